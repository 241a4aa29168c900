"""Figures of notebook 06 (knowledge neurons, Dai et al. 2022), drawn from ``ffnlib.related.knowledge_neurons``
result tables. Every function takes those tables and returns a matplotlib Figure; every bar or point with an
interval shows its 95% interval (bootstrap over facts, or exact binomial)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..related.knowledge_neurons import binomial_interval, summarise

__all__ = ["plot_accuracy", "plot_layers", "plot_effects", "plot_specificity", "plot_values", "plot_editing",
           "plot_lambda2_sweep"]

_KIND_COLOURS = {"knowledge": "#4c72b0", "random": "#bbbbbb"}


def _label(kind: str) -> str:
    return "knowledge neurons" if kind == "knowledge" else "random memories, same layers"


def plot_accuracy(accuracy: pd.DataFrame, title: str = "") -> Figure:
    """Per relation: the share of prompts whose answer's first token is the model's top token, and in its top
    10, and the share of facts right in at least one template (those analysed)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(accuracy))
    for offset, column, label in ((-0.27, "accuracy", "rank 1 (prompts)"), (0.0, "top10_accuracy", "top 10 (prompts)"),
                                  (0.27, "share_right_once", "right in >= 1 template (facts)")):
        ax.bar(x + offset, 100 * accuracy[column], width=0.26, label=label)
    ax.set_xticks(x, accuracy["relation"], rotation=15)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "Which facts does the model know?")
    fig.tight_layout()
    return fig


def plot_layers(layers: pd.DataFrame, negative: pd.DataFrame | None = None, title: str = "") -> Figure:
    """Knowledge neurons per layer (share of all), against a uniform spread; with Section 4's agreement by
    layer (notebook 02) on a second axis when the table has it; the negative side as a second series."""
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    x = layers["layer"].to_numpy()
    width = 0.4 if negative is not None else 0.8
    ax.bar(x - (width / 2 if negative is not None else 0), 100 * layers["share"], width=width, color="#4c72b0",
           label=f"positive side (m > 0): {int(layers['neurons'].sum())} neurons")
    if negative is not None:
        ax.bar(x + width / 2, 100 * negative["share"], width=width, color="#c44e52",
               label=f"negative side (m < 0): {int(negative['neurons'].sum())} neurons")
    ax.axhline(100 * layers["uniform"].iloc[0], ls="--", color="grey", label="uniform over layers")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of knowledge neurons (%)")
    ax.grid(axis="y", alpha=0.3)
    if "agreement" in layers.columns and layers["agreement"].notna().any():
        twin = ax.twinx()
        twin.plot(x, 100 * layers["agreement"], "o-", ms=3, color="#dd8452", label="Section 4 agreement (nb 02)")
        twin.set_ylabel("agreement (%)", color="#dd8452")
        rho = layers.attrs.get("spearman")
        if rho:
            twin.set_title(f"Spearman rho {rho['rho']:+.2f} (p = {rho['p']:.2g})", fontsize=8, loc="right")
        twin.legend(fontsize=7, loc="upper center")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title or "Where are the knowledge neurons?", loc="left")
    fig.tight_layout()
    return fig


def _bars(ax, table: pd.DataFrame, groups: list, kinds=("knowledge", "random"), pct: bool = True) -> None:
    x = np.arange(len(groups))
    scale = 100 if pct else 1
    for j, kind in enumerate(kinds):
        rows = [table[(table["group"] == g) & (table["kind"] == kind)] for g in groups]
        mean = np.array([r["mean"].iloc[0] if len(r) else np.nan for r in rows]) * scale
        low = np.array([r["low"].iloc[0] if len(r) else np.nan for r in rows]) * scale
        high = np.array([r["high"].iloc[0] if len(r) else np.nan for r in rows]) * scale
        ax.bar(x + (j - 0.5) * 0.38, mean, width=0.36, color=_KIND_COLOURS[kind],
               yerr=np.vstack([mean - low, high - mean]), capsize=3,
               label=_label(kind))
    ax.set_xticks(x, groups)
    ax.axhline(0, color="black", lw=0.8)
    ax.grid(axis="y", alpha=0.3)


def plot_effects(effects: pd.DataFrame, paper: dict | None = None, title: str = "") -> Figure:
    """Suppress and amplify: the mean relative change of the answer's probability (95% bootstrap intervals
    over facts), knowledge neurons against random memories of the same layers; ``paper``: {operation:
    (ours, baseline) in %} drawn as markers."""
    table = summarise(effects, "change", ["operation", "kind"]).rename(columns={"operation": "group"})
    groups = [g for g in ("suppress", "amplify") if g in set(table["group"])]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    _bars(ax, table, groups)
    for i, group in enumerate(groups):
        if paper and group in paper:
            ax.plot([i - 0.19, i + 0.19], paper[group], "k*", ms=9, label="Dai et al. (unverified)" if i == 0 else None)
    ax.set_ylabel("change of the answer's probability (%)")
    ax.legend(fontsize=7)
    ax.set_title(title or "Suppressing (x0) and amplifying (x2) a fact's neurons at the last position")
    fig.tight_layout()
    return fig


def plot_specificity(specificity: pd.DataFrame, same_answer: pd.DataFrame, title: str = "") -> Figure:
    """Left: suppressing a relation's neurons, effect on its own facts and on other relations' (bootstrap
    over facts). Right: suppressing one fact's neurons, effect on the fact, on other facts with the same
    answer and on facts of the same relation with another answer (bootstrap over source facts)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    if len(specificity):
        spec = specificity.assign(group=np.where(specificity["same_relation"], "own relation", "other relations"),
                                  unit=specificity["suppressed"] + ":" + specificity["fact_id"].astype(str))
        _bars(axes[0], summarise(spec, "change", ["group", "kind"], unit="unit"), ["own relation", "other relations"])
    axes[0].set_ylabel("change of the answer's probability (%)")
    axes[0].set_title("a relation's neurons suppressed (every position)", fontsize=9)
    if len(same_answer):
        groups = [g for g in ("self", "same answer", "same relation, other answer") if g in set(same_answer["group"])]
        _bars(axes[1], summarise(same_answer, "change", ["group", "kind"], unit="source_fact"), groups)
    axes[1].set_title("one fact's neurons suppressed (last position)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "Specificity: does the effect stay with the relation and with the fact?")
    fig.tight_layout()
    return fig


def plot_values(values: pd.DataFrame, triggers: pd.DataFrame | None = None, title: str = "") -> Figure:
    """The key-value view: the rank of the fact's answer in each neuron's value distribution p_i (log scale)
    against random memories of the same layers; with trigger examples, the share of neurons whose top
    triggers name the subject (exact binomial 95% intervals)."""
    panels = 2 if triggers is not None and len(triggers) else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    bins = np.logspace(0, np.log10(max(float(values["answer_rank"].max()) + 2, 10)), 30)
    for kind in ("knowledge", "random"):
        ranks = values.loc[values["kind"] == kind, "answer_rank"].to_numpy() + 1
        name = "knowledge neurons" if kind == "knowledge" else "random, same layers"
        ax.hist(ranks, bins=bins, alpha=0.6, color=_KIND_COLOURS[kind], label=f"{name} (median {np.median(ranks):.0f})")
    ax.set_xscale("log")
    ax.set_xlabel("rank of the answer in the value's distribution (1 = top)")
    ax.set_ylabel("memories")
    ax.legend(fontsize=7)
    ax.set_title("does v_i promote the answer?", fontsize=9)
    if panels == 2:
        ax = axes[0][1]
        for j, column in enumerate(("any_about_subject", "any_mentions_answer")):
            for k, kind in enumerate(("knowledge", "random")):
                hits = triggers.loc[triggers["kind"] == kind, column]
                low, high = binomial_interval(int(hits.sum()), len(hits))
                mean = hits.mean()
                ax.bar(j + (k - 0.5) * 0.38, 100 * mean, width=0.36, color=_KIND_COLOURS[kind],
                       yerr=[[100 * (mean - low)], [100 * (high - mean)]], capsize=3,
                       label=_label(kind) if j == 0 else None)
        ax.set_xticks([0, 1], ["a top trigger names\nthe subject", "a top trigger contains\nthe answer"])
        ax.set_ylabel("share of memories (%)")
        ax.legend(fontsize=7)
        ax.set_title("does k_i fire on text about the fact?", fontsize=9)
    fig.suptitle(title or "Knowledge neurons in the key-value view")
    fig.tight_layout()
    return fig


def plot_editing(edits: pd.DataFrame, erase: pd.DataFrame, paper_success: float | None = None,
                 title: str = "") -> Figure:
    """Left: fact updates, success rate (the new answer becomes the top token and held-out perplexity stays
    within the bound), the same without the bound (Dai's success, where ``paper_success`` is drawn), new answer
    in the top 5 and prediction changed, for knowledge neurons and random memories (exact binomial 95%
    intervals). Right: erasing a relation, the change of the answer's perplexity for its own facts and other
    relations', knowledge neurons against random memories."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    ax = axes[0]
    bound = f"{edits['max_perplexity_ratio'].iloc[0]:g}x" if len(edits) else "the bound"
    if len(edits):
        for k, kind in enumerate(("knowledge", "random")):
            rows = edits[edits["kind"] == kind]
            for j, column in enumerate(("success", "success_unbounded", "success_at_5", "changed")):
                hits = rows[column]
                low, high = binomial_interval(int(hits.sum()), len(hits))
                mean = hits.mean()
                ax.bar(j + (k - 0.5) * 0.38, 100 * mean, width=0.36, color=_KIND_COLOURS[kind],
                       yerr=[[100 * (mean - low)], [100 * (high - mean)]], capsize=3,
                       label=_label(kind) if j == 0 else None)
        ax.set_xticks([0, 1, 2, 3], [f"success (top,\nperplexity <= {bound})", "new answer top\n(any perplexity)",
                                     "new answer\nin top 5", "prediction\nchanged"], fontsize=8)
        if paper_success is not None:
            ax.plot([1 - 0.19], [paper_success], "k*", ms=9, label="Dai et al. (unverified)")
    ax.set_ylabel("% of facts")
    ax.legend(fontsize=7)
    setting = (f"lambda1 = {edits['lambda1'].iloc[0]:g}, lambda2 = {edits['lambda2'].iloc[0]:g}, "
               f"{edits['fact_id'].nunique()} facts" if len(edits) else "no facts")
    ax.set_title(f"updating a fact ({setting})", fontsize=9)
    ax = axes[1]
    if len(erase):
        frame = erase.assign(delta=erase["nll_after"] - erase["nll_before"],
                             group=np.where(erase["same_relation"], "own relation", "other relations"),
                             unit=erase["erased"] + ":" + erase["fact_id"].astype(str))
        table = summarise(frame, "delta", ["group", "kind"], unit="unit")
        for column in ("mean", "low", "high"):
            table[column] = np.expm1(table[column])
        _bars(ax, table, ["own relation", "other relations"])
    ax.set_ylabel("change of the answer's perplexity (%)")
    ax.set_title("erasing a relation (its top-20 neurons' values set to 0)", fontsize=9)
    fig.suptitle(title or "Editing with knowledge neurons")
    fig.tight_layout()
    return fig


def plot_lambda2_sweep(table: pd.DataFrame, title: str = "") -> Figure:
    """The fact update's trade-off (``sweep_table`` of ``lambda2_sweep``): the median held-out perplexity ratio
    after / before the edit (log x, bootstrap 95% interval over edits) against the success rate (exact binomial
    95% intervals), filled: success within the perplexity bound (dotted line), hollow: the new answer on top
    whatever the perplexity; knowledge neurons against random memories, each point labelled by its lambda2."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for kind in ("knowledge", "random"):
        rows = table[table["kind"] == kind].sort_values("lambda2")
        if rows.empty:
            continue
        x = rows["ppl_ratio"].to_numpy(float)
        xerr = np.vstack([x - rows["ppl_ratio_low"].to_numpy(float), rows["ppl_ratio_high"].to_numpy(float) - x])
        xerr = np.where(np.isfinite(xerr), np.clip(xerr, 0, None), 0)
        for column, face, style in (("success", _KIND_COLOURS[kind], "-"), ("success_unbounded", "white", ":")):
            y = 100 * rows[column].to_numpy(float)
            yerr = np.vstack([y - 100 * rows[f"{column}_low"].to_numpy(float),
                              100 * rows[f"{column}_high"].to_numpy(float) - y])
            name = "within the bound" if column == "success" else "new answer top, any perplexity"
            ax.errorbar(x, y, xerr=xerr if column == "success" else None, yerr=yerr, fmt="o" + style,
                        color=_KIND_COLOURS[kind], mfc=face, ms=7, capsize=2, lw=1, label=f"{_label(kind)}: {name}")
        for j, (xi, yi, lam) in enumerate(zip(x, 100 * rows["success"].to_numpy(float), rows["lambda2"])):
            up = kind == "knowledge"  # labels staggered (random memories' below): points often nearly coincide
            ax.annotate(f"lambda2={lam:g}", (xi, yi), textcoords="offset points", fontsize=7,
                        xytext=(5, 5 + 8 * j) if up else (5, -10 - 8 * j), color=_KIND_COLOURS[kind] if up else "grey")
    if len(table):
        ax.axvline(table["max_perplexity_ratio"].iloc[0], ls="--", color="black", lw=0.8,
                   label=f"bound: {table['max_perplexity_ratio'].iloc[0]:g}x the unedited perplexity")
    ax.set_xscale("log")
    ax.set_xlabel("held-out perplexity after / before the edit (median over edits, log)")
    ax.set_ylabel("% of edits")
    ax.set_ylim(-20 - 8 * (table["lambda2"].nunique() if len(table) else 0), 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax.set_title(title or "Fact updates: success against the damage to the model, by lambda2", fontsize=10)
    fig.tight_layout()
    return fig
