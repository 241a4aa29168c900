"""Interventions on memories: switch memories off, or set their coefficient.

``with intervene(loaded, {(layer, memory): 0.0}): loaded.model(ids)`` runs the model with memory
``memory`` of ``layer`` switched off; a number sets the coefficient (promote with a large positive value,
suppress with a negative one, as LM-Debugger does). ``scale=True`` multiplies instead of setting.
The hooks are always removed on exit, errors included.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch

from .errors import ParameterError


@contextmanager
def intervene(loaded, edits: Mapping[tuple[int, int], float], scale: bool = False) -> Iterator[None]:
    """Set (or, with ``scale=True``, multiply) the coefficients of chosen memories at every position."""
    adapter = loaded.adapter
    by_layer: dict[int, dict[int, float]] = defaultdict(dict)
    for key, value in edits.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ParameterError(f"Intervention keys are (layer, memory) pairs, got {key!r}.")
        layer, memory = adapter.check_layer(key[0]), key[1]
        if isinstance(memory, bool) or not isinstance(memory, int) or not 0 <= memory < adapter.d_ff:
            raise ParameterError(f"Memory {memory!r} is out of range: layers have {adapter.d_ff} memories "
                                 f"(0..{adapter.d_ff - 1}).")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ParameterError(f"The coefficient for {key} must be a finite number, got {value!r}.")
        by_layer[layer][memory] = float(value)
    handles = []

    def make_hook(memories: dict[int, float]):
        index = torch.tensor(list(memories), dtype=torch.long)
        amount = torch.tensor(list(memories.values()))

        def hook(module, args):
            coefficients = args[0].clone()
            new = amount.to(coefficients.device, coefficients.dtype)
            coefficients[..., index.to(coefficients.device)] = (
                coefficients[..., index.to(coefficients.device)] * new if scale else new)
            return (coefficients, *args[1:])

        return hook

    try:
        for layer, memories in by_layer.items():
            handles.append(adapter.down(layer).register_forward_pre_hook(make_hook(memories)))
        yield
    finally:
        for handle in handles:
            handle.remove()
