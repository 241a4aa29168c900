"""ffnlib: study the feed-forward layers of a language model as key-value memories.

Reproduces Geva, Schuster, Berant & Levy (EMNLP 2021), "Transformer Feed-Forward Layers Are
Key-Value Memories", on real pretrained models. Layers, bottom up:

- ``models``, ``corpus``: load a model/tokenizer and a sentence corpus;
- ``adapters``, ``capture``: where the memories are in each architecture, and reading them in a forward pass;
- ``keys`` (Section 3), ``values`` (Section 4), ``aggregation`` (Section 5): the paper's analyses;
- ``related``: the four related papers (knowledge neurons, MoEfication, ReLU vs softmax, FF attention maps);
- ``plots``, ``widgets``: figures and notebook tools built on those results.

The workflow a notebook uses is importable from here (loaded on first use, so ``import ffnlib`` stays quick)::

    import ffnlib, torch
    from ffnlib.capture import capture
    loaded = ffnlib.load_model("smollm2-135m")
    with capture(loaded, layers=20, what=("coefficients",)) as acts:
        loaded.model(torch.tensor([loaded.encode("The Eiffel Tower is in Paris")]))
    m = acts.coefficients[20][0]                       # (tokens, memories): the coefficients m_i
"""

__version__ = "0.1.0"

import sys as _sys  # noqa: E402

if "torch" not in _sys.modules:  # the OpenMP runtime reads its wait policy once, when torch loads it
    from .threads import set_wait_policy as _set_wait_policy  # noqa: E402

    _set_wait_policy()  # passive waiting: see ffnlib.threads (OMP_WAIT_POLICY or FFNLIB_THREAD_POLICY override it)

from .errors import (CorpusError, FFNLibError, ModelNotFoundError, NotebookError, NothingToAnalyse,  # noqa: E402
                     ParameterError, ResultsError, UnsupportedModelError)

# the workflow, by module: imported when first used (PEP 562). ``capture`` is also a module's name, so the function
# is ``ffnlib.capture.capture``.
WORKFLOW = {
    "load_model": "models", "check_model": "models", "load_corpus": "corpus", "decomposition_check": "capture",
    "mine_trigger_examples": "keys", "value_logits": "values", "project_values": "values",
    "value_agreement": "values", "run_suite": "suite", "write_report": "report",
}

__all__ = ["FFNLibError", "ModelNotFoundError", "UnsupportedModelError", "CorpusError",
           "ParameterError", "ResultsError", "NotebookError", "NothingToAnalyse", "__version__", *WORKFLOW]


def __getattr__(name: str):
    if name in WORKFLOW:
        import importlib

        value = getattr(importlib.import_module(f".{WORKFLOW[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ffnlib' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(WORKFLOW))
