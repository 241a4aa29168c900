"""The findings registry, its verdict rules, the intervals behind them and the random-weights control."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from ffnlib import ParameterError
from ffnlib.findings import ARCHITECTURAL, FINDINGS, Finding, finding, findings_rows, judge
from ffnlib.reference import paper_reference
from ffnlib.stats import Estimate, binomial, bootstrap, share, spearman_with_depth

GREATER = Finding("t.x", "Sec. 4", "Fig. 4", "x rises", "3.5%", "greater", paper_value=0.035)
WITH_BASELINE = dataclasses.replace(GREATER, key="t.y", baseline=True)
RANGE = Finding("t.r", "Sec. 5", "Fig. 7", "10-50% active", "10-50%", "within", within=(0.1, 0.5))


def est(value: float, half_width: float) -> Estimate:
    return Estimate(value, value - half_width, value + half_width, 100, "units", "test")


# ---- the verdict rules on constructed numbers ---------------------------------------------------------
def test_significantly_above_the_control_at_the_papers_size_holds():
    assert judge(GREATER, est(0.030, 0.005), est(0.0, 0.002)) == "holds"


def test_same_direction_but_far_smaller_is_partly():
    assert judge(GREATER, est(0.010, 0.002), est(0.0, 0.002)) == "partly"  # 1% of the paper's 3.5%
    # half the paper's size is the line, read at the interval's conservative end
    assert judge(GREATER, est(0.0180, 0.0004), est(0.0, 0.001)) == "holds"
    assert judge(GREATER, est(0.0180, 0.0010), est(0.0, 0.001)) == "partly"


def test_equal_to_the_control_both_above_chance_is_architectural():
    assert judge(GREATER, est(0.03, 0.004), est(0.031, 0.004)) == ARCHITECTURAL
    # with a baseline of their own: both beat it, neither beats the other
    assert judge(WITH_BASELINE, est(0.3, 0.02), est(0.31, 0.02), est(0.1, 0.01), est(0.1, 0.01)) == ARCHITECTURAL


def test_architectural_needs_ours_at_the_size_that_holds_asks():
    """wiki-relu-lm's zero agreement: 13% of examples against the paper's 84%, the control 92%. Both are above 0, but
    ours is nowhere near the paper's size: that does not hold, whatever the control shows. At the size, a control
    showing the effect as strongly or more makes it architectural."""
    zero_agreement = Finding("t.z", "Sec. 5", "Fig. 8", "no active memory agrees", "84%", "greater", paper_value=0.84)
    assert judge(zero_agreement, est(0.134, 0.005), est(0.916, 0.003)) == "does not hold"
    assert judge(zero_agreement, est(0.134, 0.005), est(0.13, 0.005)) == "does not hold"
    assert judge(zero_agreement, est(0.60, 0.01), est(0.916, 0.003)) == ARCHITECTURAL
    assert judge(zero_agreement, est(0.80, 0.01), est(0.80, 0.01)) == ARCHITECTURAL
    assert judge(zero_agreement, est(0.80, 0.01), est(0.30, 0.01)) == "holds"
    assert "architectural if the control is above 0.00% as well and ours reaches that size" in zero_agreement.rule()


@pytest.mark.parametrize("ours, control", [(est(0.03, 0.01), est(0.015, 0.01)), (est(0.05, 0.02), est(0.0, 0.035)),
                                           (est(0.04, 0.001), est(0.039, 0.001))])
def test_overlapping_intervals_never_hold(ours, control):
    assert ours.low <= control.high  # the intervals overlap
    assert judge(GREATER, ours, control) != "holds"
    assert judge(WITH_BASELINE, ours, control, est(0.0, 0.001), est(0.0, 0.001)) != "holds"


def test_no_effect_does_not_hold_and_the_other_direction_neither():
    assert judge(GREATER, est(0.0, 0.002), est(0.0, 0.002)) == "does not hold"
    assert judge(GREATER, est(-0.02, 0.002), est(0.0, 0.002)) == "does not hold"


def test_a_baseline_must_be_beaten_too():
    """Above the control but not above its own base rate (the stop-word case): not "holds"."""
    assert judge(WITH_BASELINE, est(0.25, 0.02), est(0.03, 0.01), est(0.24, 0.01), est(0.02, 0.01)) \
        == "does not hold"
    assert judge(WITH_BASELINE, est(0.30, 0.01), est(0.03, 0.01), est(0.2, 0.01), est(0.02, 0.01)) == "holds"


def test_less_direction_and_ranges():
    less = dataclasses.replace(GREATER, direction="less", paper_value=None)
    assert judge(less, est(-0.3, 0.05), est(-0.1, 0.05)) == "holds"
    assert judge(less, est(-0.3, 0.05), est(-0.3, 0.05)) == ARCHITECTURAL
    assert judge(RANGE, est(0.3, 0.05), est(0.7, 0.05)) == "holds"
    assert judge(RANGE, est(0.3, 0.05), est(0.3, 0.05)) == ARCHITECTURAL
    assert judge(RANGE, est(0.48, 0.05), est(0.7, 0.05)) == "partly"  # overlaps the range's edge
    assert judge(RANGE, est(0.8, 0.05), est(0.3, 0.05)) == "does not hold"


def test_missing_numbers_are_not_measured():
    assert judge(GREATER, None, est(0.0, 0.01)) == "not measured"
    assert judge(GREATER, Estimate.missing(), est(0.0, 0.01)) == "not measured"
    assert judge(finding("01_keys.patterns_per_key"), est(3.0, 0.5), est(0.0, 0.1)) == "not measured"
    assert judge(WITH_BASELINE, est(0.3, 0.01), est(0.0, 0.01), None, est(0.0, 0.01)) == "not measured"


def test_without_a_control_the_baseline_decides_and_nothing_is_architectural():
    assert judge(GREATER, est(0.03, 0.005), None) == "holds"
    assert judge(GREATER, est(0.0, 0.005), None) == "does not hold"


def test_a_stated_reach_replaces_half_the_papers_size():
    """A claim that little is lost: the size asked is stated (at most twice the paper's loss), in either direction."""
    cost = Finding("t.cost", "x", "", "c", "p", "less", baseline=True, reach=0.04, reach_note="twice 2%",
                   controlled=False)
    random_memories = est(19.0, 0.5)
    assert judge(cost, est(0.03, 0.005), None, random_memories) == "holds"
    assert judge(cost, est(0.05, 0.005), None, random_memories) == "partly"  # below random memories, too costly
    assert judge(cost, est(0.038, 0.005), None, random_memories) == "partly"  # its upper end passes 4%
    kept = dataclasses.replace(cost, direction="greater", reach=0.90)
    assert judge(kept, est(0.95, 0.01), None, est(0.8, 0.01)) == "holds"
    assert judge(kept, est(0.905, 0.01), None, est(0.8, 0.01)) == "partly"
    assert "at most 4.00% (twice 2%)" in cost.rule() and "control" not in cost.rule()
    assert "architectural" not in cost.rule()  # judged against its own baseline only


# ---- the registry ---------------------------------------------------------------------------------------
def test_registry_is_declared_once_with_rules_in_words():
    keys = [f.key for f in FINDINGS]
    assert len(keys) == len(set(keys))
    assert {f.notebook for f in FINDINGS} >= {"01_keys", "02_values", "03_aggregation"}
    for f in FINDINGS:
        assert f.rule() and f.claim and f.paper and f.section
    # the paper's numbers are those of data/paper/
    assert finding("02_values.agreement_upper_peak").paper_value == paper_reference("section4")[
        "agreement_upper_peak"]["value"] / 100
    assert finding("03_aggregation.stop_words_output").paper_value == paper_reference("section5")[
        "agreeing_stop_words"]["value"] / 100
    assert finding("02_values.confident_agreeing").paper_value == paper_reference("section4")[
        "confident_with_agreeing_trigger"]["value"] / 100
    with pytest.raises(ValueError):
        Finding("t.z", "Sec. 1", "", "c", "p", "within")  # a range claim needs its range


def test_rows_carry_numbers_intervals_control_and_rule():
    ours = {"agreement_rise": est(0.02, 0.002), "agreement_upper_peak": est(0.03, 0.002),
            "agreement_upper_peak/baseline": est(0.001, 0.001)}
    control = {"agreement_rise": est(0.0, 0.001), "agreement_upper_peak": est(0.002, 0.001),
               "agreement_upper_peak/baseline": est(0.001, 0.001)}
    rows = {r["key"]: r for r in findings_rows("02_values", ours, control, {"agreement_rise": "upper vs lower"},
                                               "random-init-x")}
    rise = rows["02_values.agreement_rise"]
    assert rise["verdict"] == "holds" and rise["ours"] == "2.00% [1.80, 2.20]" and rise["ours_detail"] == \
        "upper vs lower"
    assert rise["control"] == "0.00% [-0.10, 0.10]" and rise["control_name"] == "random-init-x"
    assert rows["02_values.agreement_upper_peak"]["verdict"] == "holds"
    assert "baseline" in rows["02_values.agreement_upper_peak"]["ours"]
    assert rows["02_values.target_rank_fall"]["verdict"] == "not measured"
    assert all(r["rule"] for r in rows.values())


# ---- intervals ------------------------------------------------------------------------------------------
def test_bootstrap_is_seeded_and_repeatable_and_covers_the_value():
    x = np.random.default_rng(3).random(500) < 0.3
    a, b, c = share(x, "u", seed=7), share(x, "u", seed=7), share(x, "u", seed=8)
    assert a == b and a != c
    assert a.value == pytest.approx(x.mean()) and a.low < a.value < a.high
    assert 0.03 < a.high - a.low < 0.12  # about 4 standard errors of a share of 0.3 over 500 units


def test_resample_counts_are_reused_exactly_and_bounded(monkeypatch):
    """The multinomial counts of a (seed, units, resamples) request are kept and given again: the resamples
    equal a fresh draw (the rng as it was), whatever the cache holds, and a caller cannot alter them."""
    from ffnlib import stats

    def fresh(n_units, n_boot, seed):
        rng = np.random.default_rng([seed, 0xB007])
        return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot).astype(np.float64)

    def first_rows(w):  # each resample's counts of the first three units
        out = w[:, :3].copy()
        w[:] = -1  # a caller scribbling on its weights must not reach the cache
        return out

    stats.clear_counts_cache()
    monkeypatch.setattr(stats, "MAX_BOOT_CELLS", 700)  # chunks of 7 resamples of 100 units
    expected = fresh(100, 30, 4)[:, :3]
    assert np.array_equal(stats.bootstrap_samples(first_rows, 100, 30, 4), expected)
    assert (4, 100, 30, 7) in stats.cached_counts()
    assert np.array_equal(stats.bootstrap_samples(first_rows, 100, 30, 4), expected)  # from the cache
    assert not np.array_equal(stats.bootstrap_samples(first_rows, 100, 30, 5), expected)
    monkeypatch.setattr(stats, "COUNTS_CACHE_BYTES", 100 * 30)  # room for one request: the oldest goes
    stats.bootstrap_samples(first_rows, 100, 30, 6)
    assert stats.cached_counts() == [(6, 100, 30, 7)]
    monkeypatch.setattr(stats, "COUNTS_CACHE_BYTES", 0)  # nothing kept (drawn as used), the same numbers
    stats.clear_counts_cache()
    assert np.array_equal(stats.bootstrap_samples(first_rows, 100, 30, 4), expected) and not stats.cached_counts()
    x = np.random.default_rng(3).random(500) < 0.3
    assert share(x, "u", seed=7) == share(x, "u", seed=7)
    monkeypatch.setattr(stats, "COUNTS_CACHE_BYTES", 10**6)
    monkeypatch.setattr(stats, "draw_counts", lambda *a: iter([np.array([[300, 0], [0, 300]])]))
    assert stats.bootstrap_samples(lambda w: w[:, 0], 2, 2, 9).tolist() == [300.0, 0.0]  # a count above uint8
    assert stats.bootstrap_samples(lambda w: w[:, 0], 2, 2, 9).tolist() == [300.0, 0.0]  # and from the cache
    stats.clear_counts_cache()


def test_bootstrap_interval_has_its_nominal_coverage():
    """Over many samples of a known share, the 95% interval contains it about 95% of the time."""
    rng = np.random.default_rng(0)
    covered = 0
    for i in range(200):
        sample = rng.random(200) < 0.2
        e = share(sample, "u", n_boot=400, seed=i)
        covered += e.low <= 0.2 <= e.high
    assert 0.88 <= covered / 200 <= 0.99


def test_ratio_bootstrap_and_binomial_interval():
    per_unit = np.array([[1, 2], [0, 1], [3, 3], [1, 4]], dtype=float)
    e = bootstrap(per_unit, lambda s: s[..., 0] / s[..., 1], "u", seed=0)
    assert e.value == pytest.approx(5 / 10)
    b = binomial(97, 100)
    assert b.value == 0.97 and b.low == pytest.approx(0.9148, abs=1e-3) and b.high == pytest.approx(0.9938, abs=1e-3)
    assert binomial(0, 100).low == 0.0 and binomial(100, 100).high == 1.0
    with pytest.raises(ParameterError):
        share([1, 0], "u", seed=-1)


def test_spearman_with_depth():
    assert spearman_with_depth(np.array([1.0, 2, 3, 4])) == pytest.approx(1.0)
    assert spearman_with_depth(np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    assert spearman_with_depth(np.array([1.0, 1, 1, 1])) == 0.0
    curves = np.array([[0.0, 0.5, 0.5, 1.0], [3.0, 1.0, 2.0, 0.0]])
    expected = [pd.Series(c).corr(pd.Series(range(4)), method="spearman") for c in curves]
    assert spearman_with_depth(curves) == pytest.approx(expected)


# ---- no "holds" when nothing differs ---------------------------------------------------------------------
def test_two_draws_of_the_same_random_process_give_no_holds():
    """A run whose "trained" and control numbers come from the same process must not hold anything:
    the Section 4 measures on two synthetic per-memory tables drawn with different seeds."""
    from ffnlib.values import section4_measures, value_agreement

    def draw(seed: int) -> pd.DataFrame:
        rng = np.random.default_rng(seed)
        n_layers, d_ff = 16, 300
        layer = np.repeat(np.arange(n_layers), d_ff)
        top = rng.integers(0, 200, layer.size)
        agrees = rng.random(layer.size) < 0.02
        memories = pd.DataFrame({"layer": layer, "memory": np.tile(np.arange(d_ff), n_layers), "sign": np.int8(1),
                                 "top_token": top, "max_prob": rng.random(layer.size),
                                 "target_rank": rng.integers(0, 200, layer.size)})
        triggers = memories[["layer", "memory", "sign"]].assign(
            rank=0, next_token=np.where(agrees, top, (top + 1 + rng.integers(0, 198, layer.size)) % 200))
        return value_agreement(memories, triggers, seed=seed)

    for seed in range(3):
        ours, _ = section4_measures(draw(seed), 200, 16, seed=0)
        theirs, _ = section4_measures(draw(100 + seed), 200, 16, seed=0)
        verdicts = {r["key"]: r["verdict"] for r in findings_rows("02_values", ours, theirs)}
        assert "holds" not in verdicts.values(), verdicts


def test_a_learned_effect_holds_against_the_same_draws():
    from ffnlib.values import section4_measures, value_agreement

    rng = np.random.default_rng(1)
    n_layers, d_ff = 16, 400

    def draw(rise: bool) -> pd.DataFrame:
        layer = np.repeat(np.arange(n_layers), d_ff)
        upper = (layer + 1) / n_layers > 10 / 16
        agrees = rng.random(layer.size) < (np.where(upper, 0.2, 0.001) if rise else 0.001)
        top = rng.integers(0, 1000, layer.size)
        memories = pd.DataFrame({"layer": layer, "memory": np.tile(np.arange(d_ff), n_layers), "sign": np.int8(1),
                                 "top_token": top, "max_prob": rng.random(layer.size) * 0.5 + 0.5 * agrees,
                                 "target_rank": np.where(agrees, 0, rng.integers(1, 1000, layer.size))})
        triggers = memories[["layer", "memory", "sign"]].assign(
            rank=0, next_token=np.where(agrees, top, (top + 1 + rng.integers(0, 998, layer.size)) % 1000))
        return value_agreement(memories, triggers)

    ours, _ = section4_measures(draw(True), 1000, n_layers, seed=0)
    theirs, _ = section4_measures(draw(False), 1000, n_layers, seed=0)
    verdicts = {r["key"].split(".")[1]: r["verdict"] for r in findings_rows("02_values", ours, theirs)}
    assert verdicts["agreement_rise"] == verdicts["agreement_upper_peak"] == "holds"
    assert verdicts["confident_upper"] == verdicts["confidence_rise"] == "holds"
    assert verdicts["agreement_lower"] == ARCHITECTURAL  # at chance in both: not learned


# ---- the random-weights control -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_loaded(smollm):
    from ffnlib.adapters import get_adapter
    from ffnlib.models import LoadedModel
    from tiny_models import CASE_IDS, CASES, build_config

    case = CASES[CASE_IDS.index("llama")]
    torch.manual_seed(5)
    model = case.model_cls(build_config(case, vocab=len(smollm.tokenizer), positions=256)).eval()
    return LoadedModel("tiny-llama-trained", model, smollm.tokenizer, get_adapter(model), "test", "trained-hash")


def test_random_init_control_is_seeded_and_keyed_by_architecture(tiny_loaded):
    from ffnlib.controls import cascading, control_id, random_init

    a, b, c = random_init(tiny_loaded, 0), random_init(tiny_loaded, 0), random_init(tiny_loaded, 1)
    weights = lambda m: torch.cat([p.flatten() for p in m.model.parameters()])  # noqa: E731
    assert torch.equal(weights(a), weights(b)) and not torch.equal(weights(a), weights(c))
    assert not torch.equal(weights(a), weights(tiny_loaded))
    assert a.name == b.name != c.name and a.file_hash == control_id(tiny_loaded, 0)
    assert a.adapter.family.name == tiny_loaded.adapter.family.name and a.tokenizer is tiny_loaded.tokenizer
    renamed = dataclasses.replace(tiny_loaded, name="another-name-same-architecture", file_hash="other")
    assert control_id(renamed, 0) == control_id(tiny_loaded, 0)  # computed once per architecture
    # the model's own initialiser: Llama's std (initializer_range) for the linear weights
    std = float(a.adapter.values(0).std())
    assert std == pytest.approx(tiny_loaded.model.config.initializer_range, rel=0.2)
    # cascading: the top blocks are the control's, the rest the trained model's
    half = cascading(tiny_loaded, 1, seed=0)
    assert torch.equal(half.adapter.values(1), a.adapter.values(1))
    assert torch.equal(half.adapter.values(0), tiny_loaded.adapter.values(0))
    assert torch.equal(cascading(tiny_loaded, 0).adapter.values(1), tiny_loaded.adapter.values(1))
    with pytest.raises(ParameterError, match="n_randomised"):
        cascading(tiny_loaded, 3)
