"""ffnlib: study the feed-forward layers of a language model as key-value memories.

Reproduces Geva, Schuster, Berant & Levy (EMNLP 2021), "Transformer Feed-Forward Layers Are
Key-Value Memories", on real pretrained models. Layers, bottom up:

- ``models``, ``corpus``: load a model/tokenizer and a sentence corpus;
- ``adapters``, ``capture``: where the memories are in each architecture, and reading them in a forward pass;
- ``keys`` (Section 3), ``values`` (Section 4), ``aggregation`` (Section 5): the paper's analyses;
- ``plots``, ``widgets``: figures and notebook tools built on those results.
"""

__version__ = "0.1.0"

from .errors import (CorpusError, FFNLibError, ModelNotFoundError, NotebookError, NothingToAnalyse,  # noqa: E402
                     ParameterError, ResultsError, UnsupportedModelError)

__all__ = ["FFNLibError", "ModelNotFoundError", "UnsupportedModelError", "CorpusError",
           "ParameterError", "ResultsError", "NotebookError", "NothingToAnalyse", "__version__"]
