"""Section 3's miner: the top-k trigger examples of every memory over a sentence corpus."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from ..batching import doubling_sizes, plan_prefix_batches
from ..mining import Checkpoint, TopKState, hooked
from ..progress import say
from ..storage import ensure_dir
from ._examples import TriggerExamples
from ._request import MINING_PLAN, snapshot_request, trigger_request
from ._snapshots import (keep_snapshot, load_cached_triggers, load_snapshot_state, save_trigger_examples,
                         trigger_examples_from_state)

__all__ = ["mine_trigger_examples"]


def mine_trigger_examples(loaded, sentences: pd.DataFrame, k: int = 50, per_sentence: str = "max",
                          negative: bool | None = None, layers=None, batch_tokens: int = 2048,
                          checkpoint_every: int = 1000, out_dir=None, progress: bool = True,
                          snapshot_floor="auto", on_batch=None) -> TriggerExamples:
    """Mine the top-k trigger examples of every memory of ``layers`` (all by default) over ``sentences``.

    - ``per_sentence="max"`` (the authors' code): at most one prefix per sentence per key, ending at the
      position of the key's maximum in that sentence (first position on ties); ``"all"``: every prefix.
    - ``negative`` (default: the model is gated): also keep the k most negative coefficients (sign -1).
    - Sentences are batched by length (``batch_tokens`` padded tokens per batch); order: coefficient
      descending, then sentence_id, then position, so results are exact and reproducible.
    - With ``out_dir``: a checkpoint every ``checkpoint_every`` sentences (an interrupted run resumes and
      ends with the same result), and the result is saved as Parquet with a manifest; a later call with
      the same manifest loads it instead of recomputing.
    - **Snapshots** (corpus size): the sentences are mined in prefix segments of the table's row order,
      doubling from ``snapshot_floor`` (``"auto"``: 250, or a quarter of a smaller corpus, at least k;
      None: one segment, no snapshots). The state after each prefix is exactly what a run on that prefix
      alone gives, bit for bit, with the same parameters and the same *resolved* floor (the integer in
      ``manifest["snapshot_floor"]``: ``"auto"`` on the prefix alone would resolve to a smaller one);
      :func:`trigger_snapshot` reads it. With ``out_dir`` each is saved as that prefix run's result (so such
      a run, given that floor, loads it). With snapshots the row order is part of the request.

    - ``on_batch(batches_done, sentences_done)``, when given, is called after every batch and its checkpoint:
      a benchmark runs its baselines there, a test interrupts the run there. It is not part of the request.

    The engine (top-k state, miner, batches) is :mod:`ffnlib.mining`.
    """
    req = trigger_request(loaded, sentences, k, per_sentence, negative, layers, batch_tokens, checkpoint_every,
                          snapshot_floor)
    table, request, name = req.table, req.request, req.name
    folder = ensure_dir(out_dir) if out_dir is not None else None
    if folder is not None:
        cached = load_cached_triggers(folder, name, request, table)
        if cached is not None:
            say(f"Loaded cached trigger examples from {folder / name} (same model, corpus and parameters); "
                "not recomputing.", progress)
            return cached

    lengths = np.array([len(t) for t in table["token_ids"]])
    sizes = doubling_sizes(len(table), request["snapshot_floor"])
    batches, ends = plan_prefix_batches(lengths, req.batch_tokens, sizes)
    snapshot_at = dict(zip(ends[:-1], sizes[:-1]))  # batches done -> sentences of the prefix it completes
    snapshots: dict[int, TopKState] = {}
    state = TopKState.empty(req.layers, req.signs, loaded.adapter.d_ff, req.k, device=loaded.device)
    plan = {"batch_tokens": req.batch_tokens, "plan": MINING_PLAN}  # a checkpoint counts batches of this plan
    checkpoint = Checkpoint(folder, name, {**request, **plan})
    done = {"batches": 0, "sentences": 0, "tokens": 0, "padded": 0}
    resumed, source = checkpoint.load(), f"the checkpoint {checkpoint.meta}"
    if resumed is not None:
        done = resumed[1]
    if folder is not None:  # a snapshot saved past the checkpoint is the state after its prefix: resume there
        for size, end in reversed(list(zip(sizes[:-1], ends[:-1]))):
            if size <= done["sentences"]:
                break
            saved = load_snapshot_state(folder, *snapshot_request(request, table, size)[::-1], plan=plan)
            if saved is not None:
                real = int(lengths[:size].sum())
                done = {"batches": end, "sentences": size, "tokens": real,
                        "padded": sum(len(rows) * int(lengths[rows].max()) for rows in batches[:end]) - real}
                resumed = ({"scores": saved[0].scores, "keys": saved[0].keys}, done)
                source = f"the saved snapshot of the first {size} sentences"
                break
    if resumed is not None:
        state.scores.copy_(resumed[0]["scores"])
        state.keys.copy_(resumed[0]["keys"])
        say(f"Resuming from {source}: {done['sentences']} of {len(table)} sentences already done "
            f"(resumed_from={done['sentences']}).", progress)
    resumed_from = int(done["sentences"])

    pad_id = loaded.pad_id
    sentence_ids = torch.tensor(table["sentence_id"].to_numpy(np.int64))
    token_ids = table["token_ids"].tolist()
    from ..progress import tqdm

    bar = tqdm(total=int(lengths.sum()), initial=int(done["tokens"]), unit="tok", unit_scale=True,
               desc="Mining trigger examples", disable=not progress)
    started, tokens_here, last_checkpoint = time.perf_counter(), 0, done["sentences"]
    snapshot_seconds = 0.0  # taking the snapshots: their cost
    try:
        with hooked(loaded, state, req.per_sentence) as miner, torch.inference_mode():
            for index in range(done["batches"], len(batches)):
                rows = batches[index]
                batch = miner.mine(loaded.model, [token_ids[r] for r in rows], sentence_ids[rows], pad_id)
                real = int(lengths[rows].sum())
                done = {"batches": index + 1, "sentences": done["sentences"] + len(rows),
                        "tokens": done["tokens"] + real,
                        "padded": done["padded"] + int(batch.ids.numel()) - real}
                tokens_here += real
                bar.update(real)
                bar.set_postfix(sentences=f"{done['sentences']}/{len(table)}")
                size = snapshot_at.get(index + 1)
                if size is not None:  # a prefix of the corpus is done: its snapshot (a run resumes from it too)
                    snapshot_started = time.perf_counter()
                    miner.flush()
                    keep_snapshot(snapshots, size, state, table, request, done, folder, plan)
                    last_checkpoint = done["sentences"]
                    snapshot_seconds += time.perf_counter() - snapshot_started
                if done["sentences"] - last_checkpoint >= checkpoint_every and index + 1 < len(batches):
                    miner.flush()
                    checkpoint.save({"scores": state.scores, "keys": state.keys}, done)
                    last_checkpoint = done["sentences"]
                if on_batch is not None:
                    on_batch(done["batches"], done["sentences"])
            miner.flush()
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    stats = {"sentences": len(table), "tokens": int(done["tokens"]), "batches": len(batches),
             "padding_share": done["padded"] / max(done["padded"] + done["tokens"], 1),
             "seconds": seconds, "tokens_per_second": tokens_here / max(seconds, 1e-9),
             "resumed_from": resumed_from, "from_cache": False, "snapshots": sizes[:-1],
             "snapshot_seconds": snapshot_seconds}
    result = trigger_examples_from_state(state, table, request, stats)
    result.snapshots = snapshots
    if folder is not None:
        save_trigger_examples(folder, name, result)
        checkpoint.remove()
        say(f"Saved the trigger examples to {folder / name}.parquet ({stats['tokens']} tokens, padding "
            f"{stats['padding_share']:.1%}, {stats['tokens_per_second']:.0f} tokens/s).", progress)
    return result
