"""Knowledge neurons (ffnlib.related.knowledge_neurons): the attribution on a hand-built model whose answer is
known, the fast path against captum on tiny models of several families, the refining rule, edits that are
undone bit for bit, suppression by hook = by weights, the fact data (countryinfo, a constructed BIG-bench
tarball), clear errors, and the explorer's "attribute" action.

Tiny random models (float64, so that the fast path and captum can be compared exactly) with a word-level
tokenizer built here; the real SmolLM2 only for the padding check of the batched evaluation.
"""

from __future__ import annotations

import io
import json
import math
import sys
import tarfile
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

import ffnlib
from ffnlib.adapters import get_adapter
from ffnlib.capture import capture
from ffnlib.interventions import intervene
from ffnlib.models import LoadedModel
from ffnlib.related import knowledge_neurons as kn

WORDS = ("The capital of France is Paris Germany Berlin Spain Madrid Italy Rome language French German Spanish "
         "Italian people speak in city country a the and located Europe").split()


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _tokenizer() -> tf.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<pad>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="<pad>",
                                      bos_token="<s>", eos_token="</s>")


TOKENIZER = _tokenizer()
VOCAB = len(TOKENIZER)
SPECIAL = dict(bos_token_id=2, eos_token_id=3, pad_token_id=1)


def _configs():
    llama = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64, **SPECIAL)
    return {
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**llama, tie_word_embeddings=False)),
        "gemma3_text": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**llama, head_dim=8, sliding_window=4)),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=VOCAB, n_layer=3, n_embd=16, n_head=2, n_inner=24,
                                                   n_positions=64, **SPECIAL)),
        "opt": (tf.OPTForCausalLM, tf.OPTConfig(vocab_size=VOCAB, num_hidden_layers=3, hidden_size=16,
                                                num_attention_heads=2, ffn_dim=24, word_embed_proj_dim=16,
                                                max_position_embeddings=64, **SPECIAL)),
    }


def _tiny(kind: str = "llama", seed: int = 0, dtype=torch.float64) -> LoadedModel:
    torch.manual_seed(seed)
    cls, config = _configs()[kind]
    model = cls(config).eval().requires_grad_(False)
    with torch.no_grad():  # a random init is nearly flat: widen it so that predictions and gradients are not tiny
        for p in model.parameters():
            p.normal_(0, 0.5) if p.dim() == 2 else p.add_(0.2 * torch.randn_like(p))
    model.to(dtype)
    return LoadedModel(f"tiny-{kind}", model, TOKENIZER, get_adapter(model), "random", f"tiny-{kind}-{seed}", False, [])


def _ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return _tiny("llama")


# ---- the attribution --------------------------------------------------------------------------------
def _plant(loaded: LoadedModel, prompt: list[int], answer: int, layer: int, memory: int) -> None:
    """Make memory ``memory`` of ``layer`` fire strongly at the prompt's last position and write the answer's
    direction: its gate and up rows point along that position's FFN input, its value along the answer's head row."""
    adapter = loaded.adapter
    with capture(adapter, layer, what=("ffn_input",)) as acts:
        loaded.model(torch.tensor([prompt]))
    x = acts.ffn_input[layer][0, -1]
    with torch.no_grad():
        adapter.gate(layer).weight[memory] = 3.0 * x / x.dot(x)  # gate . x = 3
        adapter.up(layer).weight[memory] = 3.0 * x / x.dot(x)  # up . x = 3: m = silu(3) * 3 ~ 8.6
        direction = adapter.head.weight[answer] / adapter.norm_gain()
        adapter.values(layer)[memory] = 30.0 * direction / direction.norm()


def test_attribution_finds_the_memory_that_writes_the_answer():
    loaded = _tiny("llama", seed=1)
    prompt, answer = _ids("The capital of France is"), _ids("Paris")[0]
    layer, memory = 2, 7
    _plant(loaded, prompt, answer, layer, memory)
    result = kn.knowledge_attribution(loaded, prompt, [answer])
    assert result.value > 0.5  # the planted memory makes the model answer
    best = divmod(int(result.scores.argmax()), loaded.adapter.d_ff)
    assert (result.layers[best[0]], best[1]) == (layer, memory)
    frame, _ = kn.score_rows(0, result, keep_ratio=0.1)
    coarse = kn.coarse_neurons(frame, threshold=0.2)
    assert (layer, memory) in set(zip(coarse["layer"], coarse["memory"]))
    view = kn.value_view(loaded, pd.DataFrame([{"relation": "capital", "fact_id": 0, "layer": layer, "memory": memory,
                                                "sign": 1}]),
                         pd.DataFrame([{"fact_id": 0, "answer": "Paris", "answer_token": answer}]))
    assert view.loc[view["kind"] == "knowledge", "answer_rank"].item() == 0


def test_scores_add_up_to_the_change_of_the_target_completeness():
    """Integrated gradients' completeness: the scores of a layer add up to F(m) - F(0)."""
    loaded = _tiny("llama", seed=2)
    prompt, answer = _ids("The capital of Germany is"), _ids("Berlin")[0]
    result = kn.knowledge_attribution(loaded, prompt, [answer], layers=[1], steps=64, method="gausslegendre")
    zeroed = kn.answer_probabilities(loaded, [prompt], [answer], [{(1, i): 0.0 for i in range(loaded.adapter.d_ff)}])
    assert float(result.scores.sum()) == pytest.approx(result.value - zeroed["p_answer"].item(), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("kind", ["llama", "gemma3_text", "gpt2", "opt"])
@pytest.mark.parametrize("target, text, answer", [("first_token", "The capital of France is", "Paris"),
                                                   ("answer_logprob", "people in Spain speak", "Spanish and Italian"),
                                                   ("first_token", "France", "Paris")])
def test_the_fast_path_gives_captums_numbers(kind, target, text, answer):
    """The cached, last-position-only path equals captum's IntegratedGradients run naively (float64). Gemma 3
    (post-FFN norm, sliding window), GPT-2 (Conv1D, learned positions), OPT (flattens tokens in its FFN: the
    batch cannot be broadcast, the fallback runs) and a one-token prompt (no cache) included."""
    loaded = _tiny(kind)
    prompt, answer_ids = _ids(text), _ids(answer)
    fast = kn.knowledge_attribution(loaded, prompt, answer_ids, target=target, implementation="fast")
    slow = kn.knowledge_attribution(loaded, prompt, answer_ids, target=target, implementation="captum")
    assert fast.layers == slow.layers == [0, 1, 2]
    assert fast.value == pytest.approx(slow.value, rel=1e-10)
    assert torch.allclose(fast.coefficients, slow.coefficients, rtol=1e-10, atol=1e-12)
    relative = (fast.scores - slow.scores).abs().amax(1) / slow.scores.abs().amax(1)
    assert float(relative.max()) <= 1e-8
    assert _hooks(loaded.model) == 0


def test_the_fast_path_batches_layers_without_changing_scores(tiny):
    prompt, answer = _ids("The capital of Italy is"), _ids("Rome")
    args = (tiny, prompt, answer, [0, 1, 2], 20, "riemann_left", "first_token")
    one = kn.fast_integrated_gradients(*args, rows_per_batch=20)
    all_ = kn.fast_integrated_gradients(*args, rows_per_batch=60)
    assert torch.allclose(one[0], all_[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", kn.METHODS)
def test_the_integration_points_are_captums(method):
    """The fast path integrates at captum's points with captum's weights, bit for bit (its own copy of the rules,
    not captum's private module)."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters(method)
    for steps in (2, 3, 7, 20, 64):
        weights, points = kn.integration_points(method, steps)
        assert torch.equal(weights, torch.tensor(step_sizes(steps), dtype=torch.float32))
        assert torch.equal(points, torch.tensor(alphas(steps), dtype=torch.float32))


def test_the_intervals_come_from_ffnlib_stats():
    from ffnlib import stats

    frame = pd.DataFrame({"fact_id": [0, 0, 1, 2, 3, 4, 5], "kind": "knowledge",
                          "change": [-0.5, -0.7, -0.9, 0.1, -0.3, np.inf, -0.2]})
    row = kn.summarise(frame, "change", ["kind"]).iloc[0]
    per_fact = frame.groupby("fact_id")["change"].mean()
    assert row["mean"] == per_fact.mean() and row["units"] == 6  # the point estimate as before (inf included)
    expected = stats.share(per_fact[np.isfinite(per_fact)].to_numpy(), "fact_id")
    assert (row["low"], row["high"]) == (expected.low, expected.high)
    assert kn.binomial_interval(3, 10) == (stats.binomial(3, 10).low, stats.binomial(3, 10).high)
    assert all(math.isnan(x) for x in kn.binomial_interval(0, 0))


def test_bad_attribution_parameters_are_clear_errors(tiny):
    prompt, answer = _ids("The capital of France is"), _ids("Paris")
    for kwargs, match in (({"target": "all"}, "target"), ({"implementation": "slow"}, "implementation"),
                          ({"steps": 1}, "steps"), ({"method": "simpson"}, "method"),
                          ({"layers": [7]}, "out of range")):
        with pytest.raises(ffnlib.ParameterError, match=match):
            kn.knowledge_attribution(tiny, prompt, answer, **kwargs)


# ---- the refining rule --------------------------------------------------------------------------------
def test_refine_keeps_neurons_found_in_a_share_of_the_prompts_and_at_least_three():
    a, b, c = (5, 1), (5, 2), (4, 9)
    bags = [{a, b, c}, {a, b}, {a, b}, {a, c}, {a}, {a}]  # a: 6 of 6, b: 3, c: 2
    assert kn.refine(bags, 0.7) == {a}  # needs 0.7 x 6 = 4.2 -> 5
    assert kn.refine(bags, 0.5) == {a, b}  # needs 3
    assert kn.refine(bags, 0.3) == {a, b}  # 1.8, but never fewer than 3 prompts
    assert kn.refine(bags, 0.3, min_prompts=2) == {a, b, c}
    assert kn.refine([{a}, {a}], 0.5) == set()  # two prompts can never reach three


def _synthetic_scores(found_per_prompt: dict[int, list[tuple[int, int]]]) -> pd.DataFrame:
    rows = [{"prompt_id": pid, "layer": l, "memory": m, "sign": 1, "score": 1.0, "coefficient": 1.0, "ratio": 1.0}
            for pid, neurons in found_per_prompt.items() for l, m in neurons]
    return pd.DataFrame(rows)


def test_p_moves_by_005_until_two_to_five_neurons_per_fact():
    prompts = pd.DataFrame({"prompt_id": range(10), "fact_id": [0] * 10, "relation": "r"})
    # neuron k is found in 10 - k prompts (k = 0..9): p x 10 prompts decides how many survive
    found = {pid: [(1, k) for k in range(10) if pid < 10 - k] for pid in range(10)}
    neurons, history = kn.find_knowledge_neurons(_synthetic_scores(found), prompts, p=0.7)
    assert history["p"].tolist() == [0.7]  # 0.7 x 10 = 7 prompts: neurons 0..3 -> 4 per fact, in range
    assert len(neurons) == 4
    counts = [10, 10, 9, 9, 8, 8, 7, 5, 3]  # neuron j is found in counts[j] of the 10 prompts
    found = {pid: [(2, j) for j, c in enumerate(counts) if pid < c] for pid in range(10)}
    neurons, history = kn.find_knowledge_neurons(_synthetic_scores(found), prompts, p=0.7)
    assert history["p"].tolist() == [0.7, 0.75, 0.8, 0.85]  # needs 7, 8, 8, 9 prompts
    assert history["mean_neurons"].tolist() == [7, 6, 6, 4]
    assert sorted(neurons["memory"]) == [0, 1, 2, 3] and (neurons["p"] == 0.85).all()
    sparse = {pid: [(1, 0)] if pid < 4 else [] for pid in range(10)}  # one neuron in 4 of 10 prompts
    neurons, history = kn.find_knowledge_neurons(_synthetic_scores(sparse), prompts, p=0.7)
    assert len(history) == 6 and history["p"].tolist() == [0.7, 0.65, 0.6, 0.55, 0.5, 0.45]
    assert len(neurons) == 0  # never reaches 2: the last try (p = 0.45 -> 4.5 prompts) is kept


# ---- edits: hooks and weights, always undone ------------------------------------------------------
def test_suppressing_through_the_hook_equals_zeroing_the_values(tiny):
    ids = torch.tensor([_ids("The capital of France is Paris and the capital of Spain is")])
    chosen = [(0, 3), (1, 5), (2, 11), (2, 0)]
    with intervene(tiny, {n: 0.0 for n in chosen}, scale=True):
        hooked = tiny.model(ids).logits
    with kn.edited_values(tiny, {n: torch.zeros(tiny.adapter.d_model, dtype=torch.float64) for n in chosen}):
        weights = tiny.model(ids).logits
    assert torch.allclose(hooked, weights, rtol=0, atol=1e-12)
    base = tiny.model(ids).logits
    assert not torch.allclose(hooked, base)


def test_weights_are_restored_bit_for_bit_even_on_error(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with kn.edited_values(tiny, {(1, 2): torch.randn(16, dtype=torch.float64),
                                     (2, 4): torch.randn(16, dtype=torch.float64)}):
            assert not torch.equal(tiny.adapter.values(1)[2], before["model.layers.1.mlp.down_proj.weight"][:, 2])
            raise RuntimeError("boom")
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _small_study(loaded):
    facts = pd.DataFrame({"relation": ["capital", "capital", "capital", "official_language", "official_language"],
                          "subject": ["France", "Germany", "Spain", "France", "Spain"],
                          "answer": ["Paris", "Berlin", "Madrid", "French", "Spanish"]})
    templates = {"capital": ["The capital of [X] is [Y]", "[X] capital city is [Y]", "the city of [X] is [Y]"],
                 "official_language": ["people in [X] speak [Y]", "the language of [X] is [Y]",
                                       "in [X] people speak [Y]"]}
    return kn.evaluate_prompts(loaded, kn.build_prompts(loaded, facts, templates))


def _edit_study(seed: int = 3):
    """A tiny model, its prompts (every fact pretended known, so that every experiment has work), hand-picked
    neurons and two held-out sentences."""
    loaded = _tiny("llama", seed=seed)
    prompts = _small_study(loaded)
    prompts["correct"] = True
    neurons = pd.DataFrame([{"relation": r, "fact_id": f, "layer": l, "memory": m, "sign": 1}
                            for r, f, l, m in [("capital", 0, 2, 1), ("capital", 0, 2, 5), ("capital", 1, 1, 5),
                                               ("capital", 2, 2, 8), ("official_language", 3, 2, 1),
                                               ("official_language", 4, 0, 3)]])
    heldout = [_ids("The capital of France is Paris"), _ids("people in Spain speak Spanish")]
    return loaded, prompts, neurons, heldout


def test_the_experiments_leave_the_model_as_it_was():
    loaded, prompts, neurons, heldout = _edit_study()
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    effects = kn.suppress_amplify(loaded, prompts, neurons)
    spec, spec_ppl = kn.specificity(loaded, prompts, neurons, heldout)
    same = kn.same_answer_effect(loaded, prompts, neurons, prompts)
    edits = kn.edit_facts(loaded, prompts, neurons, prompts, heldout, n_others=1)
    erase, erase_ppl = kn.erase_relations(loaded, prompts, neurons, heldout, top=2)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _hooks(loaded.model) == 0
    # shapes and controls: every fact gets a random control of the same size from the same layers
    assert set(effects["kind"]) == {"knowledge", "random"} and set(effects["operation"]) == {"suppress", "amplify"}
    assert (effects.groupby(["fact_id", "kind"])["n_neurons"].nunique() == 1).all()
    assert set(spec_ppl["kind"]) == {"knowledge", "random"} and len(spec)
    assert {"self", "same relation, other answer"} <= set(same["group"])
    assert set(edits["kind"]) == {"knowledge", "random"}
    assert (edits["success"] <= edits["success_unbounded"]).all()  # the bound only takes successes away
    assert edits["heldout_ppl_ratio"].to_numpy() == pytest.approx(
        (edits["heldout_ppl_after"] / edits["heldout_ppl_before"]).to_numpy())
    assert len(erase_ppl) == 4 and (erase_ppl["n_neurons"] <= 2).all()
    # the fact update writes lambda-weighted embeddings into the values (checked on one neuron)
    vectors = kn.update_vectors(loaded, [(2, 1, 1)], old_token=_ids("Paris")[0], new_token=_ids("Rome")[0])
    v = loaded.adapter.values(2)[1]
    e = loaded.model.get_input_embeddings().weight
    old, new = e[_ids("Paris")[0]], e[_ids("Rome")[0]]
    expected = v - v.norm() / old.norm() * old + 8 * v.norm() / new.norm() * new
    assert torch.allclose(vectors[(2, 1)], expected.float().to(vectors[(2, 1)].dtype), rtol=1e-6)


def test_suppressing_each_neuron_alone_equals_the_facts_suppression_where_it_is_the_only_one():
    loaded, prompts, neurons, _ = _edit_study()
    each = kn.suppress_each(loaded, prompts, neurons, seed=0)
    together = kn.suppress_amplify(loaded, prompts, neurons, seed=0)
    analysed = prompts[prompts["fact_id"].isin(neurons["fact_id"])]
    per_fact = neurons.groupby("fact_id").size()
    assert len(each) == 2 * sum(per_fact[f] for f in analysed["fact_id"])  # every (prompt, neuron), and a control
    mine = each[each["kind"] == "knowledge"].merge(neurons, on=["fact_id", "layer", "memory"])
    assert len(mine) == len(each) // 2  # only the fact's own neurons are suppressed as knowledge neurons
    control = each[each["kind"] == "random"]
    assert not set(zip(control["fact_id"], control["layer"], control["control_memory"])) & set(
        zip(neurons["fact_id"], neurons["layer"], neurons["memory"]))
    single = per_fact[per_fact == 1].index
    alone = each[(each["kind"] == "knowledge") & each["fact_id"].isin(single)].sort_values("prompt_id")
    joint = together[(together["kind"] == "knowledge") & (together["operation"] == "suppress")
                     & together["fact_id"].isin(single)].sort_values("prompt_id")
    assert len(alone) and alone["change"].to_numpy() == pytest.approx(joint["change"].to_numpy(), rel=1e-6)
    assert (alone["change"] != 0).any()  # the tiny model's answers move when a neuron is suppressed


def test_an_edit_that_breaks_perplexity_past_the_bound_is_not_a_success():
    assert kn.edit_success(0, 30.0, 44.9)  # rank 1, perplexity 1.50x: within the default bound
    assert not kn.edit_success(0, 30.0, 45.1)  # rank 1, but 1.503x
    assert not kn.edit_success(0, 29.75, 2.021e10)  # rank 1 and a destroyed model (the committed report's edit)
    assert kn.edit_success(0, 29.75, 2.021e10, max_ratio=math.inf)  # no bound: rank 1 is enough
    assert not kn.edit_success(1, 30.0, 30.0)  # the perplexity is fine, the new answer is not on top
    assert kn.edit_success(0, 30.0, 59.0, max_ratio=2.0) and not kn.edit_success(0, 30.0, 61.0, max_ratio=2.0)
    for broken in (math.nan, math.inf):  # no finite perplexity: the edit cannot be shown to leave the model working
        assert not kn.edit_success(0, 30.0, broken) and not kn.edit_success(0, broken, 30.0, max_ratio=math.inf)
    for bad in (0.9, -1, math.nan, "1.5", True):
        with pytest.raises(ffnlib.ParameterError, match="max_perplexity_ratio"):
            kn.edit_success(0, 30.0, 30.0, max_ratio=bad)


def test_a_nan_logit_is_never_a_success():
    """NaN compares false, so ``(final > final[answer]).sum()`` ranks a NaN answer logit first: the ranking must
    say the row is broken. Checked on NaN logits made in the model (a NaN head row, a NaN value edit)."""
    loaded, prompts, neurons, heldout = _edit_study(seed=5)
    row = prompts.iloc[0]
    head, answer = loaded.adapter.head.weight, int(row.answer_token)
    with torch.no_grad():
        saved = head[answer].clone()
        head[answer] = math.nan  # the answer's logit is NaN: the old ranking gives rank 0, a success
        try:
            nan_answer = kn.answer_probabilities(loaded, [row.prompt_ids], [answer])
            nan_other = kn.answer_probabilities(loaded, [row.prompt_ids], [(answer + 1) % VOCAB])  # a finite answer
            evaluated = kn.evaluate_prompts(loaded, prompts.iloc[:1])
        finally:
            head[answer] = saved
    for result in (nan_answer, nan_other):
        assert result["rank"].item() == VOCAB and result["top_token"].item() == -1
        assert not kn.edit_success(result["rank"].item(), 30.0, 30.0, max_ratio=math.inf)
    assert not evaluated["correct"].item() and not evaluated["top10"].item()
    # an update that writes NaN into the values (lambda2 = NaN) makes every logit NaN: never a success, and its
    # held-out perplexity is NaN, not the 1.0 that a NaN-skipping sum of the NLLs gives
    edits = kn.edit_facts(loaded, prompts, neurons, prompts, heldout, lambda2=math.nan, n_others=1)
    assert len(edits) and not edits["success_unbounded"].any() and not edits["success"].any()
    assert not edits["success_at_5"].any() and edits["heldout_ppl_after"].isna().all()


def test_the_lambda2_sweep_has_a_row_per_edit_and_resumes(tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    from ffnlib.plots.knowledge_neurons import plot_lambda2_sweep

    loaded, prompts, neurons, heldout = _edit_study()
    args = (loaded, prompts, neurons, prompts, heldout)
    reference = kn.lambda2_sweep(*args, lambda2s=(1, 8), n_others=1, progress=False)
    single = kn.edit_facts(*args, lambda2=8.0, n_others=1)
    assert len(reference) == 2 * len(single) and set(reference["lambda2"]) == {1.0, 8.0}
    assert {"lambda2", "kind", "fact_id", "success", "success_unbounded", "heldout_ppl_ratio",
            "max_perplexity_ratio"} <= set(reference.columns)
    pd.testing.assert_frame_equal(reference[reference["lambda2"] == 8.0].reset_index(drop=True), single)
    real, calls = kn.edit_facts, {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    sweep_module = sys.modules[kn.lambda2_sweep.__module__]  # where lambda2_sweep finds edit_facts
    monkeypatch.setattr(sweep_module, "edit_facts", flaky)
    with pytest.raises(KeyboardInterrupt):
        kn.lambda2_sweep(*args, lambda2s=(1, 8), n_others=1, out_dir=tmp_path)
    monkeypatch.setattr(sweep_module, "edit_facts", real)
    resumed = kn.lambda2_sweep(*args, lambda2s=(1, 8), n_others=1, out_dir=tmp_path)
    assert "lambda2 = 1 read from its checkpoint" in capsys.readouterr().out
    pd.testing.assert_frame_equal(resumed, reference)
    again = kn.lambda2_sweep(*args, lambda2s=(1, 8), n_others=1, out_dir=tmp_path)
    assert "Loaded the cached lambda2 sweep" in capsys.readouterr().out
    pd.testing.assert_frame_equal(again, reference)
    table = kn.sweep_table(reference)
    assert table[["lambda2", "kind"]].values.tolist() == [[1.0, "knowledge"], [1.0, "random"], [8.0, "knowledge"],
                                                          [8.0, "random"]]
    assert {"edits", "success", "success_low", "success_high", "success_unbounded", "ppl_ratio", "ppl_ratio_low",
            "ppl_ratio_high", "max_perplexity_ratio"} <= set(table.columns)
    assert (table["edits"] == len(single) // 2).all()
    assert ((table["success_low"] <= table["success"]) & (table["success"] <= table["success_high"])).all()
    assert (table["success"] <= table["success_unbounded"]).all()
    assert isinstance(plot_lambda2_sweep(table), Figure)


def test_last_position_factors_match_a_hand_written_hook(tiny):
    prompts = [_ids("The capital of France is"), _ids("people in Spain speak"), _ids("The capital of Italy")]
    answers = [_ids("Paris")[0], _ids("Spanish")[0], _ids("is")[0]]
    factors = [{(1, 3): 0.0, (2, 7): 2.0}, {}, {(0, 1): 0.0}]
    batched = kn.answer_probabilities(tiny, prompts, answers, factors, batch_size=3)
    for i, (ids, answer, factor) in enumerate(zip(prompts, answers, factors)):
        handles = []
        for (layer, memory), value in factor.items():
            def hook(module, args, memory=memory, value=value):
                c = args[0].clone()
                c[:, -1, memory] *= value
                return (c,)
            handles.append(tiny.adapter.down(layer).register_forward_pre_hook(hook))
        try:
            p = tiny.model(torch.tensor([ids])).logits[0, -1].softmax(-1)[answer]
        finally:
            for handle in handles:
                handle.remove()
        assert batched["p_answer"].iloc[i] == pytest.approx(float(p), rel=1e-9)


def test_batched_evaluation_matches_single_prompts_on_the_real_model(smollm):
    facts = pd.DataFrame({"relation": ["capital"] * 3, "subject": ["France", "Japan", "Canada"],
                          "answer": ["Paris", "Tokyo", "Ottawa"]})
    prompts = kn.build_prompts(smollm, facts, {"capital": ["The capital of [X] is [Y]", "[X] has its capital in [Y]"]})
    evaluated = kn.evaluate_prompts(smollm, prompts, batch_size=4)
    for row in evaluated.itertuples():
        with torch.no_grad():
            logits = smollm.model(torch.tensor([row.prompt_ids])).logits[0, -1]
        assert row.p_answer == pytest.approx(float(logits.softmax(-1)[row.answer_token]), rel=1e-4)
        assert row.top_token == int(logits.argmax())
    assert evaluated.loc[evaluated["subject"] == "France", "correct"].any()  # " Paris"


# ---- checkpoints and the cache --------------------------------------------------------------------
def test_an_interrupted_attribution_resumes_with_identical_results(tmp_path, monkeypatch, capsys):
    loaded = _tiny("llama", seed=4)
    prompts = _small_study(loaded)
    reference = kn.attribute_prompts(loaded, prompts, steps=4, progress=False)
    calls = {"n": 0}
    real = kn.knowledge_attribution

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    attribution_module = sys.modules[kn.attribute_prompts.__module__]  # where it finds knowledge_attribution
    monkeypatch.setattr(attribution_module, "knowledge_attribution", flaky)
    with pytest.raises(KeyboardInterrupt):
        kn.attribute_prompts(loaded, prompts, steps=4, out_dir=tmp_path, checkpoint_every=3, progress=False)
    monkeypatch.setattr(attribution_module, "knowledge_attribution", real)
    resumed = kn.attribute_prompts(loaded, prompts, steps=4, out_dir=tmp_path, checkpoint_every=3)
    assert "6 of 15 prompts were read from checkpoints" in capsys.readouterr().out
    pd.testing.assert_frame_equal(resumed.scores, reference.scores)
    pd.testing.assert_frame_equal(resumed.per_prompt.drop(columns="seconds"),
                                  reference.per_prompt.drop(columns="seconds"))
    again = kn.attribute_prompts(loaded, prompts, steps=4, out_dir=tmp_path)
    assert "Loaded the cached attribution" in capsys.readouterr().out
    pd.testing.assert_frame_equal(again.scores, reference.scores)
    # each prompt's stored rows are >= 0.1 x its maximum of the side, and positive
    assert (reference.scores["score"] > 0).all() and (reference.scores["ratio"] >= 0.1 - 1e-9).all()
    assert set(reference.scores["sign"]) <= {1, -1}


# ---- facts, templates, errors -------------------------------------------------------------------------
def test_countryinfo_facts_load_offline_with_every_relation_of_the_templates():
    facts = kn.load_facts()
    assert set(facts["relation"]) == set(kn.load_templates())
    assert facts["source"].iloc[0].startswith("countryinfo 1.0.1")
    capital = facts[facts["relation"] == "capital"].set_index("subject")["answer"]
    assert capital["France"] == "Paris" and capital["Japan"] == "Tokyo"
    language = facts[facts["relation"] == "official_language"].set_index("subject")["answer"]
    assert language["France"] == "French" and language["Germany"] == "German"
    assert not facts.duplicated(["relation", "subject"]).any()
    assert facts[["subject", "answer"]].map(lambda s: bool(s.strip()) and "(" not in s).all().all()
    templates = kn.load_templates()
    assert all(len(t) >= 4 for t in templates.values())  # Dai dropped relations with fewer than 4


def test_template_errors_say_what_is_wrong():
    with pytest.raises(ffnlib.ParameterError, match=r"subject slot \[X\]"):
        kn.check_template("The capital is [Y]", "capital")
    with pytest.raises(ffnlib.ParameterError, match=r"must end with the answer slot \[Y\]"):
        kn.check_template("[Y] is the capital of [X]", "capital_of")
    with pytest.raises(ffnlib.ParameterError, match=r"must end with the answer slot"):
        kn.check_template("The capital of [X] is", "capital")
    assert kn.check_template("The capital of [X] is [Y].") == "The capital of [X] is"


def test_a_relation_without_facts_or_templates_is_a_clear_error(tiny):
    templates = {"capital": ["The capital of [X] is [Y]"], "river": ["The longest river of [X] is [Y]"]}
    with pytest.raises(ffnlib.ParameterError, match="'river' has no facts"):
        kn.load_facts(relations=["capital", "river"], templates=templates)
    with pytest.raises(ffnlib.ParameterError, match="'mountain' has no templates"):
        kn.load_facts(relations=["mountain"], templates=templates)
    facts = pd.DataFrame({"relation": ["anthem"], "subject": ["France"], "answer": ["Paris"]})
    with pytest.raises(ffnlib.ParameterError, match="'anthem' has facts but no templates"):
        kn.build_prompts(tiny, facts, templates)
    with pytest.raises(ffnlib.ParameterError, match="no facts"):
        kn.build_prompts(tiny, facts.iloc[:0], templates)


def test_an_answer_the_tokenizer_cannot_encode_is_a_clear_error(tiny):
    facts = pd.DataFrame({"relation": ["capital"], "subject": ["France"], "answer": ["Lutetia"]})
    with pytest.raises(ffnlib.ParameterError, match="cannot encode the answer 'Lutetia'.*France"):
        kn.build_prompts(tiny, facts, {"capital": ["The capital of [X] is [Y]"]})
    with pytest.raises(ffnlib.ParameterError, match="is empty"):
        kn.encode_answer(TOKENIZER, "  ")
    both = pd.concat([facts, pd.DataFrame({"relation": ["capital"], "subject": ["Italy"], "answer": ["Rome"]})])
    kept = kn.build_prompts(tiny, both, {"capital": ["The capital of [X] is [Y]"]}, skip_unencodable=True)
    assert kept["answer"].tolist() == ["Rome"] and kept.attrs["skipped"] == [("capital", "France", "Lutetia")]


def _bigbench_tarball(path, examples) -> None:
    task = {"canary": "test", "name": "qa_wikidata", "examples": examples}
    data = json.dumps(task).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/qa_wikidata/task.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        other = b"{}"
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/other/task.json")
        info.size = len(other)
        tar.addfile(info, io.BytesIO(other))


def test_wikidata_facts_are_read_from_the_bigbench_sdist_and_cached(tmp_path, monkeypatch):
    examples = [{"input": "The capital of France is", "target": "Paris"},
                {"input": "The capital of Japan is", "target": ["Tokyo"]},
                {"input": "The official language of Spain is", "target": "Spanish"},
                {"input": "The genre of Weird Al is", "target": ["comedy", "parody"]},  # several answers: left out
                {"input": "Paris is located in", "target": "France"},  # another form: left out
                {"input": "The continent of Cocos (Keeling) Islands is", "target": "Asia"}]  # not a plain name
    _bigbench_tarball(tmp_path / "bigbench-1.0.0.tar.gz", examples)
    facts = kn.wikidata_facts(cache=tmp_path, download=False)
    assert facts[["relation", "subject", "answer"]].values.tolist() == [
        ["capital", "France", "Paris"], ["capital", "Japan", "Tokyo"], ["official language", "Spain", "Spanish"]]
    assert (tmp_path / "qa_wikidata-1.0.0.json").exists() and not (tmp_path / "bigbench-1.0.0.tar.gz").exists()
    assert kn.wikidata_facts(cache=tmp_path, download=False).equals(facts)  # from the cached JSON now
    monkeypatch.setattr(sys.modules[kn.load_facts.__module__], "wikidata_facts", lambda: kn.wikidata_facts_from_task(
        {"examples": examples}))
    ours = kn.load_facts("wikidata")
    assert set(ours["relation"]) == {"capital", "official_language"}  # mapped to our relation names


def test_a_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FFNLIB_PYPI_SIMPLE", "http://127.0.0.1:9/simple/bigbench/")
    with pytest.raises(ffnlib.ResultsError, match="Could not download bigbench-1.0.0.tar.gz.*facts=.countryinfo."):
        kn.wikidata_facts(cache=tmp_path)
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.partial"))
    with pytest.raises(ffnlib.ResultsError, match="not cached"):
        kn.wikidata_facts(cache=tmp_path / "empty", download=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bigbench-1.0.0.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(ffnlib.ResultsError, match="Cannot read"):
        kn.wikidata_facts(cache=tmp_path / "bad", download=False)


# ---- views and verdicts ---------------------------------------------------------------------------
def test_trigger_view_counts_prefixes_about_the_subject():
    sentences = pd.DataFrame({"sentence_id": [0, 1, 2], "title": ["France", "Rome", None],
                              "token_ids": [_ids("Paris is the capital of France"), _ids("The city of Rome"),
                                            _ids("people speak French")]})
    triggers = pd.DataFrame({"layer": [2, 2, 2, 1], "memory": [1, 1, 1, 4], "sign": [1, 1, 1, 1], "rank": [0, 1, 2, 0],
                             "coefficient": [3.0, 2.0, 1.0, 1.0], "sentence_id": [0, 1, 2, 0], "position": [3, 3, 2, 5],
                             "next_token": [0, -1, -1, -1]})
    examples = SimpleNamespace(triggers=triggers, sentences=sentences, layers=[1, 2], n_bos=0,
                               token_index=lambda: dict(zip(sentences["sentence_id"], sentences["token_ids"])))
    neurons = pd.DataFrame([{"relation": "capital", "fact_id": 0, "layer": 2, "memory": 1, "sign": 1}])
    prompts = pd.DataFrame([{"fact_id": 0, "subject": "France", "answer": "Paris"}])
    loaded = SimpleNamespace(tokenizer=TOKENIZER, adapter=SimpleNamespace(d_ff=24))
    view = kn.trigger_view(loaded, neurons, prompts, examples)
    row = view[view["kind"] == "knowledge"].iloc[0]
    # prefix 0 "Paris is the capital" (article France: about the subject, contains the answer); prefix 1 "The city
    # of Rome" (no); prefix 2 "people speak French" (no)
    assert (row.triggers, row.about_subject, row.mentions_answer) == (3, 1, 1)
    with pytest.raises(ffnlib.ParameterError, match="notebook 01"):
        kn.trigger_view(loaded, neurons, prompts, None)


def test_measures_are_judged_by_the_registry():
    from ffnlib.findings import finding, findings_rows, judge, of_notebook

    rng = np.random.default_rng(0)
    cases = [("knowledge", "suppress", -0.4), ("random", "suppress", 0.0), ("knowledge", "amplify", 0.05),
             ("random", "amplify", 0.0)]
    effects = pd.DataFrame([{"fact_id": f, "kind": k, "operation": o, "change": c + rng.normal(0, 0.01)}
                            for f in range(12) for k, o, c in cases])
    per_fact = pd.DataFrame({"fact_id": range(12), "n_neurons": [3] * 10 + [2, 4]})
    ours, details = kn.measures({"effects": effects, "per_fact": per_fact}, 30)
    assert ours["suppress"].value == pytest.approx(effects.query("kind == 'knowledge' and operation == 'suppress'")
                                                   .groupby("fact_id")["change"].mean().mean())
    assert ours["suppress"].high < ours["suppress/baseline"].low and ours["suppress"].n == 12
    rows = {r["key"].split(".")[1]: r for r in findings_rows("06_knowledge_neurons", ours, None, details)}
    assert len(rows) == len(of_notebook("06_knowledge_neurons"))
    assert rows["suppress"]["verdict"] == "holds"  # beats random neurons, beyond half of -29%
    assert rows["amplify"]["verdict"] == "partly"  # +5% against the paper's +31%
    assert rows["neurons_per_fact"]["verdict"] == "holds"  # 3 per fact, within 2-5
    few = kn.measures({"per_fact": pd.DataFrame({"fact_id": range(12), "n_neurons": [3] * 10 + [0, 0]})}, 30)[0]
    assert judge(finding("06_knowledge_neurons.neurons_per_fact"), few["neurons_per_fact"], None) == "partly"
    assert rows["update"]["verdict"] == "not measured" and "unverified" in rows["suppress"]["paper"]
    # updates that reach the new answer but wreck held-out perplexity do not hold; the detail gives both rates
    edits = pd.DataFrame([{"fact_id": f, "kind": k, "success_unbounded": k == "knowledge", "success": False,
                           "changed": True, "heldout_ppl_before": 30.0, "max_perplexity_ratio": 1.5,
                           "heldout_ppl_after": 2e10 if k == "knowledge" else 30.5}
                          for f in range(12) for k in ("knowledge", "random")])
    ours, details = kn.measures({"edits": edits}, 30)
    update = {r["key"].split(".")[1]: r for r in findings_rows("06_knowledge_neurons", ours, None, details)}["update"]
    assert ours["update"].value == 0 and update["verdict"] == "does not hold"
    assert "rank 1 in 100% of edits" in details["update"] and "0% with held-out perplexity within 1.5x" in \
        details["update"] and "2e+10" in details["update"]
    assert kn.measures({"edits": edits.assign(success=edits["success_unbounded"])}, 30)[0]["update"].value == 1
    # the layer finding is judged within the attributed layers: attributing only the top layers proves nothing
    neurons = pd.DataFrame({"fact_id": [0, 0, 1], "layer": [28, 29, 29], "memory": [1, 2, 3]})
    assert "top_layers" not in kn.measures({"neurons": neurons}, 30, layers=[26, 27, 28, 29])[0]
    full, _ = kn.measures({"neurons": neurons}, 30)
    assert full["top_layers"].value == 1.0 and full["top_layers/baseline"].value == 0.5
    agreement = pd.DataFrame({"sign": 1, "layer": range(30), "agreement": np.linspace(0, 0.03, 30)})
    view = kn.layer_view(neurons, 30, agreement, layers=[26, 27, 28, 29])
    assert kn.measures({"layers": view}, 30)[0]["layer_agreement"].value > 0
    assert view["layer"].tolist() == [26, 27, 28, 29] and view["neurons"].tolist() == [0, 0, 1, 2]
    assert view["share"].sum() == pytest.approx(1) and view.attrs["spearman"]["rho"] > 0
    series = kn.curves(view, 30)["kn_share"]["values"]
    assert len(series) == 30 and series[:26] == [None] * 26 and series[29] == pytest.approx(2 / 3)


# ---- the explorer's "attribute" action --------------------------------------------------------------
def test_the_explorer_attributes_the_prediction_to_the_planted_memory():
    from ffnlib.explorer import Explorer, attribute_prediction
    from ffnlib.widgets.explorer import ExplorerWidget
    from ffnlib.widgets.render import render_attribution

    loaded = _tiny("llama", seed=1)
    prompt = "The capital of France is"
    _plant(loaded, _ids(prompt), _ids("Paris")[0], 2, 7)
    result = attribute_prediction(loaded, prompt, top=5, k_tokens=3)
    assert result.token == "Paris"
    assert (result.memories["layer"].iloc[0], result.memories["memory"].iloc[0]) == (2, 7)
    assert result.memories["top_tokens"].iloc[0][0] == "Paris"  # its value writes the answer
    assert list(result.memories["score"]) == sorted(result.memories["score"], reverse=True)
    assert 'data-layer="2" data-memory="7"' in render_attribution(result)
    ui = ExplorerWidget(Explorer(loaded, top_attributed=4), prompt=prompt)
    ui.attribute_button.click()
    assert "ffn-attribution" in ui.prompt_out.value and ui.contributors.options[0][1] == (2, 7)
    ui.prompt.value = "   "
    ui.attribute()
    assert "ffn-error" in ui.prompt_out.value  # shown, not raised
    assert _hooks(loaded.model) == 0


def test_notebook_01_s_cached_triggers_are_read_by_their_exact_request_and_never_mined(tiny, tmp_path, monkeypatch):
    from ffnlib import keys

    words = WORDS[:40]
    sentences = pd.DataFrame({"sentence_id": range(60), "text": [" ".join(words[(3 * i + j) % len(words)]
                                                                           for j in range(6)) for i in range(60)]})
    assert kn.cached_trigger_examples(tiny, sentences, k=5, out_dir=tmp_path) is None  # not mined yet: nothing
    mined = keys.mine_trigger_examples(tiny, sentences, k=5, out_dir=tmp_path, progress=False)  # as notebook 01
    monkeypatch.setattr(keys, "mine_trigger_examples", lambda *a, **kw: pytest.fail("notebook 06 must not mine"))
    found = kn.cached_trigger_examples(tiny, sentences, k=5, out_dir=tmp_path)
    pd.testing.assert_frame_equal(found.triggers, mined.triggers)
    assert found.manifest == mined.manifest and found.stats["from_cache"]
    assert kn.cached_trigger_examples(tiny, sentences, k=4, out_dir=tmp_path) is None  # another k: not that result
