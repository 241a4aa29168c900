"""The memory explorer: its analyses against independent computations, its widget callbacks and state,
interventions on the real model, and the static atlas.

Real SmolLM2 for the analyses (session fixture ``smollm``); a tiny random GPT-2 (a plain, non-gated FFN with a
LayerNorm) with SmolLM2's tokenizer for "any supported model".
"""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

import ffnlib
from ffnlib.adapters import get_adapter
from ffnlib.capture import capture
from ffnlib.corpus import load_corpus
from ffnlib.explorer import (CoefficientSample, Explorer, ValueIndex, analyse_prompt, compare_intervention,
                             format_edits, key_rows, layer_key_measures, memory_view, parse_edits, search_trigger_word,
                             search_value_token)
from ffnlib.keys import mine_trigger_examples, trigger_table
from ffnlib.models import LoadedModel
from ffnlib.values import value_logits
from ffnlib.widgets.atlas import export_atlas, memory_page_name, select_memories
from ffnlib.widgets.explorer import ExplorerWidget
from ffnlib.widgets.render import render_histogram, render_memory_view

PROMPT = "The capital of France is"
LAYERS = (3, 10)  # mined layers for the trigger-based tests (mining stops after the last)


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def sentences():
    return load_corpus("wiki", split="train", seed=0, max_sentences=24)


@pytest.fixture(scope="module")
def triggers(smollm, sentences):
    return mine_trigger_examples(smollm, sentences, k=8, layers=list(LAYERS), progress=False)


@pytest.fixture(scope="module")
def sample(smollm, sentences):
    return CoefficientSample(smollm, sentences.head(6), max_tokens=24, batch_size=4)


@pytest.fixture(scope="module")
def analysis(smollm):
    return analyse_prompt(smollm, PROMPT, top_memories=4, k_tokens=5)


@pytest.fixture(scope="module")
def tiny(smollm):
    """A random 2-layer GPT-2 (ReLU-free GELU FFN, LayerNorm, head bias-free) over SmolLM2's vocabulary."""
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=len(smollm.tokenizer), n_layer=2, n_embd=32, n_head=4, n_inner=64,
                           n_positions=64, bos_token_id=0, eos_token_id=0)
    model = tf.GPT2LMHeadModel(config).eval().requires_grad_(False)
    return LoadedModel("tiny-gpt2", model, smollm.tokenizer, get_adapter(model), "random", "random")


# ---- prompt view ------------------------------------------------------------------------------------
def test_prompt_view_ranks_sub_updates_as_an_independent_computation(smollm, analysis):
    adapter = smollm.adapter
    ids = torch.tensor([smollm.encode(PROMPT)])
    with capture(smollm, what=("coefficients",)) as acts:
        logits = smollm.model(ids).logits[0, -1]
    assert analysis.prediction["token"].iloc[0] == " Paris"
    assert analysis.prediction["probability"].iloc[0] == pytest.approx(float(logits.softmax(-1).max()), rel=1e-5)
    for layer in (0, 14, 29):
        m = acts.coefficients[layer][0, -1]
        score = m.abs() * adapter.values(layer).norm(dim=-1)
        expected = score.topk(4).indices.tolist()
        rows = analysis.memories[analysis.memories["layer"] == layer].sort_values("rank")
        assert rows["memory"].tolist() == expected
        assert rows["score"].is_monotonic_decreasing
        for r in rows.itertuples():
            sign = 1 if m[r.memory] >= 0 else -1
            assert r.sign == sign and r.coefficient == pytest.approx(float(m[r.memory]), rel=1e-5)
            top = value_logits(adapter, layer, [r.memory], sign=sign)[0].topk(5).indices.tolist()
            assert r.top_token_ids == top  # top tokens of v, or of -v when m < 0


def test_prompt_view_reads_the_residual_before_and_after_the_ffn(smollm, analysis):
    last = analysis.layers.iloc[-1]
    # after the last FFN the residual is what the model projects: same top token and probability
    assert last["after_token"] == " Paris"
    assert last["after_prob"] == pytest.approx(float(analysis.prediction["probability"].iloc[0]), rel=1e-4)
    layers = analysis.layers
    assert (layers["changed"] == (layers["before_token_id"] != layers["after_token_id"])).all()
    assert len(analysis.layers) == smollm.adapter.n_layers
    with pytest.raises(ffnlib.ParameterError, match="prompt"):
        analyse_prompt(smollm, "   ")


# ---- interventions ------------------------------------------------------------------------------------
def test_widget_switching_off_the_top_contributor_lowers_the_token_it_promotes(smollm, analysis):
    ui = ExplorerWidget(Explorer(smollm, max_new_tokens=2), prompt=PROMPT)
    ui.analyse()  # the Analyse button's callback
    assert "ffn-prompt-table" in ui.prompt_out.value and ui.edit_prompt.value == PROMPT
    last = ui.explorer.analysis.memories
    top = last[last["layer"] == 29].sort_values("rank").iloc[0]  # the last layer: a direct effect
    choice = (29, int(top.memory))
    assert choice in [value for _, value in ui.candidates.options]
    promoted = int(top.top_token_ids[0])
    hooks = _hooks(smollm.model)
    ui.candidates.value = (choice,)
    ui.mode.value = "switch off"
    ui.add_button.click()
    assert ui.edits.value == f"29:{choice[1]}" and ui.explorer.edits == {choice: 0.0}
    ui.apply_button.click()
    assert _hooks(smollm.model) == hooks  # the intervention's hooks are gone
    comparison = ui.explorer.comparison
    assert "ffn-intervention" in ui.edit_out.value and 'class="ffn-error"' not in ui.edit_out.value
    direct = compare_intervention(smollm, PROMPT, {choice: 0.0}, max_new_tokens=0, track=[promoted])
    change = direct.changes.set_index("token_id")["logit_change"]
    assert change[promoted] < 0
    assert change[promoted] < change.mean()
    shown = comparison.changes.set_index("token_id")["logit_change"]  # the widget lists the promoted token too
    assert shown[promoted] == pytest.approx(change[promoted], abs=1e-4)
    # promoting instead: a large coefficient with the memory's own sign raises that token
    ui.clear_button.click()
    assert ui.edits.value == "" and ui.explorer.edits == {}
    ui.mode.value, ui.value.value = "set coefficient to", float(10 * top.coefficient)
    ui.add_button.click()
    ui.apply_button.click()
    boosted = ui.explorer.comparison.changes.set_index("token_id")
    assert promoted in boosted.index and boosted.loc[promoted, "p_after"] > boosted.loc[promoted, "p_before"]
    assert ui.explorer.comparison.continuation_before != "" and len(ui.explorer.comparison.continuation_after) > 0


def test_edits_are_read_and_written_and_bad_ones_are_shown_not_raised(smollm):
    assert parse_edits("28:1234, L20/77=5\n3:4=off; 1:2=-2.5") == {(28, 1234): 0.0, (20, 77): 5.0, (3, 4): 0.0,
                                                                    (1, 2): -2.5}
    assert parse_edits(format_edits({(28, 1234): 0.0, (20, 77): 5.0})) == {(28, 1234): 0.0, (20, 77): 5.0}
    for bad in ("28", "a:b", "3:4=x", "3:4=inf"):
        with pytest.raises(ffnlib.ParameterError):
            parse_edits(bad)
    ui = ExplorerWidget(Explorer(smollm), prompt=PROMPT)
    for text, match in (("3:99999", "out of range"), ("nonsense", "Cannot read"), ("", "No edits")):
        ui.edits.value = text
        ui.apply_button.click()
        assert 'class="ffn-error"' in ui.edit_out.value and match in ui.edit_out.value
        assert not ui.apply_button.disabled and ui.apply_button.description == "Apply"
    ui.prompt.value = ""
    ui.analyse_button.click()
    assert 'class="ffn-error"' in ui.prompt_out.value


# ---- memory view and search ---------------------------------------------------------------------------
def test_memory_view_shows_triggers_values_histogram_and_measures(smollm, triggers, sample, sentences):
    layer, memory = 10, 100
    ui = ExplorerWidget(Explorer(smollm, triggers, sample, n_triggers=5, k_tokens=7))
    ui.layer.value, ui.memory.value = layer, memory
    ui.show_button.click()
    view = ui.explorer.view
    assert (view.layer, view.memory) == (layer, memory)
    assert [side.sign for side in view.sides] == [1, -1]  # gated: the negative side too
    for side in view.sides:
        expected = trigger_table(triggers, smollm.tokenizer, layer, memory, side.sign, n=5)
        pd.testing.assert_frame_equal(side.triggers.reset_index(drop=True), expected)
        top = value_logits(smollm.adapter, layer, [memory], sign=side.sign)[0].softmax(-1).topk(7)
        assert side.top_tokens["token_id"].tolist() == top.indices.tolist()
        assert side.top_tokens["probability"].to_numpy() == pytest.approx(top.values.numpy(), rel=1e-5)
        assert set(side.measures) >= {"shallow_token", "topic_concentration", "most_common_last_token"}
    # the atlas's shortcut (the layer's pattern measures computed at once) gives the same measures
    fast = memory_view(smollm, triggers, layer, memory, n_triggers=5, k_tokens=7,
                       key_measures=layer_key_measures(triggers, layer))
    assert [side.measures for side in fast.sides] == [side.measures for side in view.sides]
    page = ui.memory_out.value
    marked = re.findall(r"<mark>(.*?)</mark>", page)
    assert len(marked) == 10 and marked[0] == html.escape(view.sides[0].triggers["last_token"].iloc[0])
    assert page.count('class="ffn-hist-bar"') == 40 and "Pattern measures" in page
    # the histogram sample: this memory's coefficient at every non-padding token of the sample
    assert len(view.sample) == sample.n_tokens
    ids = torch.tensor([smollm.encode(sentences["text"].iloc[0])[:24]])
    with capture(smollm, layer, what=("coefficients",)) as acts:
        smollm.model(ids)
    first = acts.coefficients[layer][0, :, memory].numpy()
    assert view.sample[: len(first)] == pytest.approx(first, abs=1e-4)


def test_key_rows_equals_the_miners_own_lookup(triggers):
    for layer, memory, sign in ((3, 0, 1), (3, 1535, -1), (10, 700, 1), (10, 5, -1)):
        pd.testing.assert_frame_equal(key_rows(triggers, layer, memory, sign), triggers.of(layer, memory, sign))
    with pytest.raises(ffnlib.ParameterError, match="mined layers"):
        key_rows(triggers, 20, 0, 1)


def test_value_token_search_jumps_to_memories_that_promote_the_token(smollm):
    ui = ExplorerWidget(Explorer(smollm))
    ui.query.value, ui.search_by.value = "Paris", "value token"
    ui.search_button.click()
    results = ui.explorer.results
    assert len(results) == 20 and len(ui.results.options) == 20
    first = results.iloc[0]
    assert (ui.explorer.view.layer, ui.explorer.view.memory) == (first.layer, first.memory)  # jumped to it
    assert f"Layer {first.layer}, memory {first.memory}" in ui.memory_out.value
    assert results["rank"].is_monotonic_increasing
    for r in results.head(5).itertuples():  # the reported rank is exact
        logits = value_logits(smollm.adapter, r.layer, [r.memory], sign=r.sign)[0]
        assert int((logits > logits[r.token_id]).sum()) == r.rank
        assert r.token.strip() == "Paris"
    assert results["rank"].iloc[0] <= 2  # some value ranks " Paris" near its top
    ui.results.value = ui.results.options[3][1]  # picking another result shows it
    assert (ui.explorer.view.layer, ui.explorer.view.memory) == ui.results.options[3][1]
    ui.query.value = "Pariszzqx"
    ui.search_button.click()
    assert 'class="ffn-error"' in ui.memory_out.value and "not a single token" in ui.memory_out.value


def test_trigger_word_search_finds_triggers_that_end_with_the_word(smollm, triggers):
    found = search_trigger_word(smollm, triggers, "the", limit=10)
    assert len(found) == 10 and (found["last"] > 0).all()
    assert found["last"].is_monotonic_decreasing
    for r in found.head(3).itertuples():
        table = trigger_table(triggers, smollm.tokenizer, r.layer, r.memory, r.sign, n=50)
        assert (table["last_token"].str.strip().str.lower() == "the").sum() == r.last
        contains = table["prefix"].str.cat(table["last_token"]).str.contains(r"\bthe\b", case=False, regex=True)
        assert contains.sum() >= r.anywhere  # token matches are a subset of text matches
    assert search_trigger_word(smollm, triggers, "zzqxjw").empty
    ui = ExplorerWidget(Explorer(smollm, triggers))
    ui.query.value, ui.search_by.value = "the", "trigger word"
    ui.search_button.click()
    assert (ui.explorer.view.layer, ui.explorer.view.memory) == tuple(found.iloc[0][["layer", "memory"]])


def test_coefficient_sample_matches_unpadded_forward_passes(smollm, sentences):
    texts = sentences["text"].head(3).tolist()
    sample = CoefficientSample(smollm, texts, max_tokens=20, batch_size=3)
    expected = []
    for text in texts:
        with capture(smollm, 5, what=("coefficients",)) as acts:
            smollm.model(torch.tensor([smollm.encode(text)[:20]]))
        expected.append(acts.coefficients[5][0])
    assert torch.allclose(sample.layer(5), torch.cat(expected), atol=1e-4)
    assert sample.of(5, 7) == pytest.approx(torch.cat(expected)[:, 7].numpy(), abs=1e-4)
    fresh = CoefficientSample(smollm, texts, max_tokens=20, batch_size=2)
    fresh.prefetch([(5, 7), (2, 100), (5, 9)])  # one pass for several layers keeps only those columns
    assert fresh.of(5, 9) == pytest.approx(sample.layer(5)[:, 9].numpy(), abs=1e-5) and not fresh.kept_layers
    assert fresh.of(2, 100) == pytest.approx(sample.layer(2)[:, 100].numpy(), abs=1e-5)
    with pytest.raises(ffnlib.ParameterError):
        sample.of(5, 10**6)


# ---- any supported model ----------------------------------------------------------------------------
def test_a_plain_ffn_model_gets_one_side_and_exact_value_search(tiny):
    adapter = tiny.adapter
    assert not adapter.gated
    view = memory_view(tiny, None, 1, 3, k_tokens=4)
    assert [s.sign for s in view.sides] == [1] and view.sides[0].triggers.empty
    assert 'data-sign="-1"' not in render_memory_view(view)
    analysis = analyse_prompt(tiny, PROMPT, top_memories=3)
    assert len(analysis.layers) == 2 and len(analysis.memories) == 6
    # the z-scores of the value index equal those of the full projection (LayerNorm: centred, gain)
    index = ValueIndex(tiny)
    token = tiny.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    logits = adapter.logits_from_values(adapter.values(1)).double()
    exact = (logits[:, token] - logits.mean(-1)) / logits.std(-1, unbiased=False)
    assert index.z_scores(token, [1])[0].double() == pytest.approx(exact.numpy(), abs=1e-3)
    found = search_value_token(tiny, "Paris", index=index, limit=5)
    for r in found.itertuples():
        row = adapter.logits_from_values(r.sign * adapter.values(r.layer)[r.memory])
        assert int((row > row[r.token_id]).sum()) == r.rank


# ---- atlas ----------------------------------------------------------------------------------------------
def test_atlas_writes_a_chosen_subset_with_the_memories_content(smollm, triggers, tmp_path):
    chosen = select_memories(triggers, per_layer=2)
    table = triggers.triggers
    for layer in LAYERS:
        best = table[table["layer"] == layer].assign(a=lambda f: f["coefficient"].abs()).groupby("memory")["a"].max()
        expected = best.sort_values(ascending=False).index[:2].tolist()
        assert chosen[chosen["layer"] == layer]["memory"].tolist() == expected
    index = export_atlas(smollm, triggers, tmp_path / "atlas", per_layer=2, n_triggers=5, k_tokens=5)
    manifest = json.loads((tmp_path / "atlas" / "atlas.json").read_text())
    pages = sorted(p.relative_to(tmp_path / "atlas").as_posix() for p in (tmp_path / "atlas").rglob("*.html"))
    assert pages == sorted(manifest["pages"]) and len(pages) == 1 + len(LAYERS) + 2 * len(LAYERS)
    assert index.read_text().count('href="layers/layer_') == len(LAYERS)
    layer, memory = manifest["memories"][0]
    page = (tmp_path / "atlas" / "memories" / memory_page_name(layer, memory)).read_text()
    top = trigger_table(triggers, smollm.tokenizer, layer, memory, 1, n=1).iloc[0]
    assert f"<mark>{html.escape(top.last_token)}</mark>" in page
    tokens = smollm.token_strings(value_logits(smollm.adapter, layer, [memory])[0].topk(5).indices.tolist())
    assert all(f'class="ffn-tok">{html.escape(t.replace(chr(10), "⏎"))}</span>' in page for t in tokens)
    # an explicit list replaces the pages: stale ones are removed
    export_atlas(smollm, triggers, tmp_path / "atlas", memories=[(10, 7)], n_triggers=3)
    pages = sorted(p.name for p in (tmp_path / "atlas").rglob("*.html"))
    assert pages == sorted(["index.html", "layer_10.html", memory_page_name(10, 7)])
    with pytest.raises(ffnlib.ParameterError):
        select_memories(triggers, criterion="loudest")
    with pytest.raises(ffnlib.ParameterError):
        export_atlas(smollm, None, tmp_path / "x")


def test_histogram_counts_every_value():
    values = np.random.default_rng(0).normal(size=1000)
    svg = render_histogram(values, bins=25, marks={"top": 5.0})
    counts = [int(c) for c in re.findall(r"\): (\d+)</title>", svg)]
    assert len(counts) == 25 and sum(counts) == 1000
    assert render_histogram(np.array([])) == ""
