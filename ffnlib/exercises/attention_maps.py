"""Exercises 09 · FF blocks through attention maps (Kobayashi et al., 2024): an RMSNorm split over summands
with the whole vector's statistic, and an activation split by integrated gradients."""

from __future__ import annotations

import dataclasses

import torch

from ..capture import capture
from .checking import CheckFailed, all_close, call_student, compare, ffn_input, name_of, passed

__all__ = ["check_norm_split", "check_activation_shares"]


def _split(vector: torch.Tensor, parts: int, seed: int) -> torch.Tensor:
    """``vector`` (d,) as the sum of ``parts`` random summands (parts, d)."""
    gen = torch.Generator().manual_seed(seed)
    pieces = torch.randn(parts - 1, vector.shape[-1], generator=gen) * vector.abs().mean()
    return torch.cat([pieces, (vector - pieces.sum(0))[None]])


def check_norm_split(fn, loaded, layer: int, parts: int = 4, seed: int = 0,
                     text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(summands, gain, eps)`` -> (parts, d): the RMSNorm of the summands' sum split into one part per
    summand with the statistic of the whole vector; against ffnlib's NormSplit, and the model's own norm."""
    from ..related.contextualization import NormSplit

    adapter = loaded.adapter
    ffn_norm = adapter.family.ffn_norm
    norm = getattr(adapter.layer(layer), ffn_norm, None) if ffn_norm else None
    if norm is None or "RMSNorm" not in type(norm).__name__:
        raise CheckFailed("This check needs a model whose FFN reads an RMSNorm (SmolLM2, Gemma 3).")
    split = NormSplit.of(norm, plus_one=adapter.family.gemma_norm)
    split = dataclasses.replace(split, gain=split.gain.cpu())  # compared on the CPU, whatever the model's device
    ids = torch.tensor([loaded.encode(text)], device=loaded.device)
    with torch.no_grad(), capture(loaded, layer, what=("residual_before",)) as acts:
        loaded.model(ids)
    v = acts.residual_before[layer][0, -1].float().cpu()
    summands = _split(v, parts, seed)
    expected = split.scaled(summands, 1 / split.statistic(v).expand(parts))
    got = call_student(fn, summands.clone(), split.gain.clone(), split.eps)
    with torch.no_grad():
        own = torch.stack([split.linear(y) / split.statistic(y) for y in summands])
    mistakes = [(own, "each summand was normalised with its own RMS, so the parts no longer add up to norm(v). "
                      "Divide every summand by the statistic of the whole vector, s(Σ_j y_j)."),
                (summands / split.statistic(v), "the gain g is missing: each part is g ⊙ y_j / s(v).")]
    compare(fn, got, expected, "one part per summand: (parts, d_model)", mistakes, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        weight = next(norm.parameters())
        model_norm = norm(v[None].to(weight.device, weight.dtype)).float().cpu()[0]
    if not all_close(torch.as_tensor(got).float().sum(0), model_norm, 1e-3, 1e-4):
        raise CheckFailed(f"`{name_of(fn)}`: your parts do not add up to the model's own norm of the vector.")
    passed(fn, f"the same split as ffnlib's NormSplit; the {parts} parts add up to the model's norm of the vector "
               f"(layer {layer}).")


def check_activation_shares(fn, loaded, layer: int, parts: int = 3, seed: int = 0,
                            text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(summands, activation)`` -> (parts, d_ff): how much of ``activation(Σ_j p_j)`` each summand ``p_j``
    gets, by integrated gradients from zero; against ffnlib's brute-force IG (``ig_shares_by_riemann``)."""
    from ..related.contextualization import ig_shares_by_riemann

    adapter = loaded.adapter
    act = adapter.activation(layer)
    with torch.no_grad():
        x = ffn_input(loaded, layer, text)[-1].float().cpu()
        rows = (adapter.gates(layer) if adapter.gated else adapter.keys(layer)).float().cpu()[:64]
    summands = _split(x, parts, seed) @ rows.T  # each part of the input, through the first matrix: (parts, 64)
    p = summands.sum(0)
    expected = ig_shares_by_riemann(act, summands, steps=4000).float()
    got = call_student(fn, summands.clone(), act)
    with torch.no_grad():
        mistakes = [(act(p).expand(parts, -1) / parts, "you split g(p) equally between the summands; IG gives "
                                                       "each a share in proportion to its p_j."),
                    (act(summands), "you applied the activation to each summand alone; those do not add up to "
                                    "g(p). From a zero baseline IG gives summand j the share p_j · g(p) / p.")]
    compare(fn, got, expected, "one share per summand and hidden unit: (parts, units)", mistakes,
            rtol=1e-3, atol=1e-4 * float(act(p).abs().max()))
    if not all_close(torch.as_tensor(got).float().sum(0), act(p), 1e-3, 1e-5):
        raise CheckFailed(f"`{name_of(fn)}`: your shares do not add up to activation(Σ_j p_j).")
    passed(fn, f"the same shares as ffnlib's integrated gradients for 64 hidden units of layer {layer}; they add "
               "up to the activation's output.")
