"""Contribution maps through the FFN (Kobayashi et al., ICLR 2024) against a plain forward pass of the same text.

    python benchmarks/bench_contextualization.py [--model smollm2-135m] [--tokens 40] [--repeats 5] [--batch 16]

In one process, interleaved (forward, maps, forward, maps, ...) so that the machine's drift weighs on both sides:

- one sentence of ``--tokens`` tokens (a held-out corpus sentence, cut or extended to that length): a plain
  forward pass of the whole model (``loaded.model(ids)``) against ``contextualization.decompose`` of every
  layer (every stage the model has: the four maps and the FFN's input map; no completeness check). Target: <= 30x.
- ``--batch`` held-out sentences of 8-40 tokens at once (the notebook's way): the maps against a plain padded
  forward pass of the same batch (no target; it shows what batching buys).
- peak memory at ``--tokens`` and at 128 tokens (the default bound), each in a fresh process: peak RSS
  (VmHWM) minus the RSS after loading the model and one forward pass (Linux only). The chunks over
  (query, input) pairs keep the per-layer tensors under ``CHUNK_ELEMENTS`` floats; what grows is the
  maps themselves (n² per stage and layer).

The figure is the median over ``--repeats`` pairs of runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, run_python, table  # noqa: E402

_MEMORY = """
import torch
from ffnlib.models import load_model
from ffnlib.related.contextualization import decompose
loaded = load_model({model!r}, device={device!r})
ids = (loaded.encode("The tower was built for the fair of 1889 in Paris, and it is still there. ") * 20)[:{n}]
with torch.no_grad():
    loaded.model(torch.tensor([ids], device=loaded.device))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
decompose(loaded, [ids])
print(status("VmHWM") - before)
"""


def _sentence(loaded, tokens: int) -> list[int]:
    from ffnlib.corpus import load_corpus

    table_ = load_corpus("wiki", split="heldout", seed=0, max_sentences=200)
    ids: list[int] = list(loaded.bos)
    for text in table_["text"]:
        ids += loaded.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            break
    return ids[:tokens]


def run(model: str = "smollm2-135m", tokens: int = 40, repeats: int = 5, batch: int = 16, device: str = "cpu",
        memory: bool = True) -> list[dict]:
    import torch

    from ffnlib.models import load_model
    from ffnlib.related import contextualization as ctx

    loaded = load_model(model, device=device)
    ids = _sentence(loaded, tokens)
    inputs = torch.tensor([ids], device=loaded.device)
    with torch.no_grad():  # warm up both sides
        loaded.model(inputs)
    ctx.decompose(loaded, [ids])
    plain, maps = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            loaded.model(inputs)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        ctx.decompose(loaded, [ids])
        maps.append(time.perf_counter() - start)
    forward, ours = statistics.median(plain), statistics.median(maps)
    layers = loaded.adapter.n_layers
    stages = ", ".join(ctx.stages_of(loaded.adapter, 0))
    rows = [{"row": f"All maps ({stages}) of one {tokens}-token sentence, all {layers} layers, vs a plain forward "
                    f"pass of it", "ours": f"{ours:.2f} s", "baseline": f"{forward:.3f} s",
             "ratio": ours / forward, "target": "<= 30x", "met": ours / forward <= 30,
             "note": f"median of {repeats} interleaved pairs; max/min maps {max(maps):.2f}/{min(maps):.2f} s"}]

    sentences = ctx.sample_sentences(loaded, batch, seed=0, min_tokens=8, max_tokens=40)
    token_ids = [loaded.encode(text) for text in sentences["text"]]
    width = max(map(len, token_ids))
    padded = torch.full((len(token_ids), width), loaded.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, seq in enumerate(token_ids):
        padded[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
    padded, mask = padded.to(loaded.device), mask.to(loaded.device)
    plain, maps = [], []
    for _ in range(max(1, repeats // 2)):
        start = time.perf_counter()
        with torch.no_grad():
            loaded.model(input_ids=padded, attention_mask=mask)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        ctx.decompose(loaded, token_ids)
        maps.append(time.perf_counter() - start)
    forward, ours = statistics.median(plain), statistics.median(maps)
    n_tokens = sum(map(len, token_ids))
    rows.append({"row": f"Maps of a batch of {batch} held-out sentences ({n_tokens} tokens, 8-40 each) vs a plain "
                        f"padded forward pass of the batch", "ours": f"{ours:.2f} s ({ours / batch:.2f} s/sentence)",
                 "baseline": f"{forward:.3f} s", "ratio": ours / forward, "target": "—", "met": None,
                 "note": "what the notebook does"})
    if memory:
        peaks = {n: int(run_python(_MEMORY.format(model=model, device=device, n=n))) for n in (tokens, 128)}
        rows.append({"row": f"Peak extra memory of the maps, {tokens} vs 128 tokens (fresh process each)",
                     "ours": f"{peaks[128] / 2**20:.0f} MiB", "baseline": f"{peaks[tokens] / 2**20:.0f} MiB",
                     "ratio": peaks[128] / max(peaks[tokens], 1), "target": "—", "met": None,
                     "note": f"chunks of at most {ctx.CHUNK_ELEMENTS:,} floats; (128/{tokens})² = "
                             f"{(128 / tokens) ** 2:.1f}"})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    print(f"Machine: {machine(args.device)}; model {args.model}\n")
    rows = run(args.model, args.tokens, args.repeats, args.batch, args.device, memory=not args.skip_memory)
    print(table(rows))
    return 0 if all(r["met"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
