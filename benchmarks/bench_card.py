"""The memory card (``ffnlib.card.memory_card``) on a results folder the suite has filled: how long one card takes.

    python benchmarks/bench_card.py --results RESULTS [--scale ci] [--model smollm2-135m] [--cards 6] [--threads N]

``RESULTS`` is a ``results_dir`` (``make run SCALE=ci RESULTS=...``; the card reads notebooks 01, 02, 03, 06, 07
and 10's results and the random-weights control's). The model is loaded and the libraries imported before any
timing; the memories are a knowledge neuron of notebook 06 (when there is one), a memory of a layer notebook 07
MoEfied, and seeded random ones.

- first card: the first card of the process, from a fresh ``open_results`` (every file it needs is read and its
  checksum verified);
- a card from a fresh reader: each card opens the folder again (``results=<folder>``, as a single call does); the
  files are read again, their checksums are not (verified once per process);
- a card from an open reader: ``results=open_results(...)`` shared by the cards (each file read once), for
  memories of other layers, and for other memories of a layer already read (browsing a layer);
- baseline: reading notebook 01's whole mining result (``ffnlib.keys.load_trigger_examples``), which a card that
  loaded the mining whole would pay on every call.

- memories like this one (``ffnlib.explorer.similar_by_value`` / ``similar_by_triggers``): the first query with
  its index built, and later queries on the same index.

Target: a card in under 1 s (first card and fresh reader, median). No timing is asserted in the unit tests.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import ffnlib  # noqa: F401  (first, as a notebook imports it: its thread policy applies before torch loads)
import numpy as np
import torch

from common import machine, table


def _memories(loaded, run, n: int, seed: int = 0) -> list[tuple[int, int, str]]:
    chosen = []
    neurons = run.table("06_neurons")
    if neurons is not None and len(neurons):
        chosen.append((int(neurons["layer"].iloc[0]), int(neurons["memory"].iloc[0]), "knowledge neuron"))
    splits = ((run.summary("07_moefication") or {}).get("layers") or [])
    if splits:
        chosen.append((int(splits[-1]), 7, "MoEfied layer"))
    rng = np.random.default_rng(seed)
    adapter = loaded.adapter
    while len(chosen) < n:
        chosen.append((int(rng.integers(adapter.n_layers)), int(rng.integers(adapter.d_ff)), "random"))
    return chosen[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="a results_dir the suite has filled")
    parser.add_argument("--scale", default="ci")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cards", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import pyarrow.parquet  # noqa: F401  (imported once by any process that reads results)

    from ffnlib.card import memory_card, open_results
    from ffnlib.explorer import TriggerSets, ValueIndex, similar_by_triggers, similar_by_value
    from ffnlib.keys import load_trigger_examples
    from ffnlib.models import load_model

    loaded = load_model(args.model)
    probe = open_results(loaded, args.results, args.scale)
    if probe.folder is None:
        raise SystemExit(f"No results of {args.model} at scale {args.scale} in {args.results}: run "
                         f"`make run SCALE={args.scale} RESULTS={args.results}` first.")
    memories = _memories(loaded, probe, args.cards)
    print(f"Machine: {machine()}; model {args.model}; results {probe.folder}\n")

    first_layer, first_memory, _ = memories[0]
    start = time.perf_counter()
    card = memory_card(loaded, first_layer, first_memory, results=open_results(loaded, args.results, args.scale))
    first = time.perf_counter() - start
    filled = [name for name in card.tables() if getattr(card, name) is not None]

    fresh = []
    for layer, memory, _ in memories:
        start = time.perf_counter()
        memory_card(loaded, layer, memory, results=args.results, scale=args.scale)
        fresh.append(time.perf_counter() - start)
    run = open_results(loaded, args.results, args.scale)
    memory_card(loaded, first_layer, first_memory, results=run)
    shared = []
    for layer, memory, _ in memories:
        start = time.perf_counter()
        memory_card(loaded, layer, memory, results=run)
        shared.append(time.perf_counter() - start)

    same_layer = []
    for memory in range(1, 6):
        start = time.perf_counter()
        memory_card(loaded, first_layer, first_memory + memory, results=run)
        same_layer.append(time.perf_counter() - start)

    name = next(n for n, r in probe.manifests().items()
                if r.get("analysis") == "trigger_examples" and not n.endswith("-sentences"))
    start = time.perf_counter()
    triggers = load_trigger_examples(Path(probe.folder), name, probe.manifests()[name])
    whole = time.perf_counter() - start

    # "memories like this one" (the explorer's memory view): the first query builds its index, later ones reuse it
    similar = {}
    for by, build, query in (("value", ValueIndex, lambda l, m, ix: similar_by_value(loaded, l, m, index=ix)),
                             ("triggers", lambda _: TriggerSets(triggers),
                              lambda l, m, ix: similar_by_triggers(loaded, triggers, l, m, index=ix))):
        start = time.perf_counter()
        index = build(loaded)
        query(first_layer, first_memory, index)
        first_query = time.perf_counter() - start
        later = []
        for layer, memory, _ in memories[1:]:
            start = time.perf_counter()
            query(layer, memory, index)
            later.append(time.perf_counter() - start)
        similar[by] = (first_query, statistics.median(later) if later else float("nan"))

    median = statistics.median(fresh)
    kinds = ", ".join(f"({layer}, {memory}) {kind}" for layer, memory, kind in memories)
    rows = [
        {"row": "First card of the process (fresh reader, checksums verified) vs reading notebook 01's mining whole",
         "ours": f"{first:.2f} s", "baseline": f"{whole:.2f} s", "ratio": first / whole, "target": "< 1 s",
         "met": first < 1.0, "note": f"memory ({first_layer}, {first_memory}); {len(filled)} of "
                                     f"{len(card.tables())} fields filled; missing: {', '.join(card.missing)}"},
        {"row": f"A card from a fresh reader, median of {len(fresh)}", "ours": f"{median:.2f} s",
         "baseline": f"{whole:.2f} s", "ratio": median / whole, "target": "< 1 s", "met": median < 1.0,
         "note": f"max {max(fresh):.2f} s; memories {kinds}"},
        {"row": f"A card from an open reader (open_results shared), median of {len(shared)}",
         "ours": f"{statistics.median(shared):.2f} s", "baseline": f"{median:.2f} s",
         "ratio": statistics.median(shared) / median, "note": f"max {max(shared):.2f} s"},
        {"row": f"Another memory of a layer already read (open reader), median of {len(same_layer)}",
         "ours": f"{statistics.median(same_layer):.2f} s", "baseline": f"{median:.2f} s",
         "ratio": statistics.median(same_layer) / median, "note": f"layer {first_layer}"},
        *({"row": f"Memories like this one, by {by}: a later query (median) / the first, which builds the index",
           "ours": f"{later:.2f} s", "baseline": f"{first_query:.2f} s", "ratio": later / first_query,
           "note": "every memory of every layer compared"} for by, (first_query, later) in similar.items()),
    ]
    print(table(rows))


if __name__ == "__main__":
    main()
