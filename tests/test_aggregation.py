"""Section 5 (aggregating memories): ``ffnlib.aggregation``.

Hand-built inputs for the pure pieces (cases of Fig. 11, active-memory counts, the 90%-norm number,
zero agreement), the real SmolLM2 for the residual stream identity and the held-out sampling, and a
tiny random Llama (with SmolLM2's tokenizer) for the whole analysis: batching/padding against a
single-example recomputation, resume after an interruption, caching and bad inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import ffnlib.aggregation as agg  # noqa: E402
import ffnlib.batching as batching  # noqa: E402
from ffnlib import FFNLibError, ParameterError  # noqa: E402
from ffnlib.adapters import get_adapter  # noqa: E402
from ffnlib.capture import capture  # noqa: E402
from ffnlib.config import get_scale  # noqa: E402
from ffnlib.corpus import load_corpus  # noqa: E402
from ffnlib.models import LoadedModel  # noqa: E402

D_MODEL, VOCAB_ID = 16, 49152


def _tiny_llama(vocab: int, seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=24, num_hidden_layers=3,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():  # a random init is nearly flat; widen it so tops are well separated
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def tiny(smollm):
    """A 3-layer random Llama over SmolLM2's vocabulary, wrapped as a LoadedModel."""
    model = _tiny_llama(VOCAB_ID)
    return LoadedModel("tiny-llama", model, smollm.tokenizer, get_adapter(model), "random init", "tiny-seed0",
                       False, [])


# ---- Fig. 11 cases ------------------------------------------------------------------------------------
def test_classify_partitions_the_four_cases():
    residual = np.array([1, 1, 1, 1, 5])
    ffn = np.array([2, 1, 2, 2, 5])
    output = np.array([1, 1, 2, 3, 5])
    assert agg.classify(residual, ffn, output).tolist() == ["residual", "agreement", "ffn", "composition",
                                                            "agreement"]
    # residual == ffn but the output moved away: neither kept -> composition
    assert agg.classify([4], [4], [7]).tolist() == ["composition"]
    with pytest.raises(ParameterError, match="one shape"):
        agg.classify([1, 2], [1], [1, 2])


def test_cases_on_constructed_vectors_through_a_tiny_model():
    """Residual / FFN vectors whose projections have known tops: the tiny model's head is the identity
    on the first d_model tokens, and its final RMSNorm keeps the argmax (positive scale, unit gain)."""
    vocab = 40
    model = _tiny_llama(vocab)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[:D_MODEL] = torch.eye(D_MODEL)
        model.model.norm.weight.fill_(1.0)
    adapter = get_adapter(model)

    def vec(**entries):
        v = torch.zeros(D_MODEL)
        for key, value in entries.items():
            v[int(key[1:])] = value
        return v

    cases = {  # (residual, ffn) -> expected case; output = residual + ffn
        "residual": (vec(e0=2.0), vec(e1=1.0)),  # output (2, 1): keeps 0, the FFN's 1 loses
        "ffn": (vec(e0=1.0), vec(e1=2.0)),  # output (1, 2): the FFN's token wins
        "agreement": (vec(e0=1.0), vec(e0=0.5, e3=0.2)),  # all three say 0
        "composition": (vec(e0=2.0, e2=1.5), vec(e0=-1.9, e1=1.0, e2=0.2)),  # output (0.1, 1, 1.7): token 2
    }
    residual = torch.stack([r for r, _ in cases.values()])
    ffn = torch.stack([f for _, f in cases.values()])
    tops, _ = agg.project_tops(adapter, torch.stack([residual, ffn, residual + ffn]))
    assert tops[0].tolist() == [0, 0, 0, 0]
    assert tops[1].tolist() == [1, 1, 0, 1]
    assert tops[2].tolist() == [0, 1, 0, 2]
    assert agg.classify(*(t.numpy() for t in tops)).tolist() == list(cases)


def test_project_tops_probabilities_and_chunking():
    model = _tiny_llama(50)
    adapter = get_adapter(model)
    vectors = torch.randn(3, 7, D_MODEL)
    target = torch.randint(0, 50, (7,))
    tops, probs = agg.project_tops(adapter, vectors, target, max_elements=50 * 4)  # 4 rows per chunk
    logits = adapter.logits_from_residual(vectors)
    assert torch.equal(tops, logits.argmax(-1))
    expected = logits.softmax(-1).gather(-1, target.expand(3, 7)[..., None])[..., 0]
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-7)


# ---- the residual stream on the real model -------------------------------------------------------------
def test_layer_output_is_residual_plus_ffn_output_on_smollm2(smollm):
    """Captured independently of ``capture``'s own subtraction: layer input (pre-hook) + attention
    output (hook on self_attn) + FFN output == layer output, to 1e-5."""
    adapter = smollm.adapter
    ids = torch.tensor([smollm.encode("The Eiffel Tower is a wrought-iron lattice tower in Paris.")])
    inputs, attention, handles = {}, {}, []
    for layer in range(adapter.n_layers):
        block = adapter.layer(layer)
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs, layer=layer: inputs.__setitem__(
                layer, (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True))
        handles.append(block.self_attn.register_forward_hook(
            lambda m, args, out, layer=layer: attention.__setitem__(layer, out[0].detach())))
    try:
        with torch.no_grad(), capture(smollm, what=("ffn_output", "residual_before", "residual_after")) as acts:
            smollm.model(ids)
    finally:
        for handle in handles:
            handle.remove()
    for layer in range(adapter.n_layers):
        before = inputs[layer] + attention[layer]
        after = acts.residual_after[layer]
        torch.testing.assert_close(after, before + acts.ffn_output[layer], rtol=1e-5, atol=1e-5)
        # capture's residual_before is after - ffn: exact up to the rounding of one subtraction at the
        # residual's scale (SmolLM2 has a few dimensions with |h| ~ 50, where float32 steps are ~4e-6)
        scale = after.abs().max()
        assert (acts.residual_before[layer] - before).abs().max() <= 1e-5 * scale


# ---- Sec. 5.1 pieces on hand-built coefficients --------------------------------------------------------
def test_memory_counts_and_the_90_percent_norm_number():
    coefficients = torch.tensor([[4.0, -3.0, 2.0, 1.0, 0.0],
                                 [0.0, 0.0, 0.0, 0.0, 0.0],
                                 [1.0, 1.0, 1.0, 1.0, -0.5]])
    norms = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    counts = agg.memory_counts(coefficients, norms, active_threshold=0.3, norm_share=0.9)
    assert counts["n_positive"].tolist() == [3, 0, 4]
    assert counts["n_relative"].tolist() == [3, 0, 5]  # |m| > 1.2 ; none ; |m| > 0.3
    # sizes 4,3,2,1,0 (sum 10): 4+3+2 = 9 >= 9 -> 3; all zero -> 0; 1,1,1,1,0.5 (4.5): 4 >= 4.05? no -> 5
    assert counts["n_norm"].tolist() == [3, 0, 5]
    assert counts["max_abs"].tolist() == [4.0, 0.0, 1.0]
    # value norms change the ranking: memory 3 now carries 10 of 19 (52%), memory 0 adds 4 -> 74%
    weighted = agg.memory_counts(coefficients[:1], torch.tensor([1.0, 1.0, 1.0, 10.0, 1.0]), 0.3, 0.7)
    assert weighted["n_norm"].tolist() == [2]
    assert agg.memory_counts(coefficients[:1], norms, 0.0, 1.0)["n_norm"].tolist() == [4]  # zeros excluded


def test_zero_agreement_on_a_hand_built_case():
    coefficients = torch.tensor([3.0, -2.0, 0.1, 0.0])
    top_positive = torch.tensor([5, 6, 7, 8])
    top_negative = torch.tensor([9, 10, 11, 12])
    predictions = agg.memory_predictions(coefficients, top_positive, top_negative)
    assert predictions.tolist() == [5, 10, 7, 12]  # m > 0 reads v_i, m <= 0 reads -v_i
    relative = agg.active_mask(coefficients, "relative", 0.5)  # |m| > 1.5
    positive = agg.active_mask(coefficients, "positive", 0.5)
    assert relative.tolist() == [True, True, False, False]
    assert positive.tolist() == [True, False, True, False]
    agree = lambda active, top: int(agg.agreeing_memories(predictions, active, torch.tensor(top)))  # noqa: E731
    assert agree(relative, 10) == 1  # the negative memory writes -v_1, whose top token is 10
    assert agree(relative, 7) == 0  # memory 2 predicts 7 but is not active: zero agreement
    assert agree(positive, 7) == 1  # ... unless any positive coefficient counts (the paper's rule)
    assert agree(positive, 10) == 0
    assert agree(relative, 5) == 1 and agree(relative, 6) == 0
    # a plain (ReLU) FFN has no negated values: every memory reads +v_i
    assert agg.memory_predictions(coefficients, top_positive, None).tolist() == [5, 6, 7, 8]


# ---- examples --------------------------------------------------------------------------------------------
def test_heldout_sampling_never_touches_training_sentences(smollm):
    examples = agg.sample_examples(smollm, 300, seed=3)
    train_ids = set(load_corpus("wiki", split="train")["sentence_id"])
    heldout = load_corpus("wiki", split="heldout").set_index("sentence_id")
    assert len(examples) == 300 and examples["sentence_id"].is_unique  # one position per sentence
    assert not set(examples["sentence_id"]) & train_ids
    assert heldout.loc[examples["sentence_id"], "heldout"].all()
    for row in examples.itertuples():
        assert row.token_ids == smollm.encode(row.text)
        assert 0 <= row.position <= len(row.token_ids) - 2
        assert row.next_token == row.token_ids[row.position + 1]
        assert row.prefix_len == row.position + 1
    assert examples["position"].nunique() > 10  # positions are spread, not always the same index
    again = agg.sample_examples(smollm, 300, seed=3)
    pd.testing.assert_frame_equal(examples, again)
    head = agg.sample_examples(smollm, 50, seed=3)  # a smaller run is a subset of a larger one
    pd.testing.assert_frame_equal(head, examples.iloc[:50])
    assert not agg.sample_examples(smollm, 50, seed=4)["sentence_id"].equals(head["sentence_id"])


def test_sampling_never_picks_a_bos_position(smollm):
    with_bos = SimpleNamespace(tokenizer=smollm.tokenizer, bos=[1])
    examples = agg.sample_examples(with_bos, 200, seed=0)
    assert all(ids[0] == 1 for ids in examples["token_ids"])
    assert (examples["position"] >= 1).all()
    assert (examples["prefix_len"] == examples["position"]).all()  # BOS not counted
    assert (examples["position"] <= examples["token_ids"].str.len() - 2).all()


def test_batches_cover_every_example_once_within_the_token_budget():
    lengths = np.array([5, 1, 9, 3, 3, 7, 2, 30])
    batches = batching.plan_shortest_first(lengths, batch_tokens=12)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= 12
    assert [b.tolist() for b in batches] == [b.tolist() for b in batching.plan_shortest_first(lengths, 12)]


# ---- the whole analysis on a tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_result(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("agg")
    return agg.analyse_aggregation(tiny, n_examples=24, batch_tokens=96, out_dir=folder / "out",
                                   value_cache=folder / "values", progress=False), folder


def test_batched_rows_match_a_single_example_recomputation(tiny, tiny_result):
    """Padding, batching, the early stop after the last layer and the gathers give exactly what one
    unpadded forward pass of that prefix gives."""
    result, folder = tiny_result
    frame, examples = result.frame, result.examples
    assert len(frame) == 24 * 3 and frame[["example", "layer"]].duplicated().sum() == 0
    adapter = tiny.adapter
    top_positive, top_negative = agg.memory_top_tokens(tiny, True, cache=folder / "values", progress=False)
    for example in (0, 7, 23):
        ex = examples.iloc[example]
        ids = torch.tensor([ex["token_ids"][: ex["position"] + 1]])
        with torch.no_grad(), capture(tiny, what=("coefficients", "ffn_output", "residual_before",
                                                   "residual_after")) as acts:
            logits = tiny.model(ids).logits[0, -1]
        rows = frame[frame["example"] == example].set_index("layer")
        assert (rows["final_top"] == int(logits.argmax())).all()
        for layer in range(adapter.n_layers):
            m = acts.coefficients[layer][0, -1]
            row = rows.loc[layer]
            tops = [int(adapter.logits_from_residual(getattr(acts, name)[layer][0, -1]).argmax())
                    for name in ("residual_before", "ffn_output", "residual_after")]
            assert [row.residual_top, row.ffn_top, row.output_top] == tops
            counts = agg.memory_counts(m, adapter.values(layer).norm(dim=-1), 0.1, 0.9)
            assert row.n_positive == int((m > 0).sum()) == int(counts["n_positive"])
            assert row.n_relative == row.n_active == int(counts["n_relative"])  # gated: relative rule
            assert abs(int(counts["n_norm"]) - row.n_norm) <= 1  # float rounding at the 90% boundary
            predictions = agg.memory_predictions(m, top_positive[layer], top_negative[layer])
            active = m.abs() > 0.1 * m.abs().max()
            assert row.agree_output == int(((predictions == tops[2]) & active).sum())
            assert row.agree_ffn == int(((predictions == tops[1]) & active).sum())
            assert row.agree_output_positive == int(((predictions == tops[2]) & (m > 0)).sum())
    last = frame[frame["layer"] == adapter.n_layers - 1]
    assert (last["output_top"] == last["final_top"]).all()
    assert (frame["case"] == agg.classify(frame["residual_top"], frame["ffn_top"], frame["output_top"])).all()


def test_resume_after_an_interruption_is_identical(tiny, tiny_result, tmp_path, monkeypatch):
    result, folder = tiny_result
    assert result.info["batches"] >= 4
    real = agg.analyse_batch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the kernel were stopped in the middle of batch 3
        return real(*args, **kwargs)

    monkeypatch.setattr("ffnlib.aggregation._analyse.analyse_batch", interrupted)  # where analyse_aggregation looks it up
    kwargs = dict(n_examples=24, batch_tokens=96, out_dir=tmp_path, value_cache=folder / "values", progress=False)
    with pytest.raises(KeyboardInterrupt):
        agg.analyse_aggregation(tiny, **kwargs)
    partial = list(tmp_path.glob("*.partial/batch-*.parquet"))
    assert len(partial) == 2  # the two finished batches, written atomically
    assert not list(tmp_path.glob("*.manifest.json"))  # nothing passes for a finished result

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    calls["n"] = 0
    monkeypatch.setattr("ffnlib.aggregation._analyse.analyse_batch", counted)
    resumed = agg.analyse_aggregation(tiny, **kwargs)
    assert calls["n"] == result.info["batches"] - 2 and resumed.info["resumed"] == 2
    pd.testing.assert_frame_equal(resumed.frame, result.frame)
    assert not list(tmp_path.glob("*.partial"))

    calls["n"] = 0
    cached = agg.analyse_aggregation(tiny, **kwargs)
    assert cached.cached and calls["n"] == 0
    pd.testing.assert_frame_equal(cached.frame, result.frame)
    other = agg.analyse_aggregation(tiny, **{**kwargs, "active_threshold": 0.3})  # another request: recomputed
    assert not other.cached and calls["n"] == result.info["batches"]


def test_summary_breakdown_comparison_and_plots(tiny, tiny_result):
    import matplotlib.pyplot as plt

    from ffnlib.plots import aggregation as plots

    result, _ = tiny_result
    summary = result.summary()
    frame = result.frame
    assert len(summary) == 3 and np.allclose(summary["relative_depth"], [1 / 3, 2 / 3, 1])
    layer1 = frame[frame["layer"] == 1]
    assert summary.loc[1, "share_positive"] == pytest.approx(layer1["n_positive"].mean() / tiny.adapter.d_ff)
    assert summary.loc[1, "zero_agreement_output"] == pytest.approx((layer1["agree_output"] == 0).mean())
    assert summary.loc[1, "residual_is_final"] == pytest.approx((layer1["residual_top"] == layer1["final_top"]).mean())
    assert np.allclose(summary[[f"case_{c}" for c in agg.CASES]].sum(axis=1), 1.0)
    assert summary.loc[2, "output_is_final"] == 1.0

    breakdown = result.breakdown("ffn")
    agreeing = frame[frame["agree_ffn"] > 0]
    assert breakdown["agreeing_pairs"] == len(agreeing)
    if len(agreeing):
        assert breakdown["short_prefix_share"] == pytest.approx((agreeing["prefix_len"] < 5).mean())
    measures, details = agg.section5_measures(result, seed=0)
    assert measures["active_share"].value == pytest.approx((frame["n_active"] / tiny.adapter.d_ff).mean())
    assert measures["zero_agreement_output"].value == pytest.approx(summary["zero_agreement_output"].mean())
    assert measures["ffn_rarely_overrides"].value == pytest.approx(summary["case_ffn"].mean())
    assert measures["stop_words_ffn/baseline"].value == pytest.approx(breakdown["stop_word_base_rate"])
    if len(agreeing):
        assert measures["short_prefix_ffn"].value == pytest.approx(breakdown["short_prefix_share"])
    assert measures["residual_final_trend"].value == pytest.approx(
        summary["residual_is_final"].corr(summary["layer"], method="spearman"))
    assert all(e.n == len(result.examples) and e.unit == "examples" for e in measures.values())
    from ffnlib.findings import findings_rows, of_notebook

    rows = findings_rows("03_aggregation", measures, measures, details)
    assert len(rows) == len(of_notebook("03_aggregation")) and not any(r["verdict"] == "holds" for r in rows)
    series = agg.curves(summary)
    assert all(len(c["values"]) == 3 for c in series.values())
    assert len(series["residual_is_final"]["paper"]) == 16
    table = agg.composition_examples(result, tiny.tokenizer, n=3)
    assert len(table) <= 3 and set(table["layer"]) <= {2}

    paper = agg.paper_curves()
    assert len(paper) == 16 and paper["residual_is_final"].is_monotonic_increasing
    for fig in (plots.plot_active_memories(summary), plots.plot_zero_agreement(summary, paper),
                plots.plot_residual_final(summary, paper), plots.plot_residual_confidence(frame, 3),
                plots.plot_ffn_cases(summary)):
        assert fig.axes and fig.axes[0].lines or fig.axes[0].patches
        plt.close(fig)


def _other_family(kind: str):
    torch.manual_seed(1)
    if kind == "gpt2":  # a plain (GELU) FFN: the default active rule is m_i > 0
        config = tf.GPT2Config(n_layer=2, n_embd=D_MODEL, n_head=2, n_inner=40, n_positions=256,
                               vocab_size=VOCAB_ID, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        return tf.GPT2LMHeadModel(config).eval().requires_grad_(False)
    config = tf.Gemma3TextConfig(vocab_size=VOCAB_ID, hidden_size=D_MODEL, intermediate_size=40, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                                 sliding_window=8, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return tf.Gemma3ForCausalLM(config).eval().requires_grad_(False)


@pytest.mark.parametrize("kind", ["gpt2", "gemma3"])
def test_analysis_on_other_families(smollm, kind, tmp_path):
    """GPT-2 (plain FFN, positive rule, Conv1D) and Gemma 3 (post-FFN norm, BOS): the final prediction
    is the model's own, and the FFN output is what the block adds to the residual."""
    model = _other_family(kind)
    bos = [1] if kind == "gemma3" else []
    loaded = LoadedModel(f"tiny-{kind}", model, smollm.tokenizer, get_adapter(model), "random init", f"tiny-{kind}",
                         False, bos)
    result = agg.analyse_aggregation(loaded, n_examples=6, batch_tokens=64, value_cache=tmp_path, progress=False)
    frame = result.frame
    assert result.manifest["active_rule"] == ("positive" if kind == "gpt2" else "relative")
    if kind == "gpt2":
        assert (frame["n_active"] == frame["n_positive"]).all()
        assert (frame["agree_output"] == frame["agree_output_positive"]).all()
    assert (result.examples["position"] >= len(bos)).all()
    for example in range(6):
        ex = result.examples.iloc[example]
        ids = torch.tensor([ex["token_ids"][: ex["position"] + 1]])
        final = int(model(ids).logits[0, -1].argmax())
        rows = frame[frame["example"] == example]
        assert (rows["final_top"] == final).all()
        assert rows["output_top"].iloc[-1] == final


def test_stop_word_flags(smollm):
    ids = [smollm.tokenizer.encode(w, add_special_tokens=False)[0] for w in (" the", " Paris", " of", "The")]
    assert agg.stop_word_flags(smollm.tokenizer, ids).tolist() == [True, False, True, True]


# ---- bad inputs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"n_examples": 0}, "n_examples"), ({"n_examples": -3}, "n_examples"), ({"n_examples": True}, "n_examples"),
    ({"n_examples": "10"}, "n_examples"), ({"n_examples": 10**7}, "held-out sentences"),
    ({"active_threshold": 1.5}, "active_threshold"), ({"active_threshold": -0.1}, "active_threshold"),
    ({"active_threshold": "0.1"}, "active_threshold"), ({"active_rule": "max"}, "active_rule"),
    ({"norm_share": 0}, "norm_share"), ({"batch_tokens": 0}, "batch_tokens"),
])
def test_bad_inputs_raise_ffnlib_errors(tiny, kwargs, match):
    with pytest.raises(FFNLibError, match=match):
        agg.analyse_aggregation(tiny, **{"n_examples": 4, **kwargs}, progress=False)


def test_other_bad_inputs(tiny_result, tiny):
    result, _ = tiny_result
    with pytest.raises(ParameterError, match="against"):
        agg.agreement_breakdown(result.frame, "residual")
    with pytest.raises(ParameterError, match="layer"):
        agg.composition_examples(result, tiny.tokenizer, layer=3)
    with pytest.raises(ParameterError, match="empty"):
        agg.layer_summary(result.frame.iloc[:0], 24, 3)
    assert agg.resolve_examples(None, get_scale("ci")) == get_scale("ci").aggregation_examples
    assert agg.resolve_examples(7, get_scale("ci")) == 7
    with pytest.raises(ParameterError):
        agg.resolve_examples(2.5, get_scale("ci"))


def test_the_control_reads_the_first_of_the_same_heldout_examples(tiny):
    """The random-weights control's Section 5 reads fewer examples at the default scale (to keep the suite
    within its time budget), and they are the first of the trained model's: same sentences, same positions."""
    default = get_scale("default")
    assert agg.resolve_examples(None, default, control=True) == default.control_aggregation_examples
    assert default.control_aggregation_examples < default.aggregation_examples
    assert agg.resolve_examples(None, get_scale("full"), control=True) == get_scale("full").aggregation_examples
    assert agg.resolve_examples(300, default, control=True) == 300  # a number the user gives is used for both
    few, many = agg.sample_examples(tiny, 8, seed=3), agg.sample_examples(tiny, 32, seed=3)
    columns = ["sentence_id", "position", "next_token"]
    pd.testing.assert_frame_equal(few[columns], many[columns].iloc[:len(few)].reset_index(drop=True))
    assert len(few) >= 6  # most sentences give an example: the comparison is not vacuous


def test_memory_top_tokens_reuse_notebook_02s_projection(tiny, tmp_path, capsys):
    """Section 5 reads the values' top tokens from a finished projection in the run's folder instead of
    projecting every value again; the tokens are the same."""
    from ffnlib.values import project_values

    project_values(tiny, top_k=3, out_dir=tmp_path / "run", progress=False)
    reused = agg.memory_top_tokens(tiny, True, cache=tmp_path / "a", progress=True, projections=tmp_path / "run")
    assert "from the cached projection" in capsys.readouterr().out
    fresh = agg.memory_top_tokens(tiny, True, cache=tmp_path / "b", progress=False)
    assert torch.equal(reused[0], fresh[0]) and torch.equal(reused[1], fresh[1])
    # a projection of some layers only, or of another model, is not used
    project_values(tiny, layers=[0], top_k=3, out_dir=tmp_path / "part", progress=False)
    agg.memory_top_tokens(tiny, True, cache=tmp_path / "c", progress=True, projections=tmp_path / "part")
    assert "from the cached projection" not in capsys.readouterr().out


# ---- Section 5 per memory (ffnlib.participation) ------------------------------------------------------------
def test_per_memory_tallies_add_up_to_the_per_example_columns(tiny, tiny_result):
    """Per layer, the memories' active and agreeing counts sum to the per-example table's n_active and
    agree_output, and each example's update shares sum to 1: the per-memory table is an exact regrouping."""
    from ffnlib import participation

    result, folder = tiny_result
    memories = participation.analyse_memories(tiny, result, out_dir=folder / "out", value_cache=folder / "values",
                                              progress=False)
    n = len(result.examples)
    assert len(memories) == tiny.adapter.n_layers * tiny.adapter.d_ff and (memories["n_examples"] == n).all()
    per_layer = memories.groupby("layer")
    counts = result.frame.groupby("layer")
    np.testing.assert_allclose(per_layer["active_rate"].sum() * n, counts["n_active"].sum())
    np.testing.assert_allclose(per_layer["agreeing_rate"].sum() * n, counts["agree_output"].sum())
    np.testing.assert_allclose(per_layer["mean_update_share"].sum(), 1.0, rtol=1e-9)
    assert memories[list(participation.MEMORY_COLUMNS)].apply(lambda c: c.between(0, 1).all()).all()
    assert (memories["agreeing_rate"] <= memories["active_rate"]).all()


def test_per_memory_table_is_cached_and_resumes(tiny, tiny_result, tmp_path, monkeypatch):
    from ffnlib import participation

    result, folder = tiny_result
    kwargs = dict(out_dir=tmp_path, value_cache=folder / "values", progress=False)
    reference = participation.analyse_memories(tiny, result, **kwargs)
    name = participation.memories_request(tiny, result)[1]
    assert (tmp_path / f"{name}.manifest.json").exists() and not list(tmp_path.glob("*.partial"))
    (tmp_path / f"{name}.manifest.json").unlink()
    real, calls = participation.batch_tallies, {"n": 0}

    def interrupted(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(participation, "batch_tallies", interrupted)
    with pytest.raises(KeyboardInterrupt):
        participation.analyse_memories(tiny, result, **kwargs)
    calls["n"] = 10
    resumed = participation.analyse_memories(tiny, result, **kwargs)
    assert calls["n"] == 10 + result.info["batches"] - 1  # the finished batch came from its checkpoint
    pd.testing.assert_frame_equal(resumed, reference)
    monkeypatch.setattr(participation, "batch_tallies", lambda *a, **kw: pytest.fail("recomputed a cached table"))
    pd.testing.assert_frame_equal(participation.analyse_memories(tiny, result, **kwargs), reference)


def test_per_memory_table_refuses_another_models_result(tiny, tiny_result):
    from ffnlib import participation

    result, _ = tiny_result
    other = agg.AggregationResult(result.frame, result.examples, {**result.manifest, "model": "gpt2"})
    with pytest.raises(ParameterError, match="is of 'gpt2'"):
        participation.analyse_memories(tiny, other)
    with pytest.raises(ParameterError, match="AggregationResult"):
        participation.analyse_memories(tiny, result.frame)
