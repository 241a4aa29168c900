"""How the findings move with corpus size: the Section 3 and 4 measures on every snapshot of one mining pass.

Our corpus is about 1% of the paper's (WikiText-103, more than 100M tokens). Is a gap to the paper's number
the corpus or the model? The miner answers it almost for free: it mines the corpus in prefix segments that
double (250 sentences, 500, 1,000, ...; :func:`ffnlib.batching.doubling_sizes`), and its top-k state after each
is exactly what a run on that prefix alone gives (:func:`ffnlib.keys.trigger_snapshot`). Here:

- :func:`snapshot_measures`: on each snapshot, the measures of the findings that depend on the mined trigger
  examples (:data:`CORPUS_FINDINGS`), each with its 95% interval and verdict rule from the registry
  (:mod:`ffnlib.findings`). Run it on the trained model and on its random-weights control. The removal
  experiment (Fig. 3) is left out: it costs a forward pass per modified prefix, per snapshot.
- :func:`judge_by_size`: the registry's verdict at every size (trained against control).
- :func:`corpus_trends`: a straight line in log10(tokens) per finding, weighted by the intervals, with a 95%
  band, extrapolated to the paper's corpus (100M tokens). **An extrapolation from about 1% of the data**, and
  a rough one: the fit treats the sizes as independent, but they are nested prefixes of one corpus and their
  intervals come from bootstraps over the same keys or memories, so their errors are correlated and the band's
  width is not reliable (in either direction); read the line as a direction, not a forecast. A slope whose
  interval contains 0 is "no detectable trend" (with 3-6 nested sizes, weak evidence of none). Where even the
  band's favourable end stays short of the paper's number at 100M tokens, the corpus size alone does not explain
  the gap by this extrapolation. Our tokens are the model's sub-word tokens; the paper's 100M are WikiText-103's
  word-level tokens (about 1.3 sub-word tokens per word: the comparison is loose by that much).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .config import check_int
from .errors import ParameterError
from .findings import Finding, finding, judge
from .keys import TriggerExamples, key_pattern_table, section3_measures, snapshot_sizes, trigger_snapshot
from .progress import tqdm
from .stats import LEVEL, N_BOOT, Estimate, over_draws
from .values import project_values, section4_measures, target_ranks, top_trigger_targets, value_agreement

PAPER_TOKENS = 100_000_000  # the paper mined WikiText-103's training split: more than 100M tokens
# The findings whose measures depend on the mined trigger examples (the removal experiment is left out, and
# "the confident values sit in upper layers" depends on the values alone).
CORPUS_FINDINGS = ("01_keys.shallow_lower", "01_keys.semantic_upper", "02_values.agreement_lower",
                   "02_values.agreement_rise", "02_values.agreement_upper_peak", "02_values.target_rank_fall",
                   "02_values.confidence_rise", "02_values.confident_agreeing")
NO_TREND = "no detectable trend"
MEASURE_COLUMNS = ["model", "sentences", "tokens", "key", "value", "low", "high", "baseline", "baseline_low",
                   "baseline_high"]


def snapshot_measures(loaded, examples: TriggerExamples, out_dir=None, k: int | None = None, top: int = 25,
                      value_top_k: int = 10, n_boot: int = N_BOOT, seed: int = 0, model: str = "trained",
                      progress: bool = True) -> pd.DataFrame:
    """The measures of :data:`CORPUS_FINDINGS` on every snapshot of ``examples`` (mined by
    :func:`ffnlib.keys.mine_trigger_examples`; with ``out_dir``, the folder it was mined into).

    Per snapshot: Section 3's pattern measures over each key's top-``top`` triggers, and Section 4's
    agreement measures. The values' top tokens are notebook 02's projection (reused from ``out_dir`` when it
    is there); the rank of each snapshot's target (its keys' top trigger's next token) is computed for all
    snapshots in one more pass (:func:`ffnlib.values.target_ranks`). ``k``: triggers per key for the agreement (default: all mined).
    Rows: model (``model``), sentences, tokens, key (the finding), value, low, high and, for findings with a
    baseline of their own, baseline, baseline_low, baseline_high.
    """
    if not isinstance(examples, TriggerExamples):
        raise ParameterError(f"examples must be mined trigger examples (ffnlib.keys.mine_trigger_examples), got "
                             f"{type(examples).__name__}.")
    k = int(examples.manifest["k"]) if k is None else check_int("k", k)
    top = check_int("top", top)
    if 1 not in set(examples.triggers["sign"].unique().tolist()):
        raise ParameterError("The examples have no positive trigger examples (sign +1) to measure.")
    adapter = loaded.adapter
    vocab, n_layers = int(adapter.head.weight.shape[0]), adapter.n_layers
    token_counts = examples.sentences["token_ids"].map(len).to_numpy()
    sizes = snapshot_sizes(examples)
    snapshots = {size: trigger_snapshot(examples, size, out_dir) for size in sizes}
    # the values' top tokens: notebook 02's projection (the same request, so its cache when it has run); the rank
    # of every snapshot's target token in one more pass over the values
    projection = project_values(loaded, top_k=value_top_k, targets=top_trigger_targets(examples.triggers),
                                out_dir=out_dir, progress=False)
    top_tokens = projection.memories.query("sign == 1").drop(columns=["target", "target_rank"], errors="ignore")
    targets = pd.concat([top_trigger_targets(snapshot.triggers).query("sign == 1").assign(sentences=size)
                         for size, snapshot in snapshots.items()], ignore_index=True)
    ranks = target_ranks(loaded, targets).set_index(["sentences", "layer", "memory", "sign"])["target_rank"]
    rows = []
    for size in tqdm(sizes, desc=f"Snapshots ({model})", unit="snapshot", disable=not progress):
        snapshot = snapshots[size]
        s3, _ = section3_measures(None, key_pattern_table(snapshot, top=min(top, k)), n_layers, n_boot=n_boot,
                                  seed=seed)
        memories = top_tokens.join(ranks.loc[size], on=["layer", "memory", "sign"])
        memories["target_rank"] = memories["target_rank"].fillna(-1).astype("int64")
        per_memory = value_agreement(memories, snapshot.triggers[snapshot.triggers["sign"] == 1], n_triggers=k,
                                     seed=seed)
        s4, _ = section4_measures(per_memory, vocab, n_layers, sign=1, n_boot=n_boot, seed=seed)
        measured = {**{f"01_keys.{name}": e for name, e in s3.items()},
                    **{f"02_values.{name}": e for name, e in s4.items()}}
        tokens = int(token_counts[:size].sum())
        for key in CORPUS_FINDINGS:
            estimate = measured.get(key) or Estimate.missing()
            base = measured.get(f"{key}/baseline")
            rows.append({"model": model, "sentences": int(size), "tokens": tokens, "key": key,
                         "value": estimate.value, "low": estimate.low, "high": estimate.high,
                         "baseline": np.nan if base is None else base.value,
                         "baseline_low": np.nan if base is None else base.low,
                         "baseline_high": np.nan if base is None else base.high})
    return pd.DataFrame(rows, columns=MEASURE_COLUMNS)


def _estimate(row, prefix: str = "") -> Estimate | None:
    value = row[f"{prefix}value" if not prefix else prefix]
    if prefix and (value is None or (isinstance(value, float) and math.isnan(value))):
        return None
    low, high = (row["low"], row["high"]) if not prefix else (row[f"{prefix}_low"], row[f"{prefix}_high"])
    return Estimate(float(value), float(low), float(high))


def judge_by_size(measures: pd.DataFrame) -> pd.DataFrame:
    """The registry's verdict of each finding at every snapshot size: the trained model's measures (``model
    == "trained"``) against the control's (``"control"``) of the same size, where there is one (several rows of
    a size and finding: the control's random draws, combined by :func:`ffnlib.stats.over_draws`).

    Rows: sentences, tokens, key, claim, ours, control (texts with intervals), verdict."""
    missing = [c for c in MEASURE_COLUMNS if c not in measures]
    if missing:
        raise ParameterError(f"measures lacks the column(s) {missing}: give snapshot_measures(...)'s frame.")
    trained = measures[measures["model"] == "trained"]
    control = measures[measures["model"] == "control"]
    draws = {cell: group.to_dict("records") for cell, group in control.groupby(["sentences", "key"], sort=False)}
    rows = []
    for row in trained.itertuples(index=False):
        row = row._asdict()
        f = finding(row["key"])
        ours, base = _estimate(row), _estimate(row, "baseline")
        theirs = theirs_base = None
        if (row["sentences"], row["key"]) in draws:  # one row per draw of the control: their mean, over_draws
            others = draws[(row["sentences"], row["key"])]
            theirs = over_draws([_estimate(other) for other in others])
            theirs_base = over_draws([_estimate(other, "baseline") for other in others])
        rows.append({"sentences": row["sentences"], "tokens": row["tokens"], "key": row["key"], "claim": f.claim,
                     "ours": f.text(ours), "control": "no control" if theirs is None else f.text(theirs),
                     "verdict": judge(f, ours, theirs, base, theirs_base)})
    return pd.DataFrame(rows)


def _line_fit(x: np.ndarray, y: np.ndarray, se: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted least squares of y = a + b·x: the coefficients, their covariance and the two-sided 95% quantile
    to use with it. When the points scatter more than their intervals say, the covariance is inflated by the
    reduced chi-square and the quantile is Student's t with n - 2 degrees of freedom (else the normal's).
    Standard errors are floored at a tenth of the series' median non-zero one, so that a point with a zero-width
    interval (e.g. no agreeing memory at all) does not pin the line."""
    from scipy.stats import t as student_t

    positive = se[se > 0]
    floor = 0.1 * float(np.median(positive)) if len(positive) else 1e-9
    weights = 1.0 / np.maximum(se, max(floor, 1e-12)) ** 2
    design = np.stack([np.ones_like(x), x], 1)
    cov = np.linalg.inv(design.T @ (design * weights[:, None]))
    coef = cov @ (design.T @ (weights * y))
    dof = len(x) - 2
    upper = 0.5 + LEVEL / 2
    quantile = float(student_t.ppf(upper, 1e9))  # the normal's 1.96 at LEVEL = 0.95
    if dof > 0:
        chi2 = float(np.sum(weights * (y - design @ coef) ** 2)) / dof
        if chi2 > 1.0:
            cov = cov * chi2
            quantile = float(student_t.ppf(upper, dof))
    return coef, cov, quantile


def corpus_trends(measures: pd.DataFrame, model: str = "trained", paper_tokens: int = PAPER_TOKENS,
                  min_points: int = 3) -> pd.DataFrame:
    """Per finding, a line in log10(tokens) through the snapshots' measures (weighted by their intervals),
    extrapolated to ``paper_tokens``, with a 95% band (see the module docstring: an extrapolation, and the
    band is too narrow since the snapshots are nested).

    Rows: key, claim, points, slope_per_doubling (the measure's change per doubling of the corpus) with its
    95% interval, trend ("rising", "falling", or "no detectable trend": the slope's interval contains 0),
    at_paper (the line's value at ``paper_tokens``) with its band, paper_value, and reaches_paper: "yes" (the
    band's conservative end passes the paper's number in the claimed direction), "maybe" (the band contains
    it), "no" (even the band's favourable end stays short), or "no number" (the paper gives a direction only).
    The paper's number itself, not the share of it that a verdict asks (``ffnlib.findings.SIZE_SHARE``).
    Findings with fewer than ``min_points`` measured snapshots get NaN.
    """
    from scipy.stats import norm

    rows = []
    frame = measures[measures["model"] == model]
    z = float(norm.ppf(0.5 + LEVEL / 2))  # the normal's 1.96: turns an interval's width into a standard error
    for key, group in frame.groupby("key", sort=False):
        f: Finding = finding(key)
        group = group[np.isfinite(group["value"]) & np.isfinite(group["low"]) & np.isfinite(group["high"])]
        row = {"key": key, "claim": f.claim, "points": len(group), "slope_per_doubling": np.nan,
               "slope_low": np.nan, "slope_high": np.nan, "trend": "too few points", "at_paper": np.nan,
               "at_paper_low": np.nan, "at_paper_high": np.nan,
               "paper_value": f.paper_value if f.direction != "within" else float(np.mean(f.within)),
               "reaches_paper": "no number" if f.paper_value is None and f.direction != "within" else "n/a"}
        if len(group) >= min_points:
            x = np.log10(group["tokens"].to_numpy(np.float64))
            y = group["value"].to_numpy(np.float64)
            se = (group["high"] - group["low"]).to_numpy(np.float64) / (2 * z)
            coef, cov, q = _line_fit(x, y, se)
            slope, slope_se = coef[1], math.sqrt(cov[1, 1])
            per_doubling = math.log10(2)
            at = np.array([1.0, math.log10(paper_tokens)])
            centre, spread = float(at @ coef), float(q * math.sqrt(at @ cov @ at))
            row.update(slope_per_doubling=slope * per_doubling, slope_low=(slope - q * slope_se) * per_doubling,
                       slope_high=(slope + q * slope_se) * per_doubling, at_paper=centre,
                       at_paper_low=centre - spread, at_paper_high=centre + spread)
            row["trend"] = (NO_TREND if row["slope_low"] <= 0 <= row["slope_high"] else
                            "rising" if slope > 0 else "falling")
            target = row["paper_value"]
            if f.direction == "within":
                inside = f.within[0] <= row["at_paper_low"] and row["at_paper_high"] <= f.within[1]
                touches = row["at_paper_high"] >= f.within[0] and row["at_paper_low"] <= f.within[1]
                row["reaches_paper"] = "yes" if inside else "maybe" if touches else "no"
            elif f.paper_value is not None:
                sure = row["at_paper_low"] >= target if f.direction == "greater" else row["at_paper_high"] <= target
                possible = row["at_paper_high"] >= target if f.direction == "greater" else row["at_paper_low"] <= target
                row["reaches_paper"] = "yes" if sure else "maybe" if possible else "no"
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["CORPUS_FINDINGS", "PAPER_TOKENS", "NO_TREND", "snapshot_measures", "judge_by_size", "corpus_trends"]
