"""Maps normalised per query row (each query's contributions sum to 1), for the measures and the heatmaps."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ...errors import ParameterError
from ._decompose import Decomposition
from ._layout import MAIN_STAGES, STAGES
from ._maps import MapsResult

__all__ = ["NORMALISE", "check_normalise", "row_starts", "normalised_maps", "map_arrays"]

NORMALISE = ("row", "none")


def check_normalise(normalise: str) -> str:
    if normalise not in NORMALISE:
        raise ParameterError(f"normalise must be one of {NORMALISE}, got {normalise!r}.")
    return normalise


def row_starts(frame: pd.DataFrame, keys: Sequence[str]) -> np.ndarray:
    """Where each run of equal ``keys`` starts in ``frame`` (sorted by them)."""
    change = np.zeros(len(frame), dtype=bool)
    change[0] = True
    for key in keys:
        values = frame[key].to_numpy()
        change[1:] |= values[1:] != values[:-1]
    return np.flatnonzero(change)


def normalised_maps(result: MapsResult, normalise: str = "row") -> pd.DataFrame:
    """The maps with each query row divided by its sum (``normalise="row"``: how query ``i`` shares itself among
    the input tokens), or as they are (``"none"``); the same columns as ``result.maps``."""
    frame = result.maps
    if check_normalise(normalise) == "none" or frame.empty:
        return frame.copy()
    starts = row_starts(frame, ("sentence", "layer", "i"))
    sizes = np.diff(np.append(starts, len(frame)))
    out = frame[["sentence", "layer", "i", "j"]].copy()
    for stage in STAGES:
        values = frame[stage].to_numpy(dtype=np.float64)
        sums = np.add.reduceat(np.nan_to_num(values), starts)
        out[stage] = values / np.repeat(np.where(sums > 0, sums, 1.0), sizes)
    return out


def map_arrays(decomposition: Decomposition, sentence: int = 0, stages: Sequence[str] = MAIN_STAGES,
               normalise: str = "row") -> dict[int, dict[str, np.ndarray]]:
    """``{layer: {stage: (n, n) array}}`` of one sentence of a :class:`Decomposition`, rows normalised to sum to 1
    (``normalise="row"``), for the stages of ``stages`` each layer has (for the heatmaps)."""
    check_normalise(normalise)
    out = {}
    for layer in decomposition.layers:
        out[layer] = {}
        for stage in stages:
            if stage not in decomposition.stages[layer]:
                continue
            raw = decomposition.map(layer, stage, sentence)
            if normalise == "row":
                total = raw.sum(1, keepdims=True)
                raw = raw / np.where(total > 0, total, 1.0)
            out[layer][stage] = raw
    return out
