"""Exercises 07 · MoEfication (Zhang et al., 2022): the ground-truth router's expert scores, and the FFN from
the chosen experts only."""

from __future__ import annotations

import torch

from .checking import CheckFailed, call_student, compare, ffn_input, passed

__all__ = ["check_expert_scores", "check_expert_ffn"]


def check_expert_scores(fn, loaded, layer: int, expert_size: int = 32, seed: int = 0,
                        text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(coefficients, value_norms, labels, n_experts)`` -> (tokens, n_experts): the ground-truth router's
    score of each expert, the summed size |m_i|·‖v_i‖ of its memories; against ffnlib.related.moefication."""
    from ..related.moefication import ffn_coefficients, membership, memory_sizes, random_split

    adapter = loaded.adapter
    with torch.no_grad():  # compared on the CPU, whatever the model's device
        m = ffn_coefficients(adapter, layer, ffn_input(loaded, layer, text)).float().cpu()
        norms = adapter.written_value_norms(layer).float().cpu()
    labels = torch.as_tensor(random_split(adapter.d_ff, expert_size, seed))
    n_experts = adapter.d_ff // expert_size
    members = membership(labels.numpy(), n_experts)
    expected = memory_sizes(m, norms) @ members
    got = call_student(fn, m.clone(), norms.clone(), labels.clone(), n_experts)
    mistakes = [((m * norms) @ members, "gated coefficients can be negative: a memory's size is |m_i|·‖v_i‖, "
                                        "take the absolute value first."),
                (m.abs() @ members, "the value norms are missing: a memory writes m_i·v_i, so its size is "
                                    "|m_i|·‖v_i‖."),
                (m.abs() * norms, "these are the memories' sizes; sum them over each expert's members "
                                  "(labels[i] is memory i's expert).")]
    compare(fn, got, expected, "one score per token and expert: (tokens, n_experts)", mistakes, rtol=1e-4, atol=1e-5)
    passed(fn, f"the ground-truth router's scores of {n_experts} experts of {expert_size} memories at layer {layer}.")


def check_expert_ffn(fn, loaded, layer: int, expert_size: int = 32, k: int = 8, seed: int = 0,
                     text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(coefficients, values, labels, chosen)`` -> (tokens, d_model): the FFN's output from the chosen
    experts' memories only (``chosen``: (tokens, k) expert ids per token); against
    :func:`ffnlib.related.moefication.dense_ffn` with the same memories kept."""
    from ..related.moefication import dense_ffn, ffn_coefficients, random_split

    adapter = loaded.adapter
    if adapter.value_bias(layer) is not None:
        raise CheckFailed("This check needs an FFN without an output bias (the default models have none).")
    with torch.no_grad():
        x = ffn_input(loaded, layer, text)
        m = ffn_coefficients(adapter, layer, x).float().cpu()
    labels = torch.as_tensor(random_split(adapter.d_ff, expert_size, seed))
    n_experts = adapter.d_ff // expert_size
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(m.shape[0])])
    mask = torch.zeros(m.shape[0], n_experts, dtype=torch.bool).scatter_(1, chosen, True)[:, labels]
    with torch.no_grad():
        expected = dense_ffn(adapter, layer, x, mask.to(x.device)).float().cpu()
        values = adapter.values(layer).float().cpu()
        got = call_student(fn, m.clone(), values, labels.clone(), chosen.clone())
        first = torch.zeros(m.shape[0], n_experts, dtype=torch.bool).scatter_(1, chosen[:, :1], True)[:, labels]
        mistakes = [(m @ values, "this is the dense FFN: keep only the memories whose expert is among the "
                                 "token's chosen experts."),
                    ((m * first) @ values, "you kept only the first chosen expert of each token; keep all k.")]
        compare(fn, got, expected, "one vector per token: (tokens, d_model)", mistakes, rtol=1e-3, atol=1e-4)
    passed(fn, f"the FFN restricted to {k} of {n_experts} experts per token equals ffnlib's dense_ffn with the "
               "same memories kept.")
