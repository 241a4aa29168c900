"""The expert-sparse FFN forward (:class:`ExpertFFN`): one layer's memories regrouped by expert, so that a token
reads only its selected experts' rows of gate, up and down (the speed benchmark's subject; :func:`route_random`
picks its experts there)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...adapters import Adapter
from ...errors import ParameterError, UnsupportedModelError
from ._partitions import check_partition

__all__ = ["ExpertFFN", "route_random"]


@dataclass
class ExpertFFN:
    """One FFN layer with its memories regrouped by expert (each expert's rows one contiguous block), for a
    forward pass that reads only the selected experts' rows of gate, up and down.

    ``gate_up`` is (E, 2·size, d) for a gated FFN (each expert's gate rows, then its up rows) or (E, size, d)
    for a plain one; ``down`` is (E, size, d) (the experts' value rows).
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    members: torch.Tensor  # (E, size): memory index of each row
    gated: bool

    @property
    def n_experts(self) -> int:
        return self.down.shape[0]

    @property
    def size(self) -> int:
        return self.down.shape[1]

    @classmethod
    @torch.no_grad()
    def from_layer(cls, adapter: Adapter, layer: int, labels) -> "ExpertFFN":
        labels = np.asarray(labels)
        n_experts = int(labels.max()) + 1
        size = len(labels) // n_experts
        check_partition(labels, n_experts, size)
        members = torch.as_tensor(np.argsort(labels, kind="stable").reshape(n_experts, size), dtype=torch.long)
        flat = members.reshape(-1)
        up = adapter.keys(layer)[flat].reshape(n_experts, size, -1)
        gate_up = torch.cat([adapter.gates(layer)[flat].reshape(n_experts, size, -1), up], 1) if adapter.gated else up
        bias = getattr(adapter.up(layer), "bias", None)
        if adapter.gated and (bias is not None or getattr(adapter.gate(layer), "bias", None) is not None):
            raise UnsupportedModelError("ExpertFFN handles gated FFNs without biases in gate and up (Llama, Gemma, "
                                        "...); this model has them.")
        return cls(gate_up.contiguous(), adapter.values(layer)[flat].reshape(n_experts, size, -1).contiguous(),
                   None if bias is None else bias.detach()[flat].reshape(n_experts, size),
                   adapter.value_bias(layer), adapter.activation(layer), members, adapter.gated)

    def memory_mask(self, experts: torch.Tensor) -> torch.Tensor:
        """(n, d_ff) True at the memories of each token's selected experts (n, k)."""
        n = experts.shape[0]
        mask = torch.zeros(n, self.members.numel(), dtype=torch.bool)
        rows = self.members[experts].reshape(n, -1)
        return mask.scatter_(1, rows, True)

    def _hidden(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """The coefficients (n, size) of one expert's memories for inputs x (n, d)."""
        h = F.linear(x, self.gate_up[expert])
        if self.gated:
            return self.act(h[:, : self.size]) * h[:, self.size:]
        if self.up_bias is not None:
            h = h + self.up_bias[expert]
        return self.act(h)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The FFN output for inputs ``x`` (n, d) where token t uses the experts ``experts[t]`` (n, k).

        Only the selected experts' rows of gate, up and down are read, and no weight is copied. One token
        (decoding): a small product with each selected expert's block of gate and up rows, then one weighted sum of
        their value rows (``embedding_bag``). Several tokens: the (token, expert) pairs are sorted by expert once
        and each expert runs once on its rows.
        """
        if x.dim() != 2 or experts.dim() != 2 or experts.shape[0] != x.shape[0]:
            raise ParameterError(f"x must be (n, d) and experts (n, k); got {tuple(x.shape)} and "
                                 f"{tuple(experts.shape)}.")
        if x.shape[0] == 1:  # decoding: k small products on the experts' gate/up blocks, then one weighted
            chosen = experts[0]  # sum of their value rows (embedding_bag reads only those rows)
            h = torch.cat([F.linear(x, self.gate_up[e]) for e in chosen.tolist()], 1).view(len(chosen), -1, self.size)
            if self.gated:
                h = self.act(h[:, 0]) * h[:, 1]
            else:
                h = self.act(h[:, 0] if self.up_bias is None else h[:, 0] + self.up_bias[chosen])
            rows = (chosen[:, None] * self.size + torch.arange(self.size, device=x.device)).reshape(1, -1)
            out = F.embedding_bag(rows, self.down.reshape(-1, self.down.shape[-1]), per_sample_weights=h.reshape(1, -1),
                                  mode="sum")
        else:  # several tokens: sort the (token, expert) pairs by expert once, run each expert on its rows
            n, k = experts.shape
            flat = experts.reshape(-1)
            order = torch.argsort(flat, stable=True)
            tokens = torch.arange(n, device=x.device).repeat_interleave(k)[order]
            counts = torch.bincount(flat, minlength=self.n_experts).tolist()
            grouped = x.index_select(0, tokens)
            written = torch.empty(len(tokens), self.down.shape[-1], dtype=x.dtype, device=x.device)
            start = 0
            for e, count in enumerate(counts):
                if count:
                    rows = slice(start, start + count)
                    torch.mm(self._hidden(grouped[rows], e), self.down[e], out=written[rows])
                    start += count
            out = torch.zeros(n, self.down.shape[-1], dtype=x.dtype, device=x.device).index_add_(0, tokens, written)
        if self.down_bias is not None:
            out = out + self.down_bias
        return out


def route_random(n_tokens: int, n_experts: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, k) distinct random experts per token (for the speed benchmark)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_tokens, n_experts, generator=gen).topk(k, dim=-1).indices
