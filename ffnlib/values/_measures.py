"""The measures of Section 4's findings, each with a 95% interval (judged by ``ffnlib.findings``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..reference import PAPER_LAYERS, relative_depth
from ..stats import N_BOOT, Estimate, binomial, bootstrap, bootstrap_samples, percentile_interval, share, shift
from ._agreement import PAPER_UPPER_FROM, confident_summary, confident_values

__all__ = ["section4_measures"]


def _two_groups(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Per-unit columns [value if in the first group, 1 if in the first group, value if in the second, 1 if in
    the second]: their weighted sums give both groups' means in one bootstrap."""
    values = np.asarray(values, dtype=np.float64)
    first = np.asarray(first, dtype=bool)
    return np.stack([values * first, first, values * ~first, ~first], 1).astype(np.float64)


def _difference_of_means(s: np.ndarray) -> np.ndarray:
    return s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3]


def _median_difference(a: np.ndarray, b: np.ndarray, unit: str, n_boot: int, seed: int) -> Estimate:
    """median(a) - median(b), each group resampled on its own (a stratified bootstrap)."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if len(a) == 0 or len(b) == 0:
        return Estimate.missing(unit)

    def medians(values: np.ndarray, stream: int) -> np.ndarray:
        def of(weights):
            cum = np.cumsum(weights, axis=1)
            return values[np.argmax(cum >= cum[:, -1:] / 2, axis=1)]
        return bootstrap_samples(of, len(values), n_boot, seed * 2 + stream)

    samples = medians(a, 0) - medians(b, 1)
    value = float(np.median(a) - np.median(b))
    low, high = percentile_interval(samples)
    return Estimate(value, float(min(low, value)), float(max(high, value)), len(a) + len(b), unit, "bootstrap")


def section4_measures(per_memory: pd.DataFrame, vocab_size: int, n_layers: int, sign: int = 1,
                      n_confident: int = 100, bins: int = 10, n_boot: int = N_BOOT,
                      seed: int = 0) -> tuple[dict[str, Estimate], dict[str, str]]:
    """The measures of Section 4's findings (``ffnlib.findings``, notebook ``02_values``), each with a 95%
    interval from a seeded bootstrap over memories (exact binomial intervals for the 100 most confident
    values), and a line of detail per measure for the report. Layers are matched by relative depth: the
    paper's layers 11-16 of 16 are our layers above relative depth 10/16.
    """
    g = per_memory[per_memory["sign"] == sign]
    counted = g[g["counted"]]
    depth = relative_depth(counted["layer"].to_numpy(), n_layers)
    upper = depth > PAPER_UPPER_FROM
    agrees = counted["agrees"].to_numpy(np.float64)
    base = counted["baseline_agrees"].to_numpy(np.float64)
    unit = "memories"
    out: dict[str, Estimate] = {}
    details: dict[str, str] = {}
    pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731

    lower_excess = (agrees - base)[~upper]
    out["agreement_lower"] = share(lower_excess, unit, n_boot, seed)
    details["agreement_lower"] = (f"lower layers {pct(agrees[~upper].mean() if (~upper).any() else np.nan)} of "
                                  f"{int((~upper).sum()):,} memories, empirical baseline "
                                  f"{pct(base[~upper].mean() if (~upper).any() else np.nan)}")
    out["agreement_rise"] = bootstrap(_two_groups(agrees, upper), _difference_of_means, unit, n_boot, seed)
    details["agreement_rise"] = (f"upper {pct(agrees[upper].mean() if upper.any() else np.nan)} of "
                                 f"{int(upper.sum()):,} vs lower {pct(agrees[~upper].mean() if (~upper).any() else np.nan)}")

    # the best upper layer, found in every resample
    layers = counted["layer"].to_numpy()
    upper_layers = sorted(set(layers[upper].tolist()))
    if upper_layers:
        onehot = (layers[:, None] == np.asarray(upper_layers)[None, :]).astype(np.float64)
        columns = np.concatenate([onehot * agrees[:, None], onehot], 1)
        k = len(upper_layers)
        peak = lambda s: (s[..., :k] / s[..., k:]).max(-1)  # noqa: E731
        out["agreement_upper_peak"] = bootstrap(columns, peak, unit, n_boot, seed)
        rates = columns.sum(0)
        best = int(np.argmax(rates[:k] / rates[k:]))
        in_best = layers == upper_layers[best]
        out["agreement_upper_peak/baseline"] = share(base[in_best], unit, n_boot, seed + 1)
        details["agreement_upper_peak"] = (f"layer {upper_layers[best]} of {n_layers} ({int(in_best.sum()):,} "
                                           f"memories); random baseline 1/|V| = {100 / vocab_size:.5f}%")
    else:
        out["agreement_upper_peak"] = Estimate.missing(unit)

    if "target_rank" in g.columns:
        ranked = g[g["has_trigger"] & (g["target_rank"] >= 0)]
        rdepth = relative_depth(ranked["layer"].to_numpy(), n_layers)
        low = ranked.loc[rdepth <= 7 / PAPER_LAYERS, "target_rank"].to_numpy() / vocab_size
        high = ranked.loc[rdepth > 13 / PAPER_LAYERS, "target_rank"].to_numpy() / vocab_size
        out["target_rank_fall"] = _median_difference(low, high, unit, n_boot, seed)
        if len(low) and len(high):
            details["target_rank_fall"] = (f"median rank {np.median(low) * vocab_size:,.0f} ({pct(np.median(low))} of "
                                           f"{vocab_size:,}) in the first 7/16 of depth, "
                                           f"{np.median(high) * vocab_size:,.0f} ({pct(np.median(high))}) in the "
                                           "last 3/16")

    binned = counted.assign(_bin=pd.qcut(counted["max_prob"].rank(method="first"), bins, labels=False)
                            if len(counted) >= bins else 0)
    top_bin, bottom_bin = binned["_bin"] == binned["_bin"].max(), binned["_bin"] == binned["_bin"].min()
    both = (top_bin | bottom_bin).to_numpy()
    out["confidence_rise"] = bootstrap(_two_groups(agrees[both], top_bin.to_numpy()[both]), _difference_of_means,
                                       unit, n_boot, seed)
    details["confidence_rise"] = (f"most confident tenth {pct(agrees[top_bin.to_numpy()].mean())} vs least "
                                  f"confident tenth {pct(agrees[bottom_bin.to_numpy()].mean())}")

    confident = confident_values(g, n=n_confident, sign=sign)
    summary = confident_summary(confident, n_layers)
    n = summary["n"]
    chance = len(summary["upper_layers"]) / n_layers
    out["confident_upper"] = shift(binomial(summary["in_upper_layers"], n, "values"), chance)
    details["confident_upper"] = (f"{summary['in_upper_layers']} of {n} in layers {summary['upper_layers'][0]}-"
                                  f"{n_layers - 1} (chance {chance * n:.1f})" if summary["upper_layers"] else
                                  "no upper layers")
    out["confident_agreeing"] = binomial(summary["with_agreeing_trigger"], n, "values")
    out["confident_agreeing/baseline"] = binomial(summary["with_agreeing_trigger_baseline"], n, "values")
    details["confident_agreeing"] = (f"{summary['with_agreeing_trigger']} of {n} (with other keys' triggers: "
                                     f"{summary['with_agreeing_trigger_baseline']})")
    return out, details
