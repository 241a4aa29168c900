"""Where one memory stands: its percentile among the memories of its layer, and among the control's.

A number on its own says little: a value's top-token probability of 0.05 is high or low only against the other
values of the layer, and against the same architecture with random weights (the suite's control,
``ffnlib.controls``). Every number of the card with a counterpart for every memory of the layer is placed both
ways: its percentile rank (in %) among the layer's memories, and among the control's memories of that layer. Ties
count half (the mid-rank), so a number most memories share, such as 0, sits in the middle and not at the top.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["Measure", "percentile", "percentile_table", "PERCENTILE_COLUMNS"]

PERCENTILE_COLUMNS = ["section", "measure", "sign", "value", "layer_percentile", "layer_memories",
                      "control_percentile", "control_memories", "notebook", "control_note"]


@dataclass
class Measure:
    """One number of the card (``value``) with the same number for every memory of the layer (``layer``) and,
    when the control's results hold it, for every memory of the control's layer (``control``)."""

    section: str
    name: str
    sign: int
    value: float
    layer: np.ndarray
    control: np.ndarray | None
    notebook: str
    control_note: str | None = None


def percentile(value: float, population) -> float:
    """The percentile rank (in %, 0-100) of ``value`` in ``population``: the share below it, plus half the share
    equal to it (NaN entries left out); NaN when ``value`` is NaN or nothing is left.

    >>> percentile(2.0, [1.0, 2.0, 3.0, 4.0])
    37.5
    """
    population = np.asarray(population, dtype=np.float64)
    population = population[np.isfinite(population)]
    if not np.isfinite(value) or population.size == 0:
        return float("nan")
    return float(100.0 * (np.mean(population < value) + 0.5 * np.mean(population == value)))


def percentile_table(measures: list[Measure]) -> pd.DataFrame:
    """One row per measure: its value, its percentile in the layer and in the control's layer (columns
    :data:`PERCENTILE_COLUMNS`). A measure this memory has no number for (a topic concentration of too few
    labelled triggers, the rank of a next token at a sentence's end) is left out."""
    rows = []
    for m in measures:
        if not np.isfinite(m.value):
            continue
        layer = np.asarray(m.layer, dtype=np.float64)
        control = None if m.control is None else np.asarray(m.control, dtype=np.float64)
        rows.append({"section": m.section, "measure": m.name, "sign": int(m.sign), "value": float(m.value),
                     "layer_percentile": percentile(m.value, layer),
                     "layer_memories": int(np.isfinite(layer).sum()),
                     "control_percentile": float("nan") if control is None else percentile(m.value, control),
                     "control_memories": 0 if control is None else int(np.isfinite(control).sum()),
                     "notebook": m.notebook, "control_note": m.control_note})
    return pd.DataFrame(rows, columns=PERCENTILE_COLUMNS)
