"""Figures that put models side by side, and the paper's own numbers, on a relative depth axis."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ..reference import PAPER_LAYERS, relative_depth

__all__ = ["paper_curve", "overlay_curves"]


def paper_curve(values, label: str, ylabel: str | None = None) -> Figure:
    """The paper's per-layer numbers (its 16 layers), drawn as we draw ours."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    layers = np.arange(len(values))
    ax.plot(layers + 1, values, "s--", color="0.3")
    ax.set_xlabel("layer (paper's model, 16 layers)")
    ax.set_ylabel(ylabel or label)
    ax.set_title(f"Paper: {label}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def overlay_curves(curves: dict[str, list[float]], label: str, paper: list[float] | None = None,
                   ylabel: str | None = None) -> Figure:
    """Per-layer curves of several models (name -> values) on relative depth, with the paper's if given."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, values in curves.items():
        values = np.asarray(values, dtype=float)
        ax.plot(relative_depth(np.arange(len(values)), len(values)), values, "o-", ms=3, label=name)
    if paper is not None:
        ax.plot(relative_depth(np.arange(len(paper)), PAPER_LAYERS), paper, "s--", color="0.3", label="paper")
    ax.set_xlabel("relative depth (layer / number of layers)")
    ax.set_ylabel(ylabel or label)
    ax.set_title(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
