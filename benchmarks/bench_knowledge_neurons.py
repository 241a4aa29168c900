"""Knowledge-neuron attribution (notebook 06): the fast exact path against captum run naively.

    python benchmarks/bench_knowledge_neurons.py [--model smollm2-135m] [--threads N] [--layers 0,15,29]

Both sides attribute one prompt over every layer (``--layers`` for a subset) with 20 points of a left Riemann
sum, as notebook 06 does, for the probability of the answer's first token:

- baseline: ``ffnlib.related.knowledge_neurons.knowledge_attribution(implementation="captum")``: captum's
  IntegratedGradients with a forward pass of the whole prompt per point (the 20 points of a layer as one batch,
  logits of the last position only), layer after layer;
- ours: ``implementation="fast"``: the prompt's keys and values cached once, only the last position run again
  from each layer upward, several layers' points in one batch.

The prompts are our templates for (France, capital): the one of median length among all our prompts, and the
shortest. The two sides run interleaved (ours, captum, captum, ours) and each side's two times are averaged, so a
drift of the machine's load weighs on both. Equality: the relative difference of the scores (per layer, the largest
absolute difference over the largest absolute score; the table gives the worst layer) in float32, and in float64
on three layers, where rounding cannot hide a difference in what is computed; each float32 side is also compared
with float64 (the reference), which shows which side rounding moves.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import machine, table


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().amax(1) / b.abs().amax(1).clamp_min(1e-30)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ffnlib.models import load_model
    from ffnlib.related import knowledge_neurons as kn

    loaded = load_model(args.model, device=args.device)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    facts = kn.load_facts(relations=["capital"])
    prompts = kn.build_prompts(loaded, facts)
    median = int(np.median(kn.build_prompts(loaded, kn.load_facts())["prompt_ids"].map(len)))
    france = prompts[prompts["subject"] == "France"].assign(length=lambda f: f["prompt_ids"].map(len))
    chosen = [("median", france.iloc[int((france["length"] - median).abs().argmin())]),
              ("shortest", france.sort_values("length", kind="stable").iloc[0])]
    warm = chosen[0][1]
    kn.knowledge_attribution(loaded, warm["prompt_ids"], warm["answer_ids"], layers=[0], steps=2)  # warm-up
    rows = []
    print(f"Machine: {machine(args.device)}; model {args.model}\n")
    results = {}
    for label, prompt in chosen:
        times = {"fast": [], "captum": []}
        for implementation in ("fast", "captum", "captum", "fast"):
            start = time.perf_counter()
            result = kn.knowledge_attribution(loaded, prompt["prompt_ids"], prompt["answer_ids"], layers=layers,
                                              steps=args.steps, implementation=implementation)
            times[implementation].append(time.perf_counter() - start)
            results[(label, implementation)] = result
        fast, slow = np.mean(times["fast"]), np.mean(times["captum"])
        n_layers = len(results[(label, "fast")].layers)
        rows.append({"row": f"Attribution of one prompt ({label} length: {prompt['length']} tokens, "
                            f"{prompt['prompt']!r} -> {prompt['answer']!r}), {n_layers} layers x "
                            f"{loaded.adapter.d_ff} memories, m = {args.steps}: fast path vs captum run naively",
                     "ours": f"{fast:.1f} s", "baseline": f"{slow:.1f} s", "ratio": fast / slow, "target": "≤ 0.2",
                     "met": bool(fast / slow <= 0.2), "note": f"times: ours {times['fast']}, captum {times['captum']}"})
        diff = _relative(results[(label, "fast")].scores, results[(label, "captum")].scores)
        rows.append({"row": f"… equal scores, float32 ({label} prompt): worst layer's relative difference",
                     "ours": f"{diff:.2e}", "ratio": None, "target": "≤ 1e-4", "met": bool(diff <= 1e-4)})
    # float64: the same computation without float32 rounding, on three layers
    check = [0, loaded.adapter.n_layers // 2, loaded.adapter.n_layers - 1] if layers is None else layers[:3]
    prompt = chosen[0][1]
    fp32 = {impl: kn.knowledge_attribution(loaded, prompt["prompt_ids"], prompt["answer_ids"], layers=check,
                                           steps=args.steps, implementation=impl).scores for impl in ("fast", "captum")}
    loaded.model.to(torch.float64)
    fp64 = {impl: kn.knowledge_attribution(loaded, prompt["prompt_ids"], prompt["answer_ids"], layers=check,
                                           steps=args.steps, implementation=impl).scores for impl in ("fast", "captum")}
    loaded.model.to(torch.float32)
    diff64 = _relative(fp64["fast"], fp64["captum"])
    rows.append({"row": f"… equal scores, float64 (layers {check}, median prompt): relative difference",
                 "ours": f"{diff64:.2e}", "ratio": None, "target": "≤ 1e-4", "met": bool(diff64 <= 1e-4)})
    rows.append({"row": "… float32 against the float64 reference (same layers): fast path / captum",
                 "ours": f"{_relative(fp32['fast'].double(), fp64['captum']):.2e}",
                 "baseline": f"{_relative(fp32['captum'].double(), fp64['captum']):.2e}", "ratio": None,
                 "note": "which side float32 rounding moves"})
    print(table(rows))


if __name__ == "__main__":
    main()
