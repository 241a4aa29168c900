"""Figure of the findings against corpus size, drawn from ``ffnlib.corpus_size`` result tables."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..corpus_size import PAPER_TOKENS
from ..findings import finding


def plot_corpus_size(measures: pd.DataFrame, trends: pd.DataFrame | None = None,
                     paper_tokens: int = PAPER_TOKENS, title: str = "") -> Figure:
    """One panel per finding: the measure (with its 95% interval) against the tokens mined, on a log axis,
    for the trained model and the random-weights control; the trained model's trend line extended to the
    paper's corpus with its band (dashed: an extrapolation); the paper's value as a star at its corpus size.

    ``measures``: :func:`ffnlib.corpus_size.snapshot_measures` rows (both models); ``trends``:
    :func:`ffnlib.corpus_size.corpus_trends` (None: no trend line).
    """
    keys = list(dict.fromkeys(measures["key"]))
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    styles = {"trained": ("C0", "o", "trained"), "control": ("C7", "s", "random-weights control")}
    for ax, key in zip(axes.flat, keys):
        f = finding(key)
        scale = 100.0 if f.percent else 1.0
        for model, (color, marker, label) in styles.items():
            part = measures[(measures["key"] == key) & (measures["model"] == model)].sort_values("tokens")
            if part.empty:
                continue
            y = part["value"].to_numpy() * scale
            err = np.stack([y - part["low"].to_numpy() * scale, part["high"].to_numpy() * scale - y])
            ax.errorbar(part["tokens"], y, yerr=np.nan_to_num(err), color=color, marker=marker, ms=4, capsize=2,
                        lw=1, label=label)
        if trends is not None and key in set(trends["key"]):
            t = trends[trends["key"] == key].iloc[0]
            part = measures[(measures["key"] == key) & (measures["model"] == "trained")]
            if np.isfinite(t["at_paper"]) and len(part):
                start = float(part["tokens"].min())
                slope = t["slope_per_doubling"] / math.log10(2)  # per decade
                xs = np.logspace(math.log10(start), math.log10(paper_tokens), 30)
                line = t["at_paper"] + slope * (np.log10(xs) - math.log10(paper_tokens))
                ax.plot(xs, line * scale, color="C0", ls="--", lw=1, label="trend (extrapolated)")
                ax.errorbar([paper_tokens], [t["at_paper"] * scale],
                            yerr=[[(t["at_paper"] - t["at_paper_low"]) * scale],
                                  [(t["at_paper_high"] - t["at_paper"]) * scale]],
                            color="C0", fmt="none", capsize=3, lw=1, alpha=0.6)
        if f.direction == "within":
            ax.axhspan(f.within[0] * scale, f.within[1] * scale, color="C2", alpha=0.15, label="paper's range")
        elif f.paper_value is not None:
            ax.plot([paper_tokens], [f.paper_value * scale], marker="*", ms=12, color="C3", ls="none",
                    label="paper (its corpus)")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("tokens mined")
        ax.set_ylabel("%" if f.percent else "value")
        ax.set_title(f"{f.claim[:48]}{'...' if len(f.claim) > 48 else ''}\n({f.section}, {f.figure or 'text'})",
                     fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    fig.suptitle(title or "Findings against corpus size (one mining pass, snapshots at every doubling)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return fig


__all__ = ["plot_corpus_size"]
