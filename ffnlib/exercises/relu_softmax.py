"""Exercises 08 · ReLU vs softmax memories (Shen et al., 2023): the softmax memory with and without its
LayerNorm, and the top-0.2% mass of real coefficients."""

from __future__ import annotations

import torch

from ..capture import capture
from .checking import call_student, compare, passed

__all__ = ["check_softmax_memory", "check_top_mass"]


def check_softmax_memory(fn, seed: int = 0) -> None:
    """``fn(x, keys, values, norm)`` -> (tokens, d_model): ``softmax(x·Kᵀ)·V`` over the slots, then ``norm`` (a
    LayerNorm module, or None); against ffnlib's own softmax FFN (:class:`ffnlib.ffn_variants.SlotSoftmaxMLP`) in
    a small random GPT-2 (its biases set to zero here)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..ffn_variants import CONFIG_FIELD, apply_ffn_variant

    torch.manual_seed(seed)
    for variant in ("softmax", "softmax_ln"):
        config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, n_inner=96)
        setattr(config, CONFIG_FIELD, variant)
        mlp = apply_ffn_variant(GPT2LMHeadModel(config)).transformer.h[0].mlp.eval()
        with torch.no_grad():
            for bias in (mlp.c_fc.bias, mlp.c_proj.bias):
                bias.zero_()
            if mlp.ffn_norm is not None:  # a gain and bias of its own, not (1, 0)
                mlp.ffn_norm.weight.uniform_(0.5, 1.5)
                mlp.ffn_norm.bias.normal_(0, 0.1)
            x = torch.randn(7, 32)
            keys, values = mlp.c_fc.weight.T.clone(), mlp.c_proj.weight.clone()  # Conv1D stores (in, out)
            expected = mlp(x)
            got = call_student(fn, x, keys, values, mlp.ffn_norm)
            scores = x @ keys.T
            plain = torch.softmax(scores, dim=-1) @ values
            mistakes = [(torch.softmax(scores, dim=0) @ values, "the softmax runs over the tokens; it must run over "
                                                                "the slots (the last dimension of x · Kᵀ)."),
                        (torch.relu(scores) @ values, "this is the ReLU FFN; the memory normalises its scores with a "
                                                      "softmax over the slots."),
                        (plain, "the LayerNorm is missing: softmax + LN applies `norm` to softmax(x · Kᵀ) · V.")]
            compare(fn, got, expected, "one vector per token: (tokens, d_model)", mistakes, rtol=1e-4, atol=1e-5)
    passed(fn, "the same output as ffnlib's softmax memory, with and without the LayerNorm.")


def check_top_mass(fn, loaded, layer: int, share: float = 0.002,
                   text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(coefficients, share)`` -> (tokens,): the share of Σ|m_i| in the top ``share`` of the slots (at least
    one), on the model's real coefficients; against :func:`ffnlib.related.relu_softmax` (``top_mass``)."""
    from ..related.relu_softmax import top_mass

    ids = torch.tensor([loaded.encode(text)], device=loaded.device)
    with torch.no_grad(), capture(loaded, layer, what=("coefficients",)) as acts:
        loaded.model(ids)
    m = acts.coefficients[layer][0].float().cpu()
    expected = top_mass(m, share)
    got = call_student(fn, m.clone(), share)
    k = max(1, int(round(share * m.shape[-1])))
    signed = m.topk(k, dim=-1).values.sum(-1) / m.sum(-1)
    mistakes = [(signed, "gated coefficients can be negative: measure the mass with |m_i|, in the top slots and in "
                         "the total."),
                (m.abs().max(-1).values / m.abs().sum(-1), f"you kept only the largest slot; the top {share:.1%} of "
                                                           f"{m.shape[-1]} slots is {k} slot(s)."),
                (m.abs().topk(k, dim=-1).values.sum(-1) / m.abs().max(-1).values,
                 "divide by the total mass Σ|m_i|, not by the largest one.")]
    compare(fn, got, expected, "one share per token: (tokens,)", mistakes, rtol=1e-4, atol=1e-6)
    passed(fn, f"the same top-{share:.1%} mass as ffnlib on the coefficients of layer {layer} "
               f"(mean {float(expected.mean()):.1%}).")
