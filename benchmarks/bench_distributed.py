"""Sharding on a Dask cluster (``ffnlib.distributed``) against one process, on the real model.

    python benchmarks/bench_distributed.py [--model smollm2-135m] [--sentences 400] [--examples 200] [--device cpu]

Mining (Section 3: all layers, k=50, both signs) of ``--sentences`` training sentences and Section 5
on ``--examples`` held-out prefixes, each timed three ways with the same batch plan:

- one process with 1 torch thread: the reference, which the cluster's results equal bit for bit
  (checked here);
- ``cluster="local"`` with 1 and with 2 worker processes, 1 torch thread each. The cluster is
  started and the model loaded on every worker *before* the timed run (both one-off costs, reported
  on their own rows), so the timed run is the steady state: planning, sending shards, computing,
  returning and merging partial results.

Columns: wall seconds and tokens/s; CPU seconds (this process for the reference; the workers' own
for a cluster, measured inside each shard) and tokens per CPU-second, which does not depend on how
busy the machine is; the CPU share (CPU seconds / (wall x processes)): below 1 when other programs
take the cores. Ratios: overhead = 1-worker wall / one-process wall; speed-up = 1-worker wall /
2-worker wall. ``--compare-threads`` adds one process with as many torch threads as cores (idle
machines only: OpenMP threads on an oversubscribed machine slow down by an order of magnitude).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402


def _log(message: str) -> None:
    print(f"[bench_distributed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _timed(function, *args, **kwargs) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _row(what: str, run: str, tokens: int, wall: float, cpu: float, processes: int, ratio: str = "",
         note: str = "") -> str:
    return (f"| {what} | {run} | {wall:.1f} | {tokens / wall:.0f} | {cpu:.1f} | {tokens / cpu:.0f} | "
            f"{cpu / (wall * processes):.0%} | {ratio} | {note} |")


def run(model: str = "smollm2-135m", sentences: int = 400, examples: int = 200, batch_tokens: int = 512,
        shard_tokens: int = 3000, agg_shard_tokens: int = 800, compare_threads: bool = False,
        device: str = "cpu") -> list[str]:
    import pandas as pd
    import torch

    from ffnlib import aggregation as agg
    from ffnlib import distributed as dist
    from ffnlib import keys
    from ffnlib.corpus import load_corpus
    from ffnlib.models import load_model

    cores = os.cpu_count() or 1
    loaded = load_model(model, device=device)  # the workers use the same kind of device
    table = load_corpus("wiki", split="train", max_sentences=sentences)
    jobs = {
        "mining": (lambda **kw: keys.mine_trigger_examples(loaded, table, **kw),
                   lambda client, **kw: dist.mine(loaded, table, cluster=client, shard_tokens=shard_tokens, **kw),
                   {"k": 50, "batch_tokens": batch_tokens, "progress": False}),
        "section5": (lambda **kw: agg.analyse_aggregation(loaded, **kw),
                     lambda client, **kw: dist.aggregate(loaded, cluster=client, shard_tokens=agg_shard_tokens, **kw),
                     {"n_examples": examples, "batch_tokens": batch_tokens, "progress": False}),
    }
    agg.memory_top_tokens(loaded, negative=loaded.adapter.gated, progress=False)  # the user cache, as a run uses
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    reference, single, threaded = {}, {}, {}
    for name, (one_process, _, kw) in jobs.items():
        reference[name], wall, cpu = _timed(one_process, **kw)
        single[name] = (wall, cpu)
        _log(f"{name}, one process, 1 thread: {wall:.1f} s")
        if compare_threads:
            torch.set_num_threads(cores)
            _, wall, cpu = _timed(one_process, **kw)
            threaded[name] = (wall, cpu)
            torch.set_num_threads(1)
    tokens = {"mining": int(reference["mining"].stats["tokens"]),
              "section5": int((reference["section5"].examples["position"] + 1).sum())}

    clusters, one_off = {}, []
    for workers in (1, 2):
        start = time.perf_counter()
        with dist.connect("local", n_workers=workers, progress=False) as client:
            client.run(lambda: __import__("ffnlib.distributed"))  # workers import torch and ffnlib
            started = time.perf_counter() - start
            start = time.perf_counter()
            client.run(dist.worker_model, dist.model_ref(loaded, None, 1))  # loaded once per worker, then kept
            one_off.append((workers, started, time.perf_counter() - start))
            _log(f"{workers}-worker cluster started in {started:.1f} s, model loaded in {one_off[-1][2]:.1f} s")
            for name, (_, on_cluster, kw) in jobs.items():
                result, wall, _ = _timed(on_cluster, client, **kw)
                if name == "mining":
                    pd.testing.assert_frame_equal(result.triggers, reference[name].triggers, check_exact=True)
                    info = result.stats["cluster"]
                else:
                    pd.testing.assert_frame_equal(result.frame, reference[name].frame, check_exact=True)
                    info = result.info["cluster"]
                cpu = sum(t["cpu_seconds"] for t in info["shard_timings"])
                clusters[name, workers] = (wall, cpu, info["shards"])
                _log(f"{name}, {workers} worker(s): {wall:.1f} s, {info['shards']} shards")
    torch.set_num_threads(threads_before)

    titles = {"mining": f"Mining, {len(table)} sentences ({tokens['mining']} tokens, k=50, 30 layers, both signs)",
              "section5": f"Section 5, {examples} examples ({tokens['section5']} prefix tokens)"}
    lines = ["| analysis | run | wall s | tokens/s | CPU s | tokens per CPU-s | CPU share | ratio | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in jobs:
        n = tokens[name]
        wall1, cpu1 = single[name]
        lines.append(_row(titles[name], "one process, 1 torch thread", n, wall1, cpu1, 1, "", "the exact reference"))
        if name in threaded:
            wall, cpu = threaded[name]
            lines.append(_row(titles[name], f"one process, {cores} torch threads", n, wall, cpu, cores,
                              f"{wall1 / wall:.2f}x faster than 1 thread"))
        one, two = clusters[name, 1], clusters[name, 2]
        lines.append(_row(titles[name], f"cluster='local', 1 worker x 1 thread ({one[2]} shards)", n, one[0], one[1],
                          1, f"overhead {one[0] / wall1:.2f}", "wall / one-process wall; result identical"))
        lines.append(_row(titles[name], f"cluster='local', 2 workers x 1 thread ({two[2]} shards)", n, two[0],
                          two[1], 2, f"speed-up {one[0] / two[0]:.2f}", "1-worker wall / 2-worker wall; "
                          "result identical"))
    for workers, started, load in one_off:
        lines.append(f"| one-off | start a {workers}-worker LocalCluster / load {model} on its workers | "
                     f"{started:.1f} / {load:.1f} | | | | | | not in the timed runs; each worker keeps its model |")
    lines.append("")
    lines.append(f"Load average {os.getloadavg()[0]:.1f} on {cores} cores at the end (other programs shared the "
                 f"machine: timings are inflated, see the CPU share); batch_tokens={batch_tokens}, "
                 f"shard_tokens={shard_tokens} (mining), {agg_shard_tokens} (Section 5).")
    return lines


if __name__ == "__main__":  # required: Dask starts worker processes with "spawn", which re-imports this file
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (every worker uses the GPU it sees)")
    parser.add_argument("--sentences", type=int, default=400, help="training sentences to mine")
    parser.add_argument("--examples", type=int, default=200, help="held-out examples for Section 5")
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--shard-tokens", type=int, default=3000,
                        help="mining shard size in padded tokens: keep shards well above k sentences, since each "
                             "shard fills its own top-k state from empty")
    parser.add_argument("--agg-shard-tokens", type=int, default=800, help="Section 5 shard size")
    parser.add_argument("--compare-threads", action="store_true",
                        help="also time one process with as many torch threads as cores (idle machines only)")
    args = parser.parse_args()
    print(machine(args.device))
    print(f"Load average {os.getloadavg()[0]:.1f} at the start.")
    print("\n".join(run(args.model, args.sentences, args.examples, args.batch_tokens, args.shard_tokens,
                        args.agg_shard_tokens, args.compare_threads, args.device)))
