"""bf16 against float32 on one machine, in one run: what reduced precision buys and what it costs.

    python benchmarks/bench_precision.py [--device cpu|cuda] [--sentences 120] [--suite | --suite-only]

- **Matmul**: GFLOP/s of a 4096x576 by 576x1536 product (SmolLM2's FFN shape) in float32 and bf16.
- **Forward**: tokens per second of the model's transformer body on 64 held-out sentences padded to 48 tokens.
- **Coefficients**: the FFN coefficients m of the bf16 model against float32's on the same batch, per layer
  (relative error, ||m_bf16 - m_fp32|| / ||m_fp32||).
- **Triggers**: the top-k trigger examples mined in both dtypes on ``--sentences`` training sentences: the share
  of each memory's top-k set that is the same, per layer (target: >= 95% in every layer).
- **Training** (notebook 08's loop): tokens per second of ``train_lm`` under bf16 autocast against float32.
- ``--suite``: notebooks 00-04 with the control at ``--scale`` in both dtypes: the wall time (target: bf16 >= 1.7x
  faster), the verdicts of the paper's findings, and every estimate of ours against float32's 95% interval.

On hardware without native bf16 arithmetic torch emulates it; the rows then say how much slower it is.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import machine, table  # noqa: E402

from ffnlib.capture import capture  # noqa: E402
from ffnlib.corpus import load_corpus  # noqa: E402
from ffnlib.keys import mine_trigger_examples  # noqa: E402
from ffnlib.models import load_model  # noqa: E402
from ffnlib.precision import native_bfloat16  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_gflops(device: str, dtype: torch.dtype, seconds: float = 1.0) -> float:
    a = torch.randn(4096, 576, device=device, dtype=dtype)
    b = torch.randn(576, 1536, device=device, dtype=dtype)
    a @ b
    sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 2:
        a @ b
        sync(device)
        n += 1
    return 2 * 4096 * 576 * 1536 * n / (time.perf_counter() - start) / 1e9


def padded_batch(loaded, sentences: int = 64, width: int = 48) -> torch.Tensor:
    texts = load_corpus("wiki", split="heldout", max_sentences=4 * sentences)["text"].tolist()
    rows = [loaded.encode(t)[:width] for t in texts]
    rows = [r + [r[-1]] * (width - len(r)) for r in rows if len(r) >= 8][:sentences]
    return torch.tensor(rows, device=loaded.device)


@torch.no_grad()
def body_tokens_per_second(loaded, ids: torch.Tensor, rounds: int = 2) -> float:
    body = loaded.model.model
    body(input_ids=ids[:4])
    sync(str(ids.device))
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        body(input_ids=ids)
        sync(str(ids.device))
        best = max(best, ids.numel() / (time.perf_counter() - start))
    return best


@torch.no_grad()
def coefficients(loaded, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    with capture(loaded, None, what=("coefficients",)) as acts:
        loaded.model(input_ids=ids)
    return {layer: m.cpu() for layer, m in acts.coefficients.items()}


def trigger_overlap(a, b, k: int) -> dict[int, float]:
    """Per layer, the mean share of a memory's top-k trigger set (sentence, position) found in both runs."""
    fa, fb = a.triggers, b.triggers
    out = {}
    for layer in sorted(fa["layer"].unique()):
        sa = fa[(fa["layer"] == layer) & (fa["sign"] == 1)]
        sb = fb[(fb["layer"] == layer) & (fb["sign"] == 1)]
        ka = set(zip(sa["memory"], sa["sentence_id"], sa["position"]))
        kb = set(zip(sb["memory"], sb["sentence_id"], sb["position"]))
        out[int(layer)] = len(ka & kb) / max(len(ka), 1)
    return out


def training_tokens_per_second(precision: str, steps: int) -> float:
    from ffnlib import training as tr
    from ffnlib.related.relu_softmax import sweep_sizes

    base = replace(sweep_sizes("default").base, slots=1024)
    spec = replace(base, tokens=steps * base.batch * base.context)
    work = Path(tempfile.mkdtemp(prefix="ffnlib-bench-precision-"))
    try:
        return tr.train_lm(spec, work, progress=False, precision=precision).tokens_per_second
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sentences", type=int, default=120, help="training sentences mined in both dtypes")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--forward-sentences", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--suite", action="store_true", help="also run notebooks 00-04 in both dtypes (long)")
    parser.add_argument("--scale", default="default")
    parser.add_argument("--suite-only", action="store_true", help="only the --suite rows (skips the others)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # bf16 where it is emulated says so once per load; the rows say it here
    native = native_bfloat16(args.device)
    print(f"Machine: {machine(args.device)}; native bf16: {native}\n")
    rows = []
    if args.suite_only:
        from suite_fidelity import compare_runs  # noqa: E402

        print(table(compare_runs(args.model, args.scale, args.device)))
        return 0
    f32, bf16 = matmul_gflops(args.device, torch.float32), matmul_gflops(args.device, torch.bfloat16)
    rows.append({"row": "matmul 4096x576 @ 576x1536, bf16 / float32", "ours": f"{bf16:.1f} GFLOP/s",
                 "baseline": f"{f32:.1f} GFLOP/s", "ratio": bf16 / f32})
    models = {name: load_model(args.model, device=args.device, precision=name) for name in DTYPES}
    ids = padded_batch(models["float32"], args.forward_sentences)
    speed = {name: body_tokens_per_second(m, ids) for name, m in models.items()}
    rows.append({"row": f"transformer body, {ids.shape[0]} sentences x {ids.shape[1]} tokens, bf16 / float32",
                 "ours": f"{speed['bfloat16']:,.0f} tok/s", "baseline": f"{speed['float32']:,.0f} tok/s",
                 "ratio": speed["bfloat16"] / speed["float32"]})
    m32, m16 = coefficients(models["float32"], ids[:16]), coefficients(models["bfloat16"], ids[:16])
    errors = {layer: float((m16[layer] - m32[layer]).norm() / m32[layer].norm()) for layer in m32}
    worst = max(errors, key=errors.get)
    rows.append({"row": "coefficients m, bf16 against float32: relative error", "ours":
                 f"largest {errors[worst]:.2%} (layer {worst}); median {np.median(list(errors.values())):.2%}"})
    sentences = load_corpus("wiki", split="train", max_sentences=args.sentences)
    mined = {name: mine_trigger_examples(m, sentences, k=args.k, progress=False, snapshot_floor=None)
             for name, m in models.items()}
    overlap = trigger_overlap(mined["float32"], mined["bfloat16"], args.k)
    low = min(overlap, key=overlap.get)
    rows.append({"row": f"top-{args.k} trigger sets, {args.sentences} sentences: same in both dtypes",
                 "ours": f"lowest layer {overlap[low]:.1%} (layer {low}); mean {np.mean(list(overlap.values())):.1%}",
                 "target": "≥ 95% in every layer", "met": overlap[low] >= 0.95,
                 "note": f"mining {mined['bfloat16'].stats['tokens_per_second']:.0f} tok/s bf16, "
                         f"{mined['float32'].stats['tokens_per_second']:.0f} float32"})
    train = {name: training_tokens_per_second(name, args.train_steps) for name in DTYPES}
    rows.append({"row": f"notebook 08's training loop ({args.train_steps} steps), bf16 autocast / float32",
                 "ours": f"{train['bfloat16']:,.0f} tok/s", "baseline": f"{train['float32']:,.0f} tok/s",
                 "ratio": train["bfloat16"] / train["float32"]})
    if args.suite:
        from suite_fidelity import compare_runs  # noqa: E402

        rows.extend(compare_runs(args.model, args.scale, args.device))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
