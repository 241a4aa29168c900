"""Interventions on memories: switch memories off, or set their coefficient.

``with intervene(loaded, {(layer, memory): 0.0}): loaded.model(ids)`` runs the model with memory
``memory`` of ``layer`` switched off; a number sets the coefficient (promote with a large positive value,
suppress with a negative one, as LM-Debugger does). ``scale=True`` multiplies instead of setting.
:func:`scale_at_positions` multiplies coefficients at one position per row instead (e.g. each prompt's last
token in a right-padded batch). The hooks are always removed on exit, errors included.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch

from .capture import hook_coefficients
from .errors import ParameterError

__all__ = ["intervene", "scale_at_positions"]


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
    if not by_layer:  # nothing to edit: the model runs as it is
        yield
        return
    layers = sorted(by_layer)
    index = {layer: torch.tensor(list(memories), dtype=torch.long) for layer, memories in by_layer.items()}
    amount = {layer: torch.tensor(list(memories.values())) for layer, memories in by_layer.items()}

    def edit(layer: int, coefficients: torch.Tensor) -> torch.Tensor:
        """The coefficients (batch, tokens, d_ff) with the chosen memories set (or scaled)."""
        where = index[layer].to(coefficients.device)
        new = amount[layer].to(coefficients.device, coefficients.dtype)
        coefficients = coefficients.clone()
        coefficients[..., where] = coefficients[..., where] * new if scale else new
        return coefficients

    with hook_coefficients(adapter, layers, edit):
        yield


@contextmanager
def scale_at_positions(model_or_adapter, factors: Mapping[int, torch.Tensor], positions) -> Iterator[None]:
    """Multiply row r's coefficients at position ``positions[r]`` only, by ``factors[layer][r]`` ((rows, d_ff)
    per layer; 1 leaves a memory alone): Dai et al.'s suppress (x0) and amplify (x2) at a prompt's last token."""
    if not factors:  # nothing to edit: the model runs as it is
        yield
        return
    positions = torch.as_tensor(positions, dtype=torch.long)
    rows = torch.arange(len(positions), device=positions.device)

    def edit(layer: int, coefficients: torch.Tensor) -> torch.Tensor:
        r, where = rows.to(coefficients.device), positions.to(coefficients.device)
        coefficients = coefficients.clone()
        coefficients[r, where] = coefficients[r, where] * factors[layer].to(coefficients.device, coefficients.dtype)
        return coefficients

    with hook_coefficients(model_or_adapter, list(factors), edit):
        yield
