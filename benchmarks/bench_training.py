"""The training loop of ffnlib.training against a bare training step of the same model, in the same run.

    python benchmarks/bench_training.py [--steps 60] [--rounds 3] [--spec sweep|wiki-relu-lm] [--train-default]

- **Loop / bare** (target >= 0.95): tokens per second of ``train_lm`` (batch selection, forward, backward,
  clipping, AdamW step, schedule, history, progress bar, checkpoints) over tokens per second of a bare
  ``forward + backward + optimizer.step()`` on the same model and batches. The two alternate ``--rounds`` times
  (so the machine's drift weighs on both alike); medians are compared.
- **Time to the default ReLU model** (``wiki-relu-lm``): the loop's measured seconds per step of that spec, times its
  steps (``--train-default`` trains it for real, about 30 min on 2 cores, and reports the time taken).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import machine, table  # noqa: E402

from ffnlib import training as tr  # noqa: E402
from ffnlib.related.relu_softmax import sweep_sizes  # noqa: E402


def bare_tokens_per_second(spec, tokenizer, data, steps: int) -> float:
    model = tr.build_model(spec, tokenizer)
    model.train()
    optimizer, _ = tr.make_optimizer(model, spec)
    start = time.perf_counter()
    for step in range(steps):
        ids = data[torch.from_numpy(tr.batch_indices(step, len(data), spec.batch, spec.seed))]
        model(ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * spec.batch * spec.context / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="unused (run_all passes it)")
    parser.add_argument("--device", default="cpu", help="training runs on the CPU")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spec", choices=["sweep", "wiki-relu-lm"], default="sweep",
                        help="sweep: the default sweep's ReLU cell at 1,024 slots; wiki-relu-lm: the embedded model")
    parser.add_argument("--train-default", action="store_true", help="also train wiki-relu-lm for real (~30 min)")
    args = parser.parse_args()
    print(f"Machine: {machine('cpu')}\n")
    base = replace(sweep_sizes("default").base, slots=1024) if args.spec == "sweep" else tr.WIKI_RELU_LM
    spec = replace(base, tokens=args.steps * base.batch * base.context)
    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    try:
        tokenizer = tr.cached_tokenizer(spec, work)
        data = tr.blocks(tokenizer, tr.spec_sentences(spec, "train"), spec.context)
        loop, bare = [], []
        for r in range(args.rounds):
            result = tr.train_lm(replace(spec, seed=r), work, progress=False,
                                 checkpoint_every=max(1, args.steps // 2))
            loop.append(result.tokens_per_second)
            bare.append(bare_tokens_per_second(replace(spec, seed=r), tokenizer, data, args.steps))
        ours, theirs = float(np.median(loop)), float(np.median(bare))
        rows = [{"row": f"training loop / bare step ({args.spec}: d_model {spec.d_model}, {spec.n_layers} layers, "
                        f"{spec.slots} slots, batch {spec.batch}x{spec.context})",
                 "ours": f"{ours:,.0f} tok/s", "baseline": f"{theirs:,.0f} tok/s", "ratio": ours / theirs,
                 "target": ">= 0.95", "met": ours / theirs >= 0.95,
                 "note": f"median of {args.rounds} alternating rounds of {args.steps} steps; loop includes a "
                         "checkpoint every half run"}]
        default = tr.WIKI_RELU_LM
        if args.spec == "wiki-relu-lm":
            estimate = default.steps * default.batch * default.context / ours
            rows.append({"row": "time to the default ReLU model (wiki-relu-lm), estimated", "ours": f"{estimate / 60:.0f} min",
                         "baseline": "", "ratio": None, "target": "about 30 min", "met": None,
                         "note": f"{default.steps:,} steps at the loop's measured {ours:,.0f} tok/s"})
        if args.train_default:
            start = time.perf_counter()
            result = tr.train_lm(default, work / "default", progress=True)
            rows.append({"row": "time to the default ReLU model (wiki-relu-lm), trained", "ours":
                         f"{(time.perf_counter() - start) / 60:.1f} min", "baseline": "", "ratio": None,
                         "target": "about 30 min", "met": None,
                         "note": f"held-out perplexity {result.heldout_perplexity:.1f}; tokenizer and data included"})
        print(table(rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
