"""Figures of Section 5 (aggregating memories), drawn from ``ffnlib.aggregation`` result tables.

Every function takes the per-layer summary (``AggregationResult.summary()``) or the per-example
table (``AggregationResult.frame``) and returns a matplotlib Figure. Curves are drawn against
relative depth ((layer + 1) / n_layers) so that our 30- or 18-layer models sit next to the paper's 16
layers; ``paper`` is ``ffnlib.aggregation.paper_curves()`` (omit it to draw ours only).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..aggregation import CASES

__all__ = ["plot_active_memories", "plot_zero_agreement", "plot_residual_final", "plot_residual_confidence",
           "plot_ffn_cases"]

_CASE_COLORS = {"residual": "#4c72b0", "ffn": "#dd8452", "agreement": "#55a868", "composition": "#c44e52"}


def _depth_axis(ax, ylabel: str) -> None:
    ax.set_xlabel("relative depth (layer + 1) / layers")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)


def plot_active_memories(summary: pd.DataFrame, paper_range: tuple[float, float] | None = (0.10, 0.50),
                         title: str = "") -> Figure:
    """Fig. 7: share of the d_ff memories taking part per example, under three definitions.

    ``m_i > 0`` (the paper's rule), ``|m_i| > threshold · max|m|`` (``relative``), and the 90%-norm
    number (fewest memories whose sizes |m_i|·||v_i|| carry 90% of the sum of sizes).
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    x = summary["relative_depth"]
    ax.plot(x, summary["share_positive"], "o-", ms=3, label="m_i > 0 (paper's rule)")
    ax.plot(x, summary["share_relative"], "s-", ms=3, label="|m_i| > threshold x max|m| (relative)")
    ax.plot(x, summary["share_norm"], "^-", ms=3, label="fewest memories with 90% of the sub-update sizes")
    if paper_range is not None:
        ax.axhspan(*paper_range, color="grey", alpha=0.15, label="paper: 10-50% active (Fig. 7)")
    ax.set_ylim(0, 1)
    _depth_axis(ax, "share of the layer's memories (mean over examples)")
    ax.legend(fontsize=8)
    ax.set_title(title or "Active memories per example (Fig. 7)")
    fig.tight_layout()
    return fig


def plot_zero_agreement(summary: pd.DataFrame, paper: pd.DataFrame | None = None, title: str = "") -> Figure:
    """Fig. 8: share of examples where the layer's top prediction matches no active memory's."""
    fig, ax = plt.subplots(figsize=(7, 4))
    x = summary["relative_depth"]
    ax.plot(x, summary["zero_agreement_output"], "o-", ms=3, label="ours, vs layer output (authors' code)")
    ax.plot(x, summary["zero_agreement_ffn"], "s-", ms=3, label="ours, vs FFN output (paper's text)")
    if "zero_agreement_output_positive" in summary:
        ax.plot(x, summary["zero_agreement_output_positive"], ":", color="grey",
                label="ours, vs layer output, active = m_i > 0")
    if paper is not None:
        ax.plot(paper["relative_depth"], paper["zero_agreement"], "k--", marker="x", ms=4,
                label="paper (measured from Fig. 8)")
    ax.set_ylim(0, 1.02)
    _depth_axis(ax, "share of examples with zero agreement")
    ax.legend(fontsize=8)
    ax.set_title(title or "Layer prediction vs every active memory's prediction (Fig. 8)")
    fig.tight_layout()
    return fig


def plot_residual_final(summary: pd.DataFrame, paper: pd.DataFrame | None = None, title: str = "") -> Figure:
    """Fig. 9: share of examples where the residual's top token (before the FFN) is the final prediction."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(summary["relative_depth"], summary["residual_is_final"], "o-", ms=3, label="ours")
    if paper is not None:
        ax.plot(paper["relative_depth"], paper["residual_is_final"], "k--", marker="x", ms=4,
                label="paper (measured from Fig. 9)")
    ax.set_ylim(0, 1.02)
    _depth_axis(ax, "residual top token == final prediction")
    ax.legend(fontsize=8)
    ax.set_title(title or "The residual's prediction vs the model's final prediction (Fig. 9)")
    fig.tight_layout()
    return fig


def plot_residual_confidence(frame: pd.DataFrame, n_layers: int, title: str = "") -> Figure:
    """Fig. 10: per layer, the distribution of the probability the residual gives the final token."""
    fig, ax = plt.subplots(figsize=(max(7, n_layers * 0.3), 4))
    layers = np.arange(n_layers)
    data = [frame.loc[frame["layer"] == layer, "residual_prob_final"].to_numpy() for layer in layers]
    ax.boxplot(data, positions=layers + 1, widths=0.6, showfliers=False)
    means = [d.mean() if len(d) else np.nan for d in data]
    ax.plot(layers + 1, means, "o-", ms=3, color="#c44e52", label="mean")
    ax.set_xlabel("layer (1-based)")
    ax.set_ylabel("probability of the final prediction")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "The residual's probability of the model's final prediction (Fig. 10)")
    fig.tight_layout()
    return fig


def plot_ffn_cases(summary: pd.DataFrame, title: str = "") -> Figure:
    """Fig. 11: per layer, the share of examples in each case (residual / ffn / agreement / composition)."""
    fig, ax = plt.subplots(figsize=(max(7, len(summary) * 0.3), 4))
    x = summary["layer"].to_numpy() + 1
    bottom = np.zeros(len(summary))
    for case in CASES:
        values = summary[f"case_{case}"].to_numpy()
        ax.bar(x, values, bottom=bottom, color=_CASE_COLORS[case], label=case, width=0.8)
        bottom += values
    ax.set_xlabel("layer (1-based)")
    ax.set_ylabel("share of examples")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    ax.set_title(title or "How the FFN changes the residual's prediction (Fig. 11)")
    fig.tight_layout()
    return fig
