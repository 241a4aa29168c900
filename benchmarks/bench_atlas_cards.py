"""The atlas's card pages (``ffnlib.widgets.atlas.export_atlas`` with ``results``) on a results folder the suite has
filled: how long N memory pages with their cards take.

    python benchmarks/bench_atlas_cards.py --results RESULTS [--scale ci] [--model smollm2-135m] [--pages 500]
                                           [--threads N] [--skip-baseline]

``RESULTS`` is a ``results_dir`` (``make run SCALE=ci RESULTS=...``: the cards read notebooks 01, 02, 03, 06, 07 and
10's results and the random-weights control's). The model, the run's trigger examples (as notebook 05 loads them)
and a 16-sentence held-out coefficient sample are loaded before any timing. The N memories are spread evenly over
the layers (seeded), each layer's in one run of the atlas, so every layer's results are read once.

- N card pages: ``export_atlas(memories=..., results=..., notable=None, mates=0)``: each page the memory view and
  the memory's card, the layer pages and the index;
- baseline: the same N pages without cards (``results=None``, the atlas before cards);
- the index's notable lists: ``export_atlas`` with ``notable=10, mates=2`` over the same memories adds every
  layer's value agreement and trigger survival, one pass over the sample, and the notable memories' pages.

Target: 500 card pages in under 2 minutes on 2 cores. No timing is asserted in the unit tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine, table


def _memories(adapter, n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    per_layer = np.array_split(np.arange(n), adapter.n_layers)
    return [(layer, int(m)) for layer, part in enumerate(per_layer)
            for m in sorted(rng.choice(adapter.d_ff, size=len(part), replace=False))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="a results_dir the suite has filled")
    parser.add_argument("--scale", default="ci")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pages", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-baseline", action="store_true", help="leave out the atlas without cards")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import pyarrow.parquet  # noqa: F401  (imported once by any process that reads results)

    from ffnlib.card import open_results
    from ffnlib.corpus import load_corpus
    from ffnlib.explorer import CoefficientSample
    from ffnlib.keys import load_trigger_examples
    from ffnlib.models import load_model
    from ffnlib.widgets.atlas import export_atlas

    loaded = load_model(args.model)
    probe = open_results(loaded, args.results, args.scale)
    found = [(name, request) for name, request in probe.manifests().items()
             if request.get("analysis") == "trigger_examples" and not name.endswith("-sentences")]
    if not found:
        raise SystemExit(f"No results of {args.model} at scale {args.scale} in {args.results}: run "
                         f"`make run SCALE={args.scale} RESULTS={args.results}` first.")
    triggers = load_trigger_examples(Path(probe.folder), *max(found, key=lambda f: len(f[1].get("layers", []))))
    sample = CoefficientSample(loaded, load_corpus("wiki", split="heldout", seed=0, max_sentences=16))
    memories = _memories(loaded.adapter, args.pages)
    print(f"Machine: {machine()}; model {args.model}; results {probe.folder}; {len(memories)} memories over "
          f"{loaded.adapter.n_layers} layers\n")

    def atlas(**options) -> tuple[float, int]:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            export_atlas(loaded, triggers, out, memories=memories, sample=sample, **options)
            seconds = time.perf_counter() - start
            pages = len(json.loads((Path(out) / "atlas.json").read_text())["memories"])
        return seconds, pages

    cards, n_cards = atlas(results=probe.folder, notable=None, mates=0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    plain, n_plain = (None, 0) if args.skip_baseline else atlas()
    notable, n_notable = atlas(results=probe.folder, notable=10, mates=2)
    rows = [
        {"row": f"{n_cards} card pages (memory view + card), notable lists off", "ours": f"{cards:.1f} s",
         "baseline": "" if plain is None else f"{plain:.1f} s", "ratio": None if plain is None else cards / plain,
         "target": "< 120 s for 500", "met": cards < 120 * n_cards / 500,
         "note": f"{cards / n_cards:.3f} s a page; peak RSS {rss:.0f} MB; baseline: the same pages without cards"},
        {"row": f"with the index's notable lists and 2 expert mates each ({n_notable} pages)",
         "ours": f"{notable:.1f} s", "baseline": f"{cards:.1f} s", "ratio": notable / cards,
         "note": f"{n_notable - n_cards} more pages: notable memories and expert mates"},
    ]
    print(table(rows))


if __name__ == "__main__":
    main()
