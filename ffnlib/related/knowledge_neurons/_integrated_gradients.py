"""Integrated gradients of a fact's answer over one layer's coefficients at the last prompt position (Dai et al.,
Eq. 3-4), two ways that give the same numbers:

- :func:`captum_integrated_gradients`: captum's ``IntegratedGradients`` run naively, a forward pass of the whole
  prompt per point;
- :func:`fast_integrated_gradients` (the default): a change at the last position of layer l cannot change earlier
  positions, so the prompt's keys and values are cached once and only the last position runs again, from layer l
  upward, with all points (of several layers) as one batch.

Both replace the coefficients through ``ffnlib.capture.hook_coefficients``, which owns the per-token shape (OPT
runs its FFN on (batch*tokens, d)); the points are captum's (:func:`integration_points`).
"""

from __future__ import annotations

import numpy as np
import torch

from ...capture import capture, hook_coefficients
from ...errors import ParameterError
from ._evaluation import wide

__all__ = ["TARGETS", "METHODS", "integration_points", "target_value", "captum_integrated_gradients",
           "fast_integrated_gradients"]

TARGETS = ("first_token", "answer_logprob")
METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def integration_points(method: str, steps: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, alphas) of ``method``'s rule with ``steps`` points on [0, 1], float32: captum's rules, computed as
    captum computes them, so that both paths integrate at exactly the same points."""
    n = int(steps)
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        sizes, alphas = (0.5 * weights).tolist(), (0.5 * (1 + nodes)).tolist()
    elif method in METHODS:
        rule = method.removeprefix("riemann_")
        sizes = [1 / n] * n
        if rule == "trapezoid":
            sizes[0] /= 2
            sizes[-1] /= 2
        ends = {"left": (0, 1 - 1 / n), "right": (1 / n, 1), "middle": (1 / (2 * n), 1 - 1 / (2 * n)),
                "trapezoid": (0, 1)}[rule]
        alphas = torch.linspace(*ends, n).tolist()
    else:
        raise ParameterError(f"method must be one of {METHODS} (captum's names), got {method!r}.")
    return (torch.tensor(sizes, dtype=torch.float32, device=device),
            torch.tensor(alphas, dtype=torch.float32, device=device))


def target_value(logits: torch.Tensor, answer_ids: list[int], target: str) -> torch.Tensor:
    """The target per row from the logits of the answer positions (rows, positions, vocab)."""
    if target == "first_token":
        return wide(logits[:, 0]).softmax(-1)[:, answer_ids[0]]
    log_probs = wide(logits).log_softmax(-1)
    index = torch.tensor(answer_ids, device=logits.device)
    return log_probs[:, torch.arange(len(answer_ids), device=logits.device), index].sum(-1)


def _scored_tokens(prompt_ids: list[int], answer_ids: list[int], target: str) -> list[int]:
    """The tokens whose outputs the target reads: the last prompt token, then the answer but its last token."""
    return prompt_ids[-1:] + (answer_ids[:-1] if target == "answer_logprob" else [])


def captum_integrated_gradients(loaded, prompt_ids: list[int], answer_ids: list[int], layers: list[int],
                                steps: int, method: str, target: str):
    """Integrated gradients with captum, naively: each point is a forward pass of the whole prompt.

    Returns (scores, coefficients, value): (layers, d_ff) scores and the real coefficients at the last
    prompt position, and the target at the real coefficients."""
    from captum.attr import IntegratedGradients

    model, adapter, device = loaded.model, loaded.adapter, loaded.device
    full = torch.tensor([prompt_ids + _scored_tokens(prompt_ids, answer_ids, target)[1:]], device=device)
    n_scored = len(_scored_tokens(prompt_ids, answer_ids, target))
    position = len(prompt_ids) - 1
    with torch.no_grad(), capture(adapter, layers, what=("coefficients",)) as acts:
        value = float(target_value(model(input_ids=full, logits_to_keep=n_scored).logits, answer_ids, target)[0])
    scores, coefficients = [], []
    for layer in layers:
        m = wide(acts.coefficients[layer][0, position])

        def forward(scaled: torch.Tensor, layer=layer) -> torch.Tensor:
            def replace(_, m: torch.Tensor) -> torch.Tensor:  # captum's points at the last prompt position
                m = m.clone()
                m[:, position] = scaled.to(m.dtype)
                return m

            with hook_coefficients(adapter, layer, replace):
                logits = model(input_ids=full.expand(scaled.shape[0], -1), logits_to_keep=n_scored).logits
            return target_value(logits, answer_ids, target)

        attributions = IntegratedGradients(forward).attribute(
            m[None], baselines=torch.zeros_like(m[None]), n_steps=steps, method=method, internal_batch_size=steps)
        scores.append(wide(attributions[0].detach()).cpu())
        coefficients.append(m.cpu())
    return torch.stack(scores), torch.stack(coefficients), value


def _prefix_cache(model, prefix: list[int], device):
    """The keys and values of the prompt without its last token (an empty cache for a one-token prompt)."""
    from transformers import DynamicCache

    if not prefix:
        return DynamicCache(config=model.config)
    with torch.no_grad():
        return model(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values


def _copy_cache(cache, batch: int, from_layer: int):
    """A copy of ``cache`` with the layers from ``from_layer`` on repeated ``batch`` times."""
    import copy

    cache = copy.deepcopy(cache)
    if batch > 1:
        for index, layer in enumerate(cache.layers):
            if index >= from_layer:
                layer.batch_repeat_interleave(batch)
    return cache


def fast_integrated_gradients(loaded, prompt_ids: list[int], answer_ids: list[int], layers: list[int],
                              steps: int, method: str, target: str, rows_per_batch: int = 120):
    """Integrated gradients from the cached prompt: what :func:`captum_integrated_gradients` returns, faster.

    The prompt without its last token runs once (its keys and values are cached), then once more with the
    last token (the real coefficients and the target's value). The layers are then taken in groups of
    ``rows_per_batch // steps``; one forward pass serves a whole group: only the scored positions run
    (the last prompt token, plus the answer for ``answer_logprob``), the layers up to the group's first one
    in a batch of one (nothing there depends on the points), the layers above in a batch of
    ``steps x group``, where each layer's rows get that layer's points and all other rows its real
    coefficients. A model whose blocks cannot broadcast a batch of one against the larger batch (OPT
    flattens tokens inside its FFN) runs every layer in the larger batch instead: the same numbers.
    """
    model, adapter, device = loaded.model, loaded.adapter, loaded.device
    step_sizes, alphas = integration_points(method, steps, device)
    scored = _scored_tokens(prompt_ids, answer_ids, target)
    new = torch.tensor([scored], device=device)
    prefix = _prefix_cache(model, prompt_ids[:-1], device)
    with torch.no_grad(), capture(adapter, layers, what=("coefficients",)) as acts:
        logits = model(input_ids=new, past_key_values=_copy_cache(prefix, 1, 0), use_cache=True,
                       logits_to_keep=len(scored)).logits
        value = float(target_value(logits, answer_ids, target)[0])
    true = {layer: wide(acts.coefficients[layer][0, 0]) for layer in layers}
    per_batch = max(1, rows_per_batch // steps)
    broadcast = True
    scores = {}
    for start in range(0, len(layers), per_batch):
        group = layers[start: start + per_batch]
        rows = steps * len(group)
        points = [(alphas[:, None] * true[layer][None]).requires_grad_(True) for layer in group]  # paths 0 -> m
        slots = {layer: slot for slot, layer in enumerate(group)}

        def fan_out(layer: int, m: torch.Tensor) -> torch.Tensor:
            """``m`` (a batch of one, or of ``rows``) as ``rows`` rows: the layer's own rows get its points at the
            last prompt token, every other row the real coefficients."""
            slot, shaped = slots[layer], m.expand(rows, -1, -1)
            first = torch.cat([shaped[: slot * steps, 0], points[slot].to(m.dtype), shaped[(slot + 1) * steps:, 0]])
            return torch.cat([first[:, None], shaped[:, 1:]], dim=1)

        for attempt in (0, 1):
            try:
                with hook_coefficients(adapter, group, fan_out):
                    cache = _copy_cache(prefix, rows, group[0] + 1 if broadcast else 0)
                    ids = new if broadcast else new.expand(rows, -1)
                    logits = model(input_ids=ids, past_key_values=cache, use_cache=True,
                                   logits_to_keep=len(scored)).logits
                break
            except RuntimeError:
                if not broadcast or attempt:
                    raise
                broadcast = False  # this family cannot broadcast a batch of one: run it all in the large batch
        values = target_value(logits, answer_ids, target)
        grads = torch.autograd.grad(values.sum(), points)
        for layer, grad in zip(group, grads):
            scores[layer] = (true[layer] * (step_sizes[:, None] * grad).sum(0)).detach().cpu()
    return (torch.stack([scores[layer] for layer in layers]),
            torch.stack([true[layer].cpu() for layer in layers]), value)
