"""Figures of notebook 07 (MoEfication), drawn from ``ffnlib.related.moefication`` result tables.

Every function takes a result DataFrame (``quality_table``, ``sparsity_table``, ``expert_coherence``) and
returns a matplotlib Figure; shaded bands and error bars are the tables' bootstrap 95% intervals.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = ["plot_quality", "plot_sparsity", "plot_coherence"]

_SPLIT_COLORS = {"random": "#8c8c8c", "kmeans": "#4c72b0", "coactivation": "#dd8452"}
_ROUTER_TITLES = {"ground_truth": "ground-truth router (upper bound)", "similarity": "similarity router",
                  "mlp": "trained MLP router"}
_BASELINES = {"cats": ("CATS (threshold |act(gate·x)|)", "#55a868", "s"),
              "teal": ("TEAL (threshold |x| and |m|)", "#c44e52", "D"),
              "random": ("random memories (control)", "0.2", "x")}


def _band(ax, frame: pd.DataFrame, column: str, label: str, color, marker: str, style: str = "-") -> None:
    frame = frame.sort_values("ffn_share")
    ax.plot(frame["ffn_share"], frame[column], style, marker=marker, ms=4, color=color, label=label)
    if f"{column}_low" in frame:
        ax.fill_between(frame["ffn_share"], frame[f"{column}_low"], frame[f"{column}_high"], color=color, alpha=0.15,
                        linewidth=0)


def _draws(part: pd.DataFrame) -> str:
    """The label note " (mean of N splits)" for random experts pooled over N draws of the random split."""
    n = int(part["draws"].max()) if "draws" in part and part["draws"].notna().any() else 1
    return f" (mean of {n} splits)" if n > 1 else ""


def plot_quality(quality: pd.DataFrame, teal_reference: dict[float, float] | None = None, title: str = "") -> Figure:
    """Top-1 agreement with the dense model, perplexity ratio to the dense model and the share of the
    ``|m_i|·||v_i||`` size kept, against the share of the FFN weights read per token; one column per router.

    Every panel also shows CATS, TEAL and random memories (the control; random experts and memories are the
    mean over the random split's draws), the paper's claim (>= 95% kept at
    10-30% of the FFN, on ReLU T5) and, on the perplexity row, ``teal_reference`` ({FFN share: perplexity
    ratio} reported for Llama-3-8B).
    """
    dense = quality[quality["method"] == "dense"]
    routers = [r for r in _ROUTER_TITLES if ((quality["method"] == "experts") & (quality["router"] == r)).any()]
    rows = [("agreement", "top-1 agreement with dense"), ("perplexity_ratio", "perplexity / dense (log)"),
            ("size_kept", "share of Σ|m|·||v|| kept")]
    fig, axes = plt.subplots(len(rows), max(1, len(routers)), figsize=(4.2 * max(1, len(routers)), 9.5),
                             sharex=True, squeeze=False)
    for col, router in enumerate(routers):
        for row, (column, ylabel) in enumerate(rows):
            ax = axes[row, col]
            for split, color in _SPLIT_COLORS.items():
                part = quality[(quality["method"] == "experts") & (quality["split"] == split)
                               & (quality["router"] == router)]
                if len(part):
                    _band(ax, pd.concat([part, dense]), column, f"{split} experts{_draws(part)}", color, "o")
            for method, (label, color, marker) in _BASELINES.items():
                if method == "random":
                    part = quality[(quality["method"] == "experts") & (quality["router"] == "random")]
                else:
                    part = quality[quality["method"] == method]
                if len(part):
                    _band(ax, pd.concat([part, dense]), column, label + _draws(part), color, marker, "--")
            if column == "agreement":
                ax.axhline(0.95, color="k", lw=0.8, ls=":")
                ax.axvspan(0.10, 0.30, color="gold", alpha=0.12, label="paper: >= 95% kept at 10-30% (ReLU T5)")
                ax.set_ylim(0, 1.02)
                ax.set_title(_ROUTER_TITLES[router], fontsize=10)
            if column == "perplexity_ratio":
                ax.set_yscale("log")
                ax.axhline(1.0, color="k", lw=0.8, ls=":")
                if teal_reference:
                    xs = sorted(teal_reference)
                    ax.plot(xs, [teal_reference[x] for x in xs], "*", color="#c44e52", ms=9,
                            label="TEAL paper, Llama-3-8B (model-wide)")
            if column == "size_kept":
                ax.set_ylim(0, 1.02)
                ax.set_xlabel("share of the FFN weights read per token")
            if col == 0:
                ax.set_ylabel(ylabel)
            ax.set_xlim(0, 1.02)
            ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title or "MoEfication on a gated FFN: quality against the share of the FFN kept")
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return fig


def plot_sparsity(sparsity: pd.DataFrame, tops=(0.03, 0.1, 0.3), title: str = "") -> Figure:
    """Per layer, the share of the ``|m_i|·||v_i||`` mass carried by the top k% of memories (mean over
    tokens, 95% band), with the base rate of a random k% (dashed) and the ReLU picture of the paper."""
    fig, ax = plt.subplots(figsize=(7, 4.6))
    colors = plt.cm.viridis(np.linspace(0.1, 0.85, len(tops)))
    for top, color in zip(tops, colors):
        column = f"top_{top:g}"
        if column not in sparsity:
            continue
        ax.plot(sparsity["relative_depth"], sparsity[column], "o-", ms=3, color=color,
                label=f"top {top:.0%} of memories")
        ax.fill_between(sparsity["relative_depth"], sparsity[f"{column}_low"], sparsity[f"{column}_high"],
                        color=color, alpha=0.2, linewidth=0)
        ax.axhline(top, color=color, ls="--", lw=0.8)
    ax.axhline(1.0, color="k", ls=":", lw=0.8, label="ReLU T5-XL: top 3% carry all of it for 80% of inputs [3p]")
    ax.set_xlabel("relative depth (layer + 1) / layers")
    ax.set_ylabel("share of Σ|m_i|·||v_i|| (mean over tokens)")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.set_title(title or "How concentrated are the memories? (dashed: a random k% of memories)")
    fig.tight_layout()
    return fig


def plot_coherence(coherence: pd.DataFrame, title: str = "") -> Figure:
    """Per view (trigger topics, value tokens) and split: the share of pairs of memories of one expert that
    share a trigger topic / a top value token, with 95% intervals; random experts are the control."""
    views = list(dict.fromkeys(coherence["view"]))
    fig, axes = plt.subplots(1, max(1, len(views)), figsize=(4.5 * max(1, len(views)), 3.6), squeeze=False)
    names = {"trigger_topic": "pairs sharing their dominant trigger topic (nb 01)",
             "value_tokens": "pairs sharing a top-10 value token (nb 02)"}
    for ax, view in zip(axes[0], views):
        part = coherence[coherence["view"] == view]
        x = np.arange(len(part))
        err = np.stack([part["share"] - part["share_low"], part["share_high"] - part["share"]])
        ax.bar(x, part["share"], yerr=err, capsize=4, color=[_SPLIT_COLORS.get(s, "0.5") for s in part["split"]])
        ax.set_xticks(x, part["split"])
        ax.set_ylabel("share of pairs of memories")
        ax.set_title(names.get(view, view), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title or "Do an expert's memories belong together? (random experts: the base rate)", fontsize=10)
    fig.tight_layout()
    return fig
