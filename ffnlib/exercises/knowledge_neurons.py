"""Exercises 06 · knowledge neurons (Dai et al., 2022): integrated gradients of the coefficients, and coarse
neurons by a relative threshold."""

from __future__ import annotations

from typing import Callable, Sequence

import pandas as pd
import torch

from ..capture import hook_coefficients
from .checking import CheckFailed, call_student, compare, name_of, passed

__all__ = ["answer_probability", "check_integrated_gradients", "check_coarse_neurons"]


def answer_probability(loaded, prompt_ids: Sequence[int], answer_id: int, layer: int
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """F(m'): the probability of ``answer_id`` after the prompt, with ``layer``'s coefficients at the last
    prompt position replaced by m'. Takes (n, d_ff) and returns (n,), differentiable with respect to m'."""
    ids = torch.tensor([list(prompt_ids)], device=loaded.device)
    adapter = loaded.adapter

    def target(coefficients: torch.Tensor) -> torch.Tensor:
        rows = coefficients.to(loaded.device)

        def replace(_, m):
            m = m.expand(rows.shape[0], -1, -1).clone()
            m[:, -1] = rows.to(m.dtype)
            return m

        with hook_coefficients(adapter, layer, replace):
            logits = loaded.model(ids.expand(rows.shape[0], -1)).logits[:, -1]
        return torch.softmax(logits.float(), dim=-1)[:, answer_id]

    target.__name__ = "answer_probability"
    return target


def check_integrated_gradients(fn, loaded, prompt: str, answer: str, layer: int, steps: int = 20) -> torch.Tensor:
    """``fn(target, coefficients, steps)`` -> scores (d_ff,), against
    :func:`ffnlib.related.knowledge_neurons.knowledge_attribution` (left Riemann sum from the zero baseline,
    P(answer's first token)). Returns ffnlib's scores."""
    from ..related.knowledge_neurons import encode_answer, knowledge_attribution

    prompt_ids = loaded.encode(prompt)
    answer_ids = encode_answer(loaded.tokenizer, answer)
    reference = knowledge_attribution(loaded, prompt_ids, answer_ids[:1], layers=[layer], steps=steps)
    expected, m = reference.scores[0].float(), reference.coefficients[0].float()
    target = answer_probability(loaded, prompt_ids, answer_ids[0], layer)
    got = call_student(fn, target, m.clone(), steps)
    scale = float(expected.abs().max())
    mistakes = []
    with torch.enable_grad():
        def gradients(alphas):
            points = (alphas[:, None] * m).requires_grad_(True)
            return torch.autograd.grad(target(points).sum(), points)[0]
        left = gradients(torch.arange(steps, dtype=torch.float32) / steps)
        right = gradients(torch.arange(1, steps + 1, dtype=torch.float32) / steps)
    mistakes = [(left.mean(0), "you returned the average gradient. Integrated gradients multiplies it by the "
                               "input: score_i = m_i · mean_α ∂F(α·m)/∂m_i."),
                (m * right.mean(0), "your α run from 1/steps to 1 (a right Riemann sum). Dai et al.'s code and "
                                    "ffnlib use the left sum: α = 0, 1/steps, …, (steps-1)/steps."),
                (m * gradients(torch.linspace(0, 1, steps)).mean(0),
                 "your α include both 0 and 1 (torch.linspace): the left Riemann sum stops one step before 1, "
                 "α = k/steps for k = 0 … steps-1."),
                (m * right[-1], "you took the gradient at the real coefficients only (α = 1). Integrated gradients "
                                "averages it along the path from 0 to m.")]
    compare(fn, got, expected, "one score per memory: (d_ff,)", mistakes, rtol=1e-2, atol=1e-3 * scale)
    passed(fn, f"the same attribution as ffnlib's knowledge_attribution for {prompt!r} → {answer!r} at layer "
               f"{layer} ({steps} steps).")
    return expected


def check_coarse_neurons(fn, scores: torch.Tensor, threshold: float = 0.2) -> None:
    """``fn(scores, threshold)`` -> the set of memory indices whose score is >= threshold x the largest score;
    against :func:`ffnlib.related.knowledge_neurons.coarse_neurons`."""
    from ..related.knowledge_neurons import coarse_neurons

    scores = scores.detach().float().cpu()
    frame = pd.DataFrame({"memory": range(len(scores)), "sign": 1, "ratio": (scores / scores.max()).numpy()})
    expected = set(coarse_neurons(frame, threshold)["memory"].tolist())
    got = call_student(fn, scores, threshold)
    try:
        got = {int(i) for i in got}
    except (TypeError, ValueError):
        raise CheckFailed(f"`{name_of(fn)}` should return a set of memory indices (ints); it returned "
                          f"{type(got).__name__}.") from None
    if got == expected:
        passed(fn, f"the same {len(expected)} coarse neurons as ffnlib (t = {threshold}).")
        return
    absolute = {int(i) for i in torch.nonzero(scores >= threshold).flatten().tolist()}
    if got == absolute and absolute != expected:
        raise CheckFailed(f"`{name_of(fn)}` used the threshold as an absolute score. Dai et al.'s t is relative: keep "
                          f"the neurons whose score is at least t × the largest score ({float(scores.max()):.3g}).")
    raise CheckFailed(f"`{name_of(fn)}` found {len(got)} neurons, ffnlib {len(expected)}; "
                      f"{len(got - expected)} of yours are not ffnlib's and {len(expected - got)} of ffnlib's are missing.")
