"""Memories like this one (``ffnlib.explorer.similar_by_value`` / ``similar_by_triggers``): the value correlation from
the head's moments against the correlation of the full logit vectors, trigger overlaps on a hand-built table with
known overlaps, the base rates, the explorer's section and its links, and the errors for bad input.

Tiny random models of ``tests/tiny_models.py``: GPT-J (LayerNorm, and a head bias, made to correlate with the head's
rows so that every term of the covariance counts), Llama (gated: both sides, RMSNorm) and Gemma (gain 1 + w).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

import ffnlib
from ffnlib.adapters import get_adapter
from ffnlib.explorer import Explorer, TriggerSets, ValueIndex, similar_by_triggers, similar_by_value
from ffnlib.keys import TriggerExamples
from ffnlib.models import LoadedModel
from ffnlib.widgets.explorer import ExplorerWidget
from tiny_models import CASE_IDS, CASES, make_tokenizer


def _loaded(case_id: str) -> LoadedModel:
    case = CASES[CASE_IDS.index(case_id)]
    torch.manual_seed(0)
    model = case.model_cls(case.config()).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():  # a random init is nearly flat: widen it, and give norms non-unit gains
            p.normal_(0, 0.3) if p.dim() == 2 else p.add_(0.3 * torch.randn_like(p))
        head = get_adapter(model).head
        if head.bias is not None:  # a bias correlated with the head's rows: the cross terms matter
            head.bias.copy_(head.weight @ torch.randn(head.weight.shape[1]) + 0.5 * torch.randn_like(head.bias))
    return LoadedModel(case_id, model, make_tokenizer(), get_adapter(model), "random", case_id, False, [1])


def _logits(loaded, layer, memories, sign=1) -> np.ndarray:
    """The full logit vectors of ``sign · v`` as the project reads values (``Adapter.logits_from_values``)."""
    values = loaded.adapter.values(layer)[list(memories)]
    return loaded.adapter.logits_from_values(sign * values).double().numpy()


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlations of every row of ``a`` with every row of ``b`` (rows: full logit vectors)."""
    a, b = (x - x.mean(-1, keepdims=True) for x in (a, b))
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)) @ (b / np.linalg.norm(b, axis=-1, keepdims=True)).T


@pytest.fixture(scope="module", params=["gpt-j", "llama", "gemma"])
def model(request):
    return _loaded(request.param)


def test_value_correlation_is_that_of_the_full_logit_vectors(model):
    adapter = model.adapter
    assert not adapter.softcap  # the brute force reads the softcap-free logits the correlation is of
    if model.name == "gpt-j":
        assert adapter.head.bias is not None and float(ValueIndex(model).bias_covariance.norm()) > 0.1
    index = ValueIndex(model)
    signs = [1, -1] if adapter.gated else [1]
    layer, memory = 1, 5
    for sign in signs:
        mine = _logits(model, layer, [memory], sign)[0]
        fast = index.correlations(layer, memory, sign, signs=signs).double().numpy()
        for j, other in enumerate(signs):
            for lay in range(adapter.n_layers):
                theirs = _logits(model, lay, range(adapter.d_ff), other)
                brute = np.array([np.corrcoef(mine, row)[0, 1] for row in theirs])
                assert fast[j, lay] == pytest.approx(brute, abs=2e-5)
    assert float(index.correlations(layer, memory)[0, layer, memory]) == pytest.approx(1.0, abs=1e-5)
    # pair by pair, and the z-scores (whose spread has the same bias terms)
    first, second = [(0, 3, 1), (1, 7, signs[-1]), (0, 0, 1)], [(1, 2, signs[-1]), (1, 7, 1), (0, 0, 1)]
    pairs = index.pair_correlations(first, second).double().numpy()
    for value, (la, ma, sa), (lb, mb, sb) in zip(pairs, first, second):
        assert value == pytest.approx(np.corrcoef(_logits(model, la, [ma], sa)[0], _logits(model, lb, [mb], sb)[0])[
            0, 1], abs=2e-5)
    logits = _logits(model, 0, range(adapter.d_ff))
    exact = (logits[:, 7] - logits.mean(-1)) / logits.std(-1)
    assert index.z_scores(7, [0])[0].double().numpy() == pytest.approx(exact, abs=1e-4)


def test_similar_by_value_lists_the_most_correlated_memories_of_all_layers(model):
    adapter = model.adapter
    signs = [1, -1] if adapter.gated else [1]
    layer, memory = 0, 11
    mine = _logits(model, layer, [memory])
    rows = []
    for lay in range(adapter.n_layers):
        corr = np.stack([_corr(mine, _logits(model, lay, range(adapter.d_ff), s))[0] for s in signs])
        for m in range(adapter.d_ff):
            if (lay, m) != (layer, memory):  # the memory itself is left out, its other side included
                rows.append((lay, m, signs[int(np.argmax(corr[:, m]))], float(corr[:, m].max())))
    brute = pd.DataFrame(rows, columns=["layer", "memory", "sign", "similarity"]).sort_values(
        "similarity", ascending=False)
    like = similar_by_value(model, layer, memory, limit=6, pairs=3000, k_tokens=3)
    assert (like.by, like.layer, like.memory, like.sign, like.n_compared) == ("value", 0, 11, 1, len(brute))
    assert like.memories[["layer", "memory", "sign"]].values.tolist() == brute.head(6)[
        ["layer", "memory", "sign"]].values.tolist()
    assert like.memories["similarity"].to_numpy() == pytest.approx(brute["similarity"].head(6).to_numpy(), abs=2e-5)
    assert like.median == pytest.approx(float(brute["similarity"].median()), abs=2e-5)
    top = like.memories.iloc[0]
    ids = np.argsort(-_logits(model, int(top.layer), [int(top.memory)], int(top.sign))[0])[:3]
    assert top.top_tokens == model.token_strings(ids.tolist())
    # the base rate: random pairs of memories, each through the second one's nearer side, match all pairs'
    every = []
    for la in range(adapter.n_layers):
        for lb in range(adapter.n_layers):
            a, b = _logits(model, la, range(adapter.d_ff)), [_logits(model, lb, range(adapter.d_ff), s) for s in signs]
            corr = np.max([_corr(a, side) for side in b], axis=0)
            if la == lb:
                np.fill_diagonal(corr, np.nan)
            every.append(corr[~np.isnan(corr)])
    every = np.concatenate(every)  # (the first one's -v side, drawn half the time for gated FFNs, has the same law)
    base = like.random_pairs
    assert base["n_pairs"] == 3000 and base["median"] <= base["p95"] <= base["p99"] <= 1
    assert base["median"] == pytest.approx(float(np.median(every)), abs=0.05)
    assert base["p95"] == pytest.approx(float(np.quantile(every, 0.95)), abs=0.05)
    again = similar_by_value(model, layer, memory, limit=6, pairs=3000, k_tokens=3)
    assert again.random_pairs == base  # seeded


# ---- trigger overlap ---------------------------------------------------------------------------------------
SETS = {  # (layer, memory, sign) -> trigger examples (sentence_id, position), strongest first
    (0, 0, 1): [(0, 1), (0, 2), (1, 3)],
    (0, 0, -1): [(0, 1), (5, 5), (6, 6)],  # the asked memory's other side: left out
    (0, 1, 1): [(0, 1), (0, 2), (2, 4)],  # shares 2: 2 / (3 + 3 - 2) = 0.5
    (1, 5, 1): [(1, 3), (3, 1), (3, 2)],  # shares 1: 0.2 ...
    (1, 5, -1): [(1, 3), (0, 2), (0, 1)],  # ... but its other side is the same set: 1.0
    (1, 2, 1): [(7, 1), (7, 2), (7, 3)],  # shares none: not listed
}


@pytest.fixture(scope="module")
def llama():
    return _loaded("llama")


@pytest.fixture(scope="module")
def triggers():
    rows = [{"layer": lay, "memory": m, "sign": s, "rank": r, "coefficient": float(s * (3 - r)), "sentence_id": sid,
             "position": pos, "next_token": 4} for (lay, m, s), examples in SETS.items()
            for r, (sid, pos) in enumerate(examples)]
    sentences = pd.DataFrame({"sentence_id": range(8), "text": [f"w{i + 4} w5 w6 w7 w8 w9 w10" for i in range(8)],
                              "title": "t", "topic": "x",
                              "token_ids": [[1, i + 4, 5, 6, 7, 8, 9, 10] for i in range(8)]})
    return TriggerExamples(triggers=pd.DataFrame(rows), sentences=sentences,
                           manifest={"layers": [0, 1], "k": 3, "negative": True})


def test_similar_by_triggers_counts_shared_trigger_examples(llama, triggers):
    like = similar_by_triggers(llama, triggers, 0, 0, limit=5, pairs=500, k_tokens=2)
    table = like.memories
    assert table[["layer", "memory", "sign", "shared"]].values.tolist() == [[1, 5, -1, 3], [0, 1, 1, 2]]
    assert table["similarity"].tolist() == pytest.approx([1.0, 0.5])
    ids = np.argsort(-_logits(llama, 1, [5], -1)[0])[:2]
    assert table["top_tokens"].iloc[0] == llama.token_strings(ids.tolist())
    assert like.n_compared == 3 and like.median == pytest.approx(0.5)  # memories (0, 1), (1, 2), (1, 5)
    assert like.random_pairs["n_pairs"] == 500 and 0 <= like.random_pairs["median"] <= like.random_pairs["p99"] <= 1
    # the other side, and limits
    other = similar_by_triggers(llama, triggers, 0, 0, sign=-1)
    assert other.memories[["layer", "memory", "sign", "shared"]].values.tolist() == [[0, 1, 1, 1], [1, 5, -1, 1]]
    assert other.memories["similarity"].tolist() == pytest.approx([0.2, 0.2])
    assert len(similar_by_triggers(llama, triggers, 0, 0, limit=1).memories) == 1
    sets = TriggerSets(triggers)
    keys, shared, jaccard = sets.overlaps(1, 2)
    assert shared.sum() == 3 and jaccard[sets.key(1, 2)] == 1.0 and (0, 0, -1) in sets and (0, 9, 1) not in sets
    assert similar_by_triggers(llama, triggers, 1, 2, index=sets).memories.empty


def test_the_explorer_lists_memories_like_this_one_and_links_to_them(llama, triggers):
    ui = ExplorerWidget(Explorer(llama, triggers, n_triggers=2, n_similar=3))
    ui.show_memory(0, 0)
    assert set(ui.explorer.similar) == {"value", "triggers"}
    out = ui.memory_out.value
    assert "Memories like this one" in out and out.count('class="ffn-similar-list"') == 2
    section = out[out.index('class="ffn-similar"'):]
    targets = [json.loads(t.replace("&quot;", '"')) for t in re.findall(r'data-link="([^"]+)"', section)]
    value_rows = ui.explorer.similar["value"].memories
    assert targets[:3] == [{"view": "memory", "layer": int(r.layer), "memory": int(r.memory)}
                           for r in value_rows.itertuples()]
    assert targets[3:5] == [{"view": "memory", "layer": 1, "memory": 5}, {"view": "memory", "layer": 0, "memory": 1}]
    assert "median 0." in section and "99th" in section  # the base rates are shown
    ui.follow(targets[3])  # a link opens that memory, with its own list
    assert (ui.explorer.layer, ui.explorer.memory) == (1, 5) and 'data-layer="1" data-memory="5"' in ui.memory_out.value
    assert ui.explorer.similar["triggers"].memories[["layer", "memory"]].values.tolist()[0] == [0, 0]
    values_only = Explorer(llama)  # no trigger examples: by value only
    values_only.show_memory(0, 7)
    assert set(values_only.similar) == {"value"} and len(values_only.similar["value"].memories) == 5
    off = Explorer(llama, triggers, n_similar=0)
    off.show_memory(0, 0)
    assert off.similar == {}


def test_bad_input_gets_a_clear_error(llama, triggers):
    with pytest.raises(ffnlib.ParameterError, match="out of range"):
        similar_by_value(llama, 2, 0)
    with pytest.raises(ffnlib.ParameterError, match="Memory 48 is out of range"):
        similar_by_value(llama, 0, 48)
    with pytest.raises(ffnlib.ParameterError, match="sign must be"):
        similar_by_value(llama, 0, 0, sign=0)
    with pytest.raises(ffnlib.ParameterError, match="limit must be a positive int"):
        similar_by_triggers(llama, triggers, 0, 0, limit=0)
    with pytest.raises(ffnlib.ParameterError, match="needs mined trigger examples"):
        similar_by_triggers(llama, None, 0, 0)
    with pytest.raises(ffnlib.ParameterError, match=r"No trigger examples for layer 0, memory 9, sign 1: mined"):
        similar_by_triggers(llama, triggers, 0, 9)
    with pytest.raises(ffnlib.ParameterError, match="as many first as second"):
        ValueIndex(llama).pair_correlations([(0, 0, 1)], [])
    with pytest.raises(ffnlib.ParameterError, match="by one of"):
        Explorer(llama).like_this("keys")
