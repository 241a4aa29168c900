"""The FFN pieces MoEfication reads through the adapter: the coefficients ``m`` of an input, the dense FFN (the
reference of the expert-sparse one), the rows k-means clusters, a split's one-hot membership, and the size
``|m_i|·||v_i||`` of what each memory writes (gated coefficients can be negative: every size uses ``|m_i|``)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ...adapters import Adapter
from ...precision import full_precision
from ._choices import CLUSTER_ROWS, check_choice

__all__ = ["ffn_coefficients", "dense_ffn", "key_features", "membership", "memory_sizes", "top_share_mask"]


@torch.no_grad()
def ffn_coefficients(adapter: Adapter, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The coefficients m of the FFN input ``x`` (..., d_model), computed with the layer's own modules in the model's
    dtype, returned as float32 from a bf16 model."""
    act = adapter.activation(layer)
    x = x.to(adapter.dtype)
    if adapter.gated:
        return full_precision(act(adapter.gate(layer)(x)) * adapter.up(layer)(x))
    return full_precision(act(adapter.up(layer)(x)))


@torch.no_grad()
def dense_ffn(adapter: Adapter, layer: int, x: torch.Tensor, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The FFN (before any post-FFN norm) with the layer's own modules; ``memory_mask`` (..., d_ff) zeroes
    coefficients: the dense FFN restricted to the kept memories, the reference for :class:`ExpertFFN`."""
    m = ffn_coefficients(adapter, layer, x)
    if memory_mask is not None:
        m = m * memory_mask
    return full_precision(adapter.down(layer)(m.to(adapter.dtype)))


@torch.no_grad()
def key_features(adapter: Adapter, layer: int, cluster_rows: str = "gate") -> np.ndarray:
    """The rows clustered by k-means, L2-normalised (d_ff, d_model), or (d_ff, 2·d_model) for ``"both"``."""
    check_choice("cluster_rows", cluster_rows, CLUSTER_ROWS)
    up = F.normalize(adapter.keys(layer).float(), dim=-1)
    if not adapter.gated:
        return up.cpu().numpy()
    gate = F.normalize(adapter.gates(layer).float(), dim=-1)
    rows = {"gate": gate, "up": up, "both": torch.cat([gate, up], dim=-1) / math.sqrt(2)}[cluster_rows]
    return rows.cpu().numpy()


def membership(labels, n_experts: int) -> torch.Tensor:
    """One-hot (d_ff, n_experts) float matrix of a split's labels."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return F.one_hot(labels, n_experts).float()


def memory_sizes(m: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|m_i|·||v_i||`` (the size of what each memory writes), float32."""
    return m.float().abs() * norms


def top_share_mask(sizes: torch.Tensor, share: float) -> torch.Tensor:
    """Per row, True at the ``share`` of entries with the largest sizes (ties: by index)."""
    k = max(1, int(round(share * sizes.shape[-1])))
    top = sizes.topk(k, dim=-1).indices
    return torch.zeros_like(sizes, dtype=torch.bool).scatter_(-1, top, True)
