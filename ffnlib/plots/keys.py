"""Figures for Section 3 (keys capture input patterns). Each function takes result DataFrames from
``ffnlib.keys`` and returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

__all__ = ["VARIANT_COLORS", "plot_removal", "plot_pattern_measures", "plot_annotation_summary"]

VARIANT_COLORS = {"first": "tab:blue", "last": "tab:red", "random": "tab:green"}


def plot_removal(summary: pd.DataFrame, paper: dict | None = None, statistic: str = "mean_change_pct"):
    """Fig. 3 analogue: change of the memory coefficient (%) per layer when the first, last or a random
    token of the trigger prefix is removed. ``summary`` from ``keys.removal_summary`` (with
    relative_depth). ``paper``: optional ``{variant: (low, high)}`` ranges read off the paper's figure
    (unverified), drawn as dotted lines at the bottom (L1) and top (L16) layers."""
    fig, ax = plt.subplots(figsize=(7, 4))
    x = "relative_depth" if "relative_depth" in summary else "layer"
    for variant, g in summary.groupby("variant"):
        g = g.sort_values(x)
        ax.plot(g[x], g[statistic], marker="o", ms=3, label=f"remove {variant} token",
                color=VARIANT_COLORS.get(variant))
    if paper:
        for variant, (bottom, top) in paper.items():
            ax.plot([1 / 16, 1.0], [bottom, top], ls=":", color=VARIANT_COLORS.get(variant),
                    label=f"paper, {variant} (read off Fig. 3, unverified)")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("relative depth (layer / number of layers)" if x == "relative_depth" else "layer")
    ax.set_ylabel(("mean" if statistic.startswith("mean") else "median") + " change in coefficient (%)")
    ax.set_title("Removing a token from the trigger prefixes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_pattern_measures(measures: pd.DataFrame):
    """Fig. 2 analogue (automatic): shallow (shared last token / bigram) and semantic (topic
    concentration) patterns of each layer's keys, against random keys and the corpus base rate."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = measures["relative_depth"]
    left.plot(x, measures["shallow_token"], marker="o", ms=3, color="tab:blue", label="keys: shared last token")
    left.plot(x, measures["shallow_bigram"], marker="s", ms=3, color="tab:purple", label="keys: shared last bigram")
    left.axhline(measures["random_shallow_token"].iloc[0], color="tab:blue", ls="--", lw=1,
                 label="random keys: last token")
    left.axhline(measures["random_shallow_bigram"].iloc[0], color="tab:purple", ls=":", lw=1,
                 label="random keys: last bigram")
    left.set_title("Shallow patterns")
    left.set_ylabel("share of a key's triggers sharing it with >= 2 others")
    right.plot(x, measures["topic_concentration"], marker="o", ms=3, color="tab:orange",
               label="keys: most common topic share")
    right.axhline(measures["random_topic_concentration"].iloc[0], color="tab:orange", ls="--", lw=1,
                  label="random keys")
    right.axhline(measures["topic_base_rate"].iloc[0], color="gray", ls=":", lw=1,
                  label=f"corpus base rate ({measures['most_common_topic'].iloc[0]})")
    right.set_title("Semantic patterns (topic concentration)")
    right.set_ylabel("share of the most common topic")
    for ax in (left, right):
        ax.axvline(9 / 16, color="black", lw=0.5, ls="-.")
        ax.set_xlabel("relative depth (paper: shallow up to 9/16, semantic above)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_annotation_summary(per_layer: pd.DataFrame, paper_patterns: float = 3.6,
                            paper_coverage: tuple[float, float] = (0.65, 0.80)):
    """Human annotations per layer: patterns per key and share of prefixes covered, with the paper's."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    x = per_layer["relative_depth"] if "relative_depth" in per_layer else per_layer["layer"]
    left.bar(x, per_layer["patterns_per_key"], width=0.02, color="tab:blue")
    left.axhline(paper_patterns, color="black", ls="--", label=f"paper: {paper_patterns}")
    left.set_title("Patterns per key")
    right.bar(x, per_layer["coverage"], width=0.02, color="tab:green")
    right.axhspan(*paper_coverage, color="gray", alpha=0.2, label="paper: 65-80%")
    right.set_title("Share of prefixes covered by a pattern")
    right.set_ylim(0, 1)
    for ax in (left, right):
        ax.set_xlabel("relative depth")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
