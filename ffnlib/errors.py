"""The project's own error types.

Every problem a user can cause (a bad name, a bad parameter, an unreadable file) is raised as an
:class:`FFNLibError` subclass with a message that says what was wrong and what to do. Nothing a user
types should surface as a bare ``IndexError`` or ``RuntimeError`` from inside torch.
"""

from __future__ import annotations

__all__ = ["FFNLibError", "ModelNotFoundError", "UnsupportedModelError", "CorpusError", "ParameterError",
           "ResultsError", "CheckpointError", "NotebookError", "NothingToAnalyse", "NotebookSkipped"]


class FFNLibError(Exception):
    """Base class of every error ffnlib raises on purpose."""


class ModelNotFoundError(FFNLibError):
    """The model name is neither embedded, nor a reachable/cached hub id, nor a local path."""


class UnsupportedModelError(FFNLibError):
    """The model's architecture has no adapter (or is encoder-only)."""


class CorpusError(FFNLibError):
    """The corpus is empty, unreadable, or has no sentences left after filtering."""


class ParameterError(FFNLibError, ValueError):
    """A parameter is out of range or of the wrong type."""


class ResultsError(FFNLibError):
    """A results/cache folder cannot be written, or a stored result is corrupt."""


class CheckpointError(ResultsError):
    """A training checkpoint is not a plain one (tensors, state dicts, numbers, strings, lists and dicts of those)
    or cannot be read: it is refused, never loaded, since a crafted file could run code when unpickled."""


class NotebookError(FFNLibError):
    """A notebook of the suite stopped with an error (the executed notebook shows where)."""


class NothingToAnalyse(FFNLibError):
    """The model gives a notebook nothing to analyse (e.g. it knows none of the facts): its findings are not
    measured. The suite records the reason and goes on with the next notebook."""


class NotebookSkipped(NotebookError):
    """A notebook of the suite stopped because the model gives it nothing to analyse (:class:`NothingToAnalyse`)."""
