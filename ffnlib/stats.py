"""Estimates with 95% intervals: every "ours" number in a report carries one.

- :class:`Estimate`: a number, its interval, how many units it rests on and what those units are.
- :func:`bootstrap`: a seeded bootstrap over the sampled unit (sentences or keys for Section 3, memories for
  Section 4, held-out examples for Section 5). Each unit contributes a row of per-unit numbers; every
  resample is drawn as multinomial counts of the units, and ``statistic`` maps the count-weighted sums to
  the number, so a resample costs one matrix product whatever the statistic (a share, a difference of
  shares, a per-layer curve's trend). Percentile interval; the same seed gives the same interval.
- :func:`percentile_interval`: the percentile 95% interval of bootstrap samples (every interval here ends with it);
  :func:`resample_indices`: seeded resamples as unit indices (numpy's ``integers``), for tables that keep each
  resample's numbers per configuration and pair them (MoEfication's quality and sparsity tables).
- :func:`two_level`: the mean over a few groups (e.g. random splits) of a statistic of units (e.g. sentences), with
  a bootstrap that resamples the groups and then the units, so the interval covers both.
- :func:`over_draws`: the mean of one measure over several random draws of what it is measured on (e.g. random
  initialisations of the control), with an interval that covers the spread between the draws and each draw's own
  sampling; :func:`over_draws_by_key` does it for dicts of estimates.
- :func:`binomial`: the exact (Clopper-Pearson) interval of a share, where one fits (e.g. 97 of the 100 most
  confident values in the upper layers).
- :func:`spearman_with_depth`: the trend of a per-layer curve, rows of curves at once.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .errors import ParameterError

__all__ = ["LEVEL", "N_BOOT", "MAX_BOOT_CELLS", "COUNTS_CACHE_BYTES", "Estimate", "bootstrap_samples", "draw_counts",
           "cached_counts", "clear_counts_cache", "bootstrap", "percentile_interval", "resample_indices", "resampled",
           "two_level", "over_draws", "over_draws_by_key", "share", "binomial", "shift", "spearman_with_depth"]

LEVEL = 0.95  # every interval in the reports
N_BOOT = 1000  # bootstrap resamples
MAX_BOOT_CELLS = 20_000_000  # resamples x units drawn at once (bounded memory)
COUNTS_CACHE_BYTES = 128 * 2**20  # resample counts kept for reuse (see _resample_counts)
_COUNTS: OrderedDict = OrderedDict()
_COUNTS_LOCK = threading.Lock()


@dataclass(frozen=True)
class Estimate:
    """``value`` with its 95% interval [``low``, ``high``], from ``n`` ``unit`` (e.g. 4,000 "examples")."""

    value: float
    low: float
    high: float
    n: int = 0
    unit: str = ""
    method: str = ""  # "bootstrap" or "exact binomial"

    def __post_init__(self):
        if not (math.isnan(self.value) or math.isnan(self.low) or self.low <= self.value + 1e-9 * (1 + abs(self.value))):
            raise ParameterError(f"An estimate's interval must contain its value: {self.low} > {self.value}.")

    @property
    def measured(self) -> bool:
        return not math.isnan(self.value)

    def text(self, scale: float = 1.0, digits: int = 2, suffix: str = "") -> str:
        """``value [low, high]`` scaled (e.g. ``scale=100, suffix="%"``)."""
        if not self.measured:
            return "n/a"
        fmt = f"{{:.{digits}f}}"
        return (f"{fmt.format(self.value * scale)}{suffix} [{fmt.format(self.low * scale)}, "
                f"{fmt.format(self.high * scale)}]")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Estimate | None":
        return None if data is None else cls(**{k: data[k] for k in ("value", "low", "high", "n", "unit", "method")
                                                if k in data})

    @classmethod
    def missing(cls, unit: str = "") -> "Estimate":
        nan = float("nan")
        return cls(nan, nan, nan, 0, unit, "")


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"seed must be a non-negative int, got {seed!r}.")
    return int(seed)


def draw_counts(n_units: int, n_boot: int, seed: int, rows: int, stream: tuple = ()):
    """The multinomial counts of ``n_boot`` seeded resamples of ``n_units`` units, ``rows`` resamples at a time
    (``stream``: another independent sequence for the same seed, e.g. one per group of :func:`two_level`)."""
    rng = np.random.default_rng([seed, 0xB007, *stream])
    done = 0
    while done < n_boot:
        take = min(rows, n_boot - done)
        yield rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=take)
        done += take


def _resample_counts(n_units: int, n_boot: int, seed: int):
    """The counts of :func:`draw_counts`, in chunks of at most ``MAX_BOOT_CELLS`` cells.

    A report computes many measures over the same units with the same seed (every Section 4 measure resamples
    the same memories), and numpy draws a multinomial one binomial at a time (seconds for 46,080 memories x
    1,000 resamples), so the counts of recent requests are kept as small unsigned integers
    (:data:`COUNTS_CACHE_BYTES` in all) and given again: the numbers a fresh draw gives. A request larger
    than the whole cache is drawn chunk by chunk as it is used, as before (memory bounded by
    ``MAX_BOOT_CELLS``)."""
    rows = max(1, MAX_BOOT_CELLS // max(n_units, 1))
    key = (seed, n_units, n_boot, rows)
    with _COUNTS_LOCK:
        if key in _COUNTS:
            _COUNTS.move_to_end(key)
            return _COUNTS[key]
    if n_units * n_boot > COUNTS_CACHE_BYTES:
        return draw_counts(n_units, n_boot, seed, rows)
    chunks = [counts.astype(np.uint8 if counts.max(initial=0) <= 255 else np.uint32)
              for counts in draw_counts(n_units, n_boot, seed, rows)]
    with _COUNTS_LOCK:
        _COUNTS[key] = chunks
        while sum(c.nbytes for v in _COUNTS.values() for c in v) > COUNTS_CACHE_BYTES:
            _COUNTS.popitem(last=False)
    return chunks


def cached_counts() -> list[tuple[int, int, int, int]]:
    """The requests whose resample counts are kept, oldest first: ``(seed, n_units, n_boot, rows per chunk)``."""
    with _COUNTS_LOCK:
        return list(_COUNTS)


def clear_counts_cache() -> None:
    """Forget every kept resample count (the next request draws afresh: the same numbers)."""
    with _COUNTS_LOCK:
        _COUNTS.clear()


def bootstrap_samples(sums: Callable[[np.ndarray], np.ndarray], n_units: int, n_boot: int = N_BOOT,
                      seed: int = 0) -> np.ndarray:
    """``sums(weights)`` for ``n_boot`` seeded resamples of ``n_units`` units, stacked: ``weights`` is an
    (n, n_units) float64 array of multinomial counts (each row sums to ``n_units``)."""
    chunks = _resample_counts(int(n_units), int(n_boot), _check_seed(seed))
    return np.concatenate([np.asarray(sums(counts.astype(np.float64)), dtype=np.float64) for counts in chunks])


def percentile_interval(samples, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap ``samples`` (the central ``level`` of them, linear interpolation)."""
    alpha = (1 - level) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return float(low), float(high)


def resample_indices(n_units: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, n_units) unit indices of seeded resamples with replacement, from ``numpy.random.default_rng(seed)``:
    index ``values[idx]`` with them, the same resamples for every column measured on those units (paired).
    :func:`bootstrap` draws its resamples as multinomial counts instead, another stream."""
    return np.random.default_rng(_check_seed(seed)).integers(0, int(n_units), size=(int(n_boot), int(n_units)))


def _percentile_estimate(value: float, samples: np.ndarray, n: int, unit: str, method: str) -> Estimate:
    """``value`` with the percentile 95% interval of its finite bootstrap ``samples``, widened to contain it; NaN
    throughout where the value or every sample is not finite."""
    samples = samples[np.isfinite(samples)]
    if not math.isfinite(value) or len(samples) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), n, unit, "bootstrap")
    low, high = percentile_interval(samples)
    return Estimate(value, float(min(low, value)), float(max(high, value)), n, unit, method)


def bootstrap(per_unit: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], unit: str,
              n_boot: int = N_BOOT, seed: int = 0) -> Estimate:
    """The estimate of ``statistic(sums)`` with a percentile bootstrap interval over units.

    ``per_unit`` is (n_units, k): what each unit contributes (counts, indicators, values; NaN-free).
    ``statistic`` maps (..., k) weighted sums to numbers (...,): e.g. ``lambda s: s[..., 0] / s[..., 1]``
    for a share. The point value is the statistic of the plain sums.
    """
    per_unit = np.asarray(per_unit, dtype=np.float64)
    if per_unit.ndim == 1:
        per_unit = per_unit[:, None]
    n = per_unit.shape[0]
    if n == 0:
        return Estimate.missing(unit)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = float(statistic(per_unit.sum(0)[None, :])[0])
        samples = bootstrap_samples(lambda w: statistic(w @ per_unit), n, n_boot, seed)
    return _percentile_estimate(value, samples, n, unit, "bootstrap")


def resampled(rows: np.ndarray, statistic: Callable[[np.ndarray], float], unit: str, n_boot: int = N_BOOT,
              seed: int = 0) -> Estimate:
    """The estimate of ``statistic(rows)`` with a percentile bootstrap interval from resampling the rows
    (one unit each) with replacement: for statistics that are not functions of sums (e.g. a rank correlation
    over a few dozen layers). Seeded like :func:`bootstrap`."""
    rows = np.asarray(rows)
    n = len(rows)
    if n == 0:
        return Estimate.missing(unit)
    rng = np.random.default_rng([_check_seed(seed), 0xB007])
    value = float(statistic(rows))
    samples = np.array([statistic(rows[rng.integers(0, n, n)]) for _ in range(n_boot)], dtype=np.float64)
    return _percentile_estimate(value, samples, n, unit, "bootstrap")


def two_level(per_unit, statistic: Callable[[np.ndarray], np.ndarray], unit: str, n_boot: int = N_BOOT,
              seed: int = 0, crossed: bool = True) -> Estimate:
    """The mean over groups of ``statistic`` of each group's sums over its units, with a two-level percentile
    bootstrap: each resample draws the groups with replacement, then the units. Use it where the groups are
    themselves random draws (e.g. random expert splits), so the interval covers the spread between them and not
    only the sampling of units; a one-unit-level bootstrap of one group would miss the first.

    ``crossed=True``: every group is measured on the same units (e.g. each split on the same sentences), so one
    draw of the units serves every group (the draws of :func:`bootstrap`, so with one group this is
    :func:`bootstrap`); ``per_unit`` is (n_groups, n_units, k). ``crossed=False``: each group has its own units
    (e.g. each split's experts), drawn apart; ``per_unit`` is a sequence of (n_units_g, k) arrays. ``statistic``
    maps (..., k) sums to (...); for a paired difference put both sides in the ``k`` columns. The point value is
    the mean over groups of the statistic of the plain sums. ``n``: the units (crossed: of one group).
    """
    seed = _check_seed(seed)
    if crossed:
        groups = np.asarray(per_unit, dtype=np.float64)
        if groups.ndim == 2:
            groups = groups[..., None]
        if groups.ndim != 3:
            raise ParameterError(f"two_level(crossed=True) needs (groups, units, k) numbers, got {groups.shape}.")
        groups = list(groups)
    else:
        groups = [np.asarray(g, dtype=np.float64).reshape(len(g), -1) for g in per_unit]
    if not groups or any(len(g) == 0 for g in groups):
        return Estimate.missing(unit)
    n_groups = len(groups)
    n = len(groups[0]) if crossed else sum(len(g) for g in groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = float(np.mean([statistic(g.sum(0)[None, :])[0] for g in groups]))
        if crossed:  # (n_boot, n_groups): every group under the same unit weights
            per_group = bootstrap_samples(lambda w: np.stack([statistic(w @ g) for g in groups], 1), len(groups[0]),
                                          n_boot, seed)
        else:
            rows = max(1, MAX_BOOT_CELLS // max(max(len(g) for g in groups), 1))
            per_group = np.stack([np.concatenate([statistic(w.astype(np.float64) @ g) for w in
                                                  draw_counts(len(g), n_boot, seed, rows, (i + 1,))])
                                  for i, g in enumerate(groups)], 1)
        rng = np.random.default_rng([seed, 0x6209])  # the groups' draw: a stream of its own
        picks = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=int(n_boot)).astype(np.float64)
        samples = np.where(picks > 0, picks * per_group, 0.0).sum(1) / n_groups  # a group not drawn: no NaN from it
    return _percentile_estimate(value, samples, n, unit, "two-level bootstrap")


def over_draws(estimates) -> Estimate | None:
    """The mean of one measure over random draws (e.g. the control's random initialisations, each measured on the
    same units with its own 95% interval), with an interval that covers the draws and the units together.

    Each side's half-width is ``sqrt((t · s / sqrt(n))² + mean(h_i²))``: ``s`` the draws' standard deviation, ``t``
    Student's 97.5% point with n - 1 degrees of freedom, ``h_i`` draw i's own half-width on that side. The draws'
    sampling errors are taken as fully correlated (they share the units), so the interval is never narrower than a
    typical draw's own: a normal approximation, used where the estimates carry no bootstrap samples to mix (as
    :func:`two_level` does for groups it measures itself). It is then kept within the span of the draws' own
    intervals, so that it never reaches values no draw's interval reaches (a share below 0). One draw: that estimate,
    unchanged. Draws that were not measured are left out (none measured: the first estimate given, or None).

    >>> over_draws([Estimate(0.10, 0.0, 0.3), Estimate(0.15, 0.05, 0.35), Estimate(0.20, 0.1, 0.4)]).text(digits=3)
    '0.150 [0.000, 0.385]'
    """
    from scipy.stats import t as student

    given = [e for e in estimates if e is not None]
    measured = [e for e in given if e.measured]
    if not measured:
        return given[0] if given else None
    if len(measured) == 1:
        return measured[0]
    n = len(measured)
    values = np.array([e.value for e in measured])
    value = float(values.mean())
    between = float(student.ppf(0.5 + LEVEL / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
    low = value - math.sqrt(between ** 2 + float(np.mean([(e.value - e.low) ** 2 for e in measured])))
    high = value + math.sqrt(between ** 2 + float(np.mean([(e.high - e.value) ** 2 for e in measured])))
    low, high = max(low, min(e.low for e in measured)), min(high, max(e.high for e in measured))
    return Estimate(value, low, high, measured[0].n, measured[0].unit, f"mean of {n} draws")


def over_draws_by_key(draws) -> dict | None:
    """:func:`over_draws` for each key of a list of ``{key: Estimate}`` (one dict per draw; a key some draw lacks
    counts as not measured there). One draw: a copy of its dict; none: None."""
    draws = [d for d in draws if d is not None]
    if len(draws) <= 1:
        return dict(draws[0]) if draws else None
    keys = list(dict.fromkeys(k for d in draws for k in d))
    return {k: over_draws([d.get(k) for d in draws]) for k in keys}


def share(indicator, unit: str, n_boot: int = N_BOOT, seed: int = 0) -> Estimate:
    """The mean of a 0/1 (or any) per-unit number, with a bootstrap interval."""
    x = np.asarray(indicator, dtype=np.float64)
    return bootstrap(np.stack([x, np.ones_like(x)], 1), lambda s: s[..., 0] / s[..., 1], unit, n_boot, seed)


def binomial(successes: int, trials: int, unit: str = "") -> Estimate:
    """The share ``successes / trials`` with its exact (Clopper-Pearson) 95% interval."""
    from scipy.stats import beta

    if trials <= 0:
        return Estimate.missing(unit)
    alpha = 1 - LEVEL
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return Estimate(successes / trials, low, high, int(trials), unit, "exact binomial")


def shift(estimate: Estimate, by: float) -> Estimate:
    """The estimate minus a constant (e.g. a share minus its chance level)."""
    return Estimate(estimate.value - by, estimate.low - by, estimate.high - by, estimate.n, estimate.unit,
                    estimate.method)


def spearman_with_depth(curves: np.ndarray) -> np.ndarray:
    """Spearman correlation of each curve (..., n_layers) with the layer index (average ranks for ties;
    0 for a flat curve)."""
    curves = np.asarray(curves, dtype=np.float64)
    n = curves.shape[-1]
    order = curves.argsort(-1, kind="stable")
    ranks = np.empty_like(curves)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(n, dtype=np.float64), curves.shape).copy(), -1)
    # average the ranks of ties
    sorted_vals = np.take_along_axis(curves, order, -1)
    flat_vals, flat_ranks = sorted_vals.reshape(-1, n), ranks.reshape(-1, n)
    flat_order = order.reshape(-1, n)
    for row in np.flatnonzero((np.diff(flat_vals, axis=-1) == 0).any(-1)):
        vals = flat_vals[row]
        start = 0
        while start < n:
            end = start
            while end + 1 < n and vals[end + 1] == vals[start]:
                end += 1
            if end > start:
                flat_ranks[row, flat_order[row, start:end + 1]] = (start + end) / 2
            start = end + 1
    ranks = flat_ranks.reshape(curves.shape)
    depth = np.arange(n, dtype=np.float64) - (n - 1) / 2
    centred = ranks - ranks.mean(-1, keepdims=True)
    denom = np.sqrt((centred ** 2).sum(-1) * (depth ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (centred * depth).sum(-1) / denom
    return np.where(denom > 0, rho, 0.0)
