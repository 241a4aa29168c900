"""The 95% intervals of the measures: seeded bootstraps over sentences, through :func:`ffnlib.stats.bootstrap`.

Every measure is a function of sums over sentences (a mean over the sentences that have a value, a ratio of sums,
a difference of two means, a distance-matched rate), so each interval is ``ffnlib.stats.bootstrap`` of per-sentence
columns and a statistic of their resampled sums. With one seed every measure resamples the same sentences (the
same multinomial counts), so the intervals of paired differences are paired. The point values are computed by the
measures themselves, as they always were; the intervals come from here and contain them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...stats import bootstrap

__all__ = ["UNIT", "mean_columns", "mean", "difference_of_means", "interval", "mean_estimate"]

UNIT = "sentences"


def mean_columns(values) -> np.ndarray:
    """Per-sentence columns ``[value, 1]`` (``[0, 0]`` where the value is missing, NaN): the statistic
    :func:`mean` of their (resampled) sums is the mean over the sentences that have a value."""
    values = np.asarray(values, dtype=np.float64)
    present = np.isfinite(values)
    return np.stack([np.where(present, values, 0.0), present.astype(np.float64)], 1)


def mean(sums: np.ndarray) -> np.ndarray:
    """The mean of the sums of :func:`mean_columns`."""
    return sums[..., 0] / sums[..., 1]


def difference_of_means(sums: np.ndarray) -> np.ndarray:
    """The first mean minus the second, of the sums of two :func:`mean_columns` side by side."""
    return sums[..., 0] / sums[..., 1] - sums[..., 2] / sums[..., 3]


def interval(per_sentence: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], n_boot: int, seed: int,
             value: float | None = None) -> tuple[float, float]:
    """The 95% interval of ``statistic`` of the sums of ``per_sentence`` (one row per sentence, no NaN): the
    seeded percentile bootstrap of :func:`ffnlib.stats.bootstrap` (NaN where the statistic is not a number).

    ``value``: the measure's own point value. ``bootstrap`` widens the interval to contain the statistic of the
    plain sums; the measure computes the same number in its own way (e.g. ``np.nanmean``), which can differ by a
    rounding, so the interval is widened to contain ``value`` too."""
    estimate = bootstrap(per_sentence, statistic, UNIT, n_boot, seed)
    if value is None or not np.isfinite([estimate.low, estimate.high, value]).all():
        return estimate.low, estimate.high
    return min(estimate.low, float(value)), max(estimate.high, float(value))


def mean_estimate(values, n_boot: int, seed: int) -> tuple[float, float, float]:
    """The mean of per-sentence ``values`` over the sentences that have one (NaN: none), with its 95% interval."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return (value, *interval(mean_columns(values), mean, n_boot, seed, value))
