"""The parameters every notebook takes, and the sizes behind each ``scale``.

Every notebook has a cell tagged ``parameters`` with at least ``model``, ``scale``, ``seed``,
``results_dir`` and ``device``, so ``papermill NB OUT -p scale ci`` always works. ``scale`` picks the
sizes below: ``"ci"`` is small and fast (tests), ``"default"`` is the main job (hours on a 2-core CPU
for the whole suite the first time; benchmarks/README.md has the measured times), ``"full"`` uses the whole of the larger corpus ``"wiki+"``: the embedded
text plus BIG-bench's English Wikipedia paragraphs (a 358 MB download the first time, ``ffnlib.corpus``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import ParameterError

__all__ = ["Scale", "SCALES", "CORE_PARAMETERS", "get_scale", "check_parameters", "check_int"]


@dataclass(frozen=True)
class Scale:
    name: str
    mining_sentences: int | None  # None: the whole training split
    top_k: int  # trigger examples kept per memory (the authors' code kept 50)
    removal_keys: int  # keys per layer in the removal experiment (paper: 100)
    aggregation_examples: int  # held-out prefixes for Section 5 (paper: 4,000)
    checkpoint_every: int  # sentences between mining checkpoints
    control_removal_keys: int  # keys per layer in the random-weights control's removal experiment
    control_aggregation_examples: int  # held-out prefixes for the control's Section 5
    corpus: str = "wiki"  # the embedded corpus: "wiki", or "wiki+" (plus BIG-bench's Wikipedia paragraphs, a download)
    # notebook 09 (contribution maps, ffnlib.related.contextualization.notebook_sizes)
    maps_sentences: int = 300  # held-out sentences decomposed
    maps_max_tokens: int = 40  # their largest token count
    maps_bigram_sentences: int = 20000  # training sentences counted for the frequent bigrams
    maps_control_sentences: int = 150  # the first sentences the random-weights control decomposes

    def as_dict(self) -> dict:
        return asdict(self)


SCALES: dict[str, Scale] = {
    "ci": Scale("ci", mining_sentences=160, top_k=50, removal_keys=10, aggregation_examples=64,
                checkpoint_every=64, control_removal_keys=10, control_aggregation_examples=64,
                maps_sentences=4, maps_max_tokens=20, maps_bigram_sentences=2000, maps_control_sentences=4),
    "default": Scale("default", mining_sentences=8000, top_k=50, removal_keys=100, aggregation_examples=4000,
                     checkpoint_every=1000, control_removal_keys=10, control_aggregation_examples=1000,
                     maps_sentences=300, maps_max_tokens=40, maps_bigram_sentences=20000, maps_control_sentences=150),
    "full": Scale("full", mining_sentences=None, top_k=50, removal_keys=100, aggregation_examples=4000,
                  checkpoint_every=2000, control_removal_keys=100, control_aggregation_examples=4000, corpus="wiki+",
                  maps_sentences=1000, maps_max_tokens=40, maps_bigram_sentences=40000, maps_control_sentences=300),
}

CORE_PARAMETERS = {"model": str, "scale": str, "seed": int, "results_dir": str, "device": str}


def get_scale(scale: str) -> Scale:
    if scale not in SCALES:
        raise ParameterError(f"Unknown scale {scale!r}: choose one of {list(SCALES)} "
                             "('ci' small and fast, 'default' for the main job, 'full' for the whole corpus).")
    return SCALES[scale]


def check_parameters(params: dict, types: dict[str, type] | None = None) -> None:
    """Check notebook parameters' types (``types`` adds a notebook's own), with a clear error."""
    expected = {**CORE_PARAMETERS, **(types or {})}
    for name, value in params.items():
        want = expected.get(name)
        if want is None or (value is None and name not in CORE_PARAMETERS):  # None: a notebook's "automatic"
            continue
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ParameterError(f"Parameter {name}={value!r} has type {type(value).__name__}; it must be "
                                 f"{want.__name__} (e.g. papermill ... -p {name} <{want.__name__}>).")
    get_scale(params.get("scale", "default"))


def check_int(name: str, value, low: int = 1) -> int:
    """``value`` as an int, or a clear error when it is not an int or is below ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"{name} must be an int, got {value!r}.")
    if value < low:
        raise ParameterError(f"{name} must be a positive int, got {value}." if low == 1 else
                             f"{name} must be >= {low}, got {value}.")
    return int(value)
