"""Feed-forward blocks through attention maps (Kobayashi, Kuribayashi, Yokoi & Inui, ICLR 2024).

Geva et al. read what one position's FFN writes. Kobayashi et al. ask how the FFN changes which input tokens
each output token draws on. For one layer, the layer's input vectors ``x_j`` are the atoms, and every
intermediate vector of position ``i`` is written as a sum of per-input-token vectors plus bias terms,
``v_i = Σ_j y_{i←j} + b_i``; the map entry is ``‖y_{i←j}‖``. The stages, in the order the model computes
them (:func:`stages_of` says which a family has):

- **ATB**, the residual stream after attention: ``x_i + post(Σ_h Σ_j A^h_ij f^h(x_j))``, with
  ``f^h(x) = (norm(x) W_V^h + b_V^h) W_O^h`` (norm-based attention, Kobayashi et al. 2020/2021). The
  attention weights ``A^h`` are the model's own (``output_attentions`` with eager attention: rotary
  embeddings, ALiBi, sliding windows and soft-capping are all inside them); the values are read from the
  model's value projection by a hook, so GQA, fused QKV layouts and value biases need no re-implementation.
  The residual ``x_i`` is token ``i``'s own; ``b_O`` is a bias term. ``post`` is Gemma 2/3's and OLMo 2's
  norm on the attention output (identity elsewhere).
- **ATBLN**, the FFN's input: ATB through the FFN's own input norm (pre-LN families; not for parallel
  blocks, not for OLMo 2, which has none).
- **ATBFF**, the FFN's output. Linear parts split exactly. The activation is split with integrated gradients
  (IG) from a zero baseline along the straight path that scales every summand (token summands and the bias
  summand, including the FFN's first bias) together, so the shares of all summands add up exactly to the
  FFN's hidden vector. Element-wise activations (``m = g(p)``, ``p = Σ_j p_j + p_b``) have the closed form
  ``share_j = p_j · g(p)/p``; the coefficients ``m`` are read from the model, so no activation is
  re-implemented. Gated FFNs (``m = act(a)·u``) have ``share_j = a_j · u·(act(a) − B)/a + u_j · B`` with
  ``B = ∫_0^1 act(α a) dα``: one 1-D integral per hidden unit (Gauss-Legendre, :func:`path_average`, read from a
  table of it, :func:`path_average_table`), checked against captum's IntegratedGradients and a brute-force
  Riemann sum in the tests. Where the FFN has a first-layer bias it is one more summand (the bias term's).
- **ATBFFLN**: Gemma 2/3's and OLMo 2's norm on the FFN output, one more stage before the residual.
- **ATBFFRES**: the layer's output, ATB plus the FFN block.
- **ATBFFRESLN**: the next norm, the one the next layer's attention reads (the final norm after the last
  layer). OLMo 2's attention reads the raw residual, so there only its last layer has this stage.

Every norm is split linearly with the statistic of the whole vector (:class:`NormSplit`): ``norm(Σ_j y_j + b)
= Σ_j g ⊙ C(y_j)/s + (g ⊙ C(b)/s + β)``, ``C`` centring for a LayerNorm, identity for an RMSNorm. So every
stage is exact (complete): the sum over ``j`` plus the bias terms equals the model's own vector, which
:func:`decompose` checks when asked (``check=True``).

The four maps the paper draws are :data:`MAIN_STAGES`. For a pre-LN model the FFN's input norm sits between
ATB and the FFN; ATBFF includes it (the extra map ATBLN separates it), and ATBFFRESLN is the next norm, the
place where the post-LN paper's last LN sits. For parallel blocks (GPT-J, NeoX) the FFN reads ``norm(x_i)``,
token ``i`` alone, so its map is diagonal: the FFN mixes no context within the layer there.

**Cost.** The attention part is pushed through the FFN's first matrices per head before the mixing
(``n·H·d·d_ff``, or ``d²·d_ff`` once per layer and batch through ``W_O·L·W1`` when the batch has more tokens than
``d/(H−1)``), so the only large cost is the ``n²·d_ff·d`` down-projection, computed sentence by sentence in chunks
of at most 16 query rows against the input tokens up to the chunk's last row (memory bounded by
``chunk_elements``; only the causal pairs, up to each chunk's corner). Sentences longer than ``max_tokens``
(default :data:`MAX_TOKENS`) are refused.

**Measures** (functions of a :class:`MapsResult`, all returning DataFrames): maps are normalised per row
(each query's contributions sum to 1; parameter ``normalise``). Contextualisation change of a component
(:func:`contextualization_change`) is ``1 − Spearman ρ`` between the maps before and after it, per sentence and
layer, over the flattened map (entries ``j ≤ i``; ``correlate="row"``: within each query row, averaged).
FF-amplification (:func:`amplification`) is the normalised map after the FFN minus the one it reads; the top
pairs per sentence and layer are classified (:func:`classify_pairs`: sub-word pieces of one word from the
tokenizer's offsets, tokens of one capitalised multi-word span, a frequent corpus bigram, other) and compared with
base rates (:func:`amplified_classes`). The first position (BOS, or the first token where the model has no BOS:
an attention sink) and self-pairs are excluded from that ranking. Cancellation (:func:`cancellation`): how much of
the FFN's change survives RES and the norms: the change of the whole block against the FFN's own change (the
paper's comparison), and the correlation of the later components' change with the FFN's change over map entries,
against a control in which the FFN's change is shuffled within each row. 95% intervals are seeded bootstraps over
sentences. :func:`measures` turns these frames into the estimates of the paper's findings, which the findings
registry (``ffnlib.findings``, notebook ``09_ff_attention_maps``) judges, each against its baseline and against
the same measures of a random-weights control (the notebook decomposes the first ``control_sentences`` sentences
with the same architecture, randomly initialised: ``ffnlib.controls``).
"""

from __future__ import annotations

import inspect
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..capture import capture
from ..errors import CorpusError, ParameterError, UnsupportedModelError
from ..progress import tqdm
from ..stats import Estimate
from ..storage import fingerprint, load_result, save_result

__all__ = ["MAX_TOKENS", "CHUNK_ELEMENTS", "STAGES", "MAIN_STAGES", "STAGE_LABELS", "COMPONENTS", "CHECKED",
           "LayerLayout", "VALUE_LAYOUTS", "LAYOUTS", "layout_of", "stages_of", "before_ff", "NormSplit",
           "path_average", "check_activation", "path_average_table", "gated_ig_coefficients",
           "elementwise_ig_ratio", "ig_shares_by_riemann", "eager_attention", "Decomposition", "decompose",
           "token_table", "sample_sentences", "MapsResult", "sentence_maps", "NORMALISE", "CLASSES",
           "normalised_maps", "CORRELATE", "contextualization_per_sentence", "contextualization_change",
           "corpus_bigrams", "classify_pairs", "amplification", "amplified_pairs", "amplified_classes",
           "cancellation_per_sentence", "cancellation", "MEASURE_OF_CLASS", "measures", "map_arrays", "SCALE_SIZES",
           "notebook_sizes", "curves"]

_VERSION = 1
MAX_TOKENS = 128  # the default bound on a sentence's length (cost grows as n² per layer)
CHUNK_ELEMENTS = 1 << 23  # floats in the largest per-chunk tensor (32 MiB in fp32)
_ROWS_PER_CHUNK = 16  # query rows per chunk at most: more rows, fewer and bigger products; fewer, less of the causal corner
STAGES = ("ATB", "ATBLN", "ATBFF", "ATBFFLN", "ATBFFRES", "ATBFFRESLN")
MAIN_STAGES = ("ATB", "ATBFF", "ATBFFRES", "ATBFFRESLN")
STAGE_LABELS = {"ATB": "ATB (attention + residual)", "ATBLN": "ATBLN (FFN input norm)",
                "ATBFF": "ATBFF (FFN output)", "ATBFFLN": "ATBFFLN (norm after the FFN)",
                "ATBFFRES": "ATBFFRES (layer output)", "ATBFFRESLN": "ATBFFRESLN (next norm)"}
# the component that takes one stage to the next
COMPONENTS = {("ATB", "ATBLN"): "LN (FFN input)", ("ATBLN", "ATBFF"): "FF", ("ATB", "ATBFF"): "FF",
              ("ATBFF", "ATBFFLN"): "LN (FFN output)", ("ATBFF", "ATBFFRES"): "RES", ("ATBFFLN", "ATBFFRES"): "RES",
              ("ATBFFRES", "ATBFFRESLN"): "LN"}
CHECKED = ("ATB", "ATBLN", "preactivation", "hidden", "ATBFF", "ATBFFLN", "ATBFFRES", "ATBFFRESLN")


# ---- where each family keeps what the decomposition needs ---------------------------------------------------
@dataclass(frozen=True)
class LayerLayout:
    """What the decomposition needs beyond :class:`ffnlib.adapters.FamilySpec`, as paths relative to a layer.

    ``value``: the module whose output holds the attention values; ``value_layout`` says where they are in it:
    ``"separate"`` (``kv_heads · head_dim`` wide, GQA allowed), ``"qkv_blocks"`` (``[q | k | v]``, GPT-2's
    ``c_attn``) or ``"qkv_per_head"`` (per head ``[q, k, v]``, GPT-NeoX and BLOOM). ``out``: the attention's
    output projection (its input is the heads' outputs side by side; its bias is ``b_O``).
    ``attention_norm``: the norm attention reads (``None``: OLMo 2 reads the raw residual).
    ``attention_post_norm``: a norm on the attention output before the residual add (Gemma 2/3, OLMo 2).
    ``activation``: gated FFNs only, the module applied to the gate.
    """

    value: str
    out: str
    attention_norm: str | None
    attention_post_norm: str | None = None
    value_layout: str = "separate"
    activation: str | None = None


VALUE_LAYOUTS = ("separate", "qkv_blocks", "qkv_per_head")
_LLAMA = LayerLayout("self_attn.v_proj", "self_attn.o_proj", "input_layernorm", activation="mlp.act_fn")
_GEMMA2 = LayerLayout("self_attn.v_proj", "self_attn.o_proj", "input_layernorm", "post_attention_layernorm",
                      activation="mlp.act_fn")
LAYOUTS: dict[str, LayerLayout] = {  # keyed by FamilySpec.name
    "gpt2": LayerLayout("attn.c_attn", "attn.c_proj", "ln_1", value_layout="qkv_blocks"),
    "gpt-neo": LayerLayout("attn.attention.v_proj", "attn.attention.out_proj", "ln_1"),
    "gpt-j": LayerLayout("attn.v_proj", "attn.out_proj", "ln_1"),
    "gpt-neox": LayerLayout("attention.query_key_value", "attention.dense", "input_layernorm",
                            value_layout="qkv_per_head"),
    "opt": LayerLayout("self_attn.v_proj", "self_attn.out_proj", "self_attn_layer_norm"),
    "bloom": LayerLayout("self_attention.query_key_value", "self_attention.dense", "input_layernorm",
                         value_layout="qkv_per_head"),
    "llama": _LLAMA,
    "olmo2": LayerLayout("self_attn.v_proj", "self_attn.o_proj", None, "post_attention_layernorm",
                         activation="mlp.act_fn"),
    "gemma": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3": _GEMMA2,
}


def _module(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def layout_of(adapter: Adapter) -> LayerLayout:
    """The family's :class:`LayerLayout`, checked against layer 0 of the model (clear error if it does not fit)."""
    family = adapter.family.name
    if family not in LAYOUTS:
        raise UnsupportedModelError(f"The contribution maps have no layout for the {family} family: add a "
                                    f"LayerLayout to LAYOUTS in {__name__}.")
    layout = LAYOUTS[family]
    if getattr(adapter.model.config, "apply_residual_connection_post_layernorm", False):
        raise UnsupportedModelError("This BLOOM checkpoint adds the normalised input as the residual "
                                    "(apply_residual_connection_post_layernorm=True); the maps support the "
                                    "usual residual only.")
    try:
        for path in (layout.value, layout.out, layout.attention_norm, layout.attention_post_norm, layout.activation):
            if path:
                _module(adapter.layer(0), path)
    except AttributeError as exc:
        raise UnsupportedModelError(f"{type(adapter.model).__name__} does not have the attention layout of the "
                                    f"{family} family ({exc}).") from exc
    return layout


def _next_norm(adapter: Adapter, layout: LayerLayout, layer: int) -> nn.Module | None:
    """The norm that reads this layer's output: the next layer's attention norm, or the final norm."""
    if layer == adapter.n_layers - 1:
        return adapter.final_norm
    return _module(adapter.layer(layer + 1), layout.attention_norm) if layout.attention_norm else None


def stages_of(adapter: Adapter, layer: int) -> tuple[str, ...]:
    """The stages (of :data:`STAGES`) this family has at ``layer``, in the order the model computes them."""
    layer = adapter.check_layer(layer)
    stages = ["ATB"]
    if not adapter.parallel and adapter.family.ffn_norm:
        stages.append("ATBLN")
    stages.append("ATBFF")
    if adapter.family.post_ffn_norm:
        stages.append("ATBFFLN")
    stages.append("ATBFFRES")
    if _next_norm(adapter, layout_of(adapter), layer) is not None:
        stages.append("ATBFFRESLN")
    return tuple(stages)


def before_ff(stages: Sequence[str]) -> str:
    """The stage the FFN reads: its input norm's output where it has one, else ATB."""
    return "ATBLN" if "ATBLN" in stages else "ATB"


# ---- norms, split linearly -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormSplit:
    """A LayerNorm or RMSNorm ``y = g ⊙ C(v)/s(v) + β``, split linearly with the statistic of the whole vector.

    ``C`` centres (LayerNorm) or is the identity (RMSNorm); ``s`` is ``sqrt(var + eps)`` or
    ``sqrt(mean(v²) + eps)``. With ``s`` of the whole sum, ``norm(Σ_j y_j + b) = Σ_j split(y_j) + split(b) + β``.
    """

    centre: bool
    gain: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    @classmethod
    def of(cls, module: nn.Module, plus_one: bool = False) -> "NormSplit":
        """Read a norm module: nn.LayerNorm, any ``*LayerNorm`` (OLMo's has no weight) or ``*RMSNorm``
        (``plus_one``: Gemma multiplies by ``1 + weight``)."""
        name = type(module).__name__
        if isinstance(module, nn.LayerNorm) or (name.endswith("LayerNorm") and "RMS" not in name):
            centre = True
        elif "RMSNorm" in name:
            centre = False
        else:
            raise UnsupportedModelError(f"Cannot split the norm {name}: only LayerNorm and RMSNorm are supported.")
        weight = getattr(module, "weight", None)
        size = weight.shape[0] if weight is not None else module.normalized_shape[0]
        gain = torch.ones(size) if weight is None else weight.detach().float()
        if plus_one and weight is not None:
            gain = 1.0 + gain
        bias = getattr(module, "bias", None)
        eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 1e-5
        return cls(centre, gain, None if bias is None else bias.detach().float(), float(eps))

    def statistic(self, v: torch.Tensor) -> torch.Tensor:
        """``s`` of each vector (last dimension), computed as the model does (float32)."""
        v = v.float()
        if self.centre:
            return (v.var(-1, unbiased=False) + self.eps).sqrt()
        return (v.pow(2).mean(-1) + self.eps).sqrt()

    def linear(self, y: torch.Tensor) -> torch.Tensor:
        """``g ⊙ C(y)``: the part that is linear in ``y`` (divide by the statistic afterwards)."""
        if self.centre:
            y = y - y.mean(-1, keepdim=True)
        return y * self.gain.to(y.device)

    def scaled(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``g ⊙ C(y) · scale`` with ``scale`` of y's shape without its last dimension, in one pass over ``y``."""
        if self.centre:
            y = y - y.mean(-1, keepdim=True)
        return y * (scale[..., None] * self.gain.to(y.device))

    def constant(self, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(like) if self.bias is None else self.bias.to(like.device).expand_as(like)


# ---- integrated gradients through the activation ----------------------------------------------------------------
_GL_NODES = 32
_LINEAR_BEYOND = 20.0  # |t| beyond which act(t) is t (t > 0) or 0 (t < 0) to float precision


def _gauss_legendre(nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.legendre.leggauss(nodes)
    return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)


def path_average(act, a: torch.Tensor, nodes: int = _GL_NODES, linear_beyond: float = _LINEAR_BEYOND) -> torch.Tensor:
    """``B(a) = ∫_0^1 act(α·a) dα`` element-wise, by Gauss-Legendre quadrature (float64).

    For ``|a| > linear_beyond`` the integral runs to ``±linear_beyond`` and the rest is added in closed form,
    since SiLU and GELU equal ``t`` (right) or ``0`` (left) there to float precision (checked by
    :func:`check_activation`). The nodes are evaluated in a few large batches (bounded memory).
    """
    alpha, weight = (v.to(a.device) for v in _gauss_legendre(nodes))
    a = a.double()
    c = a.clamp(-linear_beyond, linear_beyond)
    inner = torch.zeros_like(a)
    step = max(1, (1 << 22) // max(1, a.numel()))
    for k0 in range(0, nodes, step):
        at = c[..., None] * alpha[k0:k0 + step]
        inner += (act(at).double() * weight[k0:k0 + step]).sum(-1)
    big = a.abs() > linear_beyond
    if not bool(big.any()):
        return inner
    tail = torch.where(a > linear_beyond, (a * a - linear_beyond ** 2) / 2, torch.zeros_like(a))
    return torch.where(big, (c * inner + tail) / torch.where(big, a, torch.ones_like(a)), inner)


def check_activation(act, linear_beyond: float = _LINEAR_BEYOND) -> None:
    """Refuse a gate activation that is not ReLU-like far from 0 (the tails of :func:`path_average`)."""
    t = torch.tensor([-linear_beyond, linear_beyond], dtype=torch.float64)
    with torch.no_grad():
        out = act(t).double()
    if abs(float(out[0])) > 1e-4 or abs(float(out[1]) - linear_beyond) > 1e-4:
        raise UnsupportedModelError(f"The gate activation {act} is not ReLU-like beyond ±{linear_beyond} "
                                    f"(act({-linear_beyond:g}) = {float(out[0]):.3g}, act({linear_beyond:g}) = "
                                    f"{float(out[1]):.3g}); integrated gradients here assume SiLU/GELU-like gates.")


_TABLE_POINTS = (1 << 16) + 1
_AVERAGE_TABLES: dict[str, torch.Tensor] = {}


def path_average_table(act, a: torch.Tensor) -> torch.Tensor:
    """:func:`path_average` read from a table of it on a uniform grid over ``[-20, 20]`` (65,537 points, built once
    per activation by Gauss-Legendre in float64; linear interpolation, error below 1e-7), with the same closed-form
    tails. Evaluating the activation at every quadrature node of every hidden unit would cost as much as the
    down-projection."""
    key = f"{type(act).__module__}.{type(act).__qualname__}:{act!r}"
    if key not in _AVERAGE_TABLES:
        _AVERAGE_TABLES[key] = path_average(act, torch.linspace(-_LINEAR_BEYOND, _LINEAR_BEYOND, _TABLE_POINTS,
                                                                dtype=torch.float64))
    table = _AVERAGE_TABLES[key].to(a.device)
    a = a.double()
    c = a.clamp(-_LINEAR_BEYOND, _LINEAR_BEYOND)
    position = (c + _LINEAR_BEYOND) * ((_TABLE_POINTS - 1) / (2 * _LINEAR_BEYOND))
    low = position.floor().clamp(max=_TABLE_POINTS - 2)
    frac = position - low
    low = low.long()
    inner = table[low] * (1 - frac) + table[low + 1] * frac
    big = a.abs() > _LINEAR_BEYOND
    if not bool(big.any()):
        return inner
    tail = torch.where(a > _LINEAR_BEYOND, (a * a - _LINEAR_BEYOND ** 2) / 2, torch.zeros_like(a))
    return torch.where(big, (c * inner + tail) / torch.where(big, a, torch.ones_like(a)), inner)


def gated_ig_coefficients(act, a: torch.Tensor, u: torch.Tensor, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """IG of ``m = act(a)·u`` from a zero baseline, all summands scaled together: with ``a = Σ_j a_j`` and
    ``u = Σ_j u_j``, summand ``j`` gets ``a_j · coef_a + u_j · coef_u``, where ``coef_a = u·(act(a) − B)/a`` and
    ``coef_u = B = ∫_0^1 act(α a) dα`` (:func:`path_average_table`; ``exact``: :func:`path_average`). The shares
    add up to ``act(a)·u`` exactly, whatever B's accuracy."""
    average = path_average(act, a) if exact else path_average_table(act, a)
    a64 = a.double()
    safe = torch.where(a64.abs() < 1e-30, torch.full_like(a64, 1e-30), a64)
    slope = (act(a64).double() - average) / safe
    return (u.double() * slope).to(a.dtype), average.to(a.dtype)


def elementwise_ig_ratio(m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """IG of ``m = g(p)`` from a zero baseline (``g(0) = 0``): summand ``p_j`` gets ``p_j · g(p)/p``; this
    returns ``g(p)/p`` (0 where ``p`` is 0 to float precision, where ``m`` is 0 too)."""
    small = p.abs() < 1e-12
    return torch.where(small, torch.zeros_like(p), m / torch.where(small, torch.ones_like(p), p))


def ig_shares_by_riemann(function, summands: torch.Tensor, steps: int = 20000) -> torch.Tensor:
    """Brute-force IG (midpoint Riemann sum of the gradient along the straight path from 0), for tests:
    ``summands`` (n_summands, ...), ``function`` maps their sum to the output (same shape as one summand)."""
    summands = summands.double()
    total = torch.zeros_like(summands)
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    for chunk in alphas.split(2000):
        x = (chunk.view(-1, *[1] * summands.dim()) * summands).requires_grad_(True)
        out = function(x.sum(1))
        (grad,) = torch.autograd.grad(out.sum(), x)
        total += grad.sum(0)
    return summands * total / steps


# ---- one forward pass, recorded ---------------------------------------------------------------------------------
@contextmanager
def eager_attention(model: nn.Module):
    """Run the model with eager attention (so that it returns its attention weights), then restore it."""
    before = getattr(model.config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    try:
        model.set_attn_implementation("eager")
    except (ValueError, AttributeError) as exc:
        raise UnsupportedModelError(f"{type(model).__name__} cannot switch to eager attention, which the "
                                    f"contribution maps need to read its attention weights ({exc}).") from exc
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def _record(adapter: Adapter, layout: LayerLayout, layers: list[int]):
    """Hooks that keep, per layer: its input ``x``, the value module's output, the attention output projection's
    output, the down projection's output and the next norm's output. Always removed on exit."""
    rec: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    handles = []

    def keep(layer: int, name: str):
        return lambda mod, args, out: rec[layer].__setitem__(name, _first(out).detach())

    def keep_input(mod, args, kwargs, layer):
        hidden = args[0] if args else kwargs["hidden_states"]
        rec[layer]["x"] = hidden.detach()

    try:
        for layer in layers:
            block = adapter.layer(layer)
            handles.append(block.register_forward_pre_hook(
                lambda mod, args, kwargs, layer=layer: keep_input(mod, args, kwargs, layer), with_kwargs=True))
            handles.append(_module(block, layout.value).register_forward_hook(keep(layer, "values")))
            handles.append(_module(block, layout.out).register_forward_hook(keep(layer, "attention")))
            handles.append(adapter.down(layer).register_forward_hook(keep(layer, "down")))
            nxt = _next_norm(adapter, layout, layer)
            if nxt is not None:
                handles.append(nxt.register_forward_hook(keep(layer, "next")))
        yield rec
    finally:
        for handle in handles:
            handle.remove()


def _in_out(adapter: Adapter, module: nn.Module) -> torch.Tensor:
    """A linear module's weight as (in_features, out_features) (GPT-2's Conv1D already is)."""
    return module.weight if adapter.family.conv1d else module.weight.T


def _split_values(raw: torch.Tensor, layout: str, heads: int, head_dim: int) -> torch.Tensor:
    """The value vectors (b, n, heads, head_dim) in the value module's output; GQA's key-value heads are
    repeated as the model repeats them (query head h reads key-value head h // (heads / kv_heads))."""
    b, n, width = raw.shape
    if layout == "separate":
        values = raw.reshape(b, n, width // head_dim, head_dim)
    elif layout == "qkv_blocks":
        values = raw[..., 2 * width // 3:].reshape(b, n, -1, head_dim)
    elif layout == "qkv_per_head":
        values = raw.reshape(b, n, heads, 3, head_dim)[..., 2, :]
    else:
        raise ParameterError(f"Unknown value layout {layout!r}: choose from {VALUE_LAYOUTS}.")
    kv_heads = values.shape[2]
    if kv_heads != heads:
        values = values.repeat_interleave(heads // kv_heads, dim=2)
    return values


# ---- the decomposition of one batch -------------------------------------------------------------------------
@dataclass
class Decomposition:
    """The contribution maps of a batch of sentences.

    ``maps[layer][stage]``: (batch, n, n) tensors of ``‖y_{i←j}‖`` (zero where ``j > i`` and beyond each
    sentence's length). ``vectors[layer][stage]`` (batch, n, n, d) and ``bias[layer][stage]`` (batch, n, d):
    the vectors and bias terms themselves (only with ``keep_vectors=True``). ``checks``: per (layer, stage), the
    largest error of ``Σ_j y_{i←j} + bias`` against the model's own vector, relative to that vector's largest
    entry (only with ``check=True``; stages ``preactivation`` and ``hidden`` are the FFN's first linear layer
    and its hidden vector m).
    """

    token_ids: list[list[int]]
    layers: list[int]
    stages: dict[int, tuple[str, ...]]
    maps: dict[int, dict[str, torch.Tensor]]
    vectors: dict[int, dict[str, torch.Tensor]] | None = None
    bias: dict[int, dict[str, torch.Tensor]] | None = None
    checks: pd.DataFrame | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]

    def map(self, layer: int, stage: str, sentence: int = 0) -> np.ndarray:
        """One map as a (length, length) array: row i is the query, column j the input token."""
        if layer not in self.maps:
            raise ParameterError(f"Layer {layer} was not decomposed; layers here: {self.layers}.")
        if stage not in self.maps[layer]:
            raise ParameterError(f"Layer {layer} has no stage {stage!r}; it has {list(self.stages[layer])}.")
        n = self.lengths[sentence]
        return self.maps[layer][stage][sentence, :n, :n].cpu().numpy()


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ParameterError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def _token_lists(loaded, inputs, max_tokens: int) -> list[list[int]]:
    """``inputs`` (a text, texts, token id lists or a 2-D tensor of ids) as lists of token ids, checked."""
    if isinstance(inputs, torch.Tensor):
        inputs = [inputs.tolist()] if inputs.dim() == 1 else inputs.tolist()
    elif isinstance(inputs, str) or (isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], (int, np.integer))):
        inputs = [inputs]
    if not isinstance(inputs, Sequence) or not inputs:
        raise ParameterError("Give a sentence, a list of sentences, or token ids (a list of lists or a 2-D tensor).")
    out = []
    for k, item in enumerate(inputs):
        if isinstance(item, str):
            if not item.strip():
                raise ParameterError(f"Sentence {k} is empty: give some text.")
            if not hasattr(loaded, "encode"):
                raise ParameterError("Texts need a LoadedModel (with a tokenizer); a bare model takes token ids.")
            ids = list(loaded.encode(item))
        else:
            ids = [int(t) for t in item]
        if not ids:
            raise ParameterError(f"Sentence {k} has no tokens.")
        if len(ids) > max_tokens:
            raise ParameterError(f"Sentence {k} has {len(ids)} tokens, more than max_tokens={max_tokens}. The maps "
                                 f"cost n²·d_ff·d per layer: shorten the sentence, split it, or pass a larger "
                                 f"max_tokens.")
        out.append(ids)
    return out


def _adapter_and_model(loaded) -> tuple[Adapter, nn.Module]:
    adapter = getattr(loaded, "adapter", None)
    if adapter is None:
        adapter = loaded if isinstance(loaded, Adapter) else get_adapter(loaded)
    return adapter, adapter.model


@torch.no_grad()
def decompose(loaded, inputs, layers: Iterable[int] | int | None = None, *, keep_vectors: bool = False,
              check: bool = False, max_tokens: int = MAX_TOKENS, chunk_elements: int = CHUNK_ELEMENTS) -> Decomposition:
    """Decompose every stage of ``layers`` (all when ``None``) for a batch of sentences (see the module docstring).

    ``loaded``: a :class:`ffnlib.models.LoadedModel` (texts or ids) or a bare transformers model (ids only).
    ``inputs``: a text, a list of texts, a list of token-id lists, or a (batch, n) tensor of ids without
    padding. Sentences of different lengths are padded on the right; each one's maps are those of the sentence
    alone. One forward pass, then the maps layer by layer, in chunks of query positions.
    """
    adapter, model = _adapter_and_model(loaded)
    layout = layout_of(adapter)
    max_tokens = _check_positive_int("max_tokens", max_tokens)
    chunk_elements = _check_positive_int("chunk_elements", chunk_elements)
    layer_list = adapter.check_layers(layers)
    token_ids = _token_lists(loaded, inputs, max_tokens)
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = max(len(ids) for ids in token_ids)
    if isinstance(positions, int) and longest > positions:
        raise ParameterError(f"A sentence has {longest} tokens, more than the {positions} positions this model "
                             "knows; shorten it.")
    device = next(model.parameters()).device
    width = max(len(ids) for ids in token_ids)
    pad = getattr(getattr(loaded, "tokenizer", None), "pad_token_id", None) or 0
    ids = torch.full((len(token_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, seq in enumerate(token_ids):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    what = ("coefficients", "ffn_input", "ffn_output", "residual_before", "residual_after")
    with eager_attention(model), capture(adapter, layer_list, what=what) as acts, \
            _record(adapter, layout, layer_list) as rec:
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False, **extra)
    attentions = out.attentions
    if attentions is None or len(attentions) != adapter.n_layers or any(a is None for a in attentions):
        raise UnsupportedModelError(f"{type(model).__name__} did not return its attention weights for every layer "
                                    "(output_attentions=True with eager attention).")
    valid = mask.bool()
    result = Decomposition(token_ids=token_ids, layers=layer_list, stages={}, maps={},
                           vectors={} if keep_vectors else None, bias={} if keep_vectors else None)
    check_rows = []
    for layer in layer_list:
        stages = stages_of(adapter, layer)
        inputs_ = _LayerInputs(
            x=rec[layer]["x"], attentions=attentions[layer].float(), values=rec[layer]["values"],
            attention=rec[layer]["attention"], down=rec[layer]["down"], next=rec[layer].get("next"),
            coefficients=acts.coefficients[layer], ffn_input=acts.ffn_input[layer],
            ffn_output=acts.ffn_output[layer], residual_before=acts.residual_before[layer],
            residual_after=acts.residual_after[layer])
        maps, vectors, bias, errors = _decompose_layer(adapter, layout, layer, stages, inputs_, valid, keep_vectors,
                                                       check, chunk_elements)
        result.stages[layer], result.maps[layer] = stages, maps
        if keep_vectors:
            result.vectors[layer], result.bias[layer] = vectors, bias
        check_rows += [{"layer": layer, **row} for row in errors]
    if check:
        frame = pd.DataFrame(check_rows)
        frame["relative_error"] = frame["max_abs_error"] / frame["scale"].clip(lower=1e-30)
        result.checks = frame
    return result


@dataclass
class _LayerInputs:
    """What one forward pass recorded for one layer (every tensor (b, n, ·) except attentions (b, H, n, n))."""

    x: torch.Tensor
    attentions: torch.Tensor
    values: torch.Tensor
    attention: torch.Tensor
    down: torch.Tensor
    next: torch.Tensor | None
    coefficients: torch.Tensor
    ffn_input: torch.Tensor
    ffn_output: torch.Tensor
    residual_before: torch.Tensor
    residual_after: torch.Tensor


def _decompose_layer(adapter: Adapter, layout: LayerLayout, layer: int, stages: tuple[str, ...], t: _LayerInputs,
                     valid: torch.Tensor, keep_vectors: bool, check: bool, chunk_elements: int):
    family = adapter.family
    block = adapter.layer(layer)
    x = t.x.float()
    b, n, d = x.shape
    lead = (b, n)
    down_out = t.down.reshape(*lead, -1).float()  # OPT runs its FFN on (b·n, d)
    A = t.attentions  # (b, H, n, n)
    heads = A.shape[1]

    # attention: per head, each token's value through W_O, f^h(x_j) = v^h_j W_O^h  -> U (b, n, H, d)
    out_module = _module(block, layout.out)
    w_o = _in_out(adapter, out_module).float()  # (H·e, d)
    head_dim = w_o.shape[0] // heads
    values = _split_values(t.values.float(), layout.value_layout, heads, head_dim)
    U = torch.einsum("bnhe,hed->bnhd", values, w_o.reshape(heads, head_dim, d))
    b_o = out_module.bias.float() if getattr(out_module, "bias", None) is not None else torch.zeros(d, device=x.device)
    ones = torch.ones(lead, device=x.device)
    if layout.attention_post_norm:  # Gemma 2/3, OLMo 2: a norm on the attention output before the add
        post = NormSplit.of(_module(block, layout.attention_post_norm), family.gemma_norm)
        stat = post.statistic(t.attention.reshape(*lead, d))
        U = post.linear(U)
        atb_scale = 1.0 / stat
        atb_bias = post.linear(b_o).expand(*lead, d) / stat[..., None] + post.constant(x)
    else:
        atb_scale, atb_bias = ones, b_o.expand(*lead, d)

    # the FFN input: ATB through the FFN's own norm (pre-LN), ATB itself (OLMo 2), or norm(x_i) (parallel blocks)
    ffn_input = t.ffn_input.float()
    if adapter.parallel:
        mode, pre, f_scale = "token", None, ones
    elif family.ffn_norm:
        mode = "norm"
        pre = NormSplit.of(_module(block, family.ffn_norm), family.gemma_norm)
        f_scale = 1.0 / pre.statistic(t.residual_before)
    else:
        mode, pre, f_scale = "raw", None, ones
    w_up = adapter.keys(layer).float().T  # (d, d_ff)
    d_ff = w_up.shape[1]
    up_bias = adapter.up(layer).bias
    if adapter.gated:
        gate_bias = adapter.gate(layer).bias
        w1 = torch.cat([adapter.gates(layer).float().T, w_up], dim=1)  # (d, 2·d_ff): [gate | up]
        b1 = torch.cat([torch.zeros(d_ff, device=x.device) if gate_bias is None else gate_bias.float(),
                        torch.zeros(d_ff, device=x.device) if up_bias is None else up_bias.float()])
        act = _module(block, layout.activation)
        check_activation(act)
    else:
        w1 = w_up.contiguous()
        b1 = torch.zeros(d_ff, device=x.device) if up_bias is None else up_bias.float()
    k = w1.shape[1]
    if mode == "token":
        Q = None
        R = ffn_input @ w1  # token i's own FFN input
        z_bias = torch.zeros_like(x)
    else:
        lin = pre.linear if mode == "norm" else (lambda y: y)
        # each head's values pushed through W_O, the norms' linear parts and the FFN's first matrices: Q (b, n, H, k).
        # Per head (b·n·H·d·k) for a few tokens; through the product M^h = W_O^h · L · W1 (d·d·k, then b·n·d·k)
        # when the batch has more tokens than d/(H-1). Both are exact.
        if b * n * (heads - 1) > d:
            w_heads = w_o.reshape(heads, head_dim, d)
            if layout.attention_post_norm:
                w_heads = post.linear(w_heads)
            Q = torch.einsum("bnhe,hek->bnhk", values, lin(w_heads) @ w1)
        else:
            Q = lin(U) @ w1
        R = lin(x) @ w1  # (b, n, k): the residual's own part
        z_bias = lin(atb_bias) * f_scale[..., None] + (pre.constant(x) if mode == "norm" else 0)
    p_bias = z_bias @ w1 + b1
    p_real = ffn_input @ w1 + b1  # the model's own pre-activations, from its FFN input
    if adapter.gated:
        coef_a, coef_u = gated_ig_coefficients(act, p_real[..., :d_ff], p_real[..., d_ff:])
        hidden_bias = p_bias[..., :d_ff] * coef_a + p_bias[..., d_ff:] * coef_u
    else:
        ratio = elementwise_ig_ratio(t.coefficients.reshape(*lead, d_ff).float(), p_real)
        hidden_bias = p_bias * ratio
    w2 = adapter.values(layer).float().contiguous()  # (d_ff, d)
    b2 = adapter.value_bias(layer)
    ff_bias = hidden_bias @ w2 + (0 if b2 is None else b2.float())
    bias = {"ATB": atb_bias, "preactivation": p_bias, "hidden": hidden_bias, "ATBFF": ff_bias}
    if "ATBLN" in stages:
        bias["ATBLN"] = z_bias
    block_out = ff_bias
    if family.post_ffn_norm:  # Gemma 2/3, OLMo 2: a norm on the FFN output before the add
        post_ff = NormSplit.of(_module(block, family.post_ffn_norm), family.gemma_norm)
        pf_scale = 1.0 / post_ff.statistic(down_out)
        block_out = bias["ATBFFLN"] = post_ff.linear(ff_bias) * pf_scale[..., None] + post_ff.constant(x)
    bias["ATBFFRES"] = atb_bias + block_out
    if "ATBFFRESLN" in stages:
        nxt = NormSplit.of(_next_norm(adapter, layout, layer), family.gemma_norm)
        nx_scale = 1.0 / nxt.statistic(t.residual_after)
        bias["ATBFFRESLN"] = nxt.linear(bias["ATBFFRES"]) * nx_scale[..., None] + nxt.constant(x)

    # sentence by sentence, in chunks of query rows i0..i1 against the input tokens j < i1 (causal: nothing
    # beyond i, so only the chunk's own upper corner is computed for nothing): the attention part per head, then
    # the FFN's first matrices, the activation's IG shares, the down-projection, then the rest
    lengths = valid.sum(1).tolist()
    all_maps = torch.zeros(len(stages), b, n, n, device=x.device)  # one tensor: one norm and one copy per chunk
    sums = {name: torch.zeros_like(value) for name, value in bias.items()} if check else {}
    stage_sums = torch.zeros(len(stages), b, n, d, device=x.device) if check else None
    vectors = {stage: torch.zeros(b, n, n, d, device=x.device) for stage in stages} if keep_vectors else None
    for row in range(b):
        length = lengths[row]
        rows_per_chunk = max(1, min(_ROWS_PER_CHUNK, chunk_elements // max(1, length * max(k, d))))
        for i0 in range(0, length, rows_per_chunk):
            i1 = min(length, i0 + rows_per_chunk)
            rows = torch.arange(i1 - i0, device=x.device)
            cols = i0 + rows  # the diagonal j = i of this chunk
            # key-major layout (j, i, ·): each key's heads mix into the chunk's rows as one small batched product
            weights = A[row, :, i0:i1, :i1].permute(2, 1, 0).contiguous()  # (J, c, H)
            out: dict[str, torch.Tensor] = {}
            atb = torch.bmm(weights * atb_scale[row, None, i0:i1, None], U[row, :i1])  # (J, c, d)
            atb[cols, rows] += x[row, i0:i1]
            out["ATB"] = atb
            if mode == "norm":
                out["ATBLN"] = pre.scaled(atb, f_scale[row, None, i0:i1].expand(i1, -1))
            if mode == "token":
                P = torch.zeros(i1, i1 - i0, k, device=x.device)
                P[cols, rows] = R[row, i0:i1]
            else:
                P = torch.bmm(weights * (atb_scale * f_scale)[row, None, i0:i1, None], Q[row, :i1])  # (J, c, k)
                P[cols, rows] += R[row, i0:i1] * f_scale[row, i0:i1, None]
            if adapter.gated:
                S = torch.addcmul(P[..., d_ff:] * coef_u[row, None, i0:i1], P[..., :d_ff], coef_a[row, None, i0:i1])
            else:
                S = P * ratio[row, None, i0:i1]
            if check:
                sums["preactivation"][row, i0:i1] = P.sum(0)
                sums["hidden"][row, i0:i1] = S.sum(0)
            del P
            ff = out["ATBFF"] = S @ w2
            del S
            if family.post_ffn_norm:
                ff = out["ATBFFLN"] = post_ff.scaled(ff, pf_scale[row, None, i0:i1].expand(i1, -1))
            res = out["ATBFFRES"] = atb + ff
            if "ATBFFRESLN" in stages:
                out["ATBFFRESLN"] = nxt.scaled(res, nx_scale[row, None, i0:i1].expand(i1, -1))
            stacked = torch.stack([out[stage] for stage in stages])  # (stages, J, c, d)
            all_maps[:, row, i0:i1, :i1] = torch.linalg.vector_norm(stacked, dim=-1).transpose(1, 2)
            if check:
                stage_sums[:, row, i0:i1] = stacked.sum(1)
            if keep_vectors:
                for stage in stages:
                    vectors[stage][row, i0:i1, :i1] = out[stage].transpose(0, 1)
    # a chunk's corner j > i holds exact zeros (the attention weights are 0 there), as the maps need
    maps = dict(zip(stages, all_maps))
    if check:
        sums.update(zip(stages, stage_sums))
    errors = []
    if check:
        real = {"ATB": t.residual_before, "ATBLN": ffn_input, "preactivation": p_real,
                "hidden": t.coefficients.reshape(*lead, d_ff), "ATBFF": down_out, "ATBFFLN": t.ffn_output,
                "ATBFFRES": t.residual_after, "ATBFFRESLN": t.next}
        for name in CHECKED:
            if name not in sums:
                continue
            expected = real[name].reshape(*lead, -1).float()[valid]
            got = (sums[name] + bias[name])[valid]
            errors.append({"stage": name, "max_abs_error": float((got - expected).abs().max()),
                           "scale": float(expected.abs().max())})
    stage_bias = {stage: bias[stage] for stage in stages} if keep_vectors else None
    return maps, vectors, stage_bias, errors


# ---- sentences, tokens and words ------------------------------------------------------------------------------
_WORD = re.compile(r"\w+")


def token_table(loaded, texts: Sequence[str]) -> pd.DataFrame:
    """One row per token of each text as the model reads it (BOS included): ``sentence``, ``position``,
    ``token_id``, ``token`` (decoded alone), ``start``/``end`` (character offsets from the tokenizer; -1 for BOS),
    ``word`` (index of the ``\\w+`` run the token's first word character falls in; -1 for none), ``capitalised``
    (that word starts with a capital letter) and ``span`` (index of the run of two or more consecutive capitalised
    words, separated by spaces only, that the word belongs to; -1 for none)."""
    bos = list(getattr(loaded, "bos", []))
    encoded = loaded.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    rows = []
    for sentence, (text, ids, offsets) in enumerate(zip(texts, encoded["input_ids"], encoded["offset_mapping"])):
        char_word = np.full(len(text) + 1, -1)
        words = list(_WORD.finditer(text))
        for w, match in enumerate(words):
            char_word[match.start():match.end()] = w
        capital = [m.group()[0].isupper() for m in words]
        span_of, span, current = [-1] * len(words), -1, []
        for w in range(len(words) + 1):  # runs of capitalised words joined by whitespace only
            joined = (w < len(words) and capital[w] and current
                      and not text[words[w - 1].end():words[w].start()].strip())
            if joined:
                current.append(w)
                continue
            if len(current) >= 2:
                span += 1
                for member in current:
                    span_of[member] = span
            current = [w] if w < len(words) and capital[w] else []
        tokens = loaded.token_strings(bos + list(ids))
        for position, token_id in enumerate(bos + list(ids)):
            if position < len(bos):
                rows.append((sentence, position, token_id, tokens[position], -1, -1, -1, False, -1))
                continue
            start, end = offsets[position - len(bos)]
            inside = char_word[start:end]
            inside = inside[inside >= 0]
            word = int(inside[0]) if len(inside) else -1
            rows.append((sentence, position, int(token_id), tokens[position], int(start), int(end), word,
                         bool(capital[word]) if word >= 0 else False, span_of[word] if word >= 0 else -1))
    return pd.DataFrame(rows, columns=["sentence", "position", "token_id", "token", "start", "end", "word",
                                       "capitalised", "span"])


def sample_sentences(loaded, n_sentences: int, seed: int = 0, min_tokens: int = 8, max_tokens: int = 40,
                     corpus="wiki", split: str = "heldout") -> pd.DataFrame:
    """``n_sentences`` sentences of the corpus (held-out split by default, shuffled by ``seed``) whose token count
    as the model reads them is in ``[min_tokens, max_tokens]``: ``sentence_id``, ``text``, ``n_tokens``."""
    from ..corpus import load_corpus

    n_sentences = _check_positive_int("n_sentences", n_sentences)
    min_tokens, max_tokens = _check_positive_int("min_tokens", min_tokens), _check_positive_int("max_tokens", max_tokens)
    if min_tokens > max_tokens:
        raise ParameterError(f"min_tokens={min_tokens} is larger than max_tokens={max_tokens}.")
    table = load_corpus(corpus, split=split, seed=seed, max_sentences=max(4 * n_sentences, 200))
    lengths = np.array([len(ids) for ids in loaded.tokenizer(table["text"].tolist(), add_special_tokens=False)[
        "input_ids"]]) + len(getattr(loaded, "bos", []))
    keep = table[(lengths >= min_tokens) & (lengths <= max_tokens)].assign(
        n_tokens=lengths[(lengths >= min_tokens) & (lengths <= max_tokens)])
    if len(keep) < n_sentences:
        raise CorpusError(f"Only {len(keep)} of {len(table)} {split} sentences have {min_tokens}-{max_tokens} tokens; "
                          f"ask for fewer sentences or widen the range.")
    return keep.head(n_sentences)[["sentence_id", "text", "n_tokens"]].reset_index(drop=True)


# ---- the maps of many sentences, persisted ---------------------------------------------------------------------
@dataclass
class MapsResult:
    """Contribution maps of many sentences.

    ``maps``: one row per (sentence, layer, i, j ≤ i) with one float32 column per stage (the raw norms
    ``‖y_{i←j}‖``; NaN where the layer has no such stage). ``tokens``: :func:`token_table` of the sentences.
    ``sentences``: ``sentence``, ``sentence_id``, ``text``, ``n_tokens``. ``checks``: per (layer, stage), the
    largest relative completeness error over all sentences. ``manifest``: what produced it, with the stages of
    every layer (``manifest["stages"]``).
    """

    maps: pd.DataFrame
    tokens: pd.DataFrame
    sentences: pd.DataFrame
    checks: pd.DataFrame
    manifest: dict
    cached: bool = False
    info: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return [int(layer) for layer in self.manifest["layers"]]

    def stages(self, layer: int) -> tuple[str, ...]:
        return tuple(self.manifest["stages"][str(layer)])


def _batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Sentence indices in batches of at most ``batch_tokens`` padded tokens, shortest first (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda k: (lengths[k], k))
    batches, current = [], []
    for k in order:
        if current and (len(current) + 1) * lengths[k] > batch_tokens:
            batches.append(current)
            current = []
        current.append(k)
    return batches + ([current] if current else [])


def _batch_frame(decomposition: Decomposition, sentences: Sequence[int]) -> pd.DataFrame:
    """The decomposition's maps as rows (sentence, layer, i, j ≤ i, one column per stage)."""
    lengths = decomposition.lengths
    parts = []
    for row, sentence in enumerate(sentences):
        i, j = np.tril_indices(lengths[row])
        for layer in decomposition.layers:
            columns = {"sentence": np.full(len(i), sentence, dtype=np.int32),
                       "layer": np.full(len(i), layer, dtype=np.int16),
                       "i": i.astype(np.int16), "j": j.astype(np.int16)}
            for stage in STAGES:
                if stage in decomposition.maps[layer]:
                    columns[stage] = decomposition.maps[layer][stage][row, i, j].cpu().numpy().astype(np.float32)
                else:
                    columns[stage] = np.full(len(i), np.nan, dtype=np.float32)
            parts.append(pd.DataFrame(columns))
    return pd.concat(parts, ignore_index=True)


def sentence_maps(loaded, sentences, layers: Iterable[int] | int | None = None, batch_tokens: int = 512,
                  max_tokens: int = MAX_TOKENS, check: bool = True, out_dir: str | Path | None = None,
                  progress: bool = True, chunk_elements: int = CHUNK_ELEMENTS) -> MapsResult:
    """The contribution maps of every stage, layer and sentence (see :class:`MapsResult`).

    ``sentences``: a table with a ``text`` column (as :func:`sample_sentences` returns) or a list of texts.
    Sentences are batched by length (at most ``batch_tokens`` padded tokens per batch). ``out_dir``: each
    finished batch is checkpointed there (an interrupted run resumes with identical results) and the finished
    result is saved with a manifest and reused when the same request comes again (the function says so).
    """
    adapter, _ = _adapter_and_model(loaded)
    layout_of(adapter)
    layer_list = adapter.check_layers(layers)
    batch_tokens = _check_positive_int("batch_tokens", batch_tokens)
    max_tokens = _check_positive_int("max_tokens", max_tokens)
    if isinstance(sentences, pd.DataFrame):
        if "text" not in sentences.columns:
            raise ParameterError(f"The sentence table needs a 'text' column; it has {list(sentences.columns)}.")
        table = sentences.reset_index(drop=True)
    else:
        table = pd.DataFrame({"text": list(sentences)})
    if table.empty:
        raise ParameterError("No sentences given.")
    if "sentence_id" not in table.columns:
        table = table.assign(sentence_id=np.arange(len(table)))
    texts = table["text"].tolist()
    token_ids = _token_lists(loaded, texts, max_tokens)
    sentence_table = pd.DataFrame({"sentence": np.arange(len(texts)), "sentence_id": table["sentence_id"].to_numpy(),
                                   "text": texts, "n_tokens": [len(ids) for ids in token_ids]})
    tokens = token_table(loaded, texts)
    manifest = {"analysis": "kobayashi2024-contribution-maps", "version": _VERSION, "model": loaded.name,
                "weights": loaded.file_hash, "layers": layer_list, "check": bool(check),
                "texts": fingerprint(texts), "n_sentences": len(texts),
                "stages": {str(layer): list(stages_of(adapter, layer)) for layer in layer_list}}
    name = f"contribution-maps-{fingerprint(manifest)}"
    if out_dir is not None:
        cached = load_result(out_dir, name, manifest)
        checks = load_result(out_dir, f"{name}-checks", manifest)
        if cached is not None and checks is not None:
            if progress:
                print(f"[ffnlib] reusing cached contribution maps {Path(out_dir) / name}.parquet "
                      f"({len(texts)} sentences; same request)")
            return MapsResult(cached, tokens, sentence_table, checks, manifest, cached=True)
    batches = _batches([len(ids) for ids in token_ids], batch_tokens)
    partial = Path(out_dir) / f"{name}.partial" if out_dir is not None else None
    parts, check_parts, resumed = [], [], 0
    for index, batch in enumerate(tqdm(batches, desc="contribution maps", disable=not progress)):
        # each finished batch is a checkpoint with its own checksummed manifest
        checkpoint = {**manifest, "batch": index, "batch_sentences": batch}
        if partial is not None:
            part = load_result(partial, f"batch-{index:05d}", checkpoint)
            part_checks = load_result(partial, f"checks-{index:05d}", checkpoint)
            if part is not None and part_checks is not None:
                parts.append(part)
                check_parts.append(part_checks)
                resumed += 1
                continue
        decomposition = decompose(loaded, [token_ids[k] for k in batch], layer_list, check=check,
                                  max_tokens=max_tokens, chunk_elements=chunk_elements)
        part = _batch_frame(decomposition, batch)
        part_checks = decomposition.checks if check else pd.DataFrame(
            columns=["layer", "stage", "max_abs_error", "scale", "relative_error"])
        if partial is not None:
            save_result(partial, f"checks-{index:05d}", part_checks, checkpoint)
            save_result(partial, f"batch-{index:05d}", part, checkpoint)
        parts.append(part)
        check_parts.append(part_checks)
    frame = pd.concat(parts, ignore_index=True).sort_values(["sentence", "layer", "i", "j"], kind="stable")
    frame = frame.reset_index(drop=True)
    checks = pd.concat(check_parts, ignore_index=True)
    if len(checks):
        checks = (checks.groupby(["layer", "stage"], sort=True)
                  .agg(max_abs_error=("max_abs_error", "max"), scale=("scale", "max"),
                       relative_error=("relative_error", "max")).reset_index())
    if out_dir is not None:
        save_result(out_dir, f"{name}-checks", checks, manifest)
        save_result(out_dir, name, frame, manifest)
        shutil.rmtree(partial, ignore_errors=True)
        if progress and resumed:
            print(f"[ffnlib] resumed: {resumed} of {len(batches)} batches came from checkpoints in {partial}")
    return MapsResult(frame, tokens, sentence_table, checks, manifest, info={"batches": len(batches),
                                                                              "resumed": resumed})


# ---- measures ----------------------------------------------------------------------------------------------------
NORMALISE = ("row", "none")
CLASSES = ("subword", "capitalised span", "frequent bigram", "other")


def _check_normalise(normalise: str) -> str:
    if normalise not in NORMALISE:
        raise ParameterError(f"normalise must be one of {NORMALISE}, got {normalise!r}.")
    return normalise


def _row_starts(frame: pd.DataFrame, keys: Sequence[str]) -> np.ndarray:
    """Where each run of equal ``keys`` starts in ``frame`` (sorted by them)."""
    change = np.zeros(len(frame), dtype=bool)
    change[0] = True
    for key in keys:
        values = frame[key].to_numpy()
        change[1:] |= values[1:] != values[:-1]
    return np.flatnonzero(change)


def normalised_maps(result: MapsResult, normalise: str = "row") -> pd.DataFrame:
    """The maps with each query row divided by its sum (``normalise="row"``: how query ``i`` shares itself among
    the input tokens), or as they are (``"none"``); the same columns as ``result.maps``."""
    frame = result.maps
    if _check_normalise(normalise) == "none" or frame.empty:
        return frame.copy()
    starts = _row_starts(frame, ("sentence", "layer", "i"))
    sizes = np.diff(np.append(starts, len(frame)))
    out = frame[["sentence", "layer", "i", "j"]].copy()
    for stage in STAGES:
        values = frame[stage].to_numpy(dtype=np.float64)
        sums = np.add.reduceat(np.nan_to_num(values), starts)
        out[stage] = values / np.repeat(np.where(sums > 0, sums, 1.0), sizes)
    return out


def _spearman(frame: pd.DataFrame, x: np.ndarray, y: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Spearman ρ of x and y within each run starting at ``starts`` (average ranks for ties; NaN for a run that
    is constant in x or y)."""
    group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(frame))))
    rx = pd.Series(x).groupby(group).rank().to_numpy()
    ry = pd.Series(y).groupby(group).rank().to_numpy()
    return _pearson(rx, ry, starts)


def _pearson(x: np.ndarray, y: np.ndarray, starts: np.ndarray) -> np.ndarray:
    sizes = np.diff(np.append(starts, len(x)))
    sx, sy = np.add.reduceat(x, starts), np.add.reduceat(y, starts)
    sxy, sxx, syy = np.add.reduceat(x * y, starts), np.add.reduceat(x * x, starts), np.add.reduceat(y * y, starts)
    cov = sxy - sx * sy / sizes
    var = (sxx - sx * sx / sizes) * (syy - sy * sy / sizes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 1e-24, cov / np.sqrt(np.clip(var, 1e-300, None)), np.nan)


CORRELATE = ("map", "row")


def _check_correlate(correlate: str) -> str:
    if correlate not in CORRELATE:
        raise ParameterError(f"correlate must be one of {CORRELATE}, got {correlate!r}.")
    return correlate


def _rank_correlation(frame: pd.DataFrame, x: np.ndarray, y: np.ndarray, correlate: str = "map") -> np.ndarray:
    """Spearman ρ of two maps for every (sentence, layer) of ``frame`` (sorted by sentence, layer, i, j):
    ``"map"``: over the flattened map (entries ``j ≤ i``); ``"row"``: within each query row with at least three
    entries, averaged over those rows (a causal map's rows have different lengths, which a flattened normalised
    map mixes into the ranks)."""
    layer_starts = _row_starts(frame, ("sentence", "layer"))
    if _check_correlate(correlate) == "map":
        return _spearman(frame, x, y, layer_starts)
    rows = _row_starts(frame, ("sentence", "layer", "i"))
    rho = _spearman(frame, x, y, rows)
    sizes = np.diff(np.append(rows, len(frame)))
    owner = np.searchsorted(layer_starts, rows, side="right") - 1  # the (sentence, layer) of each row
    use = (sizes >= 3) & np.isfinite(rho)
    total = np.bincount(owner[use], weights=rho[use], minlength=len(layer_starts))
    count = np.bincount(owner[use], minlength=len(layer_starts))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _pearson_groups(x: np.ndarray, y: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Pearson r of x and y within each group (ids 0..n_groups-1; NaN for a group with fewer than 2 entries or
    no variance)."""
    def total(values):
        return np.bincount(group, weights=values, minlength=n_groups)

    size = np.bincount(group, minlength=n_groups).astype(float)
    sx, sy, sxy, sxx, syy = total(x), total(y), total(x * y), total(x * x), total(y * y)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / size
        var = (sxx - sx * sx / size) * (syy - sy * sy / size)
        return np.where((size > 1) & (var > 1e-24), cov / np.sqrt(np.clip(var, 1e-300, None)), np.nan)


def _bootstrap_index(n_sentences: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_sentences, size=(n_boot, n_sentences))


def _interval(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return float("nan"), float("nan")
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def _layer_groups(frame: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Run starts of (sentence, layer) in a frame sorted by sentence, layer, i, j, and the runs' keys."""
    starts = _row_starts(frame, ("sentence", "layer"))
    keys = frame.iloc[starts][["sentence", "layer"]].reset_index(drop=True)
    return starts, keys


def _components(result: MapsResult) -> list[tuple[str, str, str]]:
    """(component, before, after) for every consecutive pair of stages any layer has, plus the whole FF block."""
    seen = []
    for layer in result.layers:
        stages = result.stages(layer)
        for before, after in zip(stages[:-1], stages[1:]):
            item = (COMPONENTS[(before, after)], before, after)
            if item not in seen:
                seen.append(item)
        block = ("FF block (FF, norms, RES)", before_ff(stages), stages[-1])
        if block not in seen:
            seen.append(block)
    return seen


def contextualization_per_sentence(result: MapsResult, normalise: str = "row", correlate: str = "map"
                                   ) -> pd.DataFrame:
    """``1 − ρ`` (Spearman, see ``correlate`` in :func:`_rank_correlation`) for every sentence, layer and
    component: ``sentence``, ``layer``, ``component``, ``before``, ``after``, ``change``."""
    _check_correlate(correlate)
    norm = normalised_maps(result, normalise)
    starts, keys = _layer_groups(norm)
    parts = []
    for component, before, after in _components(result):
        x, y = norm[before].to_numpy(), norm[after].to_numpy()
        rho = _rank_correlation(norm, x, y, correlate)
        present = ~np.isnan(x[starts]) & ~np.isnan(y[starts])  # a layer without one of the stages has NaN there
        part = keys[present].assign(component=component, before=before, after=after,
                                    change=1.0 - rho[present])
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def contextualization_change(result: MapsResult, normalise: str = "row", correlate: str = "map",
                             n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Contextualisation change by each component, per layer: ``1 − Spearman ρ`` between the maps before and
    after it, averaged over sentences, with a 95% interval (seeded bootstrap over sentences). Columns: ``layer``,
    ``component``, ``before``, ``after``, ``change``, ``low``, ``high``, ``n_sentences``."""
    per = contextualization_per_sentence(result, normalise, correlate)
    n_boot = _check_positive_int("n_boot", n_boot)
    rows = []
    index = _bootstrap_index(len(result.sentences), n_boot, seed)
    for (layer, component), group in per.groupby(["layer", "component"], sort=False):
        values = np.full(len(result.sentences), np.nan)
        values[group["sentence"].to_numpy()] = group["change"].to_numpy()
        low, high = _interval(np.nanmean(values[index], axis=1))
        rows.append({"layer": int(layer), "component": component, "before": group["before"].iat[0],
                     "after": group["after"].iat[0], "change": float(np.nanmean(values)), "low": low,
                     "high": high, "n_sentences": int(np.isfinite(values).sum())})
    return pd.DataFrame(rows).sort_values(["layer"], kind="stable").reset_index(drop=True)


# ---- FF-amplified pairs ----------------------------------------------------------------------------------------
def corpus_bigrams(loaded, texts: Sequence[str], min_count: int = 5, min_pmi: float = 3.0) -> pd.DataFrame:
    """Frequent, collocated token bigrams of a corpus: adjacent token pairs (as the tokenizer splits the texts,
    no BOS) seen at least ``min_count`` times with PMI ``log2(p(ab) / (p(a) p(b)))`` at least ``min_pmi``.
    Columns: ``first``, ``second`` (token ids), ``count``, ``pmi``, ``bigram`` (decoded)."""
    min_count = _check_positive_int("min_count", min_count)
    if not texts:
        raise ParameterError("corpus_bigrams needs some texts.")
    encoded = loaded.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    vocab = max(len(loaded.tokenizer), 1 + max((max(ids) for ids in encoded if ids), default=0))
    unigrams = np.bincount(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded if ids]),
                           minlength=vocab)
    keys = np.concatenate([np.asarray(ids[:-1], dtype=np.int64) * vocab + np.asarray(ids[1:], dtype=np.int64)
                           for ids in encoded if len(ids) > 1])
    pairs, counts = np.unique(keys, return_counts=True)
    first, second = pairs // vocab, pairs % vocab
    total_pairs, total_tokens = counts.sum(), unigrams.sum()
    pmi = np.log2(counts / total_pairs) - np.log2(unigrams[first] / total_tokens) - np.log2(
        unigrams[second] / total_tokens)
    keep = (counts >= min_count) & (pmi >= min_pmi)
    frame = pd.DataFrame({"first": first[keep], "second": second[keep], "count": counts[keep], "pmi": pmi[keep]})
    frame["bigram"] = [loaded.tokenizer.decode([int(a), int(b)]) for a, b in zip(frame["first"], frame["second"])]
    return frame.sort_values("count", ascending=False, kind="stable").reset_index(drop=True)


def _pair_key(sentence, i, j) -> np.ndarray:
    return (np.asarray(sentence, dtype=np.int64) << 16) | (np.asarray(i, dtype=np.int64) << 8) | np.asarray(j, np.int64)


def classify_pairs(result: MapsResult, bigrams: pd.DataFrame | None = None, exclude_first: bool = True) -> pd.DataFrame:
    """Every candidate pair (query ``i``, input token ``j < i``) of every sentence, with its class: ``subword``
    (both tokens in one word, from the tokenizer's offsets), ``capitalised span`` (tokens of two different words
    of one run of capitalised words), ``frequent bigram`` (adjacent tokens forming a pair of ``bigrams``) or
    ``other``, checked in that order. Self-pairs are never candidates; ``exclude_first`` also leaves out input
    position 0 (BOS, or the first token where the model has none: an attention sink).
    Columns: ``sentence``, ``i``, ``j``, ``distance``, ``pair_class``."""
    tokens = result.tokens
    parts = []
    first = 1 if exclude_first else 0
    for sentence, n in zip(result.sentences["sentence"], result.sentences["n_tokens"]):
        i, j = np.tril_indices(int(n), -1)
        keep = j >= first
        parts.append((np.full(keep.sum(), sentence), i[keep], j[keep]))
    sentence = np.concatenate([p[0] for p in parts]).astype(np.int64)
    i = np.concatenate([p[1] for p in parts]).astype(np.int64)
    j = np.concatenate([p[2] for p in parts]).astype(np.int64)
    offsets = np.zeros(len(result.sentences) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(result.sentences["n_tokens"].to_numpy())
    ordered = tokens.sort_values(["sentence", "position"], kind="stable")
    word, span, token_id = (ordered[c].to_numpy() for c in ("word", "span", "token_id"))
    row_i, row_j = offsets[sentence] + i, offsets[sentence] + j
    subword = (word[row_i] == word[row_j]) & (word[row_i] >= 0)
    in_span = (span[row_i] == span[row_j]) & (span[row_i] >= 0) & ~subword
    bigram = np.zeros(len(i), dtype=bool)
    if bigrams is not None and len(bigrams):
        vocab = int(max(token_id.max(), bigrams["first"].max(), bigrams["second"].max())) + 1
        known = bigrams["first"].to_numpy(np.int64) * vocab + bigrams["second"].to_numpy(np.int64)
        bigram = (i - j == 1) & np.isin(token_id[row_j].astype(np.int64) * vocab + token_id[row_i], known)
    bigram &= ~subword & ~in_span
    pair_class = np.select([subword, in_span, bigram], list(CLASSES[:3]), CLASSES[3])
    return pd.DataFrame({"sentence": sentence, "i": i, "j": j, "distance": i - j, "pair_class": pair_class})


def amplification(result: MapsResult, normalise: str = "row") -> pd.DataFrame:
    """FF-amplification of every map entry: the normalised map after the FFN (ATBFF) minus the one it reads
    (ATBLN, or ATB where the FFN has no input norm). Columns ``sentence``, ``layer``, ``i``, ``j``, ``before``,
    ``after``, ``amp``."""
    norm = normalised_maps(result, normalise)
    with_ln = [layer for layer in result.layers if before_ff(result.stages(layer)) == "ATBLN"]
    use_ln = norm["layer"].isin(with_ln).to_numpy()
    before = np.where(use_ln, norm["ATBLN"].to_numpy(), norm["ATB"].to_numpy())
    after = norm["ATBFF"].to_numpy()
    return pd.DataFrame({"sentence": norm["sentence"], "layer": norm["layer"], "i": norm["i"], "j": norm["j"],
                         "before": before, "after": after, "amp": after - before})


def amplified_pairs(result: MapsResult, bigrams: pd.DataFrame | None = None, top_k: int = 3,
                    exclude_first: bool = True, normalise: str = "row") -> pd.DataFrame:
    """The ``top_k`` candidate pairs (see :func:`classify_pairs`) per sentence and layer whose normalised weight
    the FFN raises most (positive amplification only), with their class and tokens: ``sentence``, ``layer``,
    ``i``, ``j``, ``query``, ``key``, ``before``, ``after``, ``amp``, ``distance``, ``pair_class``, ``rank``."""
    top_k = _check_positive_int("top_k", top_k)
    amp = amplification(result, normalise)
    candidates = classify_pairs(result, bigrams, exclude_first)
    keys = pd.Index(_pair_key(candidates["sentence"], candidates["i"], candidates["j"]))
    where = keys.get_indexer(_pair_key(amp["sentence"], amp["i"], amp["j"]))
    keep = (where >= 0) & (amp["amp"].to_numpy() > 0)
    amp, where = amp[keep], where[keep]
    amp = amp.assign(distance=candidates["distance"].to_numpy()[where],
                     pair_class=candidates["pair_class"].to_numpy()[where])
    top = (amp.sort_values(["sentence", "layer", "amp"], ascending=[True, True, False], kind="stable")
           .groupby(["sentence", "layer"], sort=False).head(top_k).copy())
    top["rank"] = top.groupby(["sentence", "layer"], sort=False).cumcount()
    token = result.tokens.set_index(["sentence", "position"])["token"]
    top["query"] = token.reindex(pd.MultiIndex.from_arrays([top["sentence"], top["i"]])).to_numpy()
    top["key"] = token.reindex(pd.MultiIndex.from_arrays([top["sentence"], top["j"]])).to_numpy()
    columns = ["sentence", "layer", "i", "j", "query", "key", "before", "after", "amp", "distance", "pair_class",
               "rank"]
    return top[columns].reset_index(drop=True)


def amplified_classes(result: MapsResult, bigrams: pd.DataFrame | None = None, top_k: int = 3,
                      exclude_first: bool = True, normalise: str = "row", layers: Iterable[int] | None = None,
                      by_layer: bool = False, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The classes of the FF-amplified pairs against their base rates.

    ``top_share``: the share of each class among the top-``top_k`` pairs of every sentence and layer (each
    sentence weighs the same); ``base_rate``: its share among all candidate pairs (the control; each sentence
    weighs the same); ``matched_rate``: the base rate at the top pairs' distances ``i − j`` (a stricter control:
    amplified pairs are often adjacent, and so are sub-word pieces). 95% intervals by a seeded bootstrap over
    sentences, and the interval of the paired difference ``top_share − base_rate``; ``n_top_pairs``,
    ``n_candidates`` and ``n_sentences`` count what they rest on. ``by_layer``: one row per (layer, class).
    ``layers``: the layers whose top pairs count (default all).

    In a parallel block (GPT-J, GPT-NeoX with ``use_parallel_residual``) the FFN reads the block's input, not the
    attention's output, so its map adds weight to each token itself only: no pair ``j < i`` is FF-amplified, the
    rows' ``n_top_pairs`` are 0 and their shares NaN (the findings are then "not measured").
    """
    n_boot = _check_positive_int("n_boot", n_boot)
    top = amplified_pairs(result, bigrams, top_k, exclude_first, normalise)
    if layers is not None:
        top = top[top["layer"].isin(list(layers))]
    candidates = classify_pairs(result, bigrams, exclude_first)
    n_sent = len(result.sentences)
    max_distance = int(result.sentences["n_tokens"].max())
    class_code = {c: k for k, c in enumerate(CLASSES)}
    cand = np.zeros((n_sent, max_distance + 1, len(CLASSES)))
    np.add.at(cand, (candidates["sentence"].to_numpy(), candidates["distance"].to_numpy(),
                     candidates["pair_class"].map(class_code).to_numpy()), 1)
    index = _bootstrap_index(n_sent, n_boot, seed)
    if by_layer:  # every layer gets its rows, also one where no pair is FF-amplified (its shares are NaN)
        shown = [layer for layer in result.layers if layers is None or layer in set(layers)]
        groups = [(layer, top[top["layer"] == layer]) for layer in shown]
    else:
        groups = [(None, top)]
    rows = []
    for layer, part in groups:
        hits = np.zeros((n_sent, max_distance + 1, len(CLASSES)))
        np.add.at(hits, (part["sentence"].to_numpy(), part["distance"].to_numpy(),
                         part["pair_class"].map(class_code).to_numpy()), 1)
        stats = _class_statistics(hits, cand, np.arange(n_sent)[None, :])
        boot = _class_statistics(hits, cand, index)
        for c, name in enumerate(CLASSES):
            row = {"layer": layer, "pair_class": name} if by_layer else {"pair_class": name}
            for key in ("top_share", "base_rate", "matched_rate"):
                row[key] = float(stats[key][0, c])
                row[f"{key.split('_')[0]}_low"], row[f"{key.split('_')[0]}_high"] = _interval(boot[key][:, c])
            row["difference_low"], row["difference_high"] = _interval(boot["top_share"][:, c] - boot["base_rate"][:, c])
            row["enrichment"] = row["top_share"] / row["base_rate"] if row["base_rate"] > 0 else float("nan")
            row["n_top_pairs"] = int(hits[:, :, c].sum())
            row["n_candidates"] = int(cand[:, :, c].sum())
            row["n_sentences"] = n_sent
            rows.append(row)
    return pd.DataFrame(rows)


def _class_statistics(hits: np.ndarray, cand: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
    """Per resample (rows of ``index``): mean over sentences of each sentence's class shares among its top pairs
    and among its candidates, and the distance-matched base rate. ``hits``/``cand``: (sentence, distance, class)
    counts of the top pairs and of all candidate pairs."""
    def shares(counts):  # per-sentence shares along the last axis, NaN for a sentence without pairs
        total = counts.sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, counts / total, np.nan)

    with warnings.catch_warnings():  # a resample whose sentences have no top pair here gives NaN, as it should
        warnings.simplefilter("ignore", RuntimeWarning)
        top_share = np.nanmean(shares(hits.sum(1))[index], axis=1)
        base_rate = np.nanmean(shares(cand.sum(1))[index], axis=1)
        # distance-matched: Σ_d P_top(d) · P(class | d), with P(class | d) pooled over the resampled sentences
        p_top_d = np.nanmean(shares(hits.sum(2))[index], axis=1)  # (B, D)
    weights = np.stack([np.bincount(row, minlength=cand.shape[0]) for row in index])  # (B, S) resample counts
    cand_d = np.einsum("bs,sdc->bdc", weights, cand)  # (B, D, C)
    p_class_d = np.nan_to_num(shares(cand_d))
    matched = np.einsum("bd,bdc->bc", np.nan_to_num(p_top_d), p_class_d)
    return {"top_share": top_share, "base_rate": base_rate, "matched_rate": matched}


# ---- cancellation ----------------------------------------------------------------------------------------------
def cancellation_per_sentence(result: MapsResult, normalise: str = "row", correlate: str = "map",
                              seed: int = 0) -> pd.DataFrame:
    """Per sentence and layer, with ``N0`` the map the FFN reads, ``N1`` its output's map and ``N2`` the layer's
    last map (after RES and the next norm; after RES where the layer has no next norm): ``change_ff`` =
    1 − ρ(N0, N1), ``change_res`` = 1 − ρ(N0, map after RES), ``change_block`` = 1 − ρ(N0, N2) (Spearman, see
    :func:`_rank_correlation`); ``pair_correlation``: the Pearson correlation, over the map entries ``j < i`` (self
    entries left out), of the FFN's change ``N1 − N0`` with the later components' change ``N2 − N1`` (negative:
    they push back pair by pair);
    ``control_correlation``: the same with the FFN's change shuffled among the off-diagonal entries of each query
    row (seeded; the self entry keeps its own), which keeps its size and each row's total but not which pairs
    it concerns."""
    norm = normalised_maps(result, normalise)
    _, keys = _layer_groups(norm)
    n0 = amplification(result, normalise)["before"].to_numpy()
    n1 = norm["ATBFF"].to_numpy()
    res = norm["ATBFFRES"].to_numpy()
    last = norm["ATBFFRESLN"].to_numpy().copy()
    missing = np.isnan(last)
    last[missing] = res[missing]
    change, rest = n1 - n0, last - n1
    rng = np.random.default_rng(seed)
    rows = _row_starts(norm, ("sentence", "layer", "i"))
    row_group = np.repeat(np.arange(len(rows)), np.diff(np.append(rows, len(norm))))
    diagonal = norm["i"].to_numpy() == norm["j"].to_numpy()
    order = np.lexsort((rng.random(len(norm)), diagonal, row_group))  # a random order within (row, diagonal)
    shuffled = np.empty_like(change)
    shuffled[np.lexsort((np.arange(len(norm)), diagonal, row_group))] = change[order]
    starts = _row_starts(norm, ("sentence", "layer"))
    frame = keys.copy()
    frame["change_ff"] = 1 - _rank_correlation(norm, n0, n1, correlate)
    frame["change_res"] = 1 - _rank_correlation(norm, n0, res, correlate)
    frame["change_block"] = 1 - _rank_correlation(norm, n0, last, correlate)
    # pair by pair: over the entries j < i only (the self entries' large, opposite changes would dominate)
    group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(norm))))
    off = ~diagonal
    frame["pair_correlation"] = _pearson_groups(change[off], rest[off], group[off], len(starts))
    frame["control_correlation"] = _pearson_groups(shuffled[off], rest[off], group[off], len(starts))
    return frame


def cancellation(result: MapsResult, normalise: str = "row", correlate: str = "map", n_boot: int = 1000,
                 seed: int = 0) -> pd.DataFrame:
    """How much of the FFN's contextualisation change RES and the norms undo, per layer and over all layers
    (``layer = -1``: each sentence's mean over layers). The paper's comparison: the change of the whole block
    from the FFN's input map (``change_block``) against the FFN's own change (``change_ff``); ``cancellation =
    1 − Σ change_block / Σ change_ff`` over sentences (1: the layer's output map is back at the FFN's input map;
    0: the FFN's change survives whole; negative: RES and the norms add to it), ``cancellation_res`` the same
    after RES only. And whether the later change opposes the FFN's pair by pair: ``pair_correlation`` against
    ``control_correlation`` (see :func:`cancellation_per_sentence`). Every value has a 95% interval (seeded
    bootstrap over sentences); ``block_minus_ff_*`` and ``correlation_difference_*`` are paired intervals."""
    n_boot = _check_positive_int("n_boot", n_boot)
    per = cancellation_per_sentence(result, normalise, correlate, seed)
    n_sent = len(result.sentences)
    index = _bootstrap_index(n_sent, n_boot, seed)
    columns = ["change_ff", "change_res", "change_block", "pair_correlation", "control_correlation"]
    groups = [(int(layer), part) for layer, part in per.groupby("layer")]
    groups.append((-1, per.groupby("sentence", as_index=False)[columns].mean()))
    rows = []
    for layer, part in groups:
        values = {c: np.full(n_sent, np.nan) for c in columns}
        for c in columns:
            values[c][part["sentence"].to_numpy()] = part[c].to_numpy()

        def mean(c, idx):
            return np.nanmean(values[c][idx], axis=-1)

        def ratio(num, idx):
            return 1 - np.nansum(values[num][idx], axis=-1) / np.nansum(values["change_ff"][idx], axis=-1)

        row = {"layer": layer, "n_sentences": int(np.isfinite(values["change_ff"]).sum())}
        with np.errstate(invalid="ignore", divide="ignore"):
            for c in columns:
                row[c] = float(np.nanmean(values[c]))
                row[f"{c}_low"], row[f"{c}_high"] = _interval(mean(c, index))
            for name, num in (("cancellation", "change_block"), ("cancellation_res", "change_res")):
                row[name] = float(ratio(num, np.arange(n_sent)))
                row[f"{name}_low"], row[f"{name}_high"] = _interval(ratio(num, index))
            row["block_minus_ff_low"], row["block_minus_ff_high"] = _interval(
                mean("change_block", index) - mean("change_ff", index))
            row["correlation_difference_low"], row["correlation_difference_high"] = _interval(
                mean("pair_correlation", index) - mean("control_correlation", index))
        rows.append(row)
    return pd.DataFrame(rows)


# ---- findings ----------------------------------------------------------------------------------------------------
# The findings and their verdict rules are declared in ``ffnlib.findings`` (notebook ``09_ff_attention_maps``); this
# module only measures them. Each measure comes with a baseline of the same run; the notebook computes the same
# measures on a random-weights control too (the same functions on the control model's maps), and the registry judges
# ours against both.
MEASURE_OF_CLASS = {"subword": "amplified_subword", "capitalised span": "amplified_capitalised_span",
                    "frequent bigram": "amplified_frequent_bigram"}


def _estimate(value: float, low: float, high: float, n: int) -> Estimate:
    """A bootstrap estimate over ``n`` sentences; missing where the value is not a number."""
    if not np.isfinite(value) or not (np.isfinite(low) and np.isfinite(high)):
        return Estimate.missing("sentences")
    return Estimate(float(value), float(min(low, value)), float(max(high, value)), int(n), "sentences", "bootstrap")


def measures(classes: pd.DataFrame, cancel: pd.DataFrame, top_k: int, seed: int = 0
             ) -> tuple[dict[str, Estimate], dict[str, str]]:
    """The measures of the notebook's findings (``ffnlib.findings``, notebook ``09_ff_attention_maps``), each with
    its 95% interval (the seeded bootstrap over sentences of :func:`amplified_classes` and :func:`cancellation`,
    run with ``seed``), and its control, a baseline of the same run, under ``"<key>/baseline"``:

    - ``amplified_subword``, ``amplified_capitalised_span``, ``amplified_frequent_bigram``: the class's share among
      the top-``top_k`` FF-amplified pairs of every sentence and layer; baseline: its share among all candidate
      pairs (its base rate). Not measured where the sample has no candidate pair of the class.
    - ``cancel_block``: ``1 − ρ`` between the map the FFN reads and the layer's last map (after RES and the next
      norm), mean over layers and sentences; baseline: ``1 − ρ`` between the FFN's input and output maps (FF's own
      change).
    - ``cancel_pairwise``: the correlation over map entries ``j < i`` of FF's change with the change RES and the
      norms make after it; baseline: the same with FF's change shuffled within each query row.

    ``classes``: :func:`amplified_classes` (pooled over layers); ``cancel``: :func:`cancellation` (its row
    ``layer = -1`` pools the layers)."""
    top_k = _check_positive_int("top_k", top_k)
    out: dict[str, Estimate] = {}
    details: dict[str, str] = {}
    for name, key in MEASURE_OF_CLASS.items():
        rows = classes[classes["pair_class"] == name]
        if not len(rows):
            continue
        row = rows.iloc[0]
        n = int(row.get("n_sentences", 0))
        if int(classes["n_top_pairs"].sum()) == 0:  # e.g. parallel blocks: the FFN reads no attention output
            out[key], out[f"{key}/baseline"] = Estimate.missing("sentences"), Estimate.missing("sentences")
            details[key] = ("the FFN amplifies no pair j < i in any layer (in a parallel block it reads the block's "
                            "input, so its map adds weight to each token itself only)")
            continue
        if row.n_candidates == 0:  # no such pair in the sample: nothing to compare
            out[key], out[f"{key}/baseline"] = Estimate.missing("sentences"), Estimate.missing("sentences")
            details[key] = f"no {name} pair among the sample's candidate pairs"
            continue
        out[key] = _estimate(row.top_share, row.top_low, row.top_high, n)
        out[f"{key}/baseline"] = _estimate(row.base_rate, row.base_low, row.base_high, n)
        enrichment = f"{row.enrichment:.1f}x the base rate" if np.isfinite(row.enrichment) else "no base rate"
        details[key] = (f"{int(row.n_top_pairs)} of the top-{top_k} pairs of {n} sentences x all layers ({enrichment}); "
                        f"at the top pairs' distances the base rate is {row.matched_rate:.1%} [{row.matched_low:.1%}, "
                        f"{row.matched_high:.1%}]; BOS/first position and self-pairs excluded; bootstrap seed {seed}")
    pooled_rows = cancel[cancel["layer"] == -1]
    if len(pooled_rows):
        pooled = pooled_rows.iloc[0]
        per_layer = cancel[cancel["layer"] >= 0]
        n = int(pooled.get("n_sentences", 0))
        out["cancel_block"] = _estimate(pooled.change_block, pooled.change_block_low, pooled.change_block_high, n)
        out["cancel_block/baseline"] = _estimate(pooled.change_ff, pooled.change_ff_low, pooled.change_ff_high, n)
        undone = int((per_layer["change_block_high"] < per_layer["change_ff_low"]).sum())
        details["cancel_block"] = (
            f"{pooled.cancellation:.0%} [{pooled.cancellation_low:.0%}, {pooled.cancellation_high:.0%}] of FF's change "
            f"undone ({pooled.cancellation_res:.0%} by RES alone); the block's change is below FF's own (95% "
            f"intervals apart) in {undone} of {len(per_layer)} layers; bootstrap seed {seed}")
        out["cancel_pairwise"] = _estimate(pooled.pair_correlation, pooled.pair_correlation_low,
                                           pooled.pair_correlation_high, n)
        out["cancel_pairwise/baseline"] = _estimate(pooled.control_correlation, pooled.control_correlation_low,
                                                    pooled.control_correlation_high, n)
        opposed = int((per_layer["pair_correlation_high"] < per_layer["control_correlation_low"]).sum())
        details["cancel_pairwise"] = (f"below the shuffled control in {opposed} of {len(per_layer)} layers; self "
                                      f"entries excluded; bootstrap seed {seed}")
    return out, details


def map_arrays(decomposition: Decomposition, sentence: int = 0, stages: Sequence[str] = MAIN_STAGES,
               normalise: str = "row") -> dict[int, dict[str, np.ndarray]]:
    """``{layer: {stage: (n, n) array}}`` of one sentence of a :class:`Decomposition`, rows normalised to sum to 1
    (``normalise="row"``), for the stages of ``stages`` each layer has (for the heatmaps)."""
    _check_normalise(normalise)
    out = {}
    for layer in decomposition.layers:
        out[layer] = {}
        for stage in stages:
            if stage not in decomposition.stages[layer]:
                continue
            raw = decomposition.map(layer, stage, sentence)
            if normalise == "row":
                total = raw.sum(1, keepdims=True)
                raw = raw / np.where(total > 0, total, 1.0)
            out[layer][stage] = raw
    return out


# ---- notebook sizes ----------------------------------------------------------------------------------------------
SCALE_SIZES = {  # scale -> held-out sentences decomposed, their largest token count, training sentences for bigrams,
    # and how many of the sentences (the first ones) the random-weights control decomposes
    "ci": {"n_sentences": 4, "max_tokens": 20, "bigram_sentences": 2000, "control_sentences": 4},
    "default": {"n_sentences": 300, "max_tokens": 40, "bigram_sentences": 20000, "control_sentences": 150},
    "full": {"n_sentences": 1000, "max_tokens": 40, "bigram_sentences": 40000, "control_sentences": 300},
}


def notebook_sizes(scale: str, n_sentences: int | None = None, max_tokens: int | None = None,
                   bigram_sentences: int | None = None, control_sentences: int | None = None) -> dict:
    """The notebook's sizes: its parameters where given, else those of the scale (:data:`SCALE_SIZES`).
    ``control_sentences``: how many of the sentences (the first ones) the random-weights control decomposes; the
    scale's value is capped at ``n_sentences``, a value given larger than ``n_sentences`` is an error."""
    if scale not in SCALE_SIZES:
        raise ParameterError(f"Unknown scale {scale!r}: choose one of {list(SCALE_SIZES)}.")
    given = {"n_sentences": n_sentences, "max_tokens": max_tokens, "bigram_sentences": bigram_sentences,
             "control_sentences": control_sentences}
    sizes = {name: _check_positive_int(name, value if value is not None else SCALE_SIZES[scale][name])
             for name, value in given.items()}
    if control_sentences is not None and sizes["control_sentences"] > sizes["n_sentences"]:
        raise ParameterError(f"control_sentences={control_sentences} is more than n_sentences={sizes['n_sentences']}: "
                             "the control decomposes the first control_sentences of the same sentences.")
    sizes["control_sentences"] = min(sizes["control_sentences"], sizes["n_sentences"])
    return sizes


def curves(change: pd.DataFrame, cancel: pd.DataFrame) -> dict:
    """Per-layer series for the report and the cross-model notebook (the paper gives no per-layer numbers)."""
    out = {}
    for component in ("FF", "RES", "LN"):
        part = change[change["component"] == component].sort_values("layer")
        if len(part):
            out[f"kobayashi_change_{component.lower()}"] = {
                "label": f"Kobayashi 2024: contextualisation change by {component} (1 - Spearman rho)",
                "values": [float(v) for v in part["change"]], "paper": None}
    part = cancel[cancel["layer"] >= 0].sort_values("layer")
    out["kobayashi_cancellation"] = {"label": "Kobayashi 2024: share of FF's change undone by RES and the norms",
                                     "values": [float(v) for v in part["cancellation"]], "paper": None}
    return out
