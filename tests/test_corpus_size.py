"""Findings against corpus size (notebook 10): ``ffnlib.corpus_size``, its plot and its report section.

The snapshots themselves (each equals a run on that prefix of the corpus) are tested in test_mining.py and, for
the Dask path, in test_distributed.py. Here: the measures are read from the right snapshot, the trend of a known
line is recovered, the per-size verdicts follow the registry, and the report shows the section.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ffnlib import ParameterError, corpus_size, keys  # noqa: E402
from ffnlib.adapters import get_adapter  # noqa: E402
from ffnlib.corpus import load_corpus  # noqa: E402
from ffnlib.findings import ARCHITECTURAL  # noqa: E402
from ffnlib.models import LoadedModel  # noqa: E402
from ffnlib.plots.corpus_size import plot_corpus_size  # noqa: E402
from ffnlib.report import render_markdown  # noqa: E402
from ffnlib.values import (project_values, section4_measures, target_ranks, top_trigger_targets,  # noqa: E402
                           value_agreement)


@pytest.fixture(scope="module")
def tiny(smollm):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return LoadedModel("tiny-llama", model, smollm.tokenizer, get_adapter(model), "random init", "tiny-hash", False, [])


@pytest.fixture(scope="module")
def sentences(wiki):
    return load_corpus(wiki, split="train", seed=0, max_sentences=40)


def test_each_size_is_measured_on_its_own_snapshot(tiny, sentences):
    examples = keys.mine_trigger_examples(tiny, sentences, k=5, snapshot_floor=10, progress=False)
    measures = corpus_size.snapshot_measures(tiny, examples, n_boot=50, progress=False)
    assert sorted(set(measures["sentences"])) == [10, 20, 40]
    assert set(measures["key"]) == set(corpus_size.CORPUS_FINDINGS) and (measures["model"] == "trained").all()
    lengths = examples.sentences["token_ids"].map(len).to_numpy()
    for size, tokens in measures.groupby("sentences")["tokens"].first().items():
        assert tokens == lengths[:size].sum()
    # the size-20 row equals the same measure computed from a separate run on the first 20 sentences
    alone = keys.mine_trigger_examples(tiny, sentences.iloc[:20], k=5, snapshot_floor=10, progress=False)
    targets = top_trigger_targets(alone.triggers)
    projection = project_values(tiny, signs=(1,), targets=targets[targets["sign"] == 1], progress=False)
    per_memory = value_agreement(projection, alone.triggers[alone.triggers["sign"] == 1], n_triggers=5)
    s4, _ = section4_measures(per_memory, 49152, 4, n_boot=50)
    row = measures[(measures["sentences"] == 20) & (measures["key"] == "02_values.target_rank_fall")].iloc[0]
    expected = s4["target_rank_fall"]
    assert (row["value"], row["low"], row["high"]) == (expected.value, expected.low, expected.high)
    whole = measures[(measures["sentences"] == 40) & (measures["key"] == "02_values.target_rank_fall")].iloc[0]
    assert whole["value"] != row["value"]  # another snapshot, another top trigger per key
    with pytest.raises(ParameterError, match="mined trigger examples"):
        corpus_size.snapshot_measures(tiny, examples.triggers)


def _constructed(key: str, tokens, values, half_width: float, model: str = "trained") -> pd.DataFrame:
    values = np.asarray(values, dtype=float)
    return pd.DataFrame({"model": model, "sentences": np.arange(1, len(tokens) + 1) * 100, "tokens": tokens,
                         "key": key, "value": values, "low": values - half_width, "high": values + half_width,
                         "baseline": np.nan, "baseline_low": np.nan, "baseline_high": np.nan})


def test_the_trend_of_a_known_line_is_recovered_and_judged_against_the_paper():
    tokens = np.array([1e4, 2e4, 4e4, 8e4, 1.6e5])
    rising = 0.002 + 0.01 * np.log10(tokens / 1e4)  # 0.002 at 10k tokens, 0.042 at 100M
    frame = pd.concat([
        _constructed("02_values.agreement_upper_peak", tokens, rising, 0.0005),
        _constructed("02_values.confident_agreeing", tokens, [0.05, 0.07, 0.04, 0.06, 0.05], 0.08),
        _constructed("02_values.agreement_lower", tokens, np.zeros(5), 0.001),
        _constructed("01_keys.shallow_lower", tokens[:2], [0.1, 0.2], 0.01),
    ])
    trends = corpus_size.corpus_trends(frame).set_index("key")
    peak = trends.loc["02_values.agreement_upper_peak"]
    assert peak["slope_per_doubling"] == pytest.approx(0.01 * math.log10(2), rel=1e-9)
    assert peak["at_paper"] == pytest.approx(0.002 + 0.01 * 4, rel=1e-9)
    assert peak["trend"] == "rising" and peak["reaches_paper"] == "yes"  # 4.2% [..] against the paper's 3.5%
    flat = trends.loc["02_values.confident_agreeing"]
    assert flat["trend"] == corpus_size.NO_TREND and flat["slope_low"] < 0 < flat["slope_high"]
    assert flat["reaches_paper"] == "no"  # about 5% against the paper's 46%: corpus size alone does not explain it
    # the points scatter more than their intervals say: the band uses Student's t with 3 degrees of freedom
    ys = np.array([0.05, 0.09, 0.03, 0.08, 0.04])
    noisy = corpus_size.corpus_trends(_constructed("02_values.confident_agreeing", tokens, ys, 0.001)).iloc[0]
    x, w = np.log10(tokens), (1.959963984540054 / 0.001) ** 2  # equal weights: ordinary least squares
    slope, intercept = np.polyfit(x, ys, 1)
    chi2 = w * np.sum((ys - intercept - slope * x) ** 2) / 3
    half = 3.182446305284263 * math.sqrt(chi2 / (w * np.sum((x - x.mean()) ** 2))) * math.log10(2)  # t(0.975, 3)
    assert (noisy["slope_high"] - noisy["slope_low"]) / 2 == pytest.approx(half, rel=1e-9)
    # a zero-width interval does not pin the line
    pinned = _constructed("02_values.agreement_rise", tokens, [0.0, 0.01, 0.02, 0.03, 0.04], 0.002)
    pinned.loc[0, ["low", "high"]] = 0.0
    assert corpus_size.corpus_trends(pinned).iloc[0]["slope_per_doubling"] > 0.005
    assert trends.loc["02_values.agreement_lower", "reaches_paper"] == "yes"  # inside the claimed +-0.5 pp
    assert trends.loc["01_keys.shallow_lower", "trend"] == "too few points"
    assert trends.loc["01_keys.shallow_lower", "reaches_paper"] == "no number"  # the paper gives a direction
    fig = plot_corpus_size(frame, trends.reset_index())
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 4
    assert all(ax.get_xscale() == "log" for ax in fig.axes if ax.get_visible())


def verdicts_text(trained, control):
    return corpus_size.judge_by_size(pd.concat([trained, control])).set_index("sentences")


def test_the_verdict_at_each_size_follows_the_registry():
    tokens = [1e4, 2e4]
    trained = _constructed("02_values.agreement_rise", tokens, [0.002, 0.015], 0.001)
    control = _constructed("02_values.agreement_rise", tokens, [0.0015, 0.0015], 0.001, model="control")
    verdicts = corpus_size.judge_by_size(pd.concat([trained, control])).set_index("sentences")["verdict"]
    # at the small size both intervals lie above 0 and overlap: the architecture shows it untrained;
    # at the larger size the trained model beats the control
    assert verdicts.loc[100] == ARCHITECTURAL and verdicts.loc[200] == "holds"
    # two more draws of the control, one of them far higher: the mean over the draws and its wider interval
    far = _constructed("02_values.agreement_rise", tokens, [0.0155, 0.0155], 0.001, model="control")
    drawn = corpus_size.judge_by_size(pd.concat([trained, control, control, far])).set_index("sentences")
    assert drawn.loc[200, "verdict"] != "holds"  # 0.015 no longer beats the draws' mean 0.0057 [< 0, > 0.02]
    assert drawn.loc[200, "control"] != verdicts_text(trained, control).loc[200, "control"]
    alone = corpus_size.judge_by_size(trained)
    assert (alone["control"] == "no control").all()
    with pytest.raises(ParameterError, match="lacks the column"):
        corpus_size.judge_by_size(trained.drop(columns=["tokens"]))


def test_the_report_shows_the_corpus_size_section(tmp_path):
    tokens = np.array([1e4, 2e4, 4e4])
    frame = _constructed("02_values.agreement_upper_peak", tokens, [0.004, 0.006, 0.008], 0.0005)
    trends = corpus_size.corpus_trends(frame)
    summary = {"sizes": [250, 500, 1000], "tokens": [10000, 20000, 40000], "paper_tokens": 100_000_000,
               "corpus_size": {"verdicts": corpus_size.judge_by_size(frame).to_dict("records"),
                               "trends": trends.to_dict("records"), "figure": "figures/10_corpus_size.png"},
               "findings": []}
    (tmp_path / "summaries").mkdir()
    (tmp_path / "summaries" / "10_corpus_size.json").write_text(json.dumps(summary))
    text = render_markdown(tmp_path, {"10_corpus_size": summary})
    assert "## Findings against corpus size" in text and "an extrapolation from about 1% of the data" in text
    row = next(line for line in text.splitlines() if line.startswith("| Upper-layer agreement"))
    assert "0.40% [0.35, 0.45]" in row and "0.80% [0.75, 0.85]" in row and "| rising |" in row
    assert "![corpus size](figures/10_corpus_size.png)" in text


def test_ranks_in_rows_count_strictly_larger_logits_for_any_number_of_targets_per_row():
    from ffnlib.values import ranks_in_rows

    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.integers(0, 20, size=(6, 50)).astype(np.float32))  # many ties
    pairs = sorted({(int(r), int(t)) for r, t in zip(rng.integers(0, 5, 40), rng.integers(0, 50, 40))})  # row 5: none
    rows, tokens = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        typed = logits.to(dtype)
        got = ranks_in_rows(typed, rows, tokens, torch.empty(6, 50))
        expected = [(typed[r] > typed[r, t]).sum().item() for r, t in pairs]
        assert got.tolist() == expected and np.bincount(rows).max() > 3
    # few rows with targets (one row with many): the pairs' rows are compared instead of every row per pass
    few = np.array([[2] * 7 + [4], [1, 3, 5, 8, 13, 21, 34, 40]])
    got = ranks_in_rows(logits, few[0], few[1], torch.empty(6, 50))
    assert got.tolist() == [(logits[r] > logits[r, t]).sum().item() for r, t in few.T]


def test_target_ranks_equal_the_projection_s_ranks_with_several_targets_per_value(tiny):
    rng = np.random.default_rng(0)
    grid = pd.MultiIndex.from_product([range(4), range(24), (1, -1)], names=["layer", "memory", "sign"]).to_frame(
        index=False)
    sets = [grid.assign(token=rng.integers(-1, 49152, size=len(grid))) for _ in range(2)]
    sets.append(sets[0].assign(token=np.where(rng.random(len(grid)) < 0.5, sets[0]["token"], sets[1]["token"])))
    # the third set repeats the first two's (memory, token) pairs: each is ranked once, and given to every row
    # 2 MB: about 5 values per chunk, so every layer's 24 values take several chunks (start > 0 is exercised)
    ranks = target_ranks(tiny, pd.concat([t.assign(set=i) for i, t in enumerate(sets)], ignore_index=True),
                         memory_limit_mb=2)
    for i, targets in enumerate(sets):
        expected = project_values(tiny, targets=targets, memory_limit_mb=2, progress=False).memories
        got = ranks[ranks["set"] == i].merge(expected[["layer", "memory", "sign", "target_rank"]],
                                             on=["layer", "memory", "sign"], suffixes=("", "_projection"))
        assert len(got) == len(grid) and (got["target_rank"] == got["target_rank_projection"]).all()
        assert ((got["token"] == -1) == (got["target_rank"] == -1)).all()
    with pytest.raises(ParameterError, match="out of range"):
        target_ranks(tiny, sets[0].assign(memory=99))
