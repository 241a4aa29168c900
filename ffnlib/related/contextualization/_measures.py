"""The measures of notebook 09's findings, as :class:`ffnlib.stats.Estimate` objects, and the per-layer curves.

The findings and their verdict rules are declared in ``ffnlib.findings`` (notebook ``09_ff_attention_maps``); this
module only measures them. Each measure comes with a baseline of the same run; the notebook computes the same
measures on a random-weights control too (the same functions on the control model's maps), and the registry judges
ours against both.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...config import check_int
from ...stats import Estimate
from ._resampling import UNIT

__all__ = ["MEASURE_OF_CLASS", "measures", "curves"]

MEASURE_OF_CLASS = {"subword": "amplified_subword", "capitalised span": "amplified_capitalised_span",
                    "frequent bigram": "amplified_frequent_bigram"}


def _measured(value: float, low: float, high: float, n: int) -> Estimate:
    """A table's value and its interval (the ffnlib.stats bootstrap interval the measure made, which contains the
    value) as an Estimate over ``n`` sentences; missing where any of them is not a number."""
    if not np.isfinite([value, low, high]).all():
        return Estimate.missing(UNIT)
    return Estimate(float(value), float(low), float(high), int(n), UNIT, "bootstrap")


def measures(classes: pd.DataFrame, cancel: pd.DataFrame, top_k: int, seed: int = 0
             ) -> tuple[dict[str, Estimate], dict[str, str]]:
    """The measures of the notebook's findings (``ffnlib.findings``, notebook ``09_ff_attention_maps``), each with
    its 95% interval (the seeded bootstrap over sentences of :func:`amplified_classes` and :func:`cancellation`,
    run with ``seed``), and its control, a baseline of the same run, under ``"<key>/baseline"``:

    - ``amplified_subword``, ``amplified_capitalised_span``, ``amplified_frequent_bigram``: the class's share among
      the top-``top_k`` FF-amplified pairs of every sentence and layer; baseline: its share among all candidate
      pairs (its base rate). Not measured where the sample has no candidate pair of the class.
    - ``cancel_block``: ``1 − ρ`` between the map the FFN reads and the layer's last map (after RES and the next
      norm), mean over layers and sentences; baseline: ``1 − ρ`` between the FFN's input and output maps (FF's own
      change).
    - ``cancel_pairwise``: the correlation over map entries ``j < i`` of FF's change with the change RES and the
      norms make after it; baseline: the same with FF's change shuffled within each query row.

    ``classes``: :func:`amplified_classes` (pooled over layers); ``cancel``: :func:`cancellation` (its row
    ``layer = -1`` pools the layers)."""
    top_k = check_int("top_k", top_k)
    out: dict[str, Estimate] = {}
    details: dict[str, str] = {}
    for name, key in MEASURE_OF_CLASS.items():
        rows = classes[classes["pair_class"] == name]
        if not len(rows):
            continue
        row = rows.iloc[0]
        n = int(row.get("n_sentences", 0))
        if int(classes["n_top_pairs"].sum()) == 0:  # e.g. parallel blocks: the FFN reads no attention output
            out[key], out[f"{key}/baseline"] = Estimate.missing("sentences"), Estimate.missing("sentences")
            details[key] = ("the FFN amplifies no pair j < i in any layer (in a parallel block it reads the block's "
                            "input, so its map adds weight to each token itself only)")
            continue
        if row.n_candidates == 0:  # no such pair in the sample: nothing to compare
            out[key], out[f"{key}/baseline"] = Estimate.missing("sentences"), Estimate.missing("sentences")
            details[key] = f"no {name} pair among the sample's candidate pairs"
            continue
        out[key] = _measured(row.top_share, row.top_low, row.top_high, n)
        out[f"{key}/baseline"] = _measured(row.base_rate, row.base_low, row.base_high, n)
        enrichment = f"{row.enrichment:.1f}x the base rate" if np.isfinite(row.enrichment) else "no base rate"
        details[key] = (f"{int(row.n_top_pairs)} of the top-{top_k} pairs of {n} sentences x all layers ({enrichment}); "
                        f"at the top pairs' distances the base rate is {row.matched_rate:.1%} [{row.matched_low:.1%}, "
                        f"{row.matched_high:.1%}]; BOS/first position and self-pairs excluded; bootstrap seed {seed}")
    pooled_rows = cancel[cancel["layer"] == -1]
    if len(pooled_rows):
        pooled = pooled_rows.iloc[0]
        per_layer = cancel[cancel["layer"] >= 0]
        n = int(pooled.get("n_sentences", 0))
        out["cancel_block"] = _measured(pooled.change_block, pooled.change_block_low, pooled.change_block_high, n)
        out["cancel_block/baseline"] = _measured(pooled.change_ff, pooled.change_ff_low, pooled.change_ff_high, n)
        undone = int((per_layer["change_block_high"] < per_layer["change_ff_low"]).sum())
        details["cancel_block"] = (
            f"{pooled.cancellation:.0%} [{pooled.cancellation_low:.0%}, {pooled.cancellation_high:.0%}] of FF's change "
            f"undone ({pooled.cancellation_res:.0%} by RES alone); the block's change is below FF's own (95% "
            f"intervals apart) in {undone} of {len(per_layer)} layers; bootstrap seed {seed}")
        out["cancel_pairwise"] = _measured(pooled.pair_correlation, pooled.pair_correlation_low,
                                           pooled.pair_correlation_high, n)
        out["cancel_pairwise/baseline"] = _measured(pooled.control_correlation, pooled.control_correlation_low,
                                                    pooled.control_correlation_high, n)
        opposed = int((per_layer["pair_correlation_high"] < per_layer["control_correlation_low"]).sum())
        details["cancel_pairwise"] = (f"below the shuffled control in {opposed} of {len(per_layer)} layers; self "
                                      f"entries excluded; bootstrap seed {seed}")
    return out, details


def curves(change: pd.DataFrame, cancel: pd.DataFrame) -> dict:
    """Per-layer series for the report and the cross-model notebook (the paper gives no per-layer numbers)."""
    out = {}
    for component in ("FF", "RES", "LN"):
        part = change[change["component"] == component].sort_values("layer")
        if len(part):
            out[f"kobayashi_change_{component.lower()}"] = {
                "label": f"Kobayashi 2024: contextualisation change by {component} (1 - Spearman rho)",
                "values": [float(v) for v in part["change"]], "paper": None}
    part = cancel[cancel["layer"] >= 0].sort_values("layer")
    out["kobayashi_cancellation"] = {"label": "Kobayashi 2024: share of FF's change undone by RES and the norms",
                                     "values": [float(v) for v in part["cancellation"]], "paper": None}
    return out
