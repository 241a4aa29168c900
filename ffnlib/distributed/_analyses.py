"""Sections 3 and 5 on a cluster, and :func:`mine` and :func:`aggregate`, which the notebooks call: in this
process when ``cluster`` is None, on the cluster otherwise."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import aggregation as _aggregation
from .. import batching as _batching
from .. import keys as _keys
from .. import mining as _mining
from ..config import check_int
from ..progress import say
from ..storage import ensure_dir, load_result, save_result
from ._cluster import check_cluster, connect
from ._shards import auto_shard_tokens, cluster_info, plan_shards, run_shards
from ._worker import aggregate_shard, mine_shard, model_ref

__all__ = ["mine", "aggregate", "mine_trigger_examples_on_cluster", "analyse_aggregation_on_cluster"]


# =====================================================================================================
# Section 3 on a cluster
# =====================================================================================================
def mine_trigger_examples_on_cluster(loaded, sentences: pd.DataFrame, k: int = 50, per_sentence: str = "max",
                                     negative: bool | None = None, layers=None, batch_tokens: int = 2048,
                                     checkpoint_every: int = 1000, out_dir=None, progress: bool = True, *,
                                     cluster="local", n_workers: int = 2, torch_threads: int = 1,
                                     device: str | None = None, shard_tokens: int | None = None,
                                     keep_shards: bool = False, connect_timeout: float = 30.0,
                                     snapshot_floor="auto") -> _keys.TriggerExamples:
    """:func:`ffnlib.keys.mine_trigger_examples` on a Dask cluster: same parameters, same result.

    The batch plan is cut into shards of about ``shard_tokens`` padded tokens (default
    :func:`auto_shard_tokens`); each worker mines its shards' top-k states and the client merges them.
    ``checkpoint_every`` is accepted for the same signature; shards are the checkpoints here. The
    result's ``stats["cluster"]`` says how the run went (shards, which were computed, per-shard
    seconds). See the module docstring for ``cluster``, ``device``, ``torch_threads``, ``out_dir``.

    Snapshots (``snapshot_floor``): a shard never spans the end of a snapshot's corpus prefix, and the
    shards are merged in plan order, so every snapshot falls on a shard boundary and equals the
    single-process snapshot (and a run on that prefix), bit for bit.
    """
    started = time.perf_counter()
    check_cluster(cluster)
    req = _keys.trigger_request(loaded, sentences, k, per_sentence, negative, layers, batch_tokens, checkpoint_every,
                                snapshot_floor)
    ref = model_ref(loaded, device, torch_threads)
    table, request, name, layer_list, signs = req.table, req.request, req.name, req.layers, req.signs
    folder = ensure_dir(out_dir) if out_dir is not None else None
    if folder is not None:
        cached = _keys.load_cached_triggers(folder, name, request, table)
        if cached is not None:
            say(f"Loaded cached trigger examples from {folder / name} (same model, corpus and parameters); "
                 "not recomputing.", progress)
            return cached

    lengths = np.array([len(t) for t in table["token_ids"]])
    sizes = _batching.doubling_sizes(len(table), request["snapshot_floor"])
    batches, ends = _batching.plan_prefix_batches(lengths, req.batch_tokens, sizes)
    costs = [len(rows) * int(lengths[rows].max()) for rows in batches]
    shard_tokens = auto_shard_tokens(sum(costs)) if shard_tokens is None else check_int("shard_tokens",
                                                                                             shard_tokens)
    shards = plan_shards(costs, shard_tokens, cuts=ends[:-1])
    snapshot_after = {shard: size for size, end in zip(sizes[:-1], ends[:-1])
                      for shard, (_, shard_end) in enumerate(shards) if shard_end == end}
    pad_id = loaded.pad_id
    spec = {"layers": layer_list, "signs": signs, "k": req.k, "per_sentence": req.per_sentence,
            "pad_id": int(pad_id)}
    shape = (len(signs), len(layer_list), loaded.adapter.d_ff, req.k)
    shard_folder = folder / f"{name}.shards" if folder is not None else None

    def shard_save(index: int) -> dict | None:
        if shard_folder is None:
            return None
        first, end = shards[index]
        return {"folder": str(shard_folder), "name": f"shard-{index:05d}-of-{len(shards):05d}",
                "manifest": {**request, "batch_tokens": req.batch_tokens, "plan": _keys.MINING_PLAN,
                             "shard": index, "shards": len(shards),
                             "first_batch": first, "end_batch": end, "part": "top-k state"}}

    cached_states = {}
    for index in range(len(shards)):
        save = shard_save(index)
        frame = load_result(save["folder"], save["name"], save["manifest"]) if save else None
        if frame is not None and len(frame) == math.prod(shape):
            cached_states[index] = {"scores": frame["score"].to_numpy(np.float32).reshape(shape),
                                    "keys": frame["key"].to_numpy(np.int64).reshape(shape)}
    if cached_states:
        say(f"Reusing {len(cached_states)} of {len(shards)} finished shards from {shard_folder}.", progress)
    missing = set(range(len(shards))) - set(cached_states)
    token_ids = table["token_ids"].tolist()
    sentence_ids = table["sentence_id"].to_numpy(np.int64)

    def build(index: int) -> tuple:
        first, end = shards[index]
        rows = np.concatenate(batches[first:end])
        local = np.empty(len(table), dtype=np.int64)
        local[rows] = np.arange(len(rows))
        return (ref, spec, [token_ids[r] for r in rows], sentence_ids[rows],
                [local[b] for b in batches[first:end]], shard_save(index))

    merged: list[_mining.TopKState | None] = [None]
    waiting: dict[int, _mining.TopKState] = {}  # shards done out of plan order, until their turn
    snapshots: dict[int, _mining.TopKState] = {}
    done = {"shards": 0, "tokens": 0}

    def on_result(index: int, result: dict) -> None:
        """Merge the shards in plan order (the merge is exact in any order; this order makes every prefix
        of shards, so every snapshot, available as it completes)."""
        waiting[index] = _mining.TopKState(layer_list, signs, torch.tensor(result["scores"]),
                                           torch.tensor(result["keys"]))
        while done["shards"] in waiting:
            shard = done["shards"]
            part = waiting.pop(shard)
            merged[0] = part if merged[0] is None else _mining.merge(merged[0], part)
            first, end = shards[shard]
            done["tokens"] += int(sum(lengths[rows].sum() for rows in batches[first:end]))
            done["shards"] += 1
            if shard in snapshot_after:
                _keys.keep_snapshot(snapshots, snapshot_after[shard], merged[0], table, request,
                                     {"tokens": done["tokens"]}, folder,
                                     {"batch_tokens": req.batch_tokens, "plan": _keys.MINING_PLAN})

    with connect(cluster, n_workers, connect_timeout, progress) if missing else contextlib.nullcontext() as client:
        computed = run_shards(client, mine_shard, shards, missing, build, cached_states, on_result,
                              "Mining shards", progress)
        info = (cluster_info(client, shards, computed, shard_tokens, started) if client is not None else
                {"shards": len(shards), "computed_shards": [], "cached_shards": len(shards),
                 "shard_tokens": shard_tokens, "shard_timings": []})
    seconds = time.perf_counter() - started
    total_tokens = int(lengths.sum())
    padded = sum(costs) - total_tokens
    stats = {"sentences": len(table), "tokens": total_tokens, "batches": len(batches),
             "padding_share": padded / max(sum(costs), 1), "seconds": seconds,
             "tokens_per_second": total_tokens / max(seconds, 1e-9), "resumed_from": 0, "from_cache": False,
             "cluster": info, "snapshots": sizes[:-1]}
    result = _keys.trigger_examples_from_state(merged[0], table, request, stats)
    result.snapshots = snapshots
    if folder is not None:
        _keys.save_trigger_examples(folder, name, result)
        if not keep_shards:
            shutil.rmtree(shard_folder, ignore_errors=True)
        say(f"Saved the trigger examples to {folder / name}.parquet ({total_tokens} tokens in {len(shards)} shards, "
             f"{len(info['computed_shards'])} computed, {stats['tokens_per_second']:.0f} tokens/s).", progress)
    return result


# =====================================================================================================
# Section 5 on a cluster
# =====================================================================================================
def analyse_aggregation_on_cluster(loaded, n_examples: int = 4000, seed: int = 0, active_threshold: float = 0.1,
                                   active_rule: str = "auto", norm_share: float = 0.9, batch_tokens: int = 2048,
                                   out_dir: str | Path | None = None, corpus="wiki", progress: bool = True,
                                   value_cache: str | Path | None = None, *, cluster="local", n_workers: int = 2,
                                   torch_threads: int = 1, device: str | None = None,
                                   shard_tokens: int | None = None, keep_shards: bool = False,
                                   connect_timeout: float = 30.0) -> _aggregation.AggregationResult:
    """:func:`ffnlib.aggregation.analyse_aggregation` on a Dask cluster: same parameters, same result.

    The examples, the values' top tokens and the value norms are computed here (the client) as the
    single-process run computes them and sent to the workers once; the batch plan is cut into shards of
    about ``shard_tokens`` padded tokens, and the shards' rows are concatenated. ``info["cluster"]``
    says how the run went. See the module docstring for the other parameters.
    """
    started = time.perf_counter()
    check_cluster(cluster)
    settings = _aggregation.check_settings(loaded, active_threshold, active_rule, norm_share, batch_tokens)
    ref = model_ref(loaded, device, torch_threads)
    examples, manifest, name = _aggregation.aggregation_request(loaded, n_examples, seed, corpus, settings)
    adapter = loaded.adapter
    cached = _aggregation.load_cached_aggregation(out_dir, name, manifest, examples, progress)
    if cached is not None:
        return cached

    lengths = examples["position"].to_numpy() + 1
    batches = _batching.plan_shortest_first(lengths, settings["batch_tokens"])
    costs = [len(b) * int(lengths[b].max()) for b in batches]
    shard_tokens = auto_shard_tokens(sum(costs)) if shard_tokens is None else check_int("shard_tokens",
                                                                                             shard_tokens)
    shards = plan_shards(costs, shard_tokens)
    shard_folder = Path(out_dir) / f"{name}.shards" if out_dir is not None else None

    def shard_save(index: int) -> dict | None:
        if shard_folder is None:
            return None
        first, end = shards[index]
        return {"folder": str(shard_folder), "name": f"shard-{index:05d}-of-{len(shards):05d}",
                "manifest": {**manifest, "shard": index, "shards": len(shards), "first_batch": first,
                             "end_batch": end}}

    parts: dict[int, pd.DataFrame] = {}
    cached_parts = {}
    for index in range(len(shards)):
        save = shard_save(index)
        frame = load_result(save["folder"], save["name"], save["manifest"]) if save else None
        if frame is not None:
            cached_parts[index] = {"frame": frame}
    if cached_parts:
        say(f"Reusing {len(cached_parts)} of {len(shards)} finished shards from {shard_folder}.", progress)
    missing = set(range(len(shards))) - set(cached_parts)

    tables = None
    if missing:
        top_positive, top_negative = _aggregation.memory_top_tokens(
            loaded, negative=adapter.gated or settings["active_rule"] == "relative", cache=value_cache,
            progress=progress, projections=out_dir)
        value_norms = torch.stack([adapter.written_value_norms(layer) for layer in range(adapter.n_layers)])
        tables = {"top_positive": top_positive.cpu().numpy(),
                  "top_negative": None if top_negative is None else top_negative.cpu().numpy(),
                  "value_norms": value_norms.cpu().numpy()}

    def on_result(index: int, result: dict) -> None:
        parts[index] = result["frame"]

    with connect(cluster, n_workers, connect_timeout, progress) if missing else contextlib.nullcontext() as client:
        if client is not None:
            shared = client.scatter(tables, broadcast=True)

        def build(index: int) -> tuple:
            first, end = shards[index]
            rows = np.concatenate(batches[first:end])
            local = np.empty(len(examples), dtype=np.int64)
            local[rows] = np.arange(len(rows))
            subset = examples.iloc[rows].reset_index(drop=True)
            return (ref, subset, [local[b] for b in batches[first:end]], settings, shared, shard_save(index))

        computed = run_shards(client, aggregate_shard, shards, missing, build, cached_parts, on_result,
                              "Section 5 shards", progress)
        info = (cluster_info(client, shards, computed, shard_tokens, started) if client is not None else
                {"shards": len(shards), "computed_shards": [], "cached_shards": len(shards),
                 "shard_tokens": shard_tokens, "shard_timings": []})
    frame = pd.concat([parts[i] for i in range(len(shards))], ignore_index=True)
    frame = frame.sort_values(["example", "layer"], kind="stable").reset_index(drop=True)
    if out_dir is not None:
        save_result(out_dir, name, frame, manifest)
        if not keep_shards:
            shutil.rmtree(shard_folder, ignore_errors=True)
        if progress and info["cached_shards"]:
            print(f"[ffnlib] resumed: {info['cached_shards']} of {len(shards)} shards came from {shard_folder}")
    return _aggregation.AggregationResult(frame, examples, manifest, info={
        "batches": len(batches), "resumed": sum(shards[i][1] - shards[i][0] for i in cached_parts),
        "cluster": info})


# =====================================================================================================
# What the notebooks call
# =====================================================================================================
def mine(loaded, sentences: pd.DataFrame, cluster=None, *, n_workers: int = 2, torch_threads: int = 1,
         device: str | None = None, shard_tokens: int | None = None, keep_shards: bool = False,
         connect_timeout: float = 30.0, **kwargs) -> _keys.TriggerExamples:
    """Mine trigger examples in this process (``cluster=None``) or on a Dask cluster (``"local"``, an
    address, a Client or a cluster object). ``kwargs`` are :func:`ffnlib.keys.mine_trigger_examples`'s;
    the cluster options are ignored when ``cluster`` is None."""
    check_cluster(cluster)
    if cluster is None:
        return _keys.mine_trigger_examples(loaded, sentences, **kwargs)
    return mine_trigger_examples_on_cluster(loaded, sentences, cluster=cluster, n_workers=n_workers,
                                            torch_threads=torch_threads, device=device, shard_tokens=shard_tokens,
                                            keep_shards=keep_shards, connect_timeout=connect_timeout, **kwargs)


def aggregate(loaded, cluster=None, *, n_workers: int = 2, torch_threads: int = 1, device: str | None = None,
              shard_tokens: int | None = None, keep_shards: bool = False, connect_timeout: float = 30.0,
              **kwargs) -> _aggregation.AggregationResult:
    """Section 5 in this process (``cluster=None``) or on a Dask cluster. ``kwargs`` are
    :func:`ffnlib.aggregation.analyse_aggregation`'s; the cluster options are ignored when ``cluster``
    is None."""
    check_cluster(cluster)
    if cluster is None:
        return _aggregation.analyse_aggregation(loaded, **kwargs)
    return analyse_aggregation_on_cluster(loaded, cluster=cluster, n_workers=n_workers, torch_threads=torch_threads,
                                          device=device, shard_tokens=shard_tokens, keep_shards=keep_shards,
                                          connect_timeout=connect_timeout, **kwargs)
