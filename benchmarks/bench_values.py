"""Section 4 value projection: every value of the model through its head, against the bare matrix product.

    python benchmarks/bench_values.py [--model smollm2-135m] [--memory-limit-mb 512] [--layers 0,15,29]

Variants, all with the same memory bound and therefore the same chunks of rows:

- bare: ``adapter.logits_from_values`` on every value, chunk by chunk (the matrix product with the final
  norm's gain, nothing else: no softmax, no top-k);
- ours: ``ffnlib.values.project_values`` (top-10 tokens and probabilities of v_i, and of -v_i for gated
  models);
- ours + ranks: the same, also ranking one target token per value (as Fig. 5 needs) in the same pass.

Time: one process; the variants run layer by layer, interleaved (bare, ours, ours + ranks for one layer, then
the next layer, rotating which goes first), and each variant's per-layer times are summed. Interleaving keeps
the ratio honest on a machine whose load drifts. Each ``project_values`` call covers one layer here, so it
pays its work buffer's allocation on every layer (a whole-model call reuses it): a slight handicap to ours.

Peak memory: a fresh process per variant, over two layers. After the model is loaded and every weight has been
read once (so the weights' pages are resident), ``/proc/self/clear_refs`` resets the peak RSS (VmHWM); the
figure is VmHWM minus the RSS just before the step: the largest extra resident memory the step needed.
Requires Linux.
"""

from __future__ import annotations

import argparse
import json

from common import machine, run_python, table

SETUP = """
import json, time, numpy as np, pandas as pd, torch
from ffnlib.models import load_model
from ffnlib.values import project_values, projection_chunk_rows
loaded = load_model({model!r}, device={device!r})
a = loaded.adapter
layers = {layers!r} or list(range(a.n_layers))
vocab = int(a.head.weight.shape[0])
chunk = projection_chunk_rows(vocab, a.d_model, {limit}, softcap=bool(a.softcap))
rows = -(-a.d_ff // -(-a.d_ff // chunk))  # equal chunks of at most `chunk` rows, as project_values splits a layer
signs = (1, -1) if a.gated else (1,)
rng = np.random.default_rng(0)
targets = pd.DataFrame([(l, m, s, int(t)) for l in layers for s in signs
                        for m, t in zip(range(a.d_ff), rng.integers(0, vocab, a.d_ff))],
                       columns=["layer", "memory", "sign", "token"])

def bare(layers):
    with torch.no_grad():
        for layer in layers:
            values = a.values(layer)
            for start in range(0, a.d_ff, rows):
                logits = a.logits_from_values(values[start:start + rows])
                del logits

def ours(layers):
    project_values(loaded, layers=layers, top_k=10, memory_limit_mb={limit}, progress=False)

def ranks(layers):
    project_values(loaded, layers=layers, top_k=10, targets=targets, memory_limit_mb={limit}, progress=False)

VARIANTS = {{"bare": bare, "ours": ours, "ranks": ranks}}
"""

TIME = SETUP + """
names = list(VARIANTS)
total = dict.fromkeys(names, 0.0)
for i, layer in enumerate(layers):
    for name in names[i % 3:] + names[:i % 3]:
        t = time.perf_counter()
        VARIANTS[name]([layer])
        total[name] += time.perf_counter() - t
print(json.dumps({{"time": total, "rows": rows, "vocab": vocab, "memories": len(layers) * a.d_ff,
                  "gated": a.gated}}))
"""

PEAK = SETUP + """
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0

with torch.no_grad():
    touched = sum(float(p.sum()) for p in loaded.model.parameters())  # page every weight in before measuring
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
VARIANTS[{variant!r}](layers[:2])
print(json.dumps({{"peak": status("VmHWM:") - before}}))
"""


def run(model: str = "smollm2-135m", device: str = "cpu", limit: float = 512, layers=None) -> list[dict]:
    args = dict(model=model, device=device, layers=layers, limit=limit)
    timing = json.loads(run_python(TIME.format(**args)).splitlines()[-1])
    peak = {v: json.loads(run_python(PEAK.format(variant=v, **args)).splitlines()[-1])["peak"]
            for v in ("bare", "ours", "ranks")}
    t = timing["time"]
    what = f"{timing['memories']} values x {timing['vocab']} tokens, chunks of {timing['rows']} rows"
    sides = "v and -v" if timing["gated"] else "v"
    rows = [
        {"row": f"Project all values ({model}; {what})", "ours": f"{t['ours']:.1f} s (top-10 of {sides})",
         "baseline": f"{t['bare']:.1f} s (bare product, same chunks)", "ratio": t["ours"] / t["bare"],
         "target": "<= 1.5x", "met": t["ours"] / t["bare"] <= 1.5, "note": "same process, interleaved per layer"},
        {"row": "... plus the rank of one target token per value (Fig. 5)", "ours": f"{t['ranks']:.1f} s",
         "baseline": f"{t['bare']:.1f} s", "ratio": t["ranks"] / t["bare"], "target": "<= 1.5x",
         "met": t["ranks"] / t["bare"] <= 1.5, "note": "same pass"},
    ]
    for v, label in (("ours", "projection"), ("ranks", "projection + ranks"), ("bare", "bare product")):
        mb = peak[v] / 2**20
        rows.append({"row": f"Peak extra RSS, {label}", "ours": f"{mb:.0f} MB", "baseline": f"bound {limit:g} MB",
                     "ratio": mb / limit, "target": "<= bound", "met": mb <= limit if v != "bare" else None,
                     "note": "VmHWM - RSS before the step (clear_refs reset), fresh process, 2 layers"})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-limit-mb", type=float, default=512)
    parser.add_argument("--layers", default="", help="comma-separated layer indices (default: all)")
    args = parser.parse_args()
    chosen = [int(x) for x in args.layers.split(",") if x.strip()] or None
    print(machine(args.device))
    print(table(run(args.model, args.device, args.memory_limit_mb, chosen)))
