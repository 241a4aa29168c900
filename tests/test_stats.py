"""ffnlib.stats.two_level: the mean over groups (e.g. random expert splits) of a statistic of units (sentences),
with an interval that resamples the groups and then the units (the other helpers are tested in test_findings.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ffnlib.errors import ParameterError
from ffnlib.stats import bootstrap, two_level

def RATIO(sums: np.ndarray) -> np.ndarray:  # noqa: N802 - a share: the first column's sum over the second's
    return sums[..., 0] / sums[..., 1]


def _groups(means, n_units=60, seed=0) -> np.ndarray:
    """(groups, units, 2): per unit a 0/1 outcome and a weight of 1; the units' outcomes are shared by every group
    (crossed) up to each group's shift of its mean."""
    rng = np.random.default_rng(seed)
    base = rng.random(n_units)
    return np.stack([np.stack([(base < m).astype(float), np.ones(n_units)], 1) for m in means])


def test_with_one_group_it_is_the_units_bootstrap():
    cells = _groups([0.4])
    one, plain = two_level(cells, RATIO, "u", n_boot=300, seed=3), bootstrap(cells[0], RATIO, "u", 300, 3)
    assert (one.value, one.low, one.high, one.n) == (plain.value, plain.low, plain.high, plain.n)


def test_the_interval_widens_when_the_groups_differ_and_the_value_is_their_mean():
    same = _groups([0.5] * 5)
    apart = _groups([0.2, 0.35, 0.5, 0.65, 0.8])  # the same mean over groups, 0.5, and very different groups
    a, b = two_level(same, RATIO, "u", n_boot=500, seed=0), two_level(apart, RATIO, "u", n_boot=500, seed=0)
    assert a.value == pytest.approx(np.mean([g[:, 0].mean() for g in same]))
    assert b.value == pytest.approx(np.mean([g[:, 0].mean() for g in apart]))
    assert b.high - b.low > 1.5 * (a.high - a.low)
    assert b.low <= b.value <= b.high and b.method == "two-level bootstrap"
    again = two_level(apart, RATIO, "u", n_boot=500, seed=0)
    assert again == b and two_level(apart, RATIO, "u", n_boot=500, seed=1) != b  # seeded


def test_nested_groups_have_their_own_units_and_crossed_pairs_cancel_shared_noise():
    rng = np.random.default_rng(1)
    nested = [np.stack([(rng.random(n) < 0.3).astype(float), np.ones(n)], 1) for n in (40, 55, 70)]
    e = two_level(nested, RATIO, "experts", n_boot=400, seed=2, crossed=False)
    assert e.value == pytest.approx(np.mean([g[:, 0].mean() for g in nested])) and e.n == 165
    assert e.low < e.value < e.high
    # a paired difference: both sides in the columns, the same unit draw for both; a constant gap has no spread
    x = _groups([0.5] * 4)
    paired = np.concatenate([x, x], 2)
    paired[..., 0] += 1.0  # every unit of the first side scores 1 more
    gap = two_level(paired, lambda s: s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3], "u", n_boot=200)
    assert gap.value == pytest.approx(1.0) and gap.low == pytest.approx(1.0) and gap.high == pytest.approx(1.0)


def test_bad_input_is_a_clear_error_and_no_units_is_not_measured():
    with pytest.raises(ParameterError, match="groups, units, k"):
        two_level(np.zeros((2, 3, 4, 5)), RATIO, "u")
    with pytest.raises(ParameterError, match="seed"):
        two_level(_groups([0.5]), RATIO, "u", seed=-1)
    assert not two_level(np.zeros((2, 0, 2)), RATIO, "u").measured


def test_over_draws_one_draw_is_that_draw_and_equal_draws_keep_their_interval():
    from ffnlib.stats import Estimate, over_draws, over_draws_by_key

    one = Estimate(0.2, 0.15, 0.3, 40, "sentences", "bootstrap")
    assert over_draws([one]) is one and over_draws([None, one, Estimate.missing("sentences")]) is one
    same = over_draws([one, one, one])  # no spread between the draws: each side keeps its own half-width
    assert np.allclose([same.value, same.low, same.high], [0.2, 0.15, 0.3]) and (same.n, same.unit) == (40, "sentences")
    assert same.method == "mean of 3 draws"
    assert over_draws([None, None]) is None and not over_draws([Estimate.missing("keys")]).measured
    draws = {"a": one, "b": None}
    assert over_draws_by_key([draws]) == draws and over_draws_by_key([]) is None


def test_over_draws_widens_with_the_spread_between_draws_and_the_value_is_their_mean():
    """The BLOOM case of docs/verdicts.md: three random initialisations whose own intervals (over 4 sentences) do
    not overlap. The combined interval covers every draw, so a trained value above the first draw's interval no
    longer beats the control."""
    from ffnlib.stats import Estimate, over_draws, over_draws_by_key

    draws = [Estimate(0.0, 0.0, 0.0, 4), Estimate(0.1667, 0.125, 0.25, 4), Estimate(0.25, 0.2, 0.3, 4)]
    combined = over_draws(draws)
    assert combined.value == pytest.approx(np.mean([d.value for d in draws]))
    # t(2) * sd / sqrt(3) = 0.31 reaches past every draw's interval on both sides: kept to their span, a share >= 0
    assert (combined.low, combined.high) == (0.0, 0.3)
    ours = Estimate(0.208, 0.167, 0.292, 4)
    assert ours.low > draws[0].high and not ours.low > combined.high
    # inside the span, each side is sqrt((t * sd / sqrt(n))^2 + mean(h_i^2))
    wide = [Estimate(0.10, 0.0, 0.3), Estimate(0.15, 0.05, 0.35), Estimate(0.20, 0.1, 0.4)]
    between = 4.302652729911275 * 0.05 / np.sqrt(3)
    assert over_draws(wide).high == pytest.approx(0.15 + np.sqrt(between ** 2 + np.mean([0.2 ** 2] * 3)))
    assert over_draws(wide).low == 0.0  # 0.15 - 0.159 < 0: the span's end
    by_key = over_draws_by_key([{"x": d, "y": d} for d in draws])
    assert by_key["x"] == by_key["y"] == combined
