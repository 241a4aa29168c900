"""Section 4: the value projection and the key-value agreement.

Real SmolLM2 (loaded once per session) for the checks on real parts: the projection against the model's
own logits, chunked = unchunked bit for bit, top-k and probabilities against a direct softmax, the negative
side against the projection of -v. Tiny random models for resume, caching, the memory bound and bad input;
hand-built trigger tables (with known answers, an off-by-one trap included) for the agreement.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

import ffnlib.values as values_mod
from ffnlib import ParameterError, ResultsError
from ffnlib.adapters import get_adapter
from ffnlib.capture import capture
from ffnlib.models import LoadedModel
from ffnlib.values import (agreement_by_confidence, agreement_by_depth, agreement_by_layer, check_next_tokens,
                           confident_summary, confident_values, project_values, projection_chunk_rows,
                           top_trigger_targets, value_agreement, value_logits)

SENTENCE = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."


# ---- fixtures -------------------------------------------------------------------------------------------
def _tiny(vocab: int = 300, layers: int = 3, seed: int = 0, softcap: float | None = None) -> LoadedModel:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=40, num_hidden_layers=layers,
                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger values than the init's, so that the distributions are not flat
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(50)
    adapter = get_adapter(model)
    adapter.softcap = softcap
    return LoadedModel(f"tiny-{seed}", model, None, adapter, "random", f"seed{seed}")


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.fixture(scope="module")
def last_layer(smollm):
    """SmolLM2's last layer projected in one chunk, with a target per value (its value's 5th token)."""
    layer = smollm.adapter.n_layers - 1
    logits = value_logits(smollm.adapter, layer)
    fifth = logits.topk(5, dim=-1).indices[:, 4]
    targets = pd.DataFrame({"layer": layer, "memory": np.arange(smollm.adapter.d_ff), "sign": 1,
                            "token": fifth.numpy()})
    projection = project_values(smollm, layers=layer, top_k=5, signs=(1,), targets=targets, memory_limit_mb=4096,
                                progress=False)
    return layer, logits, projection


def _frames_equal(a, b) -> None:
    pd.testing.assert_frame_equal(a.memories, b.memories, check_exact=True)
    pd.testing.assert_frame_equal(a.tokens, b.tokens, check_exact=True)


# ---- the projection against the model itself ------------------------------------------------------------
def test_projection_predicts_the_models_own_logit_change(smollm):
    """Adding a small multiple of v_i (or -v_i) to the model's last residual moves its logits, as computed by
    the model's own final norm and head, in the direction of the value's projection."""
    adapter = smollm.adapter
    last = adapter.n_layers - 1
    with capture(smollm, layers=last, what=("residual_after",)) as acts:
        out = smollm.model(torch.tensor([smollm.encode(SENTENCE)]))
    h = acts.residual_after[last][0, -1]
    base = adapter.logits_from_residual(h)
    assert torch.allclose(base, out.logits[0, -1], atol=1e-4)  # the residual really is what the model reads

    def spearman(x, y):
        rx, ry = (v.argsort().argsort().double() for v in (x, y))
        rx, ry = rx - rx.mean(), ry - ry.mean()
        return float((rx * ry).sum() / rx.norm() / ry.norm())

    projection = project_values(smollm, layers=last, top_k=10, progress=False)
    for layer in (last, 12):
        for memory in (3, 700):
            for sign in (1, -1):
                v = adapter.values(layer)[memory]
                changed = adapter.logits_from_residual(h + sign * 0.05 * h.norm() / v.norm() * v) - base
                own = value_logits(adapter, layer, [memory], sign)[0]
                other = value_logits(adapter, layer, [memory + 1], sign)[0]
                assert spearman(changed, own) > 0.98
                assert abs(spearman(changed, other)) < 0.5  # the check can fail: another value does not fit
                if layer == last:  # the projection's own top-10 tokens are among the 100 that rise most
                    top10 = torch.tensor(projection.of(layer, memory, sign)["token"].to_numpy())
                    assert torch.isin(top10, changed.topk(100).indices).all()


def test_chunked_equals_unchunked_exactly(smollm, last_layer):
    layer, _, whole = last_layer
    vocab = smollm.adapter.head.weight.shape[0]
    for limit in (40, 120):  # 100 and 305 rows: 16 and 6 chunks, the last one zero-padded
        rows = projection_chunk_rows(vocab, smollm.adapter.d_model, limit)
        assert rows < smollm.adapter.d_ff and smollm.adapter.d_ff % rows
        chunked = project_values(smollm, layers=layer, top_k=5, signs=(1,), targets=_targets_of(whole),
                                 memory_limit_mb=limit,
                                 progress=False)
        _frames_equal(chunked, whole)


def _targets_of(projection):
    m = projection.memories
    return m[["layer", "memory", "sign", "target"]].rename(columns={"target": "token"})


def test_top_k_probabilities_and_ranks_match_a_direct_softmax(last_layer):
    layer, logits, projection = last_layer
    probs = torch.softmax(logits, dim=-1)
    direct = probs.topk(5, dim=-1)
    tokens = projection.tokens.sort_values(["memory", "rank"])
    assert np.array_equal(tokens["token"].to_numpy().reshape(-1, 5), direct.indices.numpy())
    assert np.array_equal(tokens["prob"].to_numpy().reshape(-1, 5), direct.values.numpy())  # bit for bit
    mem = projection.memories.sort_values("memory")
    assert np.array_equal(mem["max_prob"].to_numpy(), probs.max(-1).values.numpy())
    assert np.array_equal(mem["top_token"], logits.argmax(-1).numpy())
    # the target was each value's 5th token: its rank is 4 unless tied with a neighbour
    assert (mem["target_rank"] == 4).mean() > 0.99
    strictly_above = (logits > logits.gather(1, torch.tensor(mem["target"].to_numpy())[:, None])).sum(-1)
    assert np.array_equal(mem["target_rank"].to_numpy(), strictly_above.numpy())
    assert projection.memories["sign"].eq(1).all() and len(projection.memories) == logits.shape[0]


def test_negative_side_is_the_projection_of_minus_v(smollm):
    adapter = smollm.adapter
    both = project_values(smollm, layers=5, top_k=3, memory_limit_mb=4096, progress=False)
    assert sorted(both.memories["sign"].unique()) == [-1, 1]  # gated model: both sides by default
    minus = value_logits(adapter, 5, sign=-1)
    assert torch.equal(minus, -value_logits(adapter, 5))
    neg = both.tokens[both.tokens["sign"] == -1].sort_values(["memory", "rank"])
    direct = torch.softmax(minus, -1).topk(3, dim=-1)
    assert np.array_equal(neg["token"].to_numpy().reshape(-1, 3), direct.indices.numpy())
    assert np.array_equal(neg["prob"].to_numpy().reshape(-1, 3), direct.values.numpy())
    only_negative = project_values(smollm, layers=5, top_k=3, signs=(-1,), memory_limit_mb=4096, progress=False)
    pd.testing.assert_frame_equal(only_negative.tokens, neg.reset_index(drop=True), check_exact=True)


def test_negative_side_without_exact_negation(tiny):
    """A soft-capped head is not odd-symmetric in floating point: -v is then projected by its own product."""
    capped = _tiny(softcap=5.0)
    p = project_values(capped, layers=1, top_k=4, progress=False)
    neg = p.tokens[p.tokens["sign"] == -1].sort_values(["memory", "rank"])
    direct = torch.softmax(value_logits(capped.adapter, 1, sign=-1), -1).topk(4, dim=-1)
    assert np.array_equal(neg["token"].to_numpy().reshape(-1, 4), direct.indices.numpy())
    np.testing.assert_allclose(neg["prob"].to_numpy().reshape(-1, 4), direct.values.numpy(), rtol=1e-5)


# ---- memory bound, resume, cache, bad input ------------------------------------------------------------
def test_memory_bound_sets_the_chunk_size(tiny, monkeypatch):
    vocab, d = 300, 16
    rows = projection_chunk_rows(vocab, d, 0.05)
    bytes_per_row = 4 * (2 * vocab + d)
    assert rows == int(0.05 * 2**20) // bytes_per_row
    assert rows * bytes_per_row <= 0.05 * 2**20 < (rows + 1) * bytes_per_row
    assert rows * vocab * 4 <= 0.05 * 2**20  # one chunk's logits fit in the memory bound
    assert projection_chunk_rows(vocab, d, 0.05, softcap=True) < rows  # soft-capping needs two more buffers
    seen = []
    original = tiny.adapter.logits_from_values
    monkeypatch.setattr(tiny.adapter, "logits_from_values", lambda v: seen.append(v.shape) or original(v))
    project_values(tiny, top_k=3, memory_limit_mb=0.05, progress=False)
    assert seen and all(s[0] <= rows for s in seen)  # no product is larger than the bound allows
    assert max(s[0] for s in seen) * vocab * 4 * 2 <= 0.05 * 2**20
    assert len(seen) == 3 * -(-40 // rows)  # gated: one product per chunk serves both signs
    with pytest.raises(ParameterError, match="below what projecting a single value needs"):
        project_values(tiny, memory_limit_mb=0.001, progress=False)


def test_resume_after_an_interruption_is_identical(tiny, tmp_path, monkeypatch, capsys):
    reference = project_values(tiny, top_k=4, progress=False)
    projection = sys.modules[project_values.__module__]  # the module whose project_layer it calls
    real = projection.project_layer
    calls = []
    state = {"kill_at": 2}

    def interrupted(adapter, layer, *args):
        if layer == state["kill_at"]:
            state["kill_at"] = None
            raise KeyboardInterrupt  # as if the run were stopped while projecting layer 2
        calls.append(layer)
        return real(adapter, layer, *args)

    monkeypatch.setattr(projection, "project_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        project_values(tiny, top_k=4, out_dir=tmp_path, progress=False)
    assert calls == [0, 1] and len(list(tmp_path.glob("*.partial/layer-*.manifest.json"))) == 4
    calls.clear()
    resumed = project_values(tiny, top_k=4, out_dir=tmp_path, progress=False)
    assert calls == [2]  # layers 0 and 1 came from their checkpoints
    assert "Resumed: 2 of 3 layers" in capsys.readouterr().out
    _frames_equal(resumed, reference)
    again = project_values(tiny, top_k=4, out_dir=tmp_path, progress=False)
    assert calls == [2] and "Reusing the cached value projection" in capsys.readouterr().out
    _frames_equal(again, reference)
    assert not list(tmp_path.glob("*.partial"))  # checkpoints are removed once the result is saved
    other = project_values(tiny, top_k=5, out_dir=tmp_path, progress=False)  # another request: recomputed
    assert calls[-3:] == [0, 1, 2] and len(other.tokens) == len(reference.tokens) * 5 // 4


def test_bad_input_raises_ffnlib_errors(tiny, tmp_path):
    for top_k in (0, -1, 2.5, True, 301):
        with pytest.raises(ParameterError, match="top_k"):
            project_values(tiny, top_k=top_k, progress=False)
    with pytest.raises(ParameterError, match="out of range"):
        project_values(tiny, layers=[7], progress=False)
    with pytest.raises(ParameterError, match="signs"):
        project_values(tiny, signs=(2,), progress=False)
    with pytest.raises(ParameterError, match="memory_limit_mb"):
        project_values(tiny, memory_limit_mb=0, progress=False)
    with pytest.raises(ParameterError, match="LoadedModel"):
        project_values(tiny.adapter, out_dir=tmp_path / "never-used", progress=False)
    with pytest.raises(ParameterError, match="lacks the column"):
        project_values(tiny, targets=pd.DataFrame({"layer": [0]}), progress=False)
    dup = pd.DataFrame({"layer": [0, 0], "memory": [1, 1], "sign": [1, 1], "token": [3, 4]})
    with pytest.raises(ParameterError, match="several rows"):
        project_values(tiny, targets=dup, progress=False)
    with pytest.raises(ParameterError, match="out of range"):
        project_values(tiny, targets=dup.head(1).assign(token=300), progress=False)
    with pytest.raises(ParameterError, match="end_of_sentence"):
        value_agreement(_HAND_MEMORIES, _hand_triggers(), end_of_sentence="skip")
    with pytest.raises(ParameterError, match="n_triggers"):
        value_agreement(_HAND_MEMORIES, _hand_triggers(), n_triggers=0)
    with pytest.raises(ParameterError, match="No projected value"):
        project_values(tiny, layers=0, progress=False).of(1, 0)


# ---- agreement on a hand-built case ---------------------------------------------------------------------
BOS = 1
_SENTENCES = pd.DataFrame({"sentence_id": [10, 11], "token_ids": [[BOS, 50, 51, 52, 53], [BOS, 60, 61, 62]]})


def _hand_triggers() -> pd.DataFrame:
    """Layer 0, sign +1. ``next_token`` follows the contract: token_ids[position + 1], -1 past the end."""
    rows = [  # memory, rank, sentence_id, position
        (0, 0, 10, 2), (0, 1, 11, 1), (0, 2, 10, 2),  # memory 0: prefix [BOS 50 51] -> next token 52
        (1, 0, 10, 2), (1, 1, 11, 2),                  # memory 1: same top prefix; its value says 51 (its last token)
        (2, 0, 11, 3), (2, 1, 10, 1),                  # memory 2: the prefix is the whole sentence (no next token)
        (4, 0, 11, 1),                                 # memory 4: prefix [BOS 60] -> 61; its value says 62 (+2)
    ]
    ids = dict(zip(_SENTENCES["sentence_id"], _SENTENCES["token_ids"]))
    frame = pd.DataFrame(rows, columns=["memory", "rank", "sentence_id", "position"])
    frame["next_token"] = [ids[s][p + 1] if p + 1 < len(ids[s]) else -1
                           for s, p in zip(frame["sentence_id"], frame["position"])]
    frame.insert(0, "layer", 0)
    frame.insert(2, "sign", np.int8(1))
    frame["coefficient"] = np.float32(1.0)
    return frame


# memory 3 has no trigger at all
_HAND_MEMORIES = pd.DataFrame({"layer": 0, "memory": [0, 1, 2, 3, 4], "sign": np.int8(1),
                               "top_token": [52, 51, 62, 52, 62], "max_prob": [0.9, 0.5, 0.4, 0.3, 0.2]})


def test_agreement_uses_the_token_after_the_prefix():
    triggers = _hand_triggers()
    assert check_next_tokens(triggers, _SENTENCES) == len(triggers)
    per = value_agreement(_HAND_MEMORIES, triggers).set_index("memory")
    # memory 0: value 52 = the token after [BOS 50 51]; memory 1: value 51 = the prefix's own last token,
    # which an off-by-one (token_ids[position]) would call agreeing; memory 4: value 62 = token_ids[position + 2]
    assert per["agrees"].to_dict() == {0: True, 1: False, 2: False, 3: False, 4: False}
    assert per.loc[0, "trigger_next_token"] == 52 and per.loc[1, "trigger_next_token"] == 52
    assert per.loc[2, "end_of_sentence"] and per.loc[2, "counted"]  # counted as not agreeing by default
    assert not per.loc[3, "has_trigger"] and not per.loc[3, "counted"]
    assert per.loc[0, "n_triggers"] == 3 and per.loc[0, "n_agreeing"] == 2  # ranks 0 and 2 are followed by 52
    assert per.loc[0, "agreeing_share"] == pytest.approx(2 / 3)
    assert per.loc[2, "n_agreeing"] == 0 and per.loc[2, "n_triggers"] == 2
    assert per.loc[4, "n_agreeing"] == 0

    by_layer = agreement_by_layer(value_agreement(_HAND_MEMORIES, triggers), vocab_size=100, n_layers=4).iloc[0]
    assert by_layer["agreement"] == pytest.approx(1 / 4)  # 1 agreeing of 4 counted (memory 3 has no trigger)
    assert by_layer["random_baseline"] == pytest.approx(0.01)
    assert by_layer["end_of_sentence"] == 1 and by_layer["with_trigger"] == 4
    excluded = value_agreement(_HAND_MEMORIES, triggers, end_of_sentence="exclude").set_index("memory")
    assert not excluded.loc[2, "counted"] and excluded.loc[2, "n_triggers"] == 1  # its end-of-sentence trigger left out
    assert agreement_by_layer(excluded.reset_index(), 100, 4).iloc[0]["agreement"] == pytest.approx(1 / 3)

    shifted = triggers.assign(next_token=[_SENTENCES.set_index("sentence_id").loc[s, "token_ids"][p]
                                          for s, p in zip(triggers["sentence_id"], triggers["position"])])
    with pytest.raises(ResultsError, match="not token_ids"):
        check_next_tokens(shifted, _SENTENCES)  # an off-by-one miner is caught
    assert value_agreement(_HAND_MEMORIES, shifted).set_index("memory")["agrees"].to_dict()[1]  # ... and would agree


def test_empirical_baseline_pairs_each_memory_with_another_key():
    rng = np.random.default_rng(1)
    n = 200
    memories = pd.DataFrame({"layer": 0, "memory": np.arange(n), "sign": np.int8(1),
                             "top_token": rng.integers(0, 5, n), "max_prob": rng.random(n)})
    triggers = pd.DataFrame({"layer": 0, "memory": np.arange(n), "sign": np.int8(1), "rank": 0,
                             "next_token": memories["top_token"].to_numpy()})  # every memory agrees with itself
    per = value_agreement(memories, triggers, seed=3)
    assert per["agrees"].all()
    by_next = dict(zip(per["memory"], per["trigger_next_token"]))
    # the baseline token of each memory is another memory's trigger token; with 5 tokens ~ 1/5 agree by chance
    assert 0.08 < per["baseline_agrees"].mean() < 0.35
    assert sorted(per["baseline_next_token"]) == sorted(by_next.values())
    assert (per["partner"] != per["memory"]).all()
    partner_next = per["partner"].map(by_next)
    assert (per["baseline_next_token"] == partner_next).all()
    assert (per["baseline_n_agreeing"] == per["baseline_agrees"].astype(int)).all()  # one trigger per key here
    assert per.equals(value_agreement(memories, triggers, seed=3))
    assert not per["baseline_next_token"].equals(value_agreement(memories, triggers, seed=4)["baseline_next_token"])
    partner = values_mod.derangement(50, np.random.default_rng(0))
    assert sorted(partner) == list(range(50)) and (partner != np.arange(50)).all()


def test_top_trigger_targets_feed_the_rank_of_the_next_token(tiny):
    triggers = _hand_triggers()
    targets = top_trigger_targets(triggers)
    assert targets.set_index("memory")["token"].to_dict() == {0: 52, 1: 52, 2: -1, 4: 61}
    projection = project_values(tiny, layers=0, top_k=3, signs=(1,), targets=targets, progress=False)
    m = projection.memories.set_index("memory")
    logits = value_logits(tiny.adapter, 0)
    assert m.loc[0, "target_rank"] == int((logits[0] > logits[0, 52]).sum())
    assert m.loc[2, "target_rank"] == -1 and m.loc[3, "target_rank"] == -1  # end of sentence / no trigger


def test_confidence_tables():
    rng = np.random.default_rng(0)
    n_layers, d_ff = 8, 50
    memories = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), d_ff),
                             "memory": np.tile(np.arange(d_ff), n_layers),
                             "sign": np.int8(1), "top_token": rng.integers(0, 3, n_layers * d_ff)})
    memories["max_prob"] = rng.random(len(memories)) * (memories["layer"] + 1) / n_layers  # upper layers more confident
    triggers = memories[["layer", "memory", "sign"]].assign(rank=0, next_token=rng.integers(0, 3, len(memories)))
    per = value_agreement(memories, triggers)
    top = confident_values(per, n=20)
    assert top["max_prob"].is_monotonic_decreasing and len(top) == 20
    assert top["max_prob"].min() >= per["max_prob"].nlargest(20).min()
    summary = confident_summary(top, n_layers)
    assert summary["upper_layers"] == [5, 6, 7]  # relative depth above 10/16
    assert summary["in_upper_layers"] == int((top["layer"] >= 5).sum()) and summary["in_upper_layers"] >= 15
    assert summary["with_agreeing_trigger"] == int(top["agrees"].sum())  # one trigger each: the same count
    binned = agreement_by_confidence(per, bins=4)
    assert binned["memories"].sum() == len(per) and (binned["memories"] > 80).all()
    uniform = agreement_by_confidence(per, bins=4, binning="uniform")
    assert uniform["memories"].sum() == len(per)
    by_depth = agreement_by_depth(agreement_by_layer(per, 3, n_layers))
    assert by_depth.set_index("part")["layers"].to_dict() == {"lower": 5, "upper": 3}
    with pytest.raises(ParameterError):
        agreement_by_confidence(per, binning="log")


def test_plots_return_figures():
    import matplotlib.pyplot as plt

    from ffnlib.plots.values import (plot_agreement, plot_agreement_by_confidence, plot_confident_layers,
                                     plot_target_ranks)

    per = value_agreement(_HAND_MEMORIES.assign(target_rank=[0, 5, -1, -1, 30]), _hand_triggers())
    by_layer = agreement_by_layer(per, 100, 4)
    for fig in (plot_agreement(by_layer), plot_target_ranks(per, 4, 100),
                plot_agreement_by_confidence(agreement_by_confidence(per, bins=2)),
                plot_confident_layers(confident_values(per, n=3), 4)):
        assert fig.axes
        plt.close(fig)


def _synthetic(rise: bool, n_layers: int = 16, d_ff: int = 400, seed: int = 0) -> pd.DataFrame:
    """Per-memory agreement data where (rise=True) upper layers agree far more often, with confident values."""
    rng = np.random.default_rng(seed)
    layer = np.repeat(np.arange(n_layers), d_ff)
    upper = (layer + 1) / n_layers > 10 / 16
    p_agree = np.where(upper, 0.2, 0.001) if rise else np.full(layer.shape, 0.01)
    agrees = rng.random(layer.size) < p_agree
    top = rng.integers(0, 1000, layer.size)
    memories = pd.DataFrame({"layer": layer, "memory": np.tile(np.arange(d_ff), n_layers), "sign": np.int8(1),
                             "top_token": top,
                             "max_prob": rng.random(layer.size) * 0.5 + (0.5 * agrees if rise else 0)})
    memories["target_rank"] = np.where(agrees, 0, rng.integers(1, 1000, layer.size)) if rise else \
        rng.integers(0, 1000, layer.size)
    triggers = memories[["layer", "memory", "sign"]].assign(
        rank=0, next_token=np.where(agrees, top, (top + 1 + rng.integers(0, 998, layer.size)) % 1000))
    return value_agreement(memories, triggers)


def test_section4_measures_follow_the_numbers():
    from ffnlib.findings import findings_rows
    from ffnlib.values import section4_measures

    rise, details = section4_measures(_synthetic(True), vocab_size=1000, n_layers=16)
    null, _ = section4_measures(_synthetic(False, seed=1), vocab_size=1000, n_layers=16)
    assert rise["agreement_rise"].low > 0.15 and null["agreement_rise"].low < 0 < null["agreement_rise"].high
    from ffnlib.values import confident_summary, confident_values

    in_upper = confident_summary(confident_values(_synthetic(True), n=100), 16)["in_upper_layers"]
    assert in_upper > 90 and rise["confident_upper"].value == pytest.approx(in_upper / 100 - 6 / 16)  # vs chance
    assert rise["target_rank_fall"].low > 0.05 and rise["agreement_upper_peak"].low > 0.15  # 20% at rank 0
    assert all(e.low <= e.value <= e.high for e in list(rise.values()) + list(null.values()))
    verdicts = {r["key"].split(".")[1]: r["verdict"] for r in findings_rows("02_values", rise, null, details)}
    assert verdicts["agreement_rise"] == verdicts["confident_upper"] == verdicts["target_rank_fall"] == "holds"
    assert verdicts["agreement_lower"] != "does not hold"  # 0.1% in lower layers, at chance in both
    swapped = {r["key"].split(".")[1]: r["verdict"] for r in findings_rows("02_values", null, rise)}
    assert swapped["agreement_rise"] == swapped["confident_upper"] == "does not hold"
