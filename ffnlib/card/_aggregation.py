"""The aggregation side of a card (notebook 03, on held-out text): how often the memory is active, its mean share
of the layer's update ``|m|·||v||``, and how often it is among the active memories that agree with the layer's
prediction. Read only from a per-memory Section 5 result; notebook 03 saves one row per (example, layer), so until
it saves per-memory numbers the card says so."""

from __future__ import annotations

import numpy as np

from ._part import Part
from ._percentiles import Measure

__all__ = ["PER_MEMORY_ANALYSIS", "PER_MEMORY_COLUMNS", "aggregation_part"]

# the result a per-memory Section 5 table would be cached as (its manifest's "analysis"), and its columns
PER_MEMORY_ANALYSIS = "section5-memories"
PER_MEMORY_COLUMNS = {"active_rate": "share of held-out examples where it is active",
                      "mean_update_share": "mean share of the layer's update |m|·||v||",
                      "agreeing_rate": "share of held-out examples where it agrees with the layer's prediction"}


def aggregation_part(run, layer: int, memory: int) -> Part:
    """The card's ``aggregation``, from a per-memory Section 5 result."""
    part = Part()
    names = run.find(analysis=PER_MEMORY_ANALYSIS)
    if not names:
        saved = run.summary("03_aggregation") is not None or run.find(analysis="section5-aggregation")
        part.lack("aggregation", "it saves one row per (held-out example, layer), not per-memory numbers"
                  if saved else "its Section 5 results are not in the results (and it saves no per-memory numbers)")
        return part
    rows = run.load(names[0], filters=[("layer", "==", int(layer))])
    columns = [c for c in PER_MEMORY_COLUMNS if rows is not None and c in rows.columns]
    if rows is None or memory not in set(rows["memory"]) or not columns:
        part.lack("aggregation", f"its per-memory result has no row for layer {layer}, memory {memory}")
        return part
    part.fields["aggregation"] = rows[rows["memory"] == memory][["memory", *columns]].reset_index(drop=True)
    control_names = run.find(control=True, analysis=PER_MEMORY_ANALYSIS)
    theirs = run.load(control_names[0], control=True, filters=[("layer", "==", int(layer))]) if control_names else None
    layer_rows = rows.set_index("memory")
    for column in columns:
        other = None if theirs is None or column not in theirs.columns else theirs[column].to_numpy(np.float64)
        part.measures.append(Measure("aggregation", PER_MEMORY_COLUMNS[column], 1, float(layer_rows.at[memory, column]),
                                     layer_rows[column].to_numpy(np.float64), other, "03_aggregation",
                                     None if other is not None else
                                     "run notebook 03_aggregation with control='random-init'"))
    return part
