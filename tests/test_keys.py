"""Section 3 (keys capture input patterns): ``ffnlib.keys``, its plots and the annotation widget logic.

The miner is checked against a brute-force top-k (one unbatched forward pass per sentence, every
coefficient kept, sorted with pandas) on a tiny random Llama and on three layers of the real SmolLM2;
resuming is checked after an exception and after real SIGKILLs in a subprocess at five points; the
removal experiment against a direct recomputation and against a model whose answer is known by hand.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ffnlib import CorpusError, ParameterError  # noqa: E402
from ffnlib import batching, keys, mining  # noqa: E402
from ffnlib.adapters import get_adapter  # noqa: E402
from ffnlib.capture import capture  # noqa: E402
from ffnlib.corpus import load_corpus  # noqa: E402
from ffnlib.models import LoadedModel  # noqa: E402

VOCAB = 49152  # SmolLM2's tokenizer


def _tiny_llama(seed: int = 0, layers: int = 3, d_ff: int = 24) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=d_ff, num_hidden_layers=layers,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():  # a random init is nearly flat; widen it so the tops are well separated
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def _wrap(model, tokenizer, name="tiny-llama", bos=()) -> LoadedModel:
    return LoadedModel(name, model, tokenizer, get_adapter(model), "random init", f"{name}-hash", False, list(bos))


@pytest.fixture(scope="module")
def tiny(smollm):
    return _wrap(_tiny_llama(), smollm.tokenizer)


@pytest.fixture(scope="module")
def sentences(wiki):
    return load_corpus(wiki, split="train", seed=0, max_sentences=40)


def _mine(loaded, sentences, **kw):
    kw = {"k": 5, "batch_tokens": 160, "progress": False, **kw}
    return keys.mine_trigger_examples(loaded, sentences, **kw)


# ---- brute force --------------------------------------------------------------------------------------
def brute_force(loaded, sentences, layers, k, per_sentence="max", signs=(1, -1)) -> pd.DataFrame:
    """Every coefficient of every sentence, one unbatched forward pass each; top-k by pandas sorting."""
    table = mining.prepare_sentences(loaded, sentences)
    nb = len(loaded.bos)
    frames = []
    with torch.inference_mode(), capture(loaded, layers=layers, what=("coefficients",)) as acts:
        for sid, ids in zip(table["sentence_id"], table["token_ids"]):
            loaded.model(input_ids=torch.tensor([ids]))
            for layer in layers:
                c = acts.coefficients[layer][0, nb:].numpy()  # (real tokens, d_ff)
                for sign in signs:
                    v = sign * c
                    if per_sentence == "max":
                        pos = v.argmax(0)
                        frames.append(pd.DataFrame({"layer": layer, "memory": np.arange(v.shape[1]), "sign": sign,
                                                    "score": v[pos, np.arange(v.shape[1])], "sentence_id": sid,
                                                    "position": pos + nb}))
                    else:
                        t, d = v.shape
                        frames.append(pd.DataFrame({"layer": layer, "memory": np.tile(np.arange(d), t), "sign": sign,
                                                    "score": v.reshape(-1), "sentence_id": sid,
                                                    "position": np.repeat(np.arange(t), d) + nb}))
    bf = pd.concat(frames, ignore_index=True)
    bf = bf.sort_values(["layer", "memory", "sign", "score", "sentence_id", "position"],
                        ascending=[True, True, True, False, True, True])
    bf["rank"] = bf.groupby(["layer", "memory", "sign"]).cumcount()
    return bf[bf["rank"] < k]


def assert_matches_brute_force(triggers, bf, atol=1e-6, exact=True):
    m = triggers.merge(bf, on=["layer", "memory", "sign", "rank"], suffixes=("", "_bf"), validate="one_to_one")
    assert len(m) == len(bf) == len(triggers)
    np.testing.assert_allclose(m["coefficient"] * m["sign"], m["score"], atol=atol, rtol=1e-5)
    differ = (m["sentence_id"] != m["sentence_id_bf"]) | (m["position"] != m["position_bf"])
    if exact:
        assert not differ.any(), m[differ].head()
    else:  # batched and unbatched float sums differ in the last bits: a swap is allowed only at a near tie
        bf_sorted = bf.set_index(["layer", "memory", "sign", "rank"])["score"]
        for r in m[differ].itertuples():
            near = [bf_sorted.get((r.layer, r.memory, r.sign, r.rank + d)) for d in (-1, 1)]
            assert any(x is not None and abs(x - r.score) <= atol for x in near), r
        assert differ.mean() < 0.01


# ---- the miner ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_sentence,bos,lazy,copy,spare", [
    ("max", False, False, False, 2.0), ("max", False, True, False, 0.2), ("max", True, True, True, 2.0),
    ("max", True, False, True, 0.2), ("all", False, False, False, 2.0), ("all", True, False, False, 0.2)])
def test_miner_equals_brute_force_on_a_tiny_model(tiny, smollm, sentences, per_sentence, bos, lazy, copy, spare,
                                                  monkeypatch):
    """Every way of finding the maxima gives the same result: positions in the same pass as the values or
    only for the candidates that enter (lazy), padded batches reduced run by run or through one copy, pools
    sorted rarely or after every candidate (spare slots 2k or 1)."""
    if lazy:
        monkeypatch.setattr(mining, "DENSE_PAIRS_SHARE", 2.0)  # never all at once
    if copy:
        monkeypatch.setattr(mining, "MAX_GROUP_VIEWS", 0)
    monkeypatch.setattr(mining, "SPARE_SLOTS", spare)
    loaded = dataclasses.replace(tiny, bos=[1]) if bos else tiny
    ex = _mine(loaded, sentences, per_sentence=per_sentence, negative=True)
    bf = brute_force(loaded, sentences, [0, 1, 2], 5, per_sentence)
    assert_matches_brute_force(ex.triggers, bf, exact=True)
    t = ex.triggers
    assert list(t.columns) == keys.TRIGGER_COLUMNS
    assert len(t) == 2 * 3 * 24 * 5 and set(t["sign"]) == {1, -1}
    assert (t["position"] >= len(loaded.bos)).all(), "BOS positions are never triggers"
    # next_token is the token after the prefix (or -1 at the sentence end)
    index = ex.token_index()
    for r in t.sample(50, random_state=0).itertuples():
        ids = index[r.sentence_id]
        assert ids[: len(loaded.bos)] == list(loaded.bos)
        assert r.next_token == (ids[r.position + 1] if r.position + 1 < len(ids) else -1)
    if per_sentence == "max":  # at most one prefix per sentence per key
        assert not t.duplicated(["layer", "memory", "sign", "sentence_id"]).any()
    assert ex.stats["padding_share"] < 0.5 and ex.stats["tokens"] == sum(map(len, ex.sentences["token_ids"]))


def test_all_positions_differ_from_one_per_sentence(tiny, sentences):
    one = _mine(tiny, sentences, per_sentence="max").triggers
    every = _mine(tiny, sentences, per_sentence="all").triggers
    # the strongest prefix is the same; below it "all" may take several prefixes of one sentence
    top = ["layer", "memory", "sign"]
    pd.testing.assert_frame_equal(one[one["rank"] == 0].reset_index(drop=True),
                                  every[every["rank"] == 0].reset_index(drop=True))
    assert every.duplicated(top + ["sentence_id"]).any()
    assert (every["coefficient"].to_numpy() * every["sign"] >= one["coefficient"].to_numpy() * one["sign"] - 1e-7).all()


def test_negative_side_only_for_gated_by_default(tiny, sentences):
    assert set(_mine(tiny, sentences).triggers["sign"]) == {1, -1}  # a Llama is gated
    plain = _mine(tiny, sentences, negative=False).triggers
    assert set(plain["sign"]) == {1}
    neg = _mine(tiny, sentences).triggers
    neg = neg[neg["sign"] == -1]
    # most negative first
    assert (neg.groupby(["layer", "memory"])["coefficient"].diff().dropna() >= 0).all()


def test_layers_subset_and_real_smollm_matches_brute_force(smollm, wiki, monkeypatch):
    monkeypatch.setattr(mining, "DENSE_PAIRS_SHARE", 0.5)  # all at once early, one by one later
    few = load_corpus(wiki, split="train", seed=1, max_sentences=16)
    ex = keys.mine_trigger_examples(smollm, few, k=4, layers=[0, 7, 14], batch_tokens=256, progress=False)
    assert sorted(ex.triggers["layer"].unique()) == [0, 7, 14]
    bf = brute_force(smollm, few, [0, 7, 14], 4)
    assert_matches_brute_force(ex.triggers, bf, atol=1e-4, exact=False)


def test_merge_of_shards_equals_the_whole(tiny, sentences):
    whole = _mine(tiny, sentences).state()
    a = _mine(tiny, sentences.iloc[:20]).state()
    b = _mine(tiny, sentences.iloc[20:]).state()
    for merged in (mining.merge(a, b), mining.merge(b, a)):
        assert torch.equal(merged.keys, whole.keys)
        torch.testing.assert_close(merged.scores, whole.scores, atol=1e-6, rtol=1e-5)
    with pytest.raises(ParameterError, match="different shapes"):
        mining.merge(a, _mine(tiny, sentences, negative=False).state())


def test_merge_is_exact_on_ties():
    """Many equal scores: order by score, then sentence id, then position, whatever the input order."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (1, 1, 4, 30), generator=g).float()
    keys_ = torch.stack([torch.randperm(10_000, generator=g)[:30] for _ in range(4)]).view(1, 1, 4, 30)
    full = mining.top_sorted(scores, keys_, 6)
    a = mining.TopKState([0], [1], *mining.top_sorted(scores[..., :13], keys_[..., :13], 6))
    b = mining.TopKState([0], [1], *mining.top_sorted(scores[..., 13:], keys_[..., 13:], 6))
    merged = mining.merge(a, b)
    assert torch.equal(merged.scores, full[0]) and torch.equal(merged.keys, full[1])
    ref = pd.DataFrame({"s": scores.reshape(4, 30)[0], "k": keys_.reshape(4, 30)[0]}).sort_values(
        ["s", "k"], ascending=[False, True]).head(6)
    assert merged.keys[0, 0, 0].tolist() == ref["k"].tolist()


@pytest.mark.parametrize("spare", [0.02, 0.3, 1.0, 3.0])
def test_pool_of_unsorted_candidates_is_exact_on_ties(spare, monkeypatch):
    """Candidates appended to the spare slots, sorted only when they run out, in batches of any size and
    with many equal scores: the same top k as sorting everything at once (score, then key)."""
    monkeypatch.setattr(mining, "SPARE_SLOTS", spare)
    g = torch.Generator().manual_seed(1)
    n, d_ff, k = 200, 5, 8
    scores = torch.randint(0, 6, (n, d_ff), generator=g).float()
    scores[:, 4] = 1.0  # one memory where every candidate ties
    cand_keys = torch.stack([torch.randperm(100_000, generator=g)[:n] for _ in range(d_ff)], 1)
    miner = mining.Miner(mining.TopKState.empty([0], [1], d_ff, k), "max", 0)
    first = 0
    for size in [1, 3, 50, 2, 17, 9, 1, 40, 77]:  # batches smaller and larger than k and the spare slots
        part = slice(first, first + size)
        miner.offer(0, 0, scores[part], lambda rows, memories, part=part: cand_keys[part][rows, memories])
        first += size
    assert first == n
    state = miner.flush()
    want_scores, want_keys = mining.top_sorted(scores.T[None, None], cand_keys.T[None, None], k)
    assert torch.equal(state.scores, want_scores) and torch.equal(state.keys, want_keys)
    assert (miner.fill == k).all() and torch.equal(miner.threshold, want_scores[..., -1])


def test_plan_batches_by_length_and_budget():
    lengths = [5, 30, 6, 30, 29, 5, 100]
    batches = batching.plan_batches(lengths, 64)  # at most 5% padding per batch
    assert [list(b) for b in batches] == [[6], [1, 3], [4], [2], [0, 5]]
    assert [list(b) for b in batching.plan_batches(lengths, 64, max_padding=1.0)] == [[6], [1, 3], [4, 2], [0, 5]]
    assert sorted(np.concatenate(batches).tolist()) == list(range(7))


def test_the_least_padding_plan_is_optimal_and_keeps_the_budget():
    rng = np.random.default_rng(0)
    for n, cost in ((7, 0), (9, 5), (10, 40)):
        lengths = rng.integers(1, 20, size=n)
        plan = batching.plan_least_padding(lengths, 48, batch_cost=cost)
        assert sorted(np.concatenate(plan).tolist()) == list(range(n))
        assert all(len(b) == 1 or len(b) * lengths[b].max() <= 48 for b in plan)
        total = sum(len(b) * int(lengths[b].max()) + cost for b in plan)
        # brute force: every way to cut the longest-first order into runs within the budget
        order, best = np.argsort(-lengths, kind="stable"), None
        for cuts in itertools.product((0, 1), repeat=n - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
            runs = [order[a:b] for a, b in zip(bounds, bounds[1:])]
            if all(len(r) == 1 or len(r) * lengths[r].max() <= 48 for r in runs):
                found = sum(len(r) * int(lengths[r].max()) + cost for r in runs)
                best = found if best is None else min(best, found)
        assert total == best, (n, cost, total, best)
    assert [len(b) for b in batching.plan_least_padding([100, 3, 3], 48, batch_cost=0)] == [1, 2]  # too long: alone
    assert batching.plan_least_padding([], 48) == []
    # on a few hundred sentences (a snapshot's prefix segment) it pads less than the greedy 5% bound, in no more batches
    lengths = rng.integers(4, 120, size=250)
    least, greedy = batching.plan_least_padding(lengths, 2048), batching.plan_batches(lengths, 2048)
    padded = lambda plan: sum(len(b) * int(lengths[b].max()) for b in plan) - int(lengths.sum())  # noqa: E731
    assert padded(least) < padded(greedy) and len(least) <= len(greedy)


# ---- resume, cache, corruption --------------------------------------------------------------------------
def _result_files(folder: Path) -> tuple[Path, Path]:
    """The whole corpus's result (the snapshots of its prefixes are saved beside it)."""
    main = [p for p in folder.glob("triggers-*.parquet") if not p.name.endswith("-sentences.parquet")]
    sentences = {p: json.loads(p.with_suffix(".manifest.json").read_text())["request"]["sentences"] for p in main}
    largest = max(sentences.values())
    main = [p for p in main if sentences[p] == largest]
    assert len(main) == 1
    return main[0], main[0].with_name(main[0].stem + "-sentences.parquet")


class Interrupt(Exception):
    pass


def _interrupt_at(batch: int):
    def after(batches_done, sentences_done):
        if batches_done == batch:
            raise Interrupt
    return after


def test_resume_after_an_interruption_gives_identical_rows(tiny, sentences, tmp_path, monkeypatch):
    ref = _mine(tiny, sentences, out_dir=tmp_path / "ref", checkpoint_every=6)
    assert ref.stats["resumed_from"] == 0
    with pytest.raises(Interrupt):
        _mine(tiny, sentences, out_dir=tmp_path / "run", checkpoint_every=6, on_batch=_interrupt_at(7))
    assert list((tmp_path / "run").glob("*.checkpoint.json"))
    again = _mine(tiny, sentences, out_dir=tmp_path / "run", checkpoint_every=6)
    assert 0 < again.stats["resumed_from"] < len(sentences)
    for a, b in zip(_result_files(tmp_path / "ref"), _result_files(tmp_path / "run")):
        pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
    assert not list((tmp_path / "run").glob("*checkpoint*")), "the checkpoint is removed once the result is saved"


def test_cache_is_reused_only_for_the_same_manifest(tiny, sentences, tmp_path, capsys):
    first = _mine(tiny, sentences, out_dir=tmp_path, progress=True)
    assert not first.stats["from_cache"]
    capsys.readouterr()
    second = _mine(tiny, sentences, out_dir=tmp_path, progress=True)
    assert second.stats["from_cache"] and "Loaded cached trigger examples" in capsys.readouterr().out
    pd.testing.assert_frame_equal(first.triggers, second.triggers)
    assert second.sentences["token_ids"].tolist() == first.sentences["token_ids"].tolist()
    assert second.manifest == first.manifest
    stored = json.loads(_result_files(tmp_path)[0].with_suffix("").with_suffix(".manifest.json").read_text())
    assert stored["request"]["file_hash"] == "tiny-llama-hash" and "torch" in stored["versions"]
    assert len(stored["request"]["corpus"]) == 64
    # other parameters, another corpus, another model: recomputed
    assert not _mine(tiny, sentences, out_dir=tmp_path, k=4).stats["from_cache"]
    assert not _mine(tiny, sentences, out_dir=tmp_path, per_sentence="all").stats["from_cache"]
    changed = sentences.copy()
    changed.loc[3, "text"] = changed.loc[3, "text"] + " And more."
    assert not _mine(tiny, changed, out_dir=tmp_path).stats["from_cache"]
    other = _wrap(_tiny_llama(seed=1), tiny.tokenizer, name="tiny-llama-2")
    assert not _mine(other, sentences, out_dir=tmp_path).stats["from_cache"]
    # without snapshots the row order of the corpus does not matter (same ids and texts); with them it does, since
    # each snapshot is a prefix in row order
    assert not _mine(tiny, sentences.iloc[::-1], out_dir=tmp_path).stats["from_cache"]
    plain = _mine(tiny, sentences, out_dir=tmp_path, snapshot_floor=None)
    assert plain.manifest["order"] is None and not plain.stats["from_cache"]
    assert _mine(tiny, sentences.iloc[::-1], out_dir=tmp_path, snapshot_floor=None).stats["from_cache"]


def test_corrupted_checkpoint_is_detected_and_recomputed(tiny, sentences, tmp_path, monkeypatch):
    ref = _mine(tiny, sentences, snapshot_floor=None)  # no snapshot to resume from instead
    with pytest.raises(Interrupt):
        _mine(tiny, sentences, out_dir=tmp_path, checkpoint_every=6, snapshot_floor=None, on_batch=_interrupt_at(7))
    (data,) = tmp_path.glob("*.checkpoint-*.pt")
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match=re.escape(data.name)):
        again = _mine(tiny, sentences, out_dir=tmp_path, checkpoint_every=6, snapshot_floor=None)
    assert again.stats["resumed_from"] == 0
    pd.testing.assert_frame_equal(again.triggers, ref.triggers)


# ---- snapshots: the state after each doubling of the corpus -----------------------------------------------
def test_doubling_sizes_and_the_prefix_plan():
    assert batching.doubling_sizes(40, 8) == [8, 16, 32, 40]
    assert batching.doubling_sizes(32, 8) == [8, 16, 32]
    assert batching.doubling_sizes(5, 8) == [5] and batching.doubling_sizes(40, None) == [40]
    lengths = np.random.default_rng(0).integers(3, 30, size=40)
    batches, ends = batching.plan_prefix_batches(lengths, 64, [8, 16, 32, 40])
    assert ends[-1] == len(batches)
    start = 0
    for size, end in zip([8, 16, 32, 40], ends):  # the batches up to ends[j] cover exactly the first sizes[j] rows
        assert sorted(np.concatenate(batches[:end]).tolist()) == list(range(size))
        start = end
    with pytest.raises(AssertionError, match="must end at the number of rows"):
        batching.plan_prefix_batches(lengths, 64, [8, 16])
    with pytest.raises(ParameterError, match="positive number of sentences"):
        batching.doubling_sizes(40, 0)


def test_a_snapshot_equals_a_run_on_that_prefix_of_the_corpus(tiny, sentences, tmp_path):
    full = _mine(tiny, sentences, snapshot_floor=8)  # 40 sentences: snapshots after 8, 16 and 32
    assert keys.snapshot_sizes(full) == [8, 16, 32, 40] and full.stats["snapshots"] == [8, 16, 32]
    saved = _mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path)
    for size in (8, 16, 32):
        prefix = _mine(tiny, sentences.iloc[:size], snapshot_floor=8)
        for snapshot in (keys.trigger_snapshot(full, size), keys.trigger_snapshot(saved, size, out_dir=tmp_path)):
            pd.testing.assert_frame_equal(snapshot.triggers, prefix.triggers, check_exact=True)
            assert snapshot.sentences["sentence_id"].tolist() == prefix.sentences["sentence_id"].tolist()
            assert snapshot.manifest == prefix.manifest
        # each differs from the whole corpus's result (more sentences, other top-k)
        assert not snapshot.triggers["coefficient"].equals(full.triggers["coefficient"])
    # a saved snapshot is that prefix run's cached result
    assert _mine(tiny, sentences.iloc[:16], snapshot_floor=8, out_dir=tmp_path).stats["from_cache"]
    assert keys.trigger_snapshot(saved, 40) is saved
    with pytest.raises(ParameterError, match=r"No snapshot of 12 sentences: .*\[8, 16, 32, 40\]"):
        keys.trigger_snapshot(full, 12)
    with pytest.raises(ParameterError, match="neither in memory nor in"):
        keys.trigger_snapshot(saved, 16)  # saved to tmp_path, not kept in memory
    with pytest.raises(ParameterError, match="snapshot_floor=3 is smaller than k=5"):
        _mine(tiny, sentences, snapshot_floor=3)
    # "auto": 250, or a quarter of a smaller corpus, never fewer than k
    assert keys.auto_snapshot_floor(8000, 50) == 250 and keys.auto_snapshot_floor(160, 50) == 50
    assert keys.auto_snapshot_floor(40, 5) == 10


def test_snapshots_survive_an_interruption(tiny, sentences, tmp_path, monkeypatch):
    ref = _mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path / "ref")
    batches, ends = batching.plan_prefix_batches([len(t) for t in ref.sentences["token_ids"]], 160, [8, 16, 32, 40])
    with pytest.raises(Interrupt):  # past the second snapshot
        _mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path / "run", checkpoint_every=1000,
              on_batch=_interrupt_at(ends[1] + 1))
    assert not list((tmp_path / "run").glob("*.checkpoint*"))  # no checkpoint was due; the snapshots serve as ones
    again = _mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path / "run", checkpoint_every=1000)
    assert again.stats["resumed_from"] == 16  # the run resumes from its last saved snapshot
    pd.testing.assert_frame_equal(again.triggers, ref.triggers, check_exact=True)
    for stat in ("tokens", "padding_share", "batches"):  # its bookkeeping resumed too
        assert again.stats[stat] == ref.stats[stat], stat
    # a snapshot resumes a run only under the batch plan it was mined with (it still serves as a cached result)
    name, request = keys.snapshot_request(ref.manifest, ref.sentences, 16)[::-1]
    plan = {"batch_tokens": 160, "plan": keys.MINING_PLAN}
    assert keys.load_snapshot_state(tmp_path / "run", name, request, plan=plan) is not None
    assert keys.load_snapshot_state(tmp_path / "run", name, request, plan={**plan, "batch_tokens": 128}) is None
    assert keys.load_snapshot_state(tmp_path / "run", name, request, plan={**plan, "plan": "greedy"}) is None
    # one saved result (two Parquet files) and three snapshots, saved as top-k states
    for folder in (tmp_path / "ref", tmp_path / "run"):
        assert len(list(folder.glob("triggers-*.parquet"))) == 2 and len(list(folder.glob("*.state.pt"))) == 3
    for size in (8, 16, 32):
        pd.testing.assert_frame_equal(keys.trigger_snapshot(again, size, tmp_path / "run").triggers,
                                      keys.trigger_snapshot(ref, size, tmp_path / "ref").triggers, check_exact=True)


def test_a_snapshot_cut_short_while_saving_is_saved_again(tiny, sentences, tmp_path, monkeypatch):
    ref = _mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path / "ref")
    snapshots = sys.modules[keys.save_snapshot_state.__module__]  # the module whose write_json it calls
    real, calls = snapshots.write_json, []

    def write_json(path, obj):
        if str(path).endswith(".state.json"):
            calls.append(path)
            if len(calls) == 2:
                raise Interrupt  # the second snapshot's data is written, its JSON not
        return real(path, obj)

    monkeypatch.setattr(snapshots, "write_json", write_json)
    with pytest.raises(Interrupt):
        _mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path / "run", checkpoint_every=1000)
    monkeypatch.setattr(snapshots, "write_json", real)
    again = _mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path / "run", checkpoint_every=1000)
    assert again.stats["resumed_from"] == 8  # from the first snapshot; the second is mined and saved again
    for size in (8, 16, 32):
        pd.testing.assert_frame_equal(keys.trigger_snapshot(again, size, tmp_path / "run").triggers,
                                      keys.trigger_snapshot(ref, size, tmp_path / "ref").triggers, check_exact=True)
    # a damaged snapshot is reported and ignored: the prefix run mines again, to the same result
    data = calls[0].with_name(calls[0].name.replace(".state.json", ".state.pt"))  # the first snapshot's
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match="checksum does not match"):
        prefix = _mine(tiny, sentences.iloc[:8], snapshot_floor=8, out_dir=tmp_path / "run")
    assert not prefix.stats["from_cache"]
    pd.testing.assert_frame_equal(prefix.triggers, keys.trigger_snapshot(ref, 8, tmp_path / "ref").triggers,
                                  check_exact=True)


KILL_SCRIPT = textwrap.dedent("""
    import logging, os, signal, sys
    sys.path.insert(0, {root!r})
    import pandas as pd, torch
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    from ffnlib import keys, mining
    from ffnlib.models import load_model
    model_dir, corpus, out_dir, kill = sys.argv[1:5]
    mode, _, n = kill.partition(":")
    n = int(n or 0)
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    on_batch = None
    if mode == "batch":  # after a batch (and its checkpoint, if any)
        on_batch = lambda batches, sentences: die() if batches == n else None
    elif mode in ("data", "meta"):  # during the n-th checkpoint of this run
        real_bytes, real_json, count = mining.atomic_write_bytes, mining.write_json, [0]
        def write_bytes(path, data):
            count[0] += 1
            if mode == "data" and count[0] == n:  # half a temporary file written, never renamed
                open(str(path) + ".half.tmp", "wb").write(data[: len(data) // 2])
                die()
            real_bytes(path, data)
        def write_json(path, obj):
            if mode == "meta" and count[0] == n and str(path).endswith(".checkpoint.json"):
                die()  # new data file written, the JSON still names the previous one
            real_json(path, obj)
        mining.atomic_write_bytes, mining.write_json = write_bytes, write_json  # the checkpoint's writes
    loaded = load_model(model_dir)
    ex = keys.mine_trigger_examples(loaded, pd.read_parquet(corpus), k=5, batch_tokens=64, checkpoint_every=2,
                                    out_dir=out_dir, progress=False, on_batch=on_batch)
    print("DONE", ex.stats["resumed_from"])
""")


def test_sigkill_at_five_points_resumes_and_ends_identical(tiny, sentences, tmp_path):
    model_dir = tmp_path / "model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.parquet"
    sentences.to_parquet(corpus)
    script = tmp_path / "mine.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT)))

    def run(out: Path, kill: str = "none:0") -> tuple[int, int | None, str]:
        p = subprocess.run([sys.executable, str(script), str(model_dir), str(corpus), str(out), kill],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        found = re.search(r"resumed_from=(\d+)", p.stderr)
        return p.returncode, int(found.group(1)) if found else None, p.stdout + p.stderr

    rc, _, log = run(tmp_path / "ref")
    assert rc == 0 and "DONE 0" in log, log
    lengths = [len(t) for t in mining.prepare_sentences(tiny, sentences)["token_ids"]]
    sizes = batching.doubling_sizes(len(lengths), keys.auto_snapshot_floor(len(lengths), 5))
    n = len(batching.plan_prefix_batches(lengths, 64, sizes)[0])
    assert n >= 16, n
    out = tmp_path / "killed"
    resumed = [0]
    # after batch 3; while writing the 2nd checkpoint's data; between its data and its JSON; late batches
    for kill in ("batch:3", "data:2", "meta:2", f"batch:{n - 6}", f"batch:{n - 2}"):
        rc, start, log = run(out, kill)
        assert rc == -signal.SIGKILL, (kill, log)
        if kill != "batch:3":
            assert start is not None and start > 0, (kill, "started over", log)
            resumed.append(start)
    rc, start, log = run(out)
    assert rc == 0 and start is not None and start > 0, log
    resumed.append(start)
    assert resumed == sorted(resumed) and len(set(resumed)) >= 4, resumed  # progress kept between kills
    for a, b in zip(_result_files(tmp_path / "ref"), _result_files(out)):
        pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
        assert a.read_bytes() == b.read_bytes()


# ---- views ---------------------------------------------------------------------------------------------
def test_trigger_table_and_html(tiny, sentences):
    ex = _mine(tiny, sentences)
    table = keys.trigger_table(ex, tiny.tokenizer, layer=1, memory=3, n=4)
    assert list(table["rank"]) == [0, 1, 2, 3]
    assert {"prefix", "last_token", "coefficient", "next_token"} <= set(table.columns)
    index = ex.token_index()
    for r in table.itertuples():
        ids = index[r.sentence_id]
        assert r.prefix + r.last_token == tiny.tokenizer.decode(ids[: r.position + 1])
        assert r.next_token == (tiny.tokenizer.decode(ids[r.position + 1: r.position + 2]))
    page = keys.trigger_html(ex, tiny.tokenizer, 1, 3, sign=-1, n=3)
    assert page.count("<mark>") == 3 and "most negative" in page
    with pytest.raises(ParameterError, match="No trigger examples"):
        ex.of(7, 0)


def test_html_escapes_text(tiny, sentences):
    odd = pd.DataFrame({"sentence_id": [0, 1, 2], "text": ["a <b>bold</b> & co", "x < y", "plain words here"]})
    ex = _mine(tiny, odd, k=2)
    page = keys.trigger_html(ex, tiny.tokenizer, 0, 0, n=2)
    assert "<b>bold" not in page and ("&lt;" in page or "&amp;" in page)


# ---- removal experiment -------------------------------------------------------------------------------
def test_removal_equals_direct_recomputation(tiny, sentences):
    ex = _mine(tiny, sentences, k=6)
    removal = keys.removal_experiment(tiny, ex, n_keys=3, top=6, seed=1, batch_tokens=200, progress=False)
    assert set(removal["variant"]) == {"first", "last", "random"}
    assert len(removal) == len(removal[["layer", "memory", "rank", "variant"]].drop_duplicates())
    index = ex.token_index()
    first, last = removal["variant"] == "first", removal["variant"] == "last"
    assert (removal.loc[first, "removed"] == 0).all() and (removal.loc[last, "removed"] == removal.loc[last, "position"]).all()
    assert removal["removed"].between(0, removal["position"]).all()
    with torch.inference_mode(), capture(tiny, what=("coefficients",)) as acts:
        for r in removal.itertuples():
            ids = list(index[r.sentence_id][: r.position + 1])
            del ids[r.removed]
            tiny.model(input_ids=torch.tensor([ids]))
            expected = float(acts.coefficients[r.layer][0, -1, r.memory])
            assert abs(r.new_coefficient - expected) <= 1e-5 * max(1, abs(expected)), r
    np.testing.assert_allclose(removal["relative_change"],
                               (removal["new_coefficient"] - removal["coefficient"]) / removal["coefficient"].abs(),
                               rtol=1e-6)
    summary = keys.removal_summary(removal, n_layers=3)
    assert set(summary.columns) >= {"layer", "variant", "mean_change_pct", "median_change_pct", "prefixes"}
    assert summary["prefixes"].sum() == len(removal)


def test_removal_on_a_model_that_only_sees_the_last_token(smollm, sentences):
    """With every attention output zeroed, each coefficient depends only on the current token: removing
    the first token changes nothing, and removing the last gives the coefficient of the token before,
    computed here by hand from that single token."""
    model = _tiny_llama(seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    loaded = _wrap(model, smollm.tokenizer, name="no-attention")
    ex = _mine(loaded, sentences, k=4, negative=False)
    removal = keys.removal_experiment(loaded, ex, n_keys=4, top=4, seed=0, progress=False)
    first = removal[removal["variant"] == "first"]
    np.testing.assert_allclose(first["relative_change"], 0, atol=1e-5)
    index = ex.token_index()
    last = removal[removal["variant"] == "last"]
    with torch.inference_mode(), capture(loaded, what=("coefficients",)) as acts:
        for r in last.itertuples():
            loaded.model(input_ids=torch.tensor([[index[r.sentence_id][r.position - 1]]]))
            assert abs(r.new_coefficient - float(acts.coefficients[r.layer][0, 0, r.memory])) < 1e-5
    random_ = removal[removal["variant"] == "random"]
    kept_last = random_[random_["removed"] != random_["position"]]
    np.testing.assert_allclose(kept_last["relative_change"], 0, atol=1e-5)
    assert (last["relative_change"].abs() > 1e-3).mean() > 0.5


def test_removal_cache_and_bad_inputs(tiny, sentences, tmp_path):
    ex = _mine(tiny, sentences, k=4)
    a = keys.removal_experiment(tiny, ex, n_keys=2, top=3, out_dir=tmp_path, progress=False)
    b = keys.removal_experiment(tiny, ex, n_keys=2, top=3, out_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(ParameterError, match="variant"):
        keys.removal_experiment(tiny, ex, variants=("middle",), progress=False)
    with pytest.raises(ParameterError, match="top=9"):
        keys.removal_experiment(tiny, ex, n_keys=2, top=9, progress=False)
    with pytest.raises(ParameterError, match="n_keys"):
        keys.removal_experiment(tiny, ex, n_keys=10_000, progress=False)
    with pytest.raises(ParameterError, match="not mined"):
        keys.removal_experiment(tiny, _mine(tiny, sentences, k=4, layers=[0]), n_keys=2, top=2, layers=[2],
                                progress=False)


# ---- pattern measures ------------------------------------------------------------------------------------
def _hand_built() -> keys.TriggerExamples:
    """25 sentences. Key (0, 0): 10 triggers end in token 7 (5 of them after token 50), 15 distinct last
    tokens; 12 sentences about Arts, 4 about History, the rest unlabelled. Key (0, 1): all distinct."""
    token_ids, topics = [], []
    for i in range(25):
        if i < 5:
            ids = [300 + i, 50, 7]
        elif i < 10:
            ids = [300 + i, 60 + i, 7]
        else:
            ids = [300 + i, 400 + i, 500 + i]
        token_ids.append(ids)
        topics.append("Arts" if i < 12 else "History" if i < 16 else None)
    sentences = pd.DataFrame({"sentence_id": np.arange(25), "text": [f"s{i}" for i in range(25)],
                              "title": "t", "topic": topics, "token_ids": token_ids})
    rows = []
    for memory, pos in ((0, 2), (1, 0)):
        for rank in range(25):
            rows.append((0, memory, 1, rank, 25.0 - rank, rank, pos, -1))
    triggers = pd.DataFrame(rows, columns=keys.TRIGGER_COLUMNS)
    manifest = {"layers": [0], "k": 25, "negative": False, "n_bos": 0, "model": "hand"}
    return keys.TriggerExamples(triggers, sentences, manifest)


def test_key_measures_on_a_hand_built_table():
    ex = _hand_built()
    per_key = keys.key_measures(keys.with_tokens(ex, ex.triggers)).set_index("memory")
    assert per_key.loc[0, "shallow_token"] == pytest.approx(10 / 25)
    assert per_key.loc[0, "shallow_bigram"] == pytest.approx(5 / 25)
    assert per_key.loc[0, "topic_concentration"] == pytest.approx(12 / 16)
    assert per_key.loc[0, "labelled"] == 16
    # key 1: position 0 -> last tokens 300+i all distinct, no previous token
    assert per_key.loc[1, "shallow_token"] == 0 and per_key.loc[1, "shallow_bigram"] == 0
    few = keys.key_measures(keys.with_tokens(ex, ex.triggers.head(6)), min_labelled=7)
    assert np.isnan(few["topic_concentration"].iloc[0])
    one = keys.key_pattern_measures(None, ex, ex.of(0, 0))
    assert one["shallow_token"] == pytest.approx(0.4)


def test_trigger_tokens_are_read_from_each_trigger_s_own_sentence(tiny, sentences):
    """``with_tokens`` (vectorised) against reading each row's sentence one by one; a row that is not a
    token of the mined sentences is an error, not a token of the next sentence."""
    ex = keys.mine_trigger_examples(tiny, sentences, k=4)
    got = keys.with_tokens(ex, ex.triggers)
    index, topics = ex.token_index(), dict(zip(ex.sentences["sentence_id"], ex.sentences["topic"]))
    for row in got.sample(200, random_state=0).itertuples():
        ids = index[row.sentence_id]
        assert row.last_token == ids[row.position]
        assert row.previous_token == (ids[row.position - 1] if row.position - 1 >= ex.n_bos else -1)
        assert row.topic == topics[row.sentence_id] or (pd.isna(row.topic) and pd.isna(topics[row.sentence_id]))
    assert (got["previous_token"] == -1).any()  # triggers at the first real token
    too_far = ex.triggers.head(1).assign(position=len(index[int(ex.triggers["sentence_id"].iloc[0])]))
    with pytest.raises(ParameterError, match="not a token of the mined sentences"):
        keys.with_tokens(ex, too_far)
    with pytest.raises(ParameterError, match="not a token of the mined sentences"):
        keys.with_tokens(ex, ex.triggers.head(1).assign(sentence_id=-5))
    with pytest.raises(ParameterError, match="not a token of the mined sentences"):
        keys.with_tokens(ex, ex.triggers.head(1).assign(position=-1))
    assert keys.with_tokens(ex, ex.triggers.head(0)).empty


def test_layer_measures_and_trend():
    ex = _hand_built()
    measures = keys.layer_pattern_measures(ex, n_layers=1, random_keys=50)
    row = measures.iloc[0]
    assert row["shallow_token"] == pytest.approx((0.4 + 0) / 2)
    assert row["topic_base_rate"] == pytest.approx(12 / 16) and row["most_common_topic"] == "Arts"
    assert 0 <= row["random_shallow_token"] <= 1
    fake = pd.DataFrame({"relative_depth": np.arange(1, 11) / 10, "shallow_token": np.linspace(0.6, 0.1, 10),
                         "topic_concentration": np.linspace(0.3, 0.6, 10), "random_topic_concentration": 0.3})
    trend = keys.pattern_trend(fake)
    assert trend["shallow_lower"] > trend["shallow_upper"] and trend["semantic_excess_upper"] > trend[
        "semantic_excess_lower"]
    assert trend["shallow_depth_correlation"] < 0 < trend["semantic_depth_correlation"]
    fake["topic_concentration"] = np.linspace(0.6, 0.3, 10)
    assert keys.pattern_trend(fake)["semantic_depth_correlation"] < 0


def test_section3_measures_on_constructed_keys():
    """Removal rows and per-key patterns built by hand: each measure is the number it should be."""
    n_layers = 4
    rows = []
    for layer in range(n_layers):
        for memory in range(30):
            last = -0.8 if layer < 2 else -0.4  # lower layers (depth <= 9/16: layers 0, 1) hurt more
            for variant, change in (("last", last), ("first", -0.1), ("random", -0.2)):
                rows.append({"layer": layer, "memory": memory, "rank": 0, "variant": variant,
                             "relative_change": change})
    removal = pd.DataFrame(rows)
    patterns = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), 30), "memory": np.tile(np.arange(30), n_layers),
                             "shallow_token": np.repeat([0.6, 0.5, 0.2, 0.1], 30),
                             "topic_concentration": np.repeat([0.3, np.nan, 0.5, 0.7], 30)})
    ours, details = keys.section3_measures(removal, patterns, n_layers, seed=0)
    assert ours["last_hurts_most"].value == pytest.approx((0.5 * -0.6 + 0.5 * -0.2))
    assert ours["last_hurts_more_in_lower"].value == pytest.approx(-0.4)
    assert ours["shallow_lower"].value == pytest.approx(0.55 - 0.15)
    assert ours["semantic_upper"].value == pytest.approx(0.6 - 0.3)
    assert all(e.low <= e.value <= e.high for e in ours.values())
    assert ours["last_hurts_most"].unit == "keys" and ours["last_hurts_most"].n == 120
    assert "last -60%" in details["last_hurts_most"]


# ---- annotations -------------------------------------------------------------------------------------------
def test_annotation_session_add_tick_save_reload(smollm, tmp_path):
    from ffnlib.widgets.annotation import AnnotationSession

    path = tmp_path / "notes.csv"
    session = AnnotationSession(_hand_built(), smollm.tokenizer, path=path, annotator="tester", seed=0, n=25)
    with pytest.raises(ParameterError, match="next_key"):
        session.add_pattern("x", "shallow")
    shown = session.next_key(layer=0, memory=0)
    assert len(shown) == 25
    p = session.add_pattern("ends with token 7", "shallow")
    for rank in range(10):
        session.tick(p, rank)
    q = session.add_pattern("about the arts", "semantic")
    for rank in (0, 1, 10, 11):
        session.tick(q, rank)
    session.tick(q, 11, covered=False)
    assert session.coverage() == pytest.approx(11 / 25)
    with pytest.raises(ParameterError, match="kind"):
        session.add_pattern("x", "deep")
    with pytest.raises(ParameterError, match="rank"):
        session.tick(p, 25)
    session.save()
    session.next_key(layer=0, memory=1)
    short = session.add_pattern("too few", "semantic")
    session.tick(short, 0)
    with pytest.raises(ParameterError, match="at least 3"):
        session.save()
    session.remove_pattern(short)
    session.save()  # a key with no pattern
    saved = session.load()
    assert len(saved) == 3 and list(saved.columns) == keys.ANNOTATION_COLUMNS
    assert saved.loc[0, "covered"] == "0;1;2;3;4;5;6;7;8;9" and saved.loc[1, "covered"] == "0;1;10"
    summary = keys.summarise_annotations(saved, n_layers=1)
    assert summary["keys"] == 2
    assert summary["patterns_per_key"] == pytest.approx(1.0)  # 2 patterns and 0 patterns
    assert summary["coverage"] == pytest.approx((11 / 25 + 0) / 2)
    assert keys.summarise_annotations(keys.read_annotations(tmp_path / "none"))["keys"] == 0


def test_annotation_widget_builds(smollm):
    from ffnlib.widgets.annotation import AnnotationSession, annotation_widget

    session = AnnotationSession(_hand_built(), smollm.tokenizer, path="/nonexistent/never-written.csv", seed=1)
    box = annotation_widget(session)
    assert session.layer == 0 and len(box.children) == 6


# ---- bad inputs ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_ffnlib_errors(tiny, sentences):
    with pytest.raises(ParameterError, match="k must be a positive int"):
        _mine(tiny, sentences, k=0)
    with pytest.raises(ParameterError, match="larger than the number of sentences"):
        _mine(tiny, sentences, k=41)
    with pytest.raises(ParameterError, match="k must be an int"):
        _mine(tiny, sentences, k=True)
    with pytest.raises(ParameterError, match="per_sentence"):
        _mine(tiny, sentences, per_sentence="first")
    with pytest.raises(ParameterError, match="out of range"):
        _mine(tiny, sentences, layers=[3])
    with pytest.raises(ParameterError, match="empty"):
        _mine(tiny, sentences, layers=[])
    with pytest.raises(ParameterError, match="negative"):
        _mine(tiny, sentences, negative="yes")
    with pytest.raises(CorpusError, match="empty"):
        _mine(tiny, sentences.iloc[:0])
    blank = sentences.copy()
    blank.loc[2, "text"] = "   "
    with pytest.raises(CorpusError, match=f"sentence_id \\[{blank.loc[2, 'sentence_id']}\\]"):
        _mine(tiny, blank)
    dup = sentences.copy()
    dup.loc[1, "sentence_id"] = dup.loc[0, "sentence_id"]
    with pytest.raises(CorpusError, match="unique"):
        _mine(tiny, dup)
    with pytest.raises(CorpusError, match="column"):
        _mine(tiny, sentences.drop(columns="text"))


# ---- plots ------------------------------------------------------------------------------------------------
def test_plots_return_figures(tiny, sentences):
    import matplotlib.figure

    from ffnlib.plots import keys as plots

    ex = _mine(tiny, sentences, k=4)
    removal = keys.removal_experiment(tiny, ex, n_keys=2, top=3, progress=False)
    fig = plots.plot_removal(keys.removal_summary(removal, n_layers=3), paper={"last": (-67.5, -20)})
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes[0].lines) >= 4
    measures = keys.layer_pattern_measures(ex, n_layers=3, top=4, random_keys=20)
    assert isinstance(plots.plot_pattern_measures(measures), matplotlib.figure.Figure)
    per_layer = pd.DataFrame({"layer": [0, 1], "relative_depth": [0.5, 1.0], "patterns_per_key": [2, 3],
                              "coverage": [0.5, 0.7]})
    assert isinstance(plots.plot_annotation_summary(per_layer), matplotlib.figure.Figure)


def test_random_removal_is_uniform_over_the_prefix():
    """Each prefix takes the first draw of its sentence's stream that falls inside it: uniform over its
    tokens, even when a longer prefix of the same sentence shares the stream."""
    rng = np.random.default_rng(0)
    n = 3000
    sentence_ids = np.repeat(np.arange(n), 2)
    positions = np.tile([4, 20], n)  # a short and a long prefix in each 30-token sentence
    index = {i: list(range(30)) for i in range(n)}
    removed = keys.random_removals(sentence_ids, positions, index, 1, rng)  # with a BOS token
    short, long_ = removed[0::2], removed[1::2]
    assert short.min() == 1 and short.max() == 4 and long_.min() == 1 and long_.max() == 20
    counts = np.bincount(short, minlength=5)[1:]
    assert np.all(np.abs(counts / n - 1 / 4) < 0.03), counts
    counts = np.bincount(long_, minlength=21)[1:]
    assert np.all(np.abs(counts / n - 1 / 20) < 0.015), counts


def test_top_k_by_score_falls_back_to_the_exact_sort_only_where_scores_tie():
    """Rows whose first k+1 scores all differ are settled by a top-k on the scores; rows with a tie there
    (at the k-th place, inside the top k, or among empty -inf slots) are sorted by key: both agree with
    the two stable sorts everywhere."""
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(40, 30, generator=g)
    keys_ = torch.stack([torch.randperm(1000, generator=g)[:30] for _ in range(40)])
    k = 6
    top = scores.topk(k + 1, dim=1)
    scores[0, top.indices[0, k]] = top.values[0, k - 1]  # a tie at the k-th place: the key decides who stays
    scores[1, top.indices[1, 3]] = top.values[1, 2]  # a tie inside the top k: the key decides the order
    scores[2, 10:] = float("-inf")  # empty slots below the top k + 1: no tie there, the fast path
    scores[3, :] = float("-inf")
    scores[3, 5] = 1.0  # one real candidate, then empty slots
    fast = mining.top_sorted(scores, keys_, k)
    exact = mining.sort_exact(scores, keys_, k)
    assert torch.equal(fast[0], exact[0]) and torch.equal(fast[1], exact[1])
    assert fast[1][0, k - 1] == min(keys_[0, top.indices[0, k]], keys_[0, top.indices[0, k - 1]])
    assert fast[1][1, 2] == min(keys_[1, top.indices[1, 2]], keys_[1, top.indices[1, 3]])


def test_trigger_table_finds_sentences_by_any_id():
    """Sentence ids far apart (a lookup table would be huge) and close together give the same table."""
    g = torch.Generator().manual_seed(3)
    ids = np.array([5, 1, 3, 0, 4, 2])
    table = pd.DataFrame({"sentence_id": ids, "token_ids": [[7, 8, 9][: 1 + i % 3] + [i] for i in range(6)]})
    scores = torch.rand(1, 1, 2, 3, generator=g).sort(-1, descending=True).values
    sentence = torch.randint(0, 6, (1, 1, 2, 3), generator=g)
    position = torch.randint(0, 2, (1, 1, 2, 3), generator=g)
    near = keys.state_frame(mining.TopKState([0], [1], scores, (torch.as_tensor(ids)[sentence] << 20) | position), table)
    far_ids = ids * (1 << 36)
    far = keys.state_frame(mining.TopKState([0], [1], scores, (torch.as_tensor(far_ids)[sentence] << 20) | position),
                           table.assign(sentence_id=far_ids))
    assert (far["sentence_id"] == near["sentence_id"] * (1 << 36)).all()
    pd.testing.assert_frame_equal(far.drop(columns="sentence_id"), near.drop(columns="sentence_id"))
    tokens = dict(zip(ids, table["token_ids"]))
    for r in near.itertuples():
        ids_ = tokens[r.sentence_id]
        assert r.next_token == (ids_[r.position + 1] if r.position + 1 < len(ids_) else -1)


def test_sentences_longer_than_the_model_reads_are_left_out_whole_with_a_warning(smollm, sentences, wiki):
    """A model with learned positions (wiki-relu-lm: 128) cannot read a longer sentence: it is left out, said in a
    warning, everywhere sentences are tokenized for the model (mining, MoEfication, Section 5's examples)."""
    from ffnlib import aggregation

    model = _tiny_llama(layers=1)
    model.config.max_position_embeddings = 24
    short = _wrap(model, smollm.tokenizer, name="short-context")
    assert short.max_positions == 24
    everything = mining.prepare_sentences(_wrap(_tiny_llama(layers=1), smollm.tokenizer), sentences)
    fits = everything["token_ids"].map(len) <= 24
    assert 0 < fits.sum() < len(fits)  # the sample has both kinds
    with pytest.warns(UserWarning, match=rf"{(~fits).sum()} of 40 sentences are longer than the 24 positions "
                                         r"short-context reads \(BOS included\) and are left out"):
        table = mining.prepare_sentences(short, sentences)
    assert table["sentence_id"].tolist() == everything.loc[fits, "sentence_id"].tolist()
    with pytest.warns(UserWarning, match="left out"):
        examples = _mine(short, sentences, layers=[0])
    assert set(examples.triggers["sentence_id"]) <= set(table["sentence_id"])
    heldout = aggregation.sample_examples(short, 30, corpus=wiki)
    assert 0 < len(heldout) < 30 and heldout["token_ids"].map(len).max() <= 24
    model.config.max_position_embeddings = 2
    with pytest.raises(CorpusError, match="Every sentence is longer than the 2 positions short-context reads"):
        mining.prepare_sentences(short, sentences)
