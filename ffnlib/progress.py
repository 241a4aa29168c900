"""Progress bars for long steps: tqdm's widget in Jupyter, plain text when the suite runs the notebooks.

``python -m ffnlib.suite`` (``make run``) sets ``FFNLIB_PROGRESS=text`` for the notebooks it executes and
streams their output to the console, so a long step shows a text bar there (a line at most every
``FFNLIB_PROGRESS_SECONDS``, 30 by default) instead of a widget nobody sees.
"""

from __future__ import annotations

import logging
import os

__all__ = ["tqdm", "say"]

log = logging.getLogger("ffnlib")


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm``, or a plain-text ``tqdm`` under ``FFNLIB_PROGRESS=text``."""
    if os.environ.get("FFNLIB_PROGRESS") == "text":
        from tqdm.std import tqdm as text_bar

        kwargs.setdefault("mininterval", float(os.environ.get("FFNLIB_PROGRESS_SECONDS", "30")))
        return text_bar(*args, **kwargs)
    from tqdm.auto import tqdm as auto_bar

    return auto_bar(*args, **kwargs)


def say(message: str, progress: bool = True) -> None:
    """Log a message about a long step (a cached result reused, a resume), and print it when ``progress``."""
    log.info(message)
    if progress:
        print(message)
