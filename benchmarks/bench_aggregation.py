"""Section 5 analysis (aggregating memories) against a bare forward pass over the same examples.

    python benchmarks/bench_aggregation.py [--model smollm2-135m] [--examples 4000] [--batch-tokens 2048]

In one process, on the same held-out examples (one random prefix per sentence, batched and padded the
same way):

- bare: ``loaded.model(input_ids, attention_mask)`` on every batch (the whole model, head included);
- ours: ``ffnlib.aggregation.analyse_aggregation`` (hooks on every layer, the four captured tensors
  gathered at each example's position, three vocabulary projections per layer and example, memory
  counts, agreement, cases, per-batch checkpoints to a temporary folder and the final Parquet result).
  The values' top tokens are read from their cache: computing them is a one-off cost per model,
  reported on its own row (with a fresh cache folder).

Target: ours <= 3x bare. The default 4,000 examples (the paper's number) takes several minutes on a
2-core CPU; ``--examples 1000`` is a quicker check. Peak memory: ``/proc/self/clear_refs`` resets the
peak RSS before the analysis; the row reports VmHWM minus the RSS before it (Linux only).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table  # noqa: E402


def _status(key: str) -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run(model: str = "smollm2-135m", examples: int = 4000, batch_tokens: int = 2048, device: str = "cpu",
        seed: int = 0, value_tops: bool = True) -> list[dict]:
    import torch

    from ffnlib import aggregation as agg
    from ffnlib import batching
    from ffnlib.models import load_model

    loaded = load_model(model, device=device)
    sample = agg.sample_examples(loaded, examples, seed)
    batches = batching.plan_shortest_first(sample["position"].to_numpy() + 1, batch_tokens)
    tokens = int((sample["position"] + 1).sum())
    padded = int(sum(len(b) * (sample["position"].iloc[b].max() + 1) for b in batches))
    pad_id = loaded.tokenizer.pad_token_id or 0

    rows = []
    if value_tops:
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            agg.memory_top_tokens(loaded, negative=loaded.adapter.gated, cache=cache, progress=False)
            once = time.perf_counter() - start
        rows.append({"row": f"Top token of every value (one-off per model, cached; {model})",
                     "ours": f"{once:.1f} s", "baseline": "", "ratio": None, "target": "", "met": None,
                     "note": f"{loaded.adapter.n_layers * loaded.adapter.d_ff} values, v and -v" if loaded.adapter.gated
                     else ""})
    agg.memory_top_tokens(loaded, negative=loaded.adapter.gated, progress=False)  # the user cache, as a run uses

    with torch.inference_mode():  # warm-up: one small batch
        ids, mask, _ = batching.prefix_inputs(sample, batches[0][:4], pad_id, loaded.device)
        loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)

    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            ids, mask, _ = batching.prefix_inputs(sample, batch, pad_id, loaded.device)
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
    bare = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as out_dir:
        tracked = _reset_peak()
        before = _status("VmRSS:")
        start = time.perf_counter()
        result = agg.analyse_aggregation(loaded, n_examples=examples, seed=seed, batch_tokens=batch_tokens,
                                         out_dir=out_dir, progress=False)
        ours = time.perf_counter() - start
        peak = _status("VmHWM:") - before if tracked else None
    assert len(result.frame) == len(sample) * loaded.adapter.n_layers

    ratio = ours / bare
    rows.append({"row": f"Section 5 on {len(sample)} held-out examples ({model}, {tokens} prefix tokens, "
                        f"{len(batches)} batches)",
                 "ours": f"{ours:.1f} s ({len(sample) / ours:.1f} examples/s)",
                 "baseline": f"{bare:.1f} s (bare forward, same batches)", "ratio": ratio, "target": "<= 3x",
                 "met": ratio <= 3.0, "note": f"batch_tokens={batch_tokens}, {padded} padded tokens; same process"})
    if peak is not None:
        rows.append({"row": "Peak extra RSS of the analysis", "ours": f"{peak / 2**20:.0f} MB", "baseline": "",
                     "ratio": None, "target": "", "met": None,
                     "note": "VmHWM - RSS before (clear_refs reset); grows with --batch-tokens"})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=4000, help="held-out examples (paper: 4000)")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-value-tops", action="store_true", help="skip the one-off value top-token row")
    args = parser.parse_args()
    print(machine(args.device))
    print(table(run(args.model, args.examples, args.batch_tokens, args.device, args.seed, not args.no_value_tops)))
