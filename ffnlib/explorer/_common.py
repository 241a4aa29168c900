"""Checks and projections that the explorer's views share."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import ParameterError

__all__ = ["check_memory", "check_positive", "check_sign", "check_prompt", "value_norms", "top_tokens",
           "top_distribution"]


def check_memory(adapter, layer: int, memory: int) -> tuple[int, int]:
    layer = adapter.check_layer(layer)
    if isinstance(memory, bool) or not isinstance(memory, (int, np.integer)) or not 0 <= memory < adapter.d_ff:
        raise ParameterError(f"Memory {memory!r} is out of range: layers have {adapter.d_ff} memories "
                             f"(0..{adapter.d_ff - 1}).")
    return layer, int(memory)


def check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ParameterError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def check_sign(sign) -> int:
    """The side of a memory: +1 (``v_i``) or -1 (``-v_i``, gated FFNs' negative coefficients)."""
    if isinstance(sign, bool) or sign not in (1, -1):
        raise ParameterError(f"sign must be +1 or -1, got {sign!r}.")
    return int(sign)


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ParameterError(f"The prompt must be a non-empty string, got {prompt!r}. Type some text first.")
    return prompt


@torch.no_grad()
def value_norms(adapter, layer: int) -> torch.Tensor:
    """||v_i|| of the value rows of one layer (d_ff,): the value as the paper reads it and as the explorer shows
    it. Where a norm follows the FFN (Gemma 2/3) the residual receives ``g_post ⊙ v_i`` instead: MoEfication's sizes
    use those (``Adapter.written_value_norms``)."""
    return adapter.values(layer).float().norm(dim=-1)


@torch.no_grad()
def top_tokens(loaded, layer: int, memories: Sequence[int], signs: Sequence[int] | int = 1,
               k: int = 10) -> list[pd.DataFrame]:
    """The ``k`` most probable tokens of ``sign * v_i`` for each memory, read as the model reads its residual.

    Returns one DataFrame (rank, token_id, token, probability) per memory, in the order given.
    """
    adapter = loaded.adapter
    memories = [int(m) for m in memories]
    if not memories:
        return []
    signs = [signs] * len(memories) if isinstance(signs, (int, np.integer)) else list(signs)
    signs = [check_sign(s) for s in signs]
    vectors = adapter.values(layer)[memories] * torch.tensor(signs, dtype=adapter.values(layer).dtype,
                                                           device=adapter.values(layer).device)[:, None]
    probs = adapter.logits_from_values(vectors).float().softmax(-1)
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    frames = []
    for row in range(len(memories)):
        ids = top.indices[row].tolist()
        frames.append(pd.DataFrame({"rank": np.arange(len(ids)), "token_id": ids,
                                    "token": loaded.token_strings(ids),
                                    "probability": top.values[row].cpu().numpy()}))
    return frames


def top_distribution(loaded, logits: torch.Tensor, k: int) -> pd.DataFrame:
    probs = logits.float().softmax(-1)
    top = probs.topk(min(k, probs.shape[-1]))
    ids = top.indices.tolist()
    return pd.DataFrame({"rank": np.arange(len(ids)), "token_id": ids, "token": loaded.token_strings(ids),
                         "probability": top.values.cpu().numpy()})
