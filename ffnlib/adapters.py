"""Architecture adapters: where the memories of each model family live.

An FFN layer is ``FF(x) = f(x·Kᵀ)·V``. Each family stores K, V and f under its own module names and
orientations. A :class:`FamilySpec` describes one family declaratively (module paths relative to the
model or to a layer); :class:`Adapter` turns that description into tensors and hook points:

- ``keys(layer)``: K as (d_ff, d_model); for gated FFNs also ``gates(layer)`` (the gate rows);
- ``values(layer)``: V as (d_ff, d_model), whatever the module's orientation (GPT-2's Conv1D included);
- ``down(layer)``: the module whose *input* is the coefficient vector m (batch, tokens, d_ff);
- ``up(layer)``: the module whose *input* is the FFN input (the normalised residual);
- ``ffn_output_module(layer)``: the module whose *output* is what the FFN adds to the residual;
- ``final_norm`` / ``head``: the model's own last norm and output head (to project to the vocabulary);
- ``activation(layer)``: the FFN's activation function f (the module the family names, never guessed).

The attention fields of a :class:`FamilySpec` (``attention_value``, ``attention_out``, ``attention_norm``,
``attention_post_norm``, ``value_layout``) say where the attention keeps what the contribution maps of
``ffnlib.related.contextualization`` need.

Coefficients: ``m_i = f(x·k_i + b_i)`` for plain FFNs (bias included, as the authors' code did);
``m_i = act(gate_i·x)·(up_i·x)`` for gated FFNs, which can be negative (the memory then writes ``-v_i``).

Adding a family: write one more ``FamilySpec`` in ``FAMILIES`` (see docs/adding-a-family.md) and run
``tests/test_adapters.py``, which checks the decomposition on a tiny random model of the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import ParameterError, UnsupportedModelError
from .precision import full_precision

__all__ = ["FamilySpec", "VALUE_LAYOUTS", "FAMILIES", "ENCODER_ONLY", "supported_families", "find_family", "submodule",
           "Adapter", "get_adapter"]

# where the attention values sit in the output of a family's ``attention_value`` module (FamilySpec.value_layout)
VALUE_LAYOUTS = ("separate", "qkv_blocks", "qkv_per_head")


@dataclass(frozen=True)
class FamilySpec:
    """Declarative description of one model family's FFN memories.

    Paths are dotted attribute paths; ``layers`` and the final norm/head are relative to the model,
    the others relative to one layer (one transformer block).

    The FFN's activation (``activation``) and the attention fields are declared here too, once per family, so
    that no analysis has to guess attribute names: ``attention_value`` is the module whose output holds the
    attention values, laid out as ``value_layout`` says (``"separate"``: ``kv_heads · head_dim`` wide, GQA
    allowed; ``"qkv_blocks"``: ``[q | k | v]``, GPT-2's ``c_attn``; ``"qkv_per_head"``: per head ``[q, k, v]``,
    GPT-NeoX and BLOOM); ``attention_out`` the attention's output projection (its input is the heads' outputs
    side by side, its bias is ``b_O``); ``attention_norm`` the norm attention reads (``None``: the raw residual,
    OLMo 2); ``attention_post_norm`` a norm on the attention output before the residual add (Gemma 2/3, OLMo 2).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    up: str  # first FFN linear: keys (plain FFN) or "up" rows (gated FFN)
    down: str  # second FFN linear: values
    final_norm: str
    head: str
    gate: str | None = None  # gated FFNs only
    ffn_norm: str | None = None  # the norm the FFN reads (None: parallel blocks share one; OLMo 2 has none)
    post_ffn_norm: str | None = None  # Gemma 2/3: a norm applied to the FFN output before the add
    conv1d: bool = False  # GPT-2: weights stored as (in, out)
    parallel: bool = False  # GPT-J / NeoX: attention and FFN read the same residual
    gemma_norm: bool = False  # Gemma RMSNorm multiplies by (1 + weight)
    activation: str | None = None  # the FFN's activation f (applied to the gate in a gated FFN)
    attention_value: str | None = None  # the module whose output holds the attention values
    attention_out: str | None = None  # the attention's output projection (W_O, b_O)
    attention_norm: str | None = None  # the norm attention reads (None: the raw residual, OLMo 2)
    attention_post_norm: str | None = None  # Gemma 2/3, OLMo 2: a norm on the attention output before the add
    value_layout: str = "separate"  # where the values are in attention_value's output (VALUE_LAYOUTS)
    note: str = ""

    def __post_init__(self):
        if self.value_layout not in VALUE_LAYOUTS:
            raise ParameterError(f"FamilySpec {self.name!r}: value_layout={self.value_layout!r} is not one of "
                                 f"{VALUE_LAYOUTS}.")

    @property
    def gated(self) -> bool:
        return self.gate is not None


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("gpt2", ("gpt2",), "transformer.h", "mlp.c_fc", "mlp.c_proj", "transformer.ln_f", "lm_head",
               ffn_norm="ln_2", conv1d=True, activation="mlp.act", attention_value="attn.c_attn",
               attention_out="attn.c_proj", attention_norm="ln_1", value_layout="qkv_blocks",
               note="Conv1D stores weights as (in, out)"),
    FamilySpec("gpt-neo", ("gpt_neo",), "transformer.h", "mlp.c_fc", "mlp.c_proj", "transformer.ln_f", "lm_head",
               ffn_norm="ln_2", activation="mlp.act", attention_value="attn.attention.v_proj",
               attention_out="attn.attention.out_proj", attention_norm="ln_1"),
    FamilySpec("gpt-j", ("gptj",), "transformer.h", "mlp.fc_in", "mlp.fc_out", "transformer.ln_f", "lm_head",
               parallel=True, activation="mlp.act", attention_value="attn.v_proj", attention_out="attn.out_proj",
               attention_norm="ln_1", note="attention and FFN read the same ln_1 output"),
    FamilySpec("gpt-neox", ("gpt_neox",), "gpt_neox.layers", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
               "gpt_neox.final_layer_norm", "lm_head", ffn_norm="post_attention_layernorm", activation="mlp.act",
               attention_value="attention.query_key_value", attention_out="attention.dense",
               attention_norm="input_layernorm", value_layout="qkv_per_head",
               note="Pythia; use_parallel_residual=True by default; transformers>=5 names embed_out lm_head"),
    FamilySpec("opt", ("opt",), "model.decoder.layers", "fc1", "fc2", "model.decoder.final_layer_norm", "lm_head",
               ffn_norm="final_layer_norm", activation="activation_fn", attention_value="self_attn.v_proj",
               attention_out="self_attn.out_proj", attention_norm="self_attn_layer_norm",
               note="ReLU, as in the paper's model; pre-LN variants only"),
    FamilySpec("bloom", ("bloom",), "transformer.h", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "transformer.ln_f",
               "lm_head", ffn_norm="post_attention_layernorm", activation="mlp.gelu_impl",
               attention_value="self_attention.query_key_value", attention_out="self_attention.dense",
               attention_norm="input_layernorm", value_layout="qkv_per_head"),
    FamilySpec("llama", ("llama", "mistral", "qwen2", "qwen3", "olmo"), "model.layers", "mlp.up_proj",
               "mlp.down_proj", "model.norm", "lm_head", gate="mlp.gate_proj",
               ffn_norm="post_attention_layernorm", activation="mlp.act_fn", attention_value="self_attn.v_proj",
               attention_out="self_attn.o_proj", attention_norm="input_layernorm",
               note="SwiGLU; SmolLM2 is a Llama; OLMo's norms have no weights"),
    FamilySpec("olmo2", ("olmo2",), "model.layers", "mlp.up_proj", "mlp.down_proj", "model.norm", "lm_head",
               gate="mlp.gate_proj", post_ffn_norm="post_feedforward_layernorm", activation="mlp.act_fn",
               attention_value="self_attn.v_proj", attention_out="self_attn.o_proj", attention_norm=None,
               attention_post_norm="post_attention_layernorm",
               note="SwiGLU; no norm before the FFN (it reads the raw residual), a norm after it"),
    FamilySpec("gemma", ("gemma",), "model.layers", "mlp.up_proj", "mlp.down_proj", "model.norm", "lm_head",
               gate="mlp.gate_proj", ffn_norm="post_attention_layernorm", gemma_norm=True, activation="mlp.act_fn",
               attention_value="self_attn.v_proj", attention_out="self_attn.o_proj",
               attention_norm="input_layernorm", note="GeGLU"),
    FamilySpec("gemma2", ("gemma2", "gemma3_text"), "model.layers", "mlp.up_proj", "mlp.down_proj",
               "model.norm", "lm_head", gate="mlp.gate_proj", ffn_norm="pre_feedforward_layernorm",
               post_ffn_norm="post_feedforward_layernorm", gemma_norm=True, activation="mlp.act_fn",
               attention_value="self_attn.v_proj", attention_out="self_attn.o_proj",
               attention_norm="input_layernorm", attention_post_norm="post_attention_layernorm",
               note="GeGLU with a norm after the FFN, before the residual add"),
    FamilySpec("gemma3", ("gemma3",), "model.language_model.layers", "mlp.up_proj", "mlp.down_proj",
               "model.language_model.norm", "lm_head", gate="mlp.gate_proj", ffn_norm="pre_feedforward_layernorm",
               post_ffn_norm="post_feedforward_layernorm", gemma_norm=True, activation="mlp.act_fn",
               attention_value="self_attn.v_proj", attention_out="self_attn.o_proj",
               attention_norm="input_layernorm", attention_post_norm="post_attention_layernorm",
               note="Gemma 3 4B+ (Gemma3ForConditionalGeneration): the gemma2 layout inside model.language_model"),
)

ENCODER_ONLY = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                "camembert", "mpnet", "t5", "bart", "mbart", "mt5", "modernbert"}


def supported_families() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def find_family(model_type: str, class_name: str = "") -> FamilySpec:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if model_type in ENCODER_ONLY:
        raise UnsupportedModelError(
            f"{class_name or model_type} is an encoder or encoder-decoder model ({model_type}). The paper's "
            "analyses need a decoder-only (causal) language model that predicts the next token. "
            f"Supported families: {supported_families()}.")
    raise UnsupportedModelError(
        f"No adapter for {class_name or 'this model'} (model_type={model_type!r}). Supported families: "
        f"{supported_families()}. Adding one takes a single FamilySpec: see docs/adding-a-family.md.")


def submodule(root: nn.Module, path: str) -> nn.Module:
    """The attribute at the dotted ``path`` below ``root`` (e.g. ``"mlp.act_fn"`` of a layer): the one lookup of
    the families' paths. A missing step raises AttributeError naming it and the children that are there."""
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            children = ", ".join(name for name, _ in obj.named_children()) if isinstance(obj, nn.Module) else ""
            raise AttributeError(f"no module {path!r}: {type(obj).__name__} has no {part!r}"
                                 + (f" (it has {children})" if children else ""))
        obj = getattr(obj, part)
    return obj


class Adapter:
    """Access to the keys, values, coefficients and projections of one loaded model."""

    def __init__(self, model: nn.Module, family: FamilySpec | None = None):
        config = model.config
        model_type = getattr(config, "model_type", "")
        self.family = family or find_family(model_type, type(model).__name__)
        self.model = model
        if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
            raise UnsupportedModelError("This OPT checkpoint is post-LN (do_layer_norm_before=False, e.g. "
                                        "opt-350m): its layer output is not residual + FFN. Use another OPT size.")
        try:
            self._layers = list(submodule(model, self.family.layers))
            self.final_norm: nn.Module = submodule(model, self.family.final_norm)
            self.head: nn.Module = submodule(model, self.family.head)
            for i in range(len(self._layers)):
                self.up(i), self.down(i), self.gate(i) if self.family.gated else None
        except AttributeError as exc:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not have the module layout of the {self.family.name} family "
                f"({exc}). See docs/adding-a-family.md.") from exc
        self.parallel = self.family.parallel or bool(getattr(config, "use_parallel_residual", False))
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @property
    def d_ff(self) -> int:
        return self._weight(self.up(0)).shape[1]

    @property
    def d_model(self) -> int:
        return self._weight(self.up(0)).shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (:mod:`ffnlib.precision`); a tensor handed to one of its modules by hand
        is cast to it (the accessors below give float32 for a bf16/fp16 model)."""
        return self.head.weight.dtype

    @property
    def gated(self) -> bool:
        return self.family.gated

    def check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ParameterError(f"A layer index must be an int, got {layer!r}.")
        if not -self.n_layers <= layer < self.n_layers:
            raise ParameterError(f"Layer {layer} is out of range: this model has {self.n_layers} layers "
                                 f"(0..{self.n_layers - 1}).")
        return layer % self.n_layers

    def check_layers(self, layers) -> list[int]:
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, int) or not isinstance(layers, (list, tuple, range, set, frozenset)):
            layers = [layers]
        if not layers:
            raise ParameterError("layers is empty: give None (all layers), an int or a list of ints.")
        return sorted({self.check_layer(layer) for layer in layers})

    # ---- modules -----------------------------------------------------------------------------------
    def layer(self, layer: int) -> nn.Module:
        return self._layers[self.check_layer(layer)]

    def up(self, layer: int) -> nn.Module:
        return submodule(self.layer(layer), self.family.up)

    def down(self, layer: int) -> nn.Module:
        return submodule(self.layer(layer), self.family.down)

    def gate(self, layer: int) -> nn.Module:
        if not self.gated:
            raise ParameterError(f"The {self.family.name} family has no gate: its FFN is not gated.")
        return submodule(self.layer(layer), self.family.gate)

    def activation(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The FFN's activation f of ``layer``, the family's own module (``FamilySpec.activation``): ``f`` in
        ``m = f(x·Kᵀ + b)``, or ``act`` in ``m = act(x·Gᵀ)·(x·Kᵀ)`` for a gated FFN. Raises
        :class:`UnsupportedModelError` where the family declares none or the model has none there."""
        path = self.family.activation
        if not path:
            raise UnsupportedModelError(f"The {self.family.name} family declares no FFN activation: set "
                                        "FamilySpec.activation (see docs/adding-a-family.md).")
        try:
            fn = submodule(self.layer(layer), path)
        except AttributeError as exc:
            raise UnsupportedModelError(f"{type(self.model).__name__} has no FFN activation at {path!r} in layer "
                                        f"{layer}, where the {self.family.name} family keeps it ({exc}).") from exc
        if not callable(fn):
            raise UnsupportedModelError(f"{path!r} of layer {layer} of {type(self.model).__name__} is a "
                                        f"{type(fn).__name__}, not the FFN's activation function.")
        return fn

    def ffn_output_module(self, layer: int) -> nn.Module:
        """The module whose output is what the FFN adds to the residual stream."""
        if self.family.post_ffn_norm:
            return submodule(self.layer(layer), self.family.post_ffn_norm)
        # a norm that ffnlib's softmax + LN memory puts after the values (ffnlib.ffn_variants)
        parent = self.layer(layer) if "." not in self.family.down else submodule(self.layer(layer),
                                                                            self.family.down.rsplit(".", 1)[0])
        norm = getattr(parent, "ffn_norm", None)
        return norm if isinstance(norm, nn.Module) else self.down(layer)

    # ---- weights -----------------------------------------------------------------------------------
    def _weight(self, module: nn.Module) -> torch.Tensor:
        """The module's weight as (in_features, out_features), in the model's dtype."""
        return module.weight if self.family.conv1d else module.weight.T

    def _in_out(self, module: nn.Module) -> torch.Tensor:
        """The module's weight as (in_features, out_features): a view in float32 or float64 models (write to it to edit
        the weights), a float32 copy in a bf16/fp16 one (:func:`ffnlib.precision.full_precision`)."""
        return full_precision(self._weight(module))

    def value_rows(self, layer: int) -> torch.Tensor:
        """V as (d_ff, d_model), always a view of the module's weight in the model's dtype: write to its rows to edit
        the values (:meth:`values` is a float32 copy in a bf16 model)."""
        return self._weight(self.down(layer))

    @torch.no_grad()
    def keys(self, layer: int) -> torch.Tensor:
        """K as (d_ff, d_model): row i is key k_i (for gated FFNs, the "up" half of the key)."""
        return self._in_out(self.up(layer)).T

    @torch.no_grad()
    def gates(self, layer: int) -> torch.Tensor:
        """Gate rows (d_ff, d_model) of a gated FFN: the other half of each key."""
        return self._in_out(self.gate(layer)).T

    @torch.no_grad()
    def values(self, layer: int) -> torch.Tensor:
        """V as (d_ff, d_model): row i is value v_i."""
        return self._in_out(self.down(layer))

    @torch.no_grad()
    def written_values(self, layer: int) -> torch.Tensor:
        """The vectors the memories write into the residual stream, (d_ff, d_model).

        ``values(layer)`` where the FFN output is added as is. Where a norm follows the FFN (Gemma 2/3,
        OLMo 2) the residual receives ``norm(Σ m_i v_i) = g_post ⊙ Σ m_i v_i / rms``: the 1/rms is one
        positive number per token, so memory i writes in the direction ``g_post ⊙ v_i``. Project these,
        not the raw values, to read a memory as the model reads it.
        """
        values = self.values(layer)
        if not self.family.post_ffn_norm:
            return values
        weight = getattr(self.ffn_output_module(layer), "weight", None)
        if weight is None:
            return values
        weight = full_precision(weight.detach())
        gain = 1.0 + weight if self.family.gemma_norm else weight
        return values * gain

    @torch.no_grad()
    def written_value_norms(self, layer: int) -> torch.Tensor:
        """``||v_i||`` of what each memory writes into the residual (:meth:`written_values`, float32, (d_ff,)): a
        memory's size ``|m_i|·||v_i||`` as the residual receives it, which Section 5 and MoEfication rank by. The
        norms of the value rows themselves are ``values(layer).norm(dim=-1)``; they differ where a norm follows the
        FFN (Gemma 2/3, OLMo 2)."""
        return self.written_values(layer).float().norm(dim=-1)

    @torch.no_grad()
    def value_bias(self, layer: int) -> torch.Tensor | None:
        """The bias the FFN adds after the values (None where the family has none; float32 in a bf16 model)."""
        bias = getattr(self.down(layer), "bias", None)
        return None if bias is None else full_precision(bias)

    # ---- projection to the vocabulary -------------------------------------------------------------
    def norm_gain(self) -> torch.Tensor:
        """The final norm's gain g (Gemma's RMSNorm multiplies by 1 + weight; 1 where the norm has no weight), float32
        in a bf16 model."""
        weight = getattr(self.final_norm, "weight", None)
        if weight is None:  # OLMo's LayerNorm, or nn.LayerNorm(elementwise_affine=False)
            ones = torch.ones(self.d_model, dtype=self.head.weight.dtype, device=self.head.weight.device)
            return full_precision(ones)
        weight = full_precision(weight.detach())
        return 1.0 + weight if self.family.gemma_norm else weight

    def is_layernorm(self) -> bool:
        """Whether the final norm centres (LayerNorm, OLMo's weightless LayerNorm) rather than RMS-scales."""
        return isinstance(self.final_norm, nn.LayerNorm) or type(self.final_norm).__name__.endswith("LayerNorm")

    @torch.no_grad()
    def logits_from_residual(self, residual: torch.Tensor) -> torch.Tensor:
        """Logits of a residual-stream vector, exactly as the model computes them at its last layer (in the
        model's dtype), returned as float32 from a bf16 model."""
        return self._head(self.final_norm(residual.to(self.head.weight.dtype)))

    @torch.no_grad()
    def logits_from_values(self, vectors: torch.Tensor) -> torch.Tensor:
        """Logits of value vectors as the model would read them: the final norm's linear part
        (mean-centring for a LayerNorm, then the gain g), then the output head.

        The norm's scale (1/RMS or 1/std) and bias are left out. For RMSNorm families the scale is one
        positive number per vector, so the ranking and the top token are those of
        ``logits_from_residual(v)``; the probabilities are those of ``head(g ⊙ v)``. A LayerNorm's bias
        adds the same vector ``head(b)`` to every value's logits, so there the ranking is that of the
        value's own direction, not of ``logits_from_residual(v)``.
        """
        vectors = full_precision(vectors)
        if self.is_layernorm():
            vectors = vectors - vectors.mean(dim=-1, keepdim=True)
        return self._head((vectors * self.norm_gain()).to(self.head.weight.dtype))

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = full_precision(self.head(hidden))  # a softmax over the vocabulary, ranks and sums read float32
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (raises :class:`UnsupportedModelError` with the supported list)."""
    if not hasattr(model, "config"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a Hugging Face transformers model.")
    return Adapter(model)
