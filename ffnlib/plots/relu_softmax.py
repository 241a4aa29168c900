"""Figures of notebook 08 (ReLU vs softmax memories), drawn from ``ffnlib.related.relu_softmax.summary_table``.

Each function takes that table (one row per variant and slot count) and returns a matplotlib Figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

__all__ = ["STYLE", "plot_perplexity", "plot_memories"]

STYLE = {"relu": ("ReLU (the paper's FFN)", "#4c72b0", "o"), "gelu": ("GELU", "#8172b3", "v"),
         "swiglu": ("SwiGLU (a Llama block)", "#55a868", "^"), "softmax": ("softmax over the slots", "#c44e52", "s"),
         "softmax_ln": ("softmax + LayerNorm", "#dd8452", "D")}


def _lines(ax, summary: pd.DataFrame, column: str, band: tuple[str, str] | None = None) -> None:
    for variant, (label, color, marker) in STYLE.items():
        rows = summary[summary["variant"] == variant].sort_values("slots")
        if rows.empty or column not in rows or rows[column].isna().all():
            continue
        ax.plot(rows["slots"], rows[column], "-", marker=marker, ms=5, color=color, label=label)
        if band and band[0] in rows and (rows["seeds"] > 1).any():
            ax.fill_between(rows["slots"], rows[band[0]], rows[band[1]], color=color, alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("value slots per layer (d_ff)")


def plot_perplexity(summary: pd.DataFrame, title: str = "") -> Figure:
    """Held-out perplexity against the number of slots, one line per FFN variant (band: min-max across seeds)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _lines(ax, summary, "perplexity", ("ppl_min", "ppl_max"))
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title or "Held-out perplexity by FFN variant (mean over seeds; band: their range)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_memories(summary: pd.DataFrame, title: str = "") -> Figure:
    """Inside the memories: the share of Σ|m| in the top 0.2% of the slots (Shen et al.: > 85% under softmax),
    the share of active slots (m > 0), and ‖FFN output‖² / ‖residual‖² in the layers after the first (the first
    adds to the embeddings and one attention output, often orders of magnitude smaller, and its ratio would hide
    the others), against the number of slots."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("top_mass", "share of Σ|m| in the top 0.2% of slots"), ("active_share", "share of slots with m > 0"),
              ("variance_ratio_upper", "‖FFN output‖² / ‖residual‖² (log)\nin the layers after the first"))
    for ax, (column, label) in zip(axes, panels):
        _lines(ax, summary, column)
        ax.set_ylabel(label)
    axes[0].axhline(0.85, color="0.4", ls=":", lw=1)
    axes[0].text(axes[0].get_xlim()[0], 0.86, " Shen et al.: > 85% (softmax)", fontsize=7, color="0.3")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "Inside the trained memories (held-out blocks, mean over tokens, layers and seeds)")
    fig.tight_layout()
    return fig
