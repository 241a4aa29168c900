"""The aggregation side of a card (notebook 03, on held-out text): how often the memory is active, its mean share
of the layer's update ``|m|·||v||``, and how often it is active and agrees with the layer's prediction; read from
notebook 03's per-memory table (``ffnlib.participation``)."""

from __future__ import annotations

import numpy as np

from ..participation import MEMORY_ANALYSIS, MEMORY_COLUMNS
from ._part import Part
from ._percentiles import Measure

__all__ = ["PER_MEMORY_ANALYSIS", "PER_MEMORY_COLUMNS", "aggregation_part"]

# kept under the card's names: the per-memory Section 5 result (its manifest's "analysis") and its columns
PER_MEMORY_ANALYSIS = MEMORY_ANALYSIS
PER_MEMORY_COLUMNS = MEMORY_COLUMNS


def _found(run, control: bool) -> str | None:
    summary = run.summary("03_aggregation") or {}
    manifests = ((summary.get("control") or {}) if control else summary).get("manifests") or {}
    names = run.find(manifests["memories"], control=control) if manifests.get("memories") else []
    names = names or run.find(control=control, analysis=MEMORY_ANALYSIS)
    return names[0] if names else None


def aggregation_part(run, layer: int, memory: int) -> Part:
    """The card's ``aggregation``, from notebook 03's per-memory table (and its control's, for percentiles)."""
    part = Part()
    name = _found(run, control=False)
    if name is None:
        saved = run.summary("03_aggregation") is not None or run.find(analysis="section5-aggregation")
        part.lack("aggregation", "its per-memory table (ffnlib.participation) is not in the results; the run's "
                                 "notebook 03 is older than it" if saved else
                  "its Section 5 results are not in the results")
        return part
    rows = run.load(name, filters=[("layer", "==", int(layer))])
    columns = [c for c in MEMORY_COLUMNS if rows is not None and c in rows.columns]
    if rows is None or memory not in set(rows["memory"]) or not columns:
        part.lack("aggregation", f"its per-memory result has no row for layer {layer}, memory {memory}")
        return part
    keep = ["memory", *columns, *(["n_examples"] if "n_examples" in rows.columns else [])]
    part.fields["aggregation"] = rows[rows["memory"] == memory][keep].reset_index(drop=True)
    part.notes["aggregation"] = ("notebook 03's held-out examples (ffnlib.participation): agreeing = active and its "
                                 "own top token is the layer output's")
    control_name = _found(run, control=True)
    theirs = run.load(control_name, control=True, filters=[("layer", "==", int(layer))]) if control_name else None
    layer_rows = rows.set_index("memory")
    for column in columns:
        other = None if theirs is None or column not in theirs.columns else theirs[column].to_numpy(np.float64)
        part.measures.append(Measure("aggregation", MEMORY_COLUMNS[column], 1, float(layer_rows.at[memory, column]),
                                     layer_rows[column].to_numpy(np.float64), other, "03_aggregation",
                                     None if other is not None else
                                     "run notebook 03_aggregation with control='random-init'"))
    return part
