"""The decomposition of one batch: one forward pass recorded, then every stage of every layer as a sum of
per-input-token vectors plus bias terms (see the package docstring for the stages and what they mean).

:func:`decompose` runs the model once with eager attention (:func:`eager_attention`) and hooks that record each
layer's input, its attention values and output, the FFN's down projection and the next norm; the maps are then
computed layer by layer, sentence by sentence, in chunks of query rows (memory bounded by ``chunk_elements``).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ...adapters import Adapter, get_adapter, submodule
from ...batching import pad_right
from ...capture import block_input, capture, first_tensor
from ...config import check_int
from ...errors import ParameterError, UnsupportedModelError
from ._layout import CHECKED, VALUE_LAYOUTS, layout_of, next_norm, stages_of
from ._linearise import check_activation, elementwise_ig_ratio, gated_ig_coefficients
from ._norms import NormSplit

__all__ = ["MAX_TOKENS", "CHUNK_ELEMENTS", "eager_attention", "Decomposition", "token_lists", "adapter_and_model",
           "decompose"]

MAX_TOKENS = 128  # the default bound on a sentence's length (cost grows as n² per layer)
CHUNK_ELEMENTS = 1 << 23  # floats in the largest per-chunk tensor (32 MiB in fp32)
_ROWS_PER_CHUNK = 16  # query rows per chunk at most: more rows, fewer and bigger products; fewer, less of the causal corner


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


@contextmanager
def _record(adapter: Adapter, layers: list[int]):
    """Hooks that keep, per layer: its input ``x``, the value module's output, the attention output projection's
    output, the down projection's output and the next norm's output. Always removed on exit."""
    family = adapter.family
    rec: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    handles = []

    def keep(layer: int, name: str):
        return lambda mod, args, out: rec[layer].__setitem__(name, first_tensor(out).detach())

    def keep_input(mod, args, kwargs, layer):
        rec[layer]["x"] = block_input(args, kwargs).detach()

    try:
        for layer in layers:
            block = adapter.layer(layer)
            handles.append(block.register_forward_pre_hook(
                lambda mod, args, kwargs, layer=layer: keep_input(mod, args, kwargs, layer), with_kwargs=True))
            handles.append(submodule(block, family.attention_value).register_forward_hook(keep(layer, "values")))
            handles.append(submodule(block, family.attention_out).register_forward_hook(keep(layer, "attention")))
            handles.append(adapter.down(layer).register_forward_hook(keep(layer, "down")))
            nxt = next_norm(adapter, layer)
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


def token_lists(loaded, inputs, max_tokens: int) -> list[list[int]]:
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


def adapter_and_model(loaded) -> tuple[Adapter, nn.Module]:
    """The adapter and the model of a LoadedModel, an Adapter or a bare transformers model."""
    adapter = getattr(loaded, "adapter", None)
    if adapter is None:
        adapter = loaded if isinstance(loaded, Adapter) else get_adapter(loaded)
    return adapter, adapter.model


@torch.no_grad()
def decompose(loaded, inputs, layers: Iterable[int] | int | None = None, *, keep_vectors: bool = False,
              check: bool = False, max_tokens: int = MAX_TOKENS, chunk_elements: int = CHUNK_ELEMENTS) -> Decomposition:
    """Decompose every stage of ``layers`` (all when ``None``) for a batch of sentences (see the package docstring).

    ``loaded``: a :class:`ffnlib.models.LoadedModel` (texts or ids) or a bare transformers model (ids only).
    ``inputs``: a text, a list of texts, a list of token-id lists, or a (batch, n) tensor of ids without
    padding. Sentences of different lengths are padded on the right; each one's maps are those of the sentence
    alone. One forward pass, then the maps layer by layer, in chunks of query positions.
    """
    adapter, model = adapter_and_model(loaded)
    layout_of(adapter)  # the family's attention layout, checked against the model
    max_tokens = check_int("max_tokens", max_tokens)
    chunk_elements = check_int("chunk_elements", chunk_elements)
    layer_list = adapter.check_layers(layers)
    token_ids = token_lists(loaded, inputs, max_tokens)
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = max(len(ids) for ids in token_ids)
    if isinstance(positions, int) and longest > positions:
        raise ParameterError(f"A sentence has {longest} tokens, more than the {positions} positions this model "
                             "knows; shorten it.")
    device = next(model.parameters()).device
    pad = getattr(loaded, "pad_id", 0)  # LoadedModel.pad_id; a bare model or an adapter has no tokenizer: 0
    ids, mask = pad_right(token_ids, pad, device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    what = ("coefficients", "ffn_input", "ffn_output", "residual_before", "residual_after")
    with eager_attention(model), capture(adapter, layer_list, what=what) as acts, \
            _record(adapter, layer_list) as rec:
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
        maps, vectors, bias, errors = _decompose_layer(adapter, layer, stages, inputs_, valid, keep_vectors, check,
                                                       chunk_elements)
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


def _decompose_layer(adapter: Adapter, layer: int, stages: tuple[str, ...], t: _LayerInputs, valid: torch.Tensor,
                     keep_vectors: bool, check: bool, chunk_elements: int):
    family = adapter.family
    block = adapter.layer(layer)
    x = t.x.float()
    b, n, d = x.shape
    lead = (b, n)
    down_out = t.down.reshape(*lead, -1).float()  # OPT runs its FFN on (b·n, d)
    A = t.attentions  # (b, H, n, n)
    heads = A.shape[1]

    # attention: per head, each token's value through W_O, f^h(x_j) = v^h_j W_O^h  -> U (b, n, H, d)
    out_module = submodule(block, family.attention_out)
    w_o = _in_out(adapter, out_module).float()  # (H·e, d)
    head_dim = w_o.shape[0] // heads
    values = _split_values(t.values.float(), family.value_layout, heads, head_dim)
    U = torch.einsum("bnhe,hed->bnhd", values, w_o.reshape(heads, head_dim, d))
    b_o = out_module.bias.float() if getattr(out_module, "bias", None) is not None else torch.zeros(d, device=x.device)
    ones = torch.ones(lead, device=x.device)
    if family.attention_post_norm:  # Gemma 2/3, OLMo 2: a norm on the attention output before the add
        post = NormSplit.of(submodule(block, family.attention_post_norm), family.gemma_norm)
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
        pre = NormSplit.of(submodule(block, family.ffn_norm), family.gemma_norm)
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
        act = adapter.activation(layer)
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
            if family.attention_post_norm:
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
        post_ff = NormSplit.of(submodule(block, family.post_ffn_norm), family.gemma_norm)
        pf_scale = 1.0 / post_ff.statistic(down_out)
        block_out = bias["ATBFFLN"] = post_ff.linear(ff_bias) * pf_scale[..., None] + post_ff.constant(x)
    bias["ATBFFRES"] = atb_bias + block_out
    if "ATBFFRESLN" in stages:
        nxt = NormSplit.of(next_norm(adapter, layer), family.gemma_norm)
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
