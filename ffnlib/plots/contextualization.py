"""Figures of the FFN seen through attention maps (Kobayashi et al., ICLR 2024), drawn from the result tables of
``ffnlib.related.contextualization``. Every function returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = ["plot_maps", "plot_contextualization_change", "plot_amplified_classes", "plot_cancellation"]

_COMPONENT_COLORS = {"LN (FFN input)": "#8172b2", "FF": "#dd8452", "LN (FFN output)": "#937860", "RES": "#4c72b0",
                     "LN": "#55a868", "FF block (FF, norms, RES)": "#222222"}
_CLASS_COLORS = {"subword": "#dd8452", "capitalised span": "#c44e52", "frequent bigram": "#55a868",
                 "other": "#8c8c8c"}


def plot_maps(maps: dict[int, dict[str, np.ndarray]], tokens: list[str], title: str = "",
              off_diagonal_scale: bool = True) -> Figure:
    """Heatmaps of one sentence: a row of maps (ATB, ATBFF, ATBFFRES, ATBFFRESLN) per layer, side by side.
    ``maps``: ``{layer: {stage: (n, n) array}}`` as ``contextualization.map_arrays`` returns; row i is the
    position whose vector is decomposed, column j the input token. ``off_diagonal_scale``: each map's colour scale
    ends at its largest off-diagonal entry, so that the self entries (the residual makes them dominate) saturate
    and the context is visible."""
    layers = list(maps)
    stages = list(dict.fromkeys(stage for layer in layers for stage in maps[layer]))
    n = len(tokens)
    size = max(2.6, 0.16 * n + 1.2)
    fig, axes = plt.subplots(len(layers), len(stages), figsize=(size * len(stages), size * len(layers)),
                             squeeze=False)
    labels = [t.replace("\n", "⏎")[:10] for t in tokens]
    for r, layer in enumerate(layers):
        for c, stage in enumerate(stages):
            ax = axes[r][c]
            if stage not in maps[layer]:
                ax.axis("off")
                continue
            matrix = np.where(np.tril(np.ones((n, n), dtype=bool)), maps[layer][stage], np.nan)
            shown = np.tril(matrix, -1) if off_diagonal_scale and n > 1 else matrix
            top = np.nanmax(shown) if np.isfinite(shown).any() and np.nanmax(shown) > 0 else 1.0
            ax.imshow(matrix, cmap="Blues", vmin=0, vmax=top)
            ax.set_title(f"layer {layer}: {stage}", fontsize=9)
            ax.set_xticks(range(n), labels if r == len(layers) - 1 else [""] * n, rotation=90, fontsize=6)
            ax.set_yticks(range(n), labels if c == 0 else [""] * n, fontsize=6)
    scale = "; colours end at each map's largest off-diagonal entry" if off_diagonal_scale else ""
    fig.suptitle(title or f"Contribution maps (row i: how position i shares itself among input tokens j ≤ i{scale})",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_contextualization_change(change: pd.DataFrame, title: str = "") -> Figure:
    """1 − Spearman ρ between the maps before and after each component, per layer, with 95% intervals."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for component, part in change.groupby("component", sort=False):
        part = part.sort_values("layer")
        color = _COMPONENT_COLORS.get(component)
        style = "--" if component.startswith("FF block") else "-"
        ax.plot(part["layer"], part["change"], style, marker="o", ms=3, color=color,
                label=f"{component} ({part['before'].iat[0]} → {part['after'].iat[0]})")
        ax.fill_between(part["layer"], part["low"], part["high"], color=color, alpha=0.15)
    ax.set_xlabel("layer")
    ax.set_ylabel("contextualisation change, 1 − Spearman ρ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "How much each component changes the contribution maps (mean over sentences, 95% CI)")
    fig.tight_layout()
    return fig


def plot_amplified_classes(classes: pd.DataFrame, by_layer: pd.DataFrame | None = None, top_k: int | None = None,
                           title: str = "") -> Figure:
    """The classes of the FF-amplified pairs against their base rates (bars with 95% intervals) and, with
    ``by_layer``, each class's share among the top pairs layer by layer."""
    panels = 2 if by_layer is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    names = classes["pair_class"].tolist()
    x = np.arange(len(names))
    bars = (("top", "top_share", f"top-{top_k} FF-amplified pairs" if top_k else "FF-amplified pairs", "#dd8452"),
            ("base", "base_rate", "all pairs (base rate)", "#8c8c8c"),
            ("matched", "matched_rate", "all pairs at the top pairs' distances", "#4c72b0"))
    for k, (prefix, column, label, color) in enumerate(bars):
        values = classes[column].to_numpy()
        errors = np.vstack([values - classes[f"{prefix}_low"], classes[f"{prefix}_high"] - values])
        ax.bar(x + (k - 1) * 0.27, values, 0.27, yerr=np.clip(errors, 0, None), capsize=2, color=color, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("share of pairs")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    ax.set_title("Classes of FF-amplified pairs (BOS/first token and self-pairs excluded)", fontsize=9)
    if by_layer is not None:
        ax = axes[0][1]
        for name, part in by_layer[by_layer["pair_class"] != "other"].groupby("pair_class", sort=False):
            color = _CLASS_COLORS.get(name)
            ax.plot(part["layer"], part["top_share"], "o-", ms=3, color=color, label=f"{name}: top pairs")
            ax.fill_between(part["layer"], part["top_low"], part["top_high"], color=color, alpha=0.15)
            ax.axhline(part["base_rate"].iat[0], color=color, ls=":", lw=1, label=f"{name}: base rate")
        ax.set_xlabel("layer")
        ax.set_ylabel("share among the top FF-amplified pairs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("By layer (95% CI)", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_cancellation(cancel: pd.DataFrame, title: str = "") -> Figure:
    """Left: the FFN's contextualisation change and what is left of it after RES and at the end of the layer, per
    layer. Right: the correlation of the FFN's change with the later components' change over map entries, against
    the control with the FFN's change shuffled within rows."""
    part = cancel[cancel["layer"] >= 0].sort_values("layer")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4))
    for column, label, color in (("change_ff", "FF: FFN input → FFN output", "#dd8452"),
                                 ("change_res", "FFN input → after RES", "#4c72b0"),
                                 ("change_block", "FFN input → end of the layer (RES, norms)", "#222222")):
        left.plot(part["layer"], part[column], "o-", ms=3, color=color, label=label)
        left.fill_between(part["layer"], part[f"{column}_low"], part[f"{column}_high"], color=color, alpha=0.15)
    left.set_xlabel("layer")
    left.set_ylabel("1 − Spearman ρ with the FFN's input map")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    left.set_title("Contextualisation change from the FFN's input map (95% CI)", fontsize=9)
    for column, label, color in (("pair_correlation", "FF's change vs the later change", "#c44e52"),
                                 ("control_correlation", "control: FF's change shuffled within rows", "#8c8c8c")):
        right.plot(part["layer"], part[column], "o-", ms=3, color=color, label=label)
        right.fill_between(part["layer"], part[f"{column}_low"], part[f"{column}_high"], color=color, alpha=0.15)
    right.axhline(0, color="black", lw=0.8)
    right.set_xlabel("layer")
    right.set_ylabel("Pearson r over map entries")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    right.set_title("Do RES and the norms push back on FF's change? (95% CI)", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
