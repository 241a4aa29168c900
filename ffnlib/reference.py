"""The paper's reported numbers, kept in ``data/paper/*.json`` with their source.

Each file holds entries like ``{"value": ..., "source": "Sec. 4, Fig. 4", "note": "read off the figure"}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import ParameterError

__all__ = ["DATA_DIR", "PAPER_LAYERS", "paper_reference", "relative_depth"]

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
PAPER_LAYERS = 16  # the paper's model had 16 layers


def paper_reference(section: str) -> dict:
    """The reference entries for one section (``"section3"``, ``"section4"``, ``"section5"``)."""
    path = DATA_DIR / "paper" / f"{section}.json"
    if not path.exists():
        available = sorted(p.stem for p in (DATA_DIR / "paper").glob("*.json"))
        raise ParameterError(f"No paper reference {section!r}; available: {available}.")
    return json.loads(path.read_text())


def relative_depth(layer, n_layers: int):
    """Layer index (0-based) -> relative depth in (0, 1]: layer l of L sits at (l + 1) / L.

    Used to put models with different layer counts (ours: 30 and 18; the paper's: 16) on one axis.
    """
    return (np.asarray(layer) + 1) / n_layers
