"""Figures of Section 4 (values represent distributions), drawn from ``ffnlib.values`` result tables.

Every function takes a table from ``ffnlib.values`` (``agreement_by_layer``, ``value_agreement``,
``agreement_by_confidence``, ``confident_values``) and returns a matplotlib Figure. The x axis is the
relative depth ((layer + 1) / n_layers) where layers are compared with the paper's 16.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..reference import relative_depth
from ..values import PAPER_UPPER_FROM

__all__ = ["plot_agreement", "plot_target_ranks", "plot_agreement_by_confidence", "plot_confident_layers"]

_SIDE = {1: "positive coefficients: v_i", -1: "negative coefficients: -v_i"}


def _signs(frame: pd.DataFrame) -> list[int]:
    return [s for s in (1, -1) if s in set(frame["sign"].tolist())]


def _depth_axis(ax, ylabel: str) -> None:
    ax.set_xlabel("relative depth (layer + 1) / layers")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1.03)
    ax.grid(alpha=0.3)


def plot_agreement(by_layer: pd.DataFrame, paper_upper_peak: float | None = 0.035, title: str = "") -> Figure:
    """Fig. 4: share of memories whose value's top token is the next token of the key's top-1 trigger.

    One panel per sign. Bars: ours per layer; line: the empirical baseline (values paired with other keys'
    triggers); dashed: the random baseline 1/|V|. ``paper_upper_peak`` draws the paper's "up to 3.5% in
    layers 11-16" over the same relative depths (None: leave it out).
    """
    signs = _signs(by_layer)
    fig, axes = plt.subplots(1, len(signs), figsize=(6.5 * len(signs), 4), squeeze=False)
    for ax, sign in zip(axes[0], signs):
        g = by_layer[by_layer["sign"] == sign].sort_values("layer")
        x = g["relative_depth"].to_numpy()
        width = 0.8 / max(len(g), 1)
        ax.bar(x, 100 * g["agreement"], width=width, color="#4c72b0", label="ours: top-1 trigger agrees")
        ax.plot(x, 100 * g["empirical_baseline"], "o-", ms=3, color="#dd8452",
                label="empirical baseline (other keys' triggers)")
        ax.axhline(100 * g["random_baseline"].iloc[0], ls="--", color="grey",
                   label=f"random baseline 1/|V| = {100 * g['random_baseline'].iloc[0]:.4f}%")
        if paper_upper_peak is not None and sign == 1:
            ax.hlines(100 * paper_upper_peak, PAPER_UPPER_FROM, 1.0, colors="k", linestyles=":",
                      label="paper: rises to 3.5% in layers 11-16")
        _depth_axis(ax, "agreement rate (%)")
        ax.set_title(_SIDE[sign], fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Do values predict the next token of their key's top trigger? (Fig. 4)")
    fig.tight_layout()
    return fig


def plot_target_ranks(per_memory: pd.DataFrame, n_layers: int, vocab_size: int, title: str = "") -> Figure:
    """Fig. 5: per layer, the distribution (box: quartiles, whiskers: 5-95%) of the rank of the key's top-1
    trigger's next token in the value's distribution (rank 0 = the value's top token), log scale."""
    signs = _signs(per_memory)
    fig, axes = plt.subplots(1, len(signs), figsize=(6.5 * len(signs), 4), squeeze=False)
    for ax, sign in zip(axes[0], signs):
        g = per_memory[(per_memory["sign"] == sign) & (per_memory["target_rank"] >= 0)]
        layers = sorted(g["layer"].unique())
        data = [g.loc[g["layer"] == layer, "target_rank"].to_numpy() + 1 for layer in layers]
        positions = relative_depth(np.array(layers), n_layers)
        if data:
            ax.boxplot(data, positions=positions, widths=0.6 / n_layers, whis=(5, 95), showfliers=False,
                       manage_ticks=False)
        ax.set_yscale("log")
        ax.axhline(vocab_size / 2, ls="--", color="grey", label=f"|V| / 2 = {vocab_size // 2} (chance median)")
        _depth_axis(ax, "rank of the next token + 1 (log)")
        ax.set_title(_SIDE[sign], fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Rank of the top trigger's next token in the value's distribution (Fig. 5)")
    fig.tight_layout()
    return fig


def plot_agreement_by_confidence(binned: pd.DataFrame, title: str = "") -> Figure:
    """Fig. 6: agreement rate against the value's maximal probability (bins of ``agreement_by_confidence``)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for sign in _signs(binned):
        g = binned[(binned["sign"] == sign) & (binned["memories"] > 0)]
        ax.plot(g["median_max_prob"], 100 * g["agreement"], "o-", ms=4, label=f"top-1 trigger agrees ({_SIDE[sign]})")
        ax.plot(g["median_max_prob"], 100 * g["any_agreeing_trigger"], "s:", ms=3,
                label=f"some top-n trigger agrees ({_SIDE[sign]})")
    ax.set_xscale("log")
    ax.set_xlabel("value's maximal probability (bin median, log)")
    ax.set_ylabel("share of memories (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "Agreement against the value's confidence (Fig. 6)")
    fig.tight_layout()
    return fig


def plot_confident_layers(confident: pd.DataFrame, n_layers: int, split: float = PAPER_UPPER_FROM,
                          title: str = "") -> Figure:
    """Where the most confident values sit: count per layer, the paper's "upper layers" region shaded."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    counts = confident["layer"].value_counts().reindex(range(n_layers), fill_value=0)
    agreeing = confident.loc[confident["n_agreeing"] > 0, "layer"].value_counts().reindex(range(n_layers),
                                                                                          fill_value=0)
    x = relative_depth(np.arange(n_layers), n_layers)
    width = 0.8 / n_layers
    ax.bar(x, counts.to_numpy(), width=width, color="#4c72b0", label="most confident values")
    ax.bar(x, agreeing.to_numpy(), width=width, color="#55a868", label="... with an agreeing top-n trigger")
    ax.axvspan(split, 1.03, color="grey", alpha=0.15, label="upper layers (paper: L11-16 of 16)")
    _depth_axis(ax, "values")
    ax.legend(fontsize=7)
    ax.set_title(title or f"The {len(confident)} most confident values, by layer (Sec. 4)")
    fig.tight_layout()
    return fig
