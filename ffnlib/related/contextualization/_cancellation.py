"""Cancellation: how much of the FFN's change of the maps survives RES and the norms after it, for the whole
block (the paper's comparison) and pair by pair against a shuffled control."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...config import check_int
from ._change import layer_groups, rank_correlation
from ._maps import MapsResult
from ._normalise import normalised_maps, row_starts
from ._pairs import amplification
from ._resampling import difference_of_means, interval, mean_columns, mean_estimate

__all__ = ["cancellation_per_sentence", "cancellation"]


def cancellation_per_sentence(result: MapsResult, normalise: str = "row", correlate: str = "map",
                              seed: int = 0) -> pd.DataFrame:
    """Per sentence and layer, with ``N0`` the map the FFN reads, ``N1`` its output's map and ``N2`` the layer's
    last map (after RES and the next norm; after RES where the layer has no next norm): ``change_ff`` =
    1 − ρ(N0, N1), ``change_res`` = 1 − ρ(N0, map after RES), ``change_block`` = 1 − ρ(N0, N2) (Spearman, see
    :func:`rank_correlation`); ``pair_correlation``: the Pearson correlation, over the map entries ``j < i`` (self
    entries left out), of the FFN's change ``N1 − N0`` with the later components' change ``N2 − N1`` (negative:
    they push back pair by pair);
    ``control_correlation``: the same with the FFN's change shuffled among the off-diagonal entries of each query
    row (seeded; the self entry keeps its own), which keeps its size and each row's total but not which pairs
    it concerns."""
    norm = normalised_maps(result, normalise)
    _, keys = layer_groups(norm)
    n0 = amplification(result, normalise)["before"].to_numpy()
    n1 = norm["ATBFF"].to_numpy()
    res = norm["ATBFFRES"].to_numpy()
    last = norm["ATBFFRESLN"].to_numpy().copy()
    missing = np.isnan(last)
    last[missing] = res[missing]
    change, rest = n1 - n0, last - n1
    rng = np.random.default_rng(seed)
    rows = row_starts(norm, ("sentence", "layer", "i"))
    row_group = np.repeat(np.arange(len(rows)), np.diff(np.append(rows, len(norm))))
    diagonal = norm["i"].to_numpy() == norm["j"].to_numpy()
    order = np.lexsort((rng.random(len(norm)), diagonal, row_group))  # a random order within (row, diagonal)
    shuffled = np.empty_like(change)
    shuffled[np.lexsort((np.arange(len(norm)), diagonal, row_group))] = change[order]
    starts = row_starts(norm, ("sentence", "layer"))
    frame = keys.copy()
    frame["change_ff"] = 1 - rank_correlation(norm, n0, n1, correlate)
    frame["change_res"] = 1 - rank_correlation(norm, n0, res, correlate)
    frame["change_block"] = 1 - rank_correlation(norm, n0, last, correlate)
    # pair by pair: over the entries j < i only (the self entries' large, opposite changes would dominate)
    group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(norm))))
    off = ~diagonal
    frame["pair_correlation"] = _pearson_groups(change[off], rest[off], group[off], len(starts))
    frame["control_correlation"] = _pearson_groups(shuffled[off], rest[off], group[off], len(starts))
    return frame


def _pearson_groups(x: np.ndarray, y: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Pearson r of x and y within each group (ids 0..n_groups-1; NaN for a group with fewer than 2 entries or
    no variance)."""
    def total(values):
        return np.bincount(group, weights=values, minlength=n_groups)

    size = np.bincount(group, minlength=n_groups).astype(float)
    sx, sy, sxy, sxx, syy = total(x), total(y), total(x * y), total(x * x), total(y * y)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / size
        var = (sxx - sx * sx / size) * (syy - sy * sy / size)
        return np.where((size > 1) & (var > 1e-24), cov / np.sqrt(np.clip(var, 1e-300, None)), np.nan)


def cancellation(result: MapsResult, normalise: str = "row", correlate: str = "map", n_boot: int = 1000,
                 seed: int = 0) -> pd.DataFrame:
    """How much of the FFN's contextualisation change RES and the norms undo, per layer and over all layers
    (``layer = -1``: each sentence's mean over layers). The paper's comparison: the change of the whole block
    from the FFN's input map (``change_block``) against the FFN's own change (``change_ff``); ``cancellation =
    1 − Σ change_block / Σ change_ff`` over sentences (1: the layer's output map is back at the FFN's input map;
    0: the FFN's change survives whole; negative: RES and the norms add to it), ``cancellation_res`` the same
    after RES only. And whether the later change opposes the FFN's pair by pair: ``pair_correlation`` against
    ``control_correlation`` (see :func:`cancellation_per_sentence`). Every value has a 95% interval (seeded
    bootstrap over sentences, ``ffnlib.stats``); ``block_minus_ff_*`` and ``correlation_difference_*`` are paired
    intervals."""
    n_boot = check_int("n_boot", n_boot)
    per = cancellation_per_sentence(result, normalise, correlate, seed)
    n_sent = len(result.sentences)
    columns = ["change_ff", "change_res", "change_block", "pair_correlation", "control_correlation"]
    groups = [(int(layer), part) for layer, part in per.groupby("layer")]
    groups.append((-1, per.groupby("sentence", as_index=False)[columns].mean()))
    rows = []
    for layer, part in groups:
        values = {c: np.full(n_sent, np.nan) for c in columns}
        for c in columns:
            values[c][part["sentence"].to_numpy()] = part[c].to_numpy()

        def ratio(num):
            return 1 - np.nansum(values[num], axis=-1) / np.nansum(values["change_ff"], axis=-1)

        row = {"layer": layer, "n_sentences": int(np.isfinite(values["change_ff"]).sum())}
        with np.errstate(invalid="ignore", divide="ignore"):
            for c in columns:
                row[c], row[f"{c}_low"], row[f"{c}_high"] = mean_estimate(values[c], n_boot, seed)
            for name, num in (("cancellation", "change_block"), ("cancellation_res", "change_res")):
                row[name] = float(ratio(num))
                sums = np.stack([np.nan_to_num(values[num]), np.nan_to_num(values["change_ff"])], 1)
                row[f"{name}_low"], row[f"{name}_high"] = interval(sums, _one_minus_ratio, n_boot, seed, row[name])
            for name, first, second in (("block_minus_ff", "change_block", "change_ff"),
                                        ("correlation_difference", "pair_correlation", "control_correlation")):
                paired = np.hstack([mean_columns(values[first]), mean_columns(values[second])])
                row[f"{name}_low"], row[f"{name}_high"] = interval(paired, difference_of_means, n_boot, seed)
        rows.append(row)
    return pd.DataFrame(rows)


def _one_minus_ratio(sums: np.ndarray) -> np.ndarray:
    """``1 − Σ first / Σ second`` (the share of the FFN's change undone)."""
    return 1 - sums[..., 0] / sums[..., 1]
