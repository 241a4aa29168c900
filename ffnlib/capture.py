"""Reading the memories in a forward pass.

``with capture(loaded, layers=[3, 7], what=("coefficients",)) as acts: loaded.model(ids)`` fills
``acts.coefficients[3]`` with the memory coefficients m (batch, tokens, d_ff) of layer 3, using
forward hooks that are always removed on exit (errors included). Only what was asked for is kept, as float32
whatever dtype the model computes in (:mod:`ffnlib.precision`):

- ``coefficients``: m, the input of the FFN's second linear (``down``/``c_proj``/``fc2``);
- ``ffn_input``: the normalised residual the FFN reads (the input of its first linear);
- ``ffn_output``: what the FFN adds to the residual stream (after Gemma's post-FFN norm);
- ``residual_after``: the layer's output;
- ``residual_before``: the residual the FFN is added to, i.e. ``residual_after - ffn_output``. For
  sequential blocks this is the residual after attention; for parallel blocks (GPT-J, NeoX) it is
  the input plus the attention output, which the model never materialises on its own.

Every tensor comes per token, (batch, tokens, width), whatever shape the family's modules use: OPT runs
its FFN on (batch·tokens, d). :func:`hook_coefficients` is the one place that owns that reshape for
code that reads or edits the coefficients inside a forward pass (the miner, interventions, ...): it
hands each hook the coefficients as (batch, tokens, d_ff) and writes an edit back in the module's own
shape.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .errors import ParameterError
from .precision import full_precision

__all__ = ["WHAT", "Activations", "first_tensor", "block_input", "StopForward", "forward_until_stop", "stop_after",
           "TokenShapes", "hook_coefficients", "capture", "decomposition_check"]

WHAT = ("coefficients", "ffn_input", "ffn_output", "residual_before", "residual_after")


@dataclass
class Activations:
    """What one forward pass produced, per layer index."""

    coefficients: dict[int, torch.Tensor] = field(default_factory=dict)
    ffn_input: dict[int, torch.Tensor] = field(default_factory=dict)
    ffn_output: dict[int, torch.Tensor] = field(default_factory=dict)
    residual_before: dict[int, torch.Tensor] = field(default_factory=dict)
    residual_after: dict[int, torch.Tensor] = field(default_factory=dict)


def first_tensor(output):
    """A module's main output: the first element of a tuple or list (a block's hidden states), else itself."""
    return output[0] if isinstance(output, (tuple, list)) else output


def block_input(args: tuple, kwargs: dict):
    """A block's hidden-states input as a forward pre-hook registered ``with_kwargs=True`` sees it: the first
    positional argument, else the ``hidden_states`` keyword (None when neither is given)."""
    return args[0] if args else kwargs.get("hidden_states")


class StopForward(Exception):
    """Raised by a hook once the last layer needed has been read: the rest of the model is skipped."""


def forward_until_stop(model, **inputs) -> None:
    """Run ``model(**inputs)``, ending quietly where a hook raised :class:`StopForward`."""
    try:
        model(**inputs)
    except StopForward:
        pass


@contextmanager
def stop_after(model_or_adapter, layer: int) -> Iterator[None]:
    """Stop every forward pass right after block ``layer`` (run it with :func:`forward_until_stop`)."""
    adapter = _adapter_of(model_or_adapter)

    def stop(module, args, output):
        raise StopForward

    handle = adapter.layer(layer).register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


class TokenShapes:
    """The (batch, tokens) of each hooked layer's input, recorded by a pre-hook on the block, so that
    a tensor a family's module sees flattened (OPT: (batch·tokens, d)) can be given back per token."""

    def __init__(self) -> None:
        self.lead: dict[int, torch.Size] = {}

    def register(self, adapter: Adapter, layer: int):
        def record(mod, args, kwargs):
            hidden = block_input(args, kwargs)
            if isinstance(hidden, torch.Tensor):
                self.lead[layer] = hidden.shape[:-1]
        return adapter.layer(layer).register_forward_pre_hook(record, with_kwargs=True)

    def per_token(self, layer: int, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as (batch, tokens, width) (a view; unchanged when it already is)."""
        lead = self.lead.get(layer)
        if lead is not None and tensor.shape[:-1] != lead and tensor.shape[:-1].numel() == lead.numel():
            return tensor.reshape(*lead, tensor.shape[-1])
        return tensor


def _adapter_of(model_or_adapter) -> Adapter:
    adapter = getattr(model_or_adapter, "adapter", model_or_adapter)
    if isinstance(adapter, nn.Module):  # a bare transformers model
        adapter = get_adapter(adapter)
    return adapter


CoefficientHook = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@contextmanager
def hook_coefficients(model_or_adapter, layers: Iterable[int] | int | None,
                      fn: CoefficientHook) -> Iterator[None]:
    """Call ``fn(layer, m)`` inside every forward pass, with the coefficients ``m`` of each hooked layer
    (all when ``None``) as (batch, tokens, d_ff), float32 for a bf16/fp16 model (:func:`ffnlib.precision.full_precision`),
    whatever shape the family's FFN uses.

    If ``fn`` returns a tensor of that shape, it replaces the coefficients: the FFN's second linear then
    reads it, given back in the module's own shape. It may have more rows than it was given (a batch of one
    fanned out: the layers above then run in the larger batch). An exception raised by ``fn`` (e.g. to stop the
    forward pass once the last layer needed has been read) propagates. The hooks are removed on exit,
    errors included.
    """
    adapter = _adapter_of(model_or_adapter)
    shapes = TokenShapes()
    handles = []

    def make(layer: int):
        def pre_hook(module, args):
            m = args[0]
            replaced = fn(layer, full_precision(shapes.per_token(layer, m)))
            if replaced is None:
                return None
            # the module's shape and dtype; the batch may grow
            return (replaced.reshape(-1, *m.shape[1:]).to(m.dtype), *args[1:])
        return pre_hook

    try:
        for layer in adapter.check_layers(layers):
            handles.append(shapes.register(adapter, layer))
            handles.append(adapter.down(layer).register_forward_pre_hook(make(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(model_or_adapter, layers: Iterable[int] | int | None = None,
            what: Iterable[str] = ("coefficients",)) -> Iterator[Activations]:
    """Hook the given layers (all when ``None``) and record ``what`` on every forward pass.

    Each forward pass overwrites the previous one's tensors.
    """
    adapter = _adapter_of(model_or_adapter)
    what = (what,) if isinstance(what, str) else tuple(what)
    unknown = sorted(set(what) - set(WHAT))
    if unknown:
        raise ParameterError(f"Cannot capture {unknown}: choose from {list(WHAT)}.")
    layer_list = adapter.check_layers(layers)
    acts = Activations()
    need_out = "ffn_output" in what or "residual_before" in what
    need_after = "residual_after" in what or "residual_before" in what
    handles = []
    shapes = TokenShapes()

    def store(name: str, layer: int, tensor: torch.Tensor) -> None:
        getattr(acts, name)[layer] = full_precision(shapes.per_token(layer, tensor).detach())

    try:
        for layer in layer_list:
            handles.append(shapes.register(adapter, layer))
            if "coefficients" in what:
                handles.append(adapter.down(layer).register_forward_pre_hook(
                    lambda mod, args, layer=layer: store("coefficients", layer, args[0])))
            if "ffn_input" in what:
                handles.append(adapter.up(layer).register_forward_pre_hook(
                    lambda mod, args, layer=layer: store("ffn_input", layer, args[0])))
            if need_out:
                handles.append(adapter.ffn_output_module(layer).register_forward_hook(
                    lambda mod, args, out, layer=layer: store("ffn_output", layer, first_tensor(out))))
            if need_after:
                def after(mod, args, out, layer=layer):
                    store("residual_after", layer, first_tensor(out))
                    if "residual_before" in what:
                        acts.residual_before[layer] = acts.residual_after[layer] - acts.ffn_output[layer]
                handles.append(adapter.layer(layer).register_forward_hook(after))
        yield acts
    finally:
        for handle in handles:
            handle.remove()
        for name in set(WHAT) - set(what):
            getattr(acts, name).clear()


@torch.no_grad()
def decomposition_check(loaded, text: str, layers: Iterable[int] | int | None = None):
    """Check FF(x) = Σ_i m_i·v_i (+ bias) on a real forward pass, per layer.

    Returns a DataFrame with, per layer, the largest absolute and relative error between the FFN's
    own output (before any post-FFN norm) and the sum of its memories' contributions, and the same
    for the model's logits against the final residual projected by the adapter.
    """
    import pandas as pd

    adapter: Adapter = loaded.adapter
    layer_list = adapter.check_layers(layers)
    ids = torch.tensor([loaded.encode(text)], device=loaded.device)
    down_out: dict[int, torch.Tensor] = {}
    handles = [adapter.down(layer).register_forward_hook(
        lambda mod, args, out, layer=layer: down_out.__setitem__(layer, first_tensor(out).detach()))
        for layer in layer_list]
    try:
        with capture(adapter, layer_list, what=("coefficients",)) as acts, \
                capture(adapter, adapter.n_layers - 1, what=("residual_after",)) as last:
            logits = loaded.model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    final_logits = adapter.logits_from_residual(last.residual_after[adapter.n_layers - 1])
    rows = []
    for layer in layer_list:
        memories = acts.coefficients[layer] @ adapter.values(layer)
        bias = adapter.value_bias(layer)
        if bias is not None:
            memories = memories + bias
        out = down_out[layer].reshape(memories.shape)  # OPT's FFN output is (batch * tokens, d)
        err = (memories - out).abs().max().item()
        rows.append({"layer": layer, "max_abs_error": err,
                     "relative_error": err / max(out.abs().max().item(), 1e-30)})
    frame = pd.DataFrame(rows)
    frame.attrs["logits_max_abs_error"] = (final_logits - logits).abs().max().item()
    return frame
