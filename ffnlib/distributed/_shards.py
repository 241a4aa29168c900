"""Shards: a batch plan cut into consecutive runs of batches, each one Dask task, and the client's loop that
submits the missing ones and takes their results as they come."""

from __future__ import annotations

import math
import time
import uuid
from typing import Sequence

from ..config import check_int
from ..errors import ResultsError
from ._cluster import ALLOWED_FAILURES

__all__ = ["MIN_SHARD_TOKENS", "MAX_SHARD_TOKENS", "TARGET_SHARDS", "plan_shards", "auto_shard_tokens", "run_shards",
           "cluster_info"]

MIN_SHARD_TOKENS = 1 << 15  # automatic shard size: at least this many padded tokens ...
MAX_SHARD_TOKENS = 1 << 20  # ... at most this many ...
TARGET_SHARDS = 16  # ... and otherwise the plan cut into about this many shards


# =====================================================================================================
# Shards
# =====================================================================================================
def plan_shards(batch_tokens: Sequence[int], shard_tokens: int, cuts: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Cut a batch plan into shards: consecutive runs ``(first, end)`` of batches whose padded tokens add
    up to at most ``shard_tokens`` (a batch larger than that is a shard of its own). A shard also ends at
    every batch index in ``cuts`` (the ends of the corpus prefixes that mining snapshots)."""
    shard_tokens = check_int("shard_tokens", shard_tokens)
    cuts = set(int(c) for c in cuts)
    shards, first, total = [], 0, 0
    for index, cost in enumerate(batch_tokens):
        if index > first and (total + int(cost) > shard_tokens or index in cuts):
            shards.append((first, index))
            first, total = index, 0
        total += int(cost)
    if len(batch_tokens) > first:
        shards.append((first, len(batch_tokens)))
    return shards


def auto_shard_tokens(total_tokens: int) -> int:
    """Default shard size: the plan in about 16 shards, each 32Ki..1Mi padded tokens (deterministic in
    the inputs, so a rerun finds the same shards whatever the cluster's size)."""
    return int(min(MAX_SHARD_TOKENS, max(MIN_SHARD_TOKENS, math.ceil(total_tokens / TARGET_SHARDS))))


def run_shards(client, function, shards: list[tuple[int, int]], missing: set[int], build, cached: dict,
               on_result, desc: str, progress: bool) -> list[dict]:
    """Submit ``function(*build(index))`` for the ``missing`` shards; feed each result (the ``cached``
    ones first) to ``on_result(index, result)`` as it comes. Returns the computed shards' timings."""
    from distributed import KilledWorker, as_completed
    from ..progress import tqdm

    bar = tqdm(total=len(shards), desc=desc, unit="shard", disable=not progress)
    for index in sorted(cached):
        on_result(index, cached.pop(index))
        bar.update(1)
    token = uuid.uuid4().hex[:8]
    futures = {}
    for index in sorted(missing):
        futures[client.submit(function, *build(index), key=f"{desc.replace(' ', '-')}-{token}-{index:05d}",
                              pure=False)] = index
    timings = []
    try:
        for future in as_completed(list(futures)):
            index = futures[future]
            try:
                result = future.result()
            except KilledWorker as exc:
                raise ResultsError(
                    f"Shard {index} was on more than {ALLOWED_FAILURES} workers that died while computing it ({exc}). "
                    f"Check the workers' memory and logs; finished shards are kept in out_dir, so a rerun "
                    f"computes only the missing ones.") from exc
            future.release()
            timings.append({"shard": index, "first_batch": shards[index][0], "end_batch": shards[index][1],
                            **{k: result.pop(k) for k in ("tokens", "seconds", "cpu_seconds", "load_seconds", "pid")}})
            on_result(index, result)
            bar.update(1)
    finally:
        bar.close()
        for future in futures:
            future.release()
    return sorted(timings, key=lambda t: t["shard"])


def cluster_info(client, shards, computed: list[dict], shard_tokens: int, started: float) -> dict:
    """What a cluster run records about itself: the scheduler, its workers, the shards and their timings."""
    return {"address": client.scheduler.address, "workers": len(client.scheduler_info().get("workers", {})),
            "shard_tokens": shard_tokens, "shards": len(shards), "computed_shards": [t["shard"] for t in computed],
            "cached_shards": len(shards) - len(computed), "shard_timings": computed,
            "seconds": time.perf_counter() - started}
