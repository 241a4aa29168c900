"""Section 3 trigger-example mining: end-to-end throughput, padding and memory, against the bare forward pass
and against the usual "cache every activation, then top-k" approach.

    python benchmarks/bench_mining.py [--model smollm2-135m] [--sentences 1000] [--device cpu]

Rows (all measured in this run):

- mining throughput: real sentence tokens per second of ``ffnlib.keys.mine_trigger_examples`` end to end
  (tokenisation, length batching, the per-layer top-k reduction inside the forward pass, building the result
  table, writing Parquet + manifest), k=50, both signs, all layers;
- bare forward: the same tokens packed into full dense batches (rows of the mean sentence length, no padding,
  same token budget per batch), ``model(input_ids)`` with nothing hooked (a copy of the model, so the miner's hooks
  never fire in it). Ratio = ours / bare (target >= 0.9). A second row compares with the transformer body only
  (every layer, no final norm and head), since the miner stops the forward pass after the last layer's FFN: that
  is the stricter comparison. The baselines run *interleaved* with the miner: after each of the miner's batches
  (through the miner's ``on_batch`` callback) the dense batches that catch up with the tokens it has mined so far, body then
  full LM. The miner's time is its end-to-end wall time minus the time spent in them, so a machine whose speed
  drifts during the run (these shared machines drift by 5-18% within minutes) weighs on both sides alike;
- padding share of the miner's batches (target < 5%);
- a batch's fixed cost, in padded tokens: the miner (hooked, k, both signs) runs the same tokens, sentences of
  one length, as one batch of ``batch_tokens`` and as eight batches of an eighth, alternating, several times;
  (eight small − one big) / 7 over the time per token. It checks ``batching.BATCH_COST``, the cost per batch that
  the miner's batch plan (``batching.plan_least_padding``) weighs against padding;
- the snapshots at every doubling of the corpus (notebook 10): the miner's own time taking them (flushing its
  pools, saving each as a prefix run's top-k state) as a share of its mining time, plus the extra work of
  planning batches within each prefix rather than over the whole corpus, counted: extra padded tokens plus the
  extra batches at the measured cost per batch (a count, not a timing); target: at most 2% in all;
- peak memory at N and 10N sentences: a fresh process each; after the model is loaded and has run once,
  ``/proc/self/clear_refs`` resets the peak RSS (VmHWM); we report VmHWM during mining (model included) and the
  growth from N to 10N (target <= +10%);
- the usual approach: a forward hook that caches every FFN activation (coefficients) of every layer for every
  sentence, as TransformerLens' ``run_with_cache`` does (this is a hook-based baseline: transformer-lens is not
  installed), then the same top-k (per-sentence maximum and top-50 over sentences, both signs) with torch ops.
  Fresh process; same length-sorted batches; throughput and peak memory against ours.

The default size is the default notebook scale's mining corpus (8,000 sentences, the main job's).
Requires Linux for the memory rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, run_python, table  # noqa: E402

from ffnlib.config import SCALES  # noqa: E402

ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

SETUP = """
import json, os, resource, tempfile, time, numpy as np, torch
from ffnlib.corpus import load_corpus
from ffnlib.models import load_model
from ffnlib import batching, keys, mining
loaded = load_model({model!r}, device={device!r})
sentences = load_corpus("wiki", split="train", seed=0, max_sentences={sentences})

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0

with torch.inference_mode():  # warm up: every weight read once, so its pages are resident
    loaded.model(input_ids=torch.tensor([loaded.encode("Warm up the model once.")]))
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM)
"""

OURS = SETUP + """
start = time.perf_counter()
ex = keys.mine_trigger_examples(loaded, sentences, k={k}, batch_tokens={batch_tokens}, out_dir=tempfile.mkdtemp(),
                                progress=False)
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "tokens": ex.stats["tokens"], "peak": status("VmHWM:"), "before": before,
                  "padding": ex.stats["padding_share"]}}))
"""

USUAL = SETUP + """
a = loaded.adapter
start = time.perf_counter()
table = mining.prepare_sentences(loaded, sentences)
lengths = np.array([len(t) for t in table["token_ids"]])
cache = {{layer: [] for layer in range(a.n_layers)}}
hooks = [a.down(layer).register_forward_pre_hook(lambda m, args, layer=layer: cache[layer].append(args[0].detach().clone()))
         for layer in range(a.n_layers)]
pad = loaded.tokenizer.pad_token_id or 0
order = []
with torch.inference_mode():
    for rows in batching.plan_least_padding(lengths, {batch_tokens}):  # the miner's plan without snapshots
        width = int(lengths[rows].max())
        ids = torch.full((len(rows), width), pad)
        for i, r in enumerate(rows):
            ids[i, :lengths[r]] = torch.tensor(table["token_ids"][r])
        loaded.model(input_ids=ids.to(loaded.device), use_cache=False)
        order.extend(rows.tolist())
for h in hooks:
    h.remove()
ids = torch.tensor(table["sentence_id"].to_numpy()[order])
lens = torch.tensor(lengths[order])
top = {{}}
with torch.inference_mode():
    for layer, parts in cache.items():
        highs, lows, offset = [], [], 0
        for part in parts:
            real = lens[offset: offset + part.shape[0]].to(part.device)
            offset += part.shape[0]
            mask = (torch.arange(part.shape[1], device=part.device)[None, :] < real[:, None])[..., None]
            highs.append(part.masked_fill(~mask, float("-inf")).max(1).values)
            lows.append(part.masked_fill(~mask, float("inf")).min(1).values)
        high, low = torch.cat(highs), torch.cat(lows)
        top[layer] = (high.topk({k}, dim=0), (-low).topk({k}, dim=0))
seconds = time.perf_counter() - start
stored = sum(p.numel() * p.element_size() for parts in cache.values() for p in parts)
print(json.dumps({{"seconds": seconds, "tokens": int(lengths.sum()), "peak": status("VmHWM:"), "before": before,
                  "cached_bytes": stored}}))
"""


def miner_plan(lengths, batch_tokens: int, k: int) -> list:
    """The miner's batches: length-sorted within each doubling prefix of the corpus (its snapshots)."""
    from ffnlib import batching, keys

    sizes = batching.doubling_sizes(len(lengths), keys.auto_snapshot_floor(len(lengths), k))
    return batching.plan_prefix_batches(lengths, batch_tokens, sizes)[0]


def batch_cost(loaded, token_ids, batch_tokens: int, k: int, repeats: int = 5) -> tuple[float, int, float]:
    """A miner's batch's fixed cost in padded tokens: (cost, width, seconds per token). The same
    ``batch_tokens`` tokens (sentences cut to one width) mined as one batch and as eight, alternating."""
    import numpy as np
    import torch

    from ffnlib import mining

    width = 32
    rows = [list(t[:width]) for t in token_ids if len(t) >= width][: max(8, batch_tokens // width)]
    rows = rows[: len(rows) // 8 * 8]
    if not rows:
        raise SystemExit(f"the batch-cost row needs at least 8 sentences of {width} tokens or more")
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    ids = torch.arange(len(rows))
    pad = loaded.tokenizer.pad_token_id or 0
    state = mining.TopKState.empty(list(range(loaded.adapter.n_layers)), [1, -1], loaded.adapter.d_ff, k,
                                   device=loaded.device)
    one, eight = [], []
    with mining.hooked(loaded, state) as miner, torch.inference_mode():
        miner.mine(loaded.model, rows, ids, pad)  # warm up
        step = len(rows) // 8
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            miner.mine(loaded.model, rows, ids, pad)
            sync()
            one.append(time.perf_counter() - start)
            start = time.perf_counter()
            for first in range(0, len(rows), step):
                miner.mine(loaded.model, rows[first: first + step], ids[first: first + step], pad)
            sync()
            eight.append(time.perf_counter() - start)
    per_token = float(np.median(one)) / (len(rows) * width)
    return (float(np.median(eight)) - float(np.median(one))) / 7 / per_token, width, per_token


def padded_tokens(lengths, batches) -> int:
    return int(sum(len(rows) * int(lengths[rows].max()) for rows in batches))


class InterleavedBaselines:
    """The bare forward passes, run between the miner's batches: pass as ``on_batch`` to ``keys.mine_trigger_examples``.

    The tokens are the miner's, in corpus order, packed into dense rows of the mean sentence length and batches of
    ``batch_tokens``. After the miner's batch ``b``, dense batches run until they have covered as many tokens as
    the miner has mined so far; each runs twice, through the transformer body only (stopped after the last layer)
    and through the full LM. ``seconds`` counts all time spent in here, to subtract from the miner's wall time.
    """

    def __init__(self, loaded, token_ids, batch_tokens: int, k: int):
        import copy

        import numpy as np
        import torch

        from ffnlib import capture, mining

        lengths = np.array([len(t) for t in token_ids])
        self.mined_after = np.cumsum([lengths[rows].sum() for rows in miner_plan(lengths, batch_tokens, k)])
        self.width = width = max(1, int(round(lengths.mean())))
        flat = [t for ids in token_ids for t in ids]
        n_rows = len(flat) // width
        self.ids = torch.tensor(flat[: n_rows * width]).view(n_rows, width).to(loaded.device)
        self.rows = max(1, batch_tokens // width)
        self.next_row = 0
        self.model = copy.deepcopy(loaded.model)  # before mining: no miner hooks on the copy
        self.stop_body = False

        def stop(module, args, out):
            if self.stop_body:
                raise capture.StopForward

        last = loaded.adapter.layer(loaded.adapter.n_layers - 1)
        path = next(name for name, module in loaded.model.named_modules() if module is last)
        self.model.get_submodule(path).register_forward_hook(stop)
        with torch.inference_mode():  # warm up both models (not counted)
            for model in (self.model, loaded.model):
                model(input_ids=self.ids[:8], use_cache=False)
        self.seconds = 0.0
        self.body = [0.0, 0]  # seconds, tokens
        self.full = [0.0, 0]

    def run(self) -> None:
        """The next dense batch, through the body and then the full LM."""
        import torch

        from ffnlib import capture

        chunk = self.ids[self.next_row: self.next_row + self.rows]
        self.next_row += chunk.shape[0]
        with torch.inference_mode():
            for target, body in ((self.body, True), (self.full, False)):
                self.stop_body = body
                start = time.perf_counter()
                try:
                    self.model(input_ids=chunk, use_cache=False)
                except capture.StopForward:
                    pass
                target[0] += time.perf_counter() - start
                target[1] += chunk.numel()

    def __call__(self, batches_done: int, sentences_done: int) -> None:
        start = time.perf_counter()
        while self.next_row < self.ids.shape[0] and self.next_row * self.width < self.mined_after[batches_done - 1]:
            self.run()
        self.seconds += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sentences", type=int, default=SCALES["default"].mining_sentences,
                        help="sentences mined (10N; N = this / 10); default: the default scale's mining corpus")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-usual", action="store_true", help="skip the cache-everything baseline")
    args = parser.parse_args()

    import psutil

    from ffnlib import batching, keys, mining
    from ffnlib.corpus import load_corpus
    from ffnlib.models import load_model

    loaded = load_model(args.model, device=args.device)
    sentences = load_corpus("wiki", split="train", seed=0, max_sentences=args.sentences)
    token_ids = mining.prepare_sentences(loaded, sentences)["token_ids"].tolist()
    bare_full = [0.0, 0]
    bare_body = [0.0, 0]
    ours = [0.0, 0]
    padding = None
    snapshot_seconds = 0.0
    for repeat in range(args.repeats):
        baselines = InterleavedBaselines(loaded, token_ids, args.batch_tokens, args.k)
        start = time.perf_counter()
        ex = keys.mine_trigger_examples(loaded, sentences, k=args.k, batch_tokens=args.batch_tokens,
                                        out_dir=tempfile.mkdtemp(), progress=False, on_batch=baselines)
        ours[0] += time.perf_counter() - start - baselines.seconds
        ours[1] += ex.stats["tokens"]
        padding = ex.stats["padding_share"]
        snapshot_seconds += ex.stats["snapshot_seconds"]
        for total, part in ((bare_body, baselines.body), (bare_full, baselines.full)):
            total[0] += part[0]
            total[1] += part[1]

    rate = lambda pair: pair[1] / pair[0]
    params = {"model": args.model, "device": args.device, "k": args.k, "batch_tokens": args.batch_tokens}
    small = max(args.k, args.sentences // 10)
    big = json.loads(run_python(OURS.format(sentences=args.sentences, **params), ENV))
    little = json.loads(run_python(OURS.format(sentences=small, **params), ENV))
    rows = [
        {"row": "mining throughput vs bare forward (full LM, dense batches)", "ours": f"{rate(ours):,.0f} tok/s",
         "baseline": f"{rate(bare_full):,.0f} tok/s", "ratio": rate(ours) / rate(bare_full), "target": ">= 0.9",
         "met": rate(ours) / rate(bare_full) >= 0.9,
         "note": f"{ours[1]:,} real tokens, {len(sentences):,} sentences, k={args.k}, both signs, all layers"},
        {"row": "mining throughput vs bare transformer body (no final norm/head)", "ours": f"{rate(ours):,.0f} tok/s",
         "baseline": f"{rate(bare_body):,.0f} tok/s", "ratio": rate(ours) / rate(bare_body), "target": ">= 0.9",
         "met": rate(ours) / rate(bare_body) >= 0.9, "note": "stricter: the miner also skips the head"},
        {"row": "padding share of the miner's batches", "ours": f"{padding:.1%}", "target": "< 5%",
         "met": padding < 0.05, "note": f"batch_tokens={args.batch_tokens}"},
        {"row": f"peak RSS while mining, {little['tokens']:,} vs {big['tokens']:,} tokens",
         "ours": f"{big['peak'] / 2**20:,.0f} MiB", "baseline": f"{little['peak'] / 2**20:,.0f} MiB",
         "ratio": big["peak"] / little["peak"], "target": "<= 1.10", "met": big["peak"] <= 1.10 * little["peak"],
         "note": f"model included; above the post-load RSS: {(little['peak'] - little['before']) / 2**20:,.0f} -> "
                 f"{(big['peak'] - big['before']) / 2**20:,.0f} MiB"},
    ]
    # The snapshots (notebook 10): the time the miner spends taking them (flush, save their states), and the extra
    # work of planning within each doubling prefix instead of over the whole corpus, counted as padded tokens plus
    # the batches at the measured cost each (measured in this run, not as two timed runs).
    import numpy as np

    lengths = np.array([len(t) for t in token_ids])
    cost, width, per_token = batch_cost(loaded, token_ids, args.batch_tokens, args.k)
    rows.append({"row": "a miner's batch's fixed cost, in padded tokens", "ours": f"{cost:.0f}",
                 "baseline": f"batching.BATCH_COST = {batching.BATCH_COST}", "ratio": cost / batching.BATCH_COST,
                 "target": "—", "met": None,
                 "note": f"one batch of {args.batch_tokens} tokens vs eight (width {width}), "
                         f"{per_token * 1e3:.2f} ms per token"})
    whole = batching.plan_least_padding(lengths, args.batch_tokens)  # the plan of a run without snapshots
    segments = miner_plan(lengths, args.batch_tokens, args.k)
    single, segmented = padded_tokens(lengths, whole), padded_tokens(lengths, segments)
    taking = snapshot_seconds / ours[0]
    extra = (segmented + cost * len(segments)) / (single + cost * len(whole)) - 1
    rows.append({"row": "snapshots at every doubling (corpus size): share of the mining time",
                 "ours": f"{taking + extra:.2%}", "baseline": "no snapshots", "ratio": 1 + taking + extra,
                 "target": "<= 1.02", "met": taking + extra <= 0.02,
                 "note": f"taking them {snapshot_seconds:.1f} s of {ours[0]:.0f} s ({taking:.2%}); planning within "
                         f"the prefixes {extra:+.2%} ({segmented:,} vs {single:,} padded tokens, {len(segments)} "
                         f"vs {len(whole)} batches at {cost:.0f} tokens each); sizes {ex.stats['snapshots']}"})
    if not args.skip_usual:
        need = 4 * loaded.adapter.n_layers * loaded.adapter.d_ff * (ours[1] / args.repeats) * 1.1
        if need > 0.6 * psutil.virtual_memory().available:
            rows.append({"row": "usual approach (cache all activations)", "note":
                         f"skipped: would need ~{need / 2**30:.1f} GiB of activations"})
        else:
            usual = json.loads(run_python(USUAL.format(sentences=args.sentences, **params), ENV))
            ours_sub = big["tokens"] / big["seconds"]
            usual_rate = usual["tokens"] / usual["seconds"]
            rows.append({"row": "throughput vs the usual approach (hook cache of every FFN activation, then top-k)",
                         "ours": f"{ours_sub:,.0f} tok/s", "baseline": f"{usual_rate:,.0f} tok/s",
                         "ratio": ours_sub / usual_rate, "target": "—", "met": None,
                         "note": "both in a fresh process; hook-based baseline (transformer-lens not installed)"})
            rows.append({"row": "peak RSS vs the usual approach", "ours": f"{big['peak'] / 2**20:,.0f} MiB",
                         "baseline": f"{usual['peak'] / 2**20:,.0f} MiB", "ratio": big["peak"] / usual["peak"],
                         "target": "—", "met": None,
                         "note": f"the usual approach cached {usual['cached_bytes'] / 2**30:.2f} GiB of "
                                 f"activations; it grows with the corpus, ours does not"})
    print(f"Machine: {machine(args.device)}; {psutil.cpu_percent(interval=0.5):.0f}% CPU busy at the end "
          f"(load average {', '.join(f'{x:.1f}' for x in psutil.getloadavg())})")
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
