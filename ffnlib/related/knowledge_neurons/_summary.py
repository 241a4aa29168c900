"""The numbers notebook 06 reports: the findings' measures, each with its 95% interval and its control
(:func:`measures`), per-group means over facts (:func:`summarise`) and the per-layer curves. Every interval comes
from ``ffnlib.stats`` (a seeded bootstrap over facts, or the exact binomial interval)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ...reference import relative_depth
from ...stats import Estimate, binomial, resampled, share

__all__ = ["finite_mean", "binomial_interval", "summarise", "measures", "curves"]


def finite_mean(values, unit: str, seed: int = 0) -> Estimate:
    """The mean of the finite per-unit numbers (NaN and inf left out) with a seeded bootstrap 95% interval over
    units (``ffnlib.stats.share``); missing when none is finite."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return share(values, unit, seed=seed) if len(values) else Estimate.missing(unit)


def binomial_interval(successes: int, trials: int) -> tuple[float, float]:
    """The exact (Clopper-Pearson) 95% interval of a rate (``ffnlib.stats.binomial``); NaN without trials."""
    rate = binomial(int(successes), int(trials))
    return rate.low, rate.high


def summarise(frame: pd.DataFrame, value: str, by: Sequence[str], unit: str = "fact_id", seed: int = 0) -> pd.DataFrame:
    """Mean of ``value`` per ``by``: first averaged within each ``unit`` (the sampled unit, a fact by
    default), then over units, with a seeded bootstrap 95% interval over units (:func:`finite_mean`)."""
    rows = []
    for key, group in frame.groupby(list(by), sort=True):
        per_unit = group.groupby(unit)[value].mean()
        interval = finite_mean(per_unit.to_numpy(), str(unit), seed)
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "mean": float(per_unit.mean()),
                     "low": interval.low, "high": interval.high, "units": len(per_unit), "rows": len(group)})
    return pd.DataFrame(rows)


def _pct(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:+.1f}%"


def measures(results: Mapping[str, pd.DataFrame], n_layers: int, seed: int = 0,
             layers: Sequence[int] | None = None) -> tuple[dict[str, Estimate], dict[str, str]]:
    """The measures of the notebook's findings (``ffnlib.findings``, notebook ``06_knowledge_neurons``), each
    with a 95% interval (seeded bootstrap over facts, or exact binomial for shares of neurons), and the
    measure's own control under ``"<key>/baseline"``: as many random memories of the same layers (none of the
    fact's), the other relations' facts, or the other facts with the same answer. A random-weights model knows
    no facts, so these findings have no random-weights control: the baseline is theirs.

    ``results`` may hold: ``per_fact`` (:func:`neurons_per_fact`), ``neurons``, ``effects``
    (:func:`suppress_amplify`), ``specificity`` (its facts frame), ``same_answer``, ``values``
    (:func:`value_view`), ``triggers`` (:func:`trigger_view`), ``layers`` (:func:`layer_view`), ``edits``
    (:func:`edit_facts`, judged on ``success``: rank 1 within the perplexity bound), ``erase`` (the facts frame
    of :func:`erase_relations`). Missing ones are skipped.
    ``layers``: the attributed layers (all by default).
    """
    out: dict[str, Estimate] = {}
    details: dict[str, str] = {}
    per_fact = results.get("per_fact")
    if per_fact is not None and len(per_fact):
        counts = per_fact["n_neurons"].to_numpy(float)
        out["neurons_per_fact"] = finite_mean(counts, "facts", seed)
        details["neurons_per_fact"] = (f"{len(counts)} facts, {(counts > 0).mean():.0%} with at least one; p is "
                                       "moved per relation towards 2-5 neurons per fact (Dai's code), so the count "
                                       "is not free")
    neurons = results.get("neurons")
    if neurons is not None and len(neurons):
        attributed = np.arange(n_layers) if layers is None else np.asarray(sorted(layers))
        upper_share = float((relative_depth(attributed, n_layers) > 0.5).mean())
        if 0.0 < upper_share < 1.0:  # with only one half attributed, the share says nothing
            depth = relative_depth(neurons["layer"].to_numpy(), n_layers)
            shares = pd.Series(depth > 0.5, index=neurons["fact_id"].to_numpy()).groupby(level=0).mean()
            out["top_layers"] = finite_mean(shares.to_numpy(float), "facts", seed)
            out["top_layers/baseline"] = Estimate(upper_share, upper_share, upper_share, len(attributed), "layers",
                                                  "exact")
            details["top_layers"] = (f"per fact, the share of its neurons in the upper half; baseline: the upper "
                                     f"half's share of the {len(attributed)} attributed layers")
    effects = results.get("effects")
    if effects is not None and len(effects):
        for operation in ("suppress", "amplify"):
            for kind, key in (("knowledge", operation), ("random", f"{operation}/baseline")):
                rows = effects[(effects["operation"] == operation) & (effects["kind"] == kind)]
                if len(rows):
                    out[key] = finite_mean(rows.groupby("fact_id")["change"].mean().to_numpy(), "facts", seed)
            if operation in out:
                details[operation] = f"baseline: as many random memories of the same layers, {out[operation].n} facts"
    spec = results.get("specificity")
    if spec is not None and len(spec):
        kn = spec[spec["kind"] == "knowledge"].assign(unit=lambda f: f["suppressed"] + ":" + f["fact_id"].astype(str))
        for same, key in ((True, "relation_specific"), (False, "relation_specific/baseline")):
            rows = kn[kn["same_relation"] == same]
            if len(rows):
                out[key] = finite_mean(rows.groupby("unit")["change"].mean().to_numpy(), "facts", seed)
        details["relation_specific"] = ("answer probability of the suppressed relation's facts; baseline: other "
                                        "relations'")
    same = results.get("same_answer")
    if same is not None and len(same):
        kn = same[same["kind"] == "knowledge"]
        for group, key in (("self", "fact_specific"), ("same answer", "fact_specific/baseline")):
            rows = kn[kn["group"] == group]
            if len(rows):
                out[key] = finite_mean(rows.groupby("source_fact")["change"].mean().to_numpy(), "facts", seed)
        details["fact_specific"] = "the fact's own answer; baseline: other facts with the same answer"
    values = results.get("values")
    if values is not None and len(values):
        for kind, key in (("knowledge", "values_promote_answer"), ("random", "values_promote_answer/baseline")):
            hits = values.loc[values["kind"] == kind, "answer_rank"] < 10
            out[key] = binomial(int(hits.sum()), len(hits), "neurons")
        median = float(values.loc[values["kind"] == "knowledge", "answer_rank"].median())
        details["values_promote_answer"] = (f"median rank of the answer in the values' distributions {median:.0f}; "
                                            "baseline: random memories of the same layers")
    triggers = results.get("triggers")
    if triggers is not None and len(triggers):
        for kind, key in (("knowledge", "keys_about_subject"), ("random", "keys_about_subject/baseline")):
            hits = triggers.loc[triggers["kind"] == kind, "any_about_subject"]
            out[key] = binomial(int(hits.sum()), len(hits), "neurons")
        details["keys_about_subject"] = "a top trigger example names the subject; baseline: random same-layer memories"
    layer_table = results.get("layers")
    if layer_table is not None and "agreement" in layer_table.columns:
        both = layer_table.dropna(subset=["share", "agreement"])
        if len(both) >= 3:
            def rho(rows: np.ndarray) -> float:
                return float(pd.Series(rows[:, 0]).corr(pd.Series(rows[:, 1]), method="spearman"))

            out["layer_agreement"] = resampled(both[["share", "agreement"]].to_numpy(np.float64), rho, "layers",
                                               seed=seed)
            details["layer_agreement"] = (f"Spearman correlation over {len(both)} attributed layers between their "
                                          "share of knowledge neurons and their Section 4 agreement")
    edits = results.get("edits")
    if edits is not None and len(edits):
        for kind, key in (("knowledge", "update"), ("random", "update/baseline")):
            rate = edits.loc[edits["kind"] == kind, "success"]  # rank 1 and perplexity within the bound
            out[key] = binomial(int(rate.sum()), len(rate), "facts")
        kn, rnd = edits[edits["kind"] == "knowledge"], edits[edits["kind"] == "random"]
        details["update"] = (f"new answer at rank 1 in {kn['success_unbounded'].mean():.0%} of edits (random "
                             f"{rnd['success_unbounded'].mean():.0%}), {kn['success'].mean():.0%} with held-out "
                             f"perplexity within {kn['max_perplexity_ratio'].iloc[0]:g}x (random "
                             f"{rnd['success'].mean():.0%}); held-out perplexity {kn['heldout_ppl_before'].iloc[0]:.4g}"
                             f" -> {kn['heldout_ppl_after'].median():.4g} (median over edits; random neurons "
                             f"{rnd['heldout_ppl_after'].median():.4g}); prediction changed {kn['changed'].mean():.0%}")
    erase = results.get("erase")
    if erase is not None and len(erase):
        own = erase[erase["same_relation"]].assign(delta=lambda f: f["nll_after"] - f["nll_before"])
        for kind, key in (("knowledge", "erase"), ("random", "erase/baseline")):
            per_fact_delta = own[own["kind"] == kind].groupby("fact_id")["delta"].mean().to_numpy()
            e = finite_mean(per_fact_delta, "facts", seed)  # mean change of the answer's log-perplexity
            out[key] = Estimate(math.expm1(e.value), math.expm1(e.low), math.expm1(e.high), e.n, e.unit, e.method) \
                if e.measured else e
        other = erase[~erase["same_relation"] & (erase["kind"] == "knowledge")]
        other_change = math.expm1(float((other["nll_after"] - other["nll_before"]).mean())) if len(other) else math.nan
        details["erase"] = (f"answer perplexity of the erased relation's facts; other relations {_pct(other_change)}; "
                            "baseline: 20 random memories of the same layers")
    return out, details


def curves(layers: pd.DataFrame, n_layers: int) -> dict:
    """Per-layer series for the report (one value per layer, None where a layer was not attributed): the share
    of knowledge neurons in each layer, and Section 4's agreement when the table has it."""
    def series(column):
        values = dict(zip(layers["layer"], layers[column]))
        return [None if l not in values or pd.isna(values[l]) else float(values[l]) for l in range(n_layers)]

    out = {"kn_share": {"label": "share of knowledge neurons in the layer", "values": series("share"), "paper": None}}
    if "agreement" in layers.columns:
        out["kn_agreement"] = {"label": "Section 4 agreement of the layer (notebook 02)", "values": series("agreement"),
                               "paper": None}
    return out
