"""Mining the trigger examples of Section 3 (``ffnlib.keys.mine_trigger_examples``, ``ffnlib.mining``).

The miner is checked against a brute-force top-k (one unbatched forward pass per sentence, every
coefficient kept, sorted with pandas) on a tiny random Llama and on three layers of the real SmolLM2;
merging shards, the batch plans, the corpus-size snapshots, and resuming after an exception and after real
SIGKILLs in a subprocess at five points. The analyses of the mined keys are in tests/test_keys.py.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ffnlib import ParameterError  # noqa: E402
from ffnlib import batching, keys, mining  # noqa: E402
from ffnlib.capture import capture  # noqa: E402
from ffnlib.corpus import load_corpus  # noqa: E402
from tiny_llama import mine, tiny_llama, wrap  # noqa: E402


@pytest.fixture(scope="module")
def tiny(smollm):
    return wrap(tiny_llama(), smollm.tokenizer)


@pytest.fixture(scope="module")
def sentences(wiki):
    return load_corpus(wiki, split="train", seed=0, max_sentences=40)


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
    ex = mine(loaded, sentences, per_sentence=per_sentence, negative=True)
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
    one = mine(tiny, sentences, per_sentence="max").triggers
    every = mine(tiny, sentences, per_sentence="all").triggers
    # the strongest prefix is the same; below it "all" may take several prefixes of one sentence
    top = ["layer", "memory", "sign"]
    pd.testing.assert_frame_equal(one[one["rank"] == 0].reset_index(drop=True),
                                  every[every["rank"] == 0].reset_index(drop=True))
    assert every.duplicated(top + ["sentence_id"]).any()
    assert (every["coefficient"].to_numpy() * every["sign"] >= one["coefficient"].to_numpy() * one["sign"] - 1e-7).all()


def test_negative_side_only_for_gated_by_default(tiny, sentences):
    assert set(mine(tiny, sentences).triggers["sign"]) == {1, -1}  # a Llama is gated
    plain = mine(tiny, sentences, negative=False).triggers
    assert set(plain["sign"]) == {1}
    neg = mine(tiny, sentences).triggers
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
    whole = mine(tiny, sentences).state()
    a = mine(tiny, sentences.iloc[:20]).state()
    b = mine(tiny, sentences.iloc[20:]).state()
    for merged in (mining.merge(a, b), mining.merge(b, a)):
        assert torch.equal(merged.keys, whole.keys)
        torch.testing.assert_close(merged.scores, whole.scores, atol=1e-6, rtol=1e-5)
    with pytest.raises(ParameterError, match="different shapes"):
        mining.merge(a, mine(tiny, sentences, negative=False).state())


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
    ref = mine(tiny, sentences, out_dir=tmp_path / "ref", checkpoint_every=6)
    assert ref.stats["resumed_from"] == 0
    with pytest.raises(Interrupt):
        mine(tiny, sentences, out_dir=tmp_path / "run", checkpoint_every=6, on_batch=_interrupt_at(7))
    assert list((tmp_path / "run").glob("*.checkpoint.json"))
    again = mine(tiny, sentences, out_dir=tmp_path / "run", checkpoint_every=6)
    assert 0 < again.stats["resumed_from"] < len(sentences)
    for a, b in zip(_result_files(tmp_path / "ref"), _result_files(tmp_path / "run")):
        pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
    assert not list((tmp_path / "run").glob("*checkpoint*")), "the checkpoint is removed once the result is saved"


def test_cache_is_reused_only_for_the_same_manifest(tiny, sentences, tmp_path, capsys):
    first = mine(tiny, sentences, out_dir=tmp_path, progress=True)
    assert not first.stats["from_cache"]
    capsys.readouterr()
    second = mine(tiny, sentences, out_dir=tmp_path, progress=True)
    assert second.stats["from_cache"] and "Loaded cached trigger examples" in capsys.readouterr().out
    pd.testing.assert_frame_equal(first.triggers, second.triggers)
    assert second.sentences["token_ids"].tolist() == first.sentences["token_ids"].tolist()
    assert second.manifest == first.manifest
    stored = json.loads(_result_files(tmp_path)[0].with_suffix("").with_suffix(".manifest.json").read_text())
    assert stored["request"]["file_hash"] == "tiny-llama-hash" and "torch" in stored["versions"]
    assert len(stored["request"]["corpus"]) == 64
    # other parameters, another corpus, another model: recomputed
    assert not mine(tiny, sentences, out_dir=tmp_path, k=4).stats["from_cache"]
    assert not mine(tiny, sentences, out_dir=tmp_path, per_sentence="all").stats["from_cache"]
    changed = sentences.copy()
    changed.loc[3, "text"] = changed.loc[3, "text"] + " And more."
    assert not mine(tiny, changed, out_dir=tmp_path).stats["from_cache"]
    other = wrap(tiny_llama(seed=1), tiny.tokenizer, name="tiny-llama-2")
    assert not mine(other, sentences, out_dir=tmp_path).stats["from_cache"]
    # without snapshots the row order of the corpus does not matter (same ids and texts); with them it does, since
    # each snapshot is a prefix in row order
    assert not mine(tiny, sentences.iloc[::-1], out_dir=tmp_path).stats["from_cache"]
    plain = mine(tiny, sentences, out_dir=tmp_path, snapshot_floor=None)
    assert plain.manifest["order"] is None and not plain.stats["from_cache"]
    assert mine(tiny, sentences.iloc[::-1], out_dir=tmp_path, snapshot_floor=None).stats["from_cache"]


def test_corrupted_checkpoint_is_detected_and_recomputed(tiny, sentences, tmp_path, monkeypatch):
    ref = mine(tiny, sentences, snapshot_floor=None)  # no snapshot to resume from instead
    with pytest.raises(Interrupt):
        mine(tiny, sentences, out_dir=tmp_path, checkpoint_every=6, snapshot_floor=None, on_batch=_interrupt_at(7))
    (data,) = tmp_path.glob("*.checkpoint-*.pt")
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match=re.escape(data.name)):
        again = mine(tiny, sentences, out_dir=tmp_path, checkpoint_every=6, snapshot_floor=None)
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
    full = mine(tiny, sentences, snapshot_floor=8)  # 40 sentences: snapshots after 8, 16 and 32
    assert keys.snapshot_sizes(full) == [8, 16, 32, 40] and full.stats["snapshots"] == [8, 16, 32]
    saved = mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path)
    for size in (8, 16, 32):
        prefix = mine(tiny, sentences.iloc[:size], snapshot_floor=8)
        for snapshot in (keys.trigger_snapshot(full, size), keys.trigger_snapshot(saved, size, out_dir=tmp_path)):
            pd.testing.assert_frame_equal(snapshot.triggers, prefix.triggers, check_exact=True)
            assert snapshot.sentences["sentence_id"].tolist() == prefix.sentences["sentence_id"].tolist()
            assert snapshot.manifest == prefix.manifest
        # each differs from the whole corpus's result (more sentences, other top-k)
        assert not snapshot.triggers["coefficient"].equals(full.triggers["coefficient"])
    # a saved snapshot is that prefix run's cached result
    assert mine(tiny, sentences.iloc[:16], snapshot_floor=8, out_dir=tmp_path).stats["from_cache"]
    assert keys.trigger_snapshot(saved, 40) is saved
    with pytest.raises(ParameterError, match=r"No snapshot of 12 sentences: .*\[8, 16, 32, 40\]"):
        keys.trigger_snapshot(full, 12)
    with pytest.raises(ParameterError, match="neither in memory nor in"):
        keys.trigger_snapshot(saved, 16)  # saved to tmp_path, not kept in memory
    with pytest.raises(ParameterError, match="snapshot_floor=3 is smaller than k=5"):
        mine(tiny, sentences, snapshot_floor=3)
    # "auto": 250, or a quarter of a smaller corpus, never fewer than k
    assert keys.auto_snapshot_floor(8000, 50) == 250 and keys.auto_snapshot_floor(160, 50) == 50
    assert keys.auto_snapshot_floor(40, 5) == 10


def test_snapshots_survive_an_interruption(tiny, sentences, tmp_path, monkeypatch):
    ref = mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path / "ref")
    batches, ends = batching.plan_prefix_batches([len(t) for t in ref.sentences["token_ids"]], 160, [8, 16, 32, 40])
    with pytest.raises(Interrupt):  # past the second snapshot
        mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path / "run", checkpoint_every=1000,
              on_batch=_interrupt_at(ends[1] + 1))
    assert not list((tmp_path / "run").glob("*.checkpoint*"))  # no checkpoint was due; the snapshots serve as ones
    again = mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path / "run", checkpoint_every=1000)
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
    ref = mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path / "ref")
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
        mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path / "run", checkpoint_every=1000)
    monkeypatch.setattr(snapshots, "write_json", real)
    again = mine(tiny, sentences, snapshot_floor=8, out_dir=tmp_path / "run", checkpoint_every=1000)
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
        prefix = mine(tiny, sentences.iloc[:8], snapshot_floor=8, out_dir=tmp_path / "run")
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
