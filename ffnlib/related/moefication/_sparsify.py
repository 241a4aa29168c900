"""Sparsifying the FFNs inside a forward pass. A rule says, for one layer, which FFN inputs a method keeps and which
memories (:class:`ExpertRule`: the experts a router picks; :class:`CatsRule`: ``|act(gate_i·x)| >= t``;
:class:`TealRule`: ``|x_j| >= t_in`` and ``|m_i| >= t_m``); :func:`sparsify` applies rules (the coefficient edit
through :func:`ffnlib.capture.hook_coefficients`, the one owner of the down projection's hook) and a
:class:`Record` sums what was kept over the real tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ...adapters import Adapter
from ...capture import hook_coefficients
from ._ffn import membership, memory_sizes
from ._routers import MLPRouter

__all__ = ["Rule", "ExpertRule", "CatsRule", "TealRule", "Record", "sparsify"]


class Rule(ABC):
    """How one method sparsifies a layer: which FFN inputs it keeps (``inputs``; None: all) and which memories
    (``mask`` of the coefficients ``m``, given the input ``x`` and, where ``needs_gate``, the gate's output ``z``)."""

    needs_gate = False

    def inputs(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    @abstractmethod
    def mask(self, x: torch.Tensor, m: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor | None:
        """True at the memories kept (None: all)."""


class ExpertRule(Rule):
    """Experts: keep the memories of the ``k`` experts with the top router scores (``router``: ground_truth,
    similarity with centroid keys ``w``/``c2``, mlp, or random with ``generator``)."""

    def __init__(self, labels: np.ndarray, n_experts: int, k: int, router: str, norms: torch.Tensor,
                 w: torch.Tensor | None = None, c2: torch.Tensor | None = None, mlp: MLPRouter | None = None,
                 generator: torch.Generator | None = None):
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.members = membership(labels, n_experts)
        self.n_experts, self.k, self.router, self.norms = n_experts, k, router, norms
        self.w, self.c2, self.mlp, self.generator = w, c2, mlp, generator

    def scores(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if self.router == "ground_truth":
            return memory_sizes(m, self.norms.to(m.device)) @ self.members.to(m.device)
        if self.router == "random":
            return torch.rand(m.shape[0], self.n_experts, generator=self.generator).to(m.device)
        xn = F.normalize(x.float(), dim=-1)
        if self.router == "similarity":
            return 2 * xn @ self.w.to(xn.device).T - self.c2.to(xn.device)
        return self.mlp.to(xn.device)(xn)

    def mask(self, x, m, z):
        top = self.scores(x, m).topk(self.k, dim=-1).indices
        chosen = torch.zeros(m.shape[0], self.n_experts, dtype=torch.bool, device=m.device).scatter_(1, top, True)
        return chosen[:, self.labels.to(m.device)]


class CatsRule(Rule):
    """CATS: keep memory i where ``|act(gate_i·x)| >= threshold`` (a plain FFN, ``act`` None: ``|m_i|``)."""

    def __init__(self, threshold: float, act: Callable | None):
        self.threshold, self.act = threshold, act
        self.needs_gate = act is not None

    def mask(self, x, m, z):
        gate_act = self.act(z) if self.act is not None else m
        return gate_act.abs() >= self.threshold


class TealRule(Rule):
    """TEAL: keep the FFN input's entries with ``|x_j| >= threshold_input`` and the memories with
    ``|m_i| >= threshold_coefficient``."""

    def __init__(self, threshold_input: float, threshold_coefficient: float):
        self.threshold_input, self.threshold_coefficient = threshold_input, threshold_coefficient

    def inputs(self, x):
        return x * (x.abs() >= self.threshold_input)

    def mask(self, x, m, z):
        return m.abs() >= self.threshold_coefficient


class Record:
    """Per-layer sums over the real tokens of a sparsified run: memories kept, inputs kept, size kept; with
    ``per_memory``, also how often each memory was kept (for experts: how often the router picked its expert)."""

    def __init__(self, norms: dict[int, torch.Tensor], per_memory: bool = False):
        self.norms = norms
        self.real: torch.Tensor | None = None  # flattened (rows·tokens,) bool, set before each forward
        self.sums: dict[int, np.ndarray] = {}  # layer -> [tokens, kept_memories, kept_inputs, size_kept]
        self.per_memory = per_memory
        self.kept: dict[int, torch.Tensor] = {}  # layer -> (d_ff,) tokens at which each memory was kept

    def _flat_real(self, n: int, device) -> torch.Tensor:
        if self.real is None or self.real.numel() != n:
            return torch.ones(n, dtype=torch.bool, device=device)
        return self.real.to(device)

    def add(self, layer: int, x: torch.Tensor, x_new: torch.Tensor | None, m: torch.Tensor,
            mask: torch.Tensor | None) -> None:
        real = self._flat_real(m.shape[0], m.device)
        sizes = memory_sizes(m[real], self.norms[layer].to(m.device))
        kept = mask[real].float() if mask is not None else torch.ones_like(sizes)
        total = sizes.sum(-1)
        share = torch.where(total > 0, (sizes * kept).sum(-1) / total.clamp_min(1e-30), torch.ones_like(total))
        inputs = (x_new[real] != 0).float().mean(-1).sum() if x_new is not None else real.sum()
        add = np.array([int(real.sum()), float(kept.mean(-1).sum()), float(inputs), float(share.sum())])
        self.sums[layer] = self.sums.get(layer, np.zeros(4)) + add
        if self.per_memory:
            counts = kept.double().sum(0).cpu()
            self.kept[layer] = self.kept[layer] + counts if layer in self.kept else counts

    def memories(self) -> pd.DataFrame:
        """With ``per_memory``: per layer and memory, the share of real tokens at which the memory was kept."""
        parts = [pd.DataFrame({"layer": np.int16(layer), "memory": np.arange(len(counts), dtype=np.int32),
                               "kept_rate": counts.numpy() / max(self.sums[layer][0], 1)})
                 for layer, counts in sorted(self.kept.items())]
        return (pd.concat(parts, ignore_index=True) if parts else
                pd.DataFrame(columns=["layer", "memory", "kept_rate"]))

    def frame(self) -> pd.DataFrame:
        rows = [{"layer": layer, "tokens": int(s[0]), "kept_memories": s[1] / max(s[0], 1),
                 "kept_inputs": s[2] / max(s[0], 1), "size_kept": s[3] / max(s[0], 1)}
                for layer, s in sorted(self.sums.items())]
        return pd.DataFrame(rows, columns=["layer", "tokens", "kept_memories", "kept_inputs", "size_kept"])


@contextmanager
def sparsify(adapter: Adapter, rules: dict[int, Rule], record: Record | None = None) -> Iterator[None]:
    """Apply ``rules`` (layer -> rule) to the FFNs inside every forward pass; hooks removed on exit.

    Pre-hooks on gate and up read the FFN input (and replace it, where a rule keeps only some of its entries), a
    hook on the gate reads its output where a rule needs it, and the memories are masked through
    :func:`ffnlib.capture.hook_coefficients`. A rule sees every token as one row: (tokens, width)."""
    if not rules:  # nothing to sparsify: the model runs as it is
        yield
        return
    inputs: dict[int, torch.Tensor] = {}
    sparse_inputs: dict[int, torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    handles = []

    def input_hook(layer: int, rule: Rule):
        def hook(module, args):
            x = args[0]
            inputs[layer] = x
            new = rule.inputs(x)
            if new is None:
                return None
            sparse_inputs[layer] = new
            return (new, *args[1:])
        return hook

    def gate_hook(layer: int):
        def hook(module, args, output):
            gates[layer] = output
        return hook

    def edit(layer: int, m: torch.Tensor) -> torch.Tensor | None:
        """The coefficients (batch, tokens, d_ff) with the rule's memories kept, or None to keep them all."""
        rule = rules[layer]
        flat = m.reshape(-1, m.shape[-1])
        x = inputs.pop(layer)
        x = x.reshape(flat.shape[0], -1)
        z = gates.pop(layer, None)
        z = None if z is None else z.reshape(flat.shape)
        x_new = sparse_inputs.pop(layer, None)
        mask = rule.mask(x, flat, z)
        if record is not None:
            record.add(layer, x, None if x_new is None else x_new.reshape(flat.shape[0], -1), flat, mask)
        if mask is None:
            return None
        return (flat * mask).reshape(m.shape)

    try:
        for layer, rule in rules.items():
            handles.append(adapter.up(layer).register_forward_pre_hook(input_hook(layer, rule)))
            if adapter.gated:
                handles.append(adapter.gate(layer).register_forward_pre_hook(input_hook(layer, rule)))
                if rule.needs_gate:
                    handles.append(adapter.gate(layer).register_forward_hook(gate_hook(layer)))
        with hook_coefficients(adapter, list(rules), edit):
            yield
    finally:
        for handle in handles:
            handle.remove()
