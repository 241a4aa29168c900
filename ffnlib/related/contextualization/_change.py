"""Contextualisation change: how much a component (FF, RES, a norm) changes which input tokens each query
draws on, ``1 − Spearman ρ`` between the normalised maps before and after it, per sentence and layer."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...config import check_int
from ...errors import ParameterError
from ._layout import COMPONENTS, before_ff
from ._maps import MapsResult
from ._normalise import normalised_maps, row_starts
from ._resampling import mean_estimate

__all__ = ["CORRELATE", "check_correlate", "rank_correlation", "layer_groups", "contextualization_per_sentence",
           "contextualization_change"]


def _spearman(frame: pd.DataFrame, x: np.ndarray, y: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Spearman ρ of x and y within each run starting at ``starts`` (average ranks for ties; NaN for a run that
    is constant in x or y)."""
    group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(frame))))
    rx = pd.Series(x).groupby(group).rank().to_numpy()
    ry = pd.Series(y).groupby(group).rank().to_numpy()
    return _pearson(rx, ry, starts)


def _pearson(x: np.ndarray, y: np.ndarray, starts: np.ndarray) -> np.ndarray:
    sizes = np.diff(np.append(starts, len(x)))
    sx, sy = np.add.reduceat(x, starts), np.add.reduceat(y, starts)
    sxy, sxx, syy = np.add.reduceat(x * y, starts), np.add.reduceat(x * x, starts), np.add.reduceat(y * y, starts)
    cov = sxy - sx * sy / sizes
    var = (sxx - sx * sx / sizes) * (syy - sy * sy / sizes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 1e-24, cov / np.sqrt(np.clip(var, 1e-300, None)), np.nan)


CORRELATE = ("map", "row")


def check_correlate(correlate: str) -> str:
    if correlate not in CORRELATE:
        raise ParameterError(f"correlate must be one of {CORRELATE}, got {correlate!r}.")
    return correlate


def rank_correlation(frame: pd.DataFrame, x: np.ndarray, y: np.ndarray, correlate: str = "map") -> np.ndarray:
    """Spearman ρ of two maps for every (sentence, layer) of ``frame`` (sorted by sentence, layer, i, j):
    ``"map"``: over the flattened map (entries ``j ≤ i``); ``"row"``: within each query row with at least three
    entries, averaged over those rows (a causal map's rows have different lengths, which a flattened normalised
    map mixes into the ranks)."""
    layer_starts = row_starts(frame, ("sentence", "layer"))
    if check_correlate(correlate) == "map":
        return _spearman(frame, x, y, layer_starts)
    rows = row_starts(frame, ("sentence", "layer", "i"))
    rho = _spearman(frame, x, y, rows)
    sizes = np.diff(np.append(rows, len(frame)))
    owner = np.searchsorted(layer_starts, rows, side="right") - 1  # the (sentence, layer) of each row
    use = (sizes >= 3) & np.isfinite(rho)
    total = np.bincount(owner[use], weights=rho[use], minlength=len(layer_starts))
    count = np.bincount(owner[use], minlength=len(layer_starts))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def layer_groups(frame: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Run starts of (sentence, layer) in a frame sorted by sentence, layer, i, j, and the runs' keys."""
    starts = row_starts(frame, ("sentence", "layer"))
    keys = frame.iloc[starts][["sentence", "layer"]].reset_index(drop=True)
    return starts, keys


def _components(result: MapsResult) -> list[tuple[str, str, str]]:
    """(component, before, after) for every consecutive pair of stages any layer has, plus the whole FF block."""
    seen = []
    for layer in result.layers:
        stages = result.stages(layer)
        for before, after in zip(stages[:-1], stages[1:]):
            item = (COMPONENTS[(before, after)], before, after)
            if item not in seen:
                seen.append(item)
        block = ("FF block (FF, norms, RES)", before_ff(stages), stages[-1])
        if block not in seen:
            seen.append(block)
    return seen


def contextualization_per_sentence(result: MapsResult, normalise: str = "row", correlate: str = "map"
                                   ) -> pd.DataFrame:
    """``1 − ρ`` (Spearman, see ``correlate`` in :func:`rank_correlation`) for every sentence, layer and
    component: ``sentence``, ``layer``, ``component``, ``before``, ``after``, ``change``."""
    check_correlate(correlate)
    norm = normalised_maps(result, normalise)
    starts, keys = layer_groups(norm)
    parts = []
    for component, before, after in _components(result):
        x, y = norm[before].to_numpy(), norm[after].to_numpy()
        rho = rank_correlation(norm, x, y, correlate)
        present = ~np.isnan(x[starts]) & ~np.isnan(y[starts])  # a layer without one of the stages has NaN there
        part = keys[present].assign(component=component, before=before, after=after,
                                    change=1.0 - rho[present])
        parts.append(part)
    return pd.concat(parts, ignore_index=True)



def contextualization_change(result: MapsResult, normalise: str = "row", correlate: str = "map",
                             n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Contextualisation change by each component, per layer: ``1 − Spearman ρ`` between the maps before and
    after it, averaged over sentences, with a 95% interval (seeded bootstrap over sentences, ``ffnlib.stats``).
    Columns: ``layer``, ``component``, ``before``, ``after``, ``change``, ``low``, ``high``, ``n_sentences``."""
    per = contextualization_per_sentence(result, normalise, correlate)
    n_boot = check_int("n_boot", n_boot)
    rows = []
    for (layer, component), group in per.groupby(["layer", "component"], sort=False):
        values = np.full(len(result.sentences), np.nan)
        values[group["sentence"].to_numpy()] = group["change"].to_numpy()
        change, low, high = mean_estimate(values, n_boot, seed)
        rows.append({"layer": int(layer), "component": component, "before": group["before"].iat[0],
                     "after": group["after"].iat[0], "change": change, "low": low, "high": high,
                     "n_sentences": int(np.isfinite(values).sum())})
    return pd.DataFrame(rows).sort_values(["layer"], kind="stable").reset_index(drop=True)
