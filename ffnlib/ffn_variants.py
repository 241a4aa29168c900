"""FFN forms that no transformers config names: a memory read with a softmax over its slots (Shen et al., 2023).

The models ffnlib trains (``ffnlib.training``) are transformers GPT-2 models. Three of their FFN forms
are plain GPT-2 configs: ReLU (``activation_function="relu"``, the paper's FFN), GELU (``"gelu_new"``), and
SwiGLU is a Llama config. The other two are the classic key-value memory, ``softmax(x·Kᵀ)·V``, and the same with a
LayerNorm on its output, ``LN(softmax(x·Kᵀ)·V)``, which Shen et al. show makes it behave like the ReLU FFN. They
are stored as one small config field, ``config.ffnlib_ffn = "softmax"`` or ``"softmax_ln"`` (saved in
``config.json`` by ``save_pretrained``), and :func:`apply_ffn_variant` puts the matching FFN in every block;
``ffnlib.models.load_model`` does that for any folder whose config has the field. No remote code is involved.

The replacement FFN keeps GPT-2's module names (``mlp.c_fc``: keys, ``mlp.c_proj``: values), so the adapters
read its coefficients, the softmax over the slots, like any GPT-2's. ``softmax_ln`` adds ``mlp.ffn_norm``, a
LayerNorm with its own gain and bias applied after the values: what the residual receives is then
``LN(Σ_i m_i·v_i)``, not ``Σ_i m_i·v_i`` (as with Gemma's norm after the FFN): the adapter's
``ffn_output_module`` is then that norm, so captured FFN outputs are what the residual receives. Unlike Gemma's
RMSNorm, a LayerNorm centres its input, so it is not a gain per memory: ``written_values`` stays ``V``, and a value
read through the head is the value before that norm.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import ModelNotFoundError, ParameterError

__all__ = ["CONFIG_FIELD", "SOFTMAX_VARIANTS", "SlotSoftmaxMLP", "ffn_variant", "apply_ffn_variant",
           "load_variant_model"]

CONFIG_FIELD = "ffnlib_ffn"
SOFTMAX_VARIANTS = ("softmax", "softmax_ln")


class SlotSoftmaxMLP(nn.Module):
    """GPT-2's MLP with the activation replaced by a softmax over the slots (and, for ``softmax_ln``, a
    LayerNorm on the output). Holds the same ``c_fc``/``c_proj`` modules as the block it replaces."""

    def __init__(self, mlp: nn.Module, d_model: int, norm: bool, eps: float):
        super().__init__()
        self.c_fc, self.c_proj, self.dropout = mlp.c_fc, mlp.c_proj, mlp.dropout
        self.act = nn.Softmax(dim=-1)
        self.ffn_norm = nn.LayerNorm(d_model, eps=eps) if norm else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.c_proj(self.act(self.c_fc(hidden_states)))
        if self.ffn_norm is not None:
            out = self.ffn_norm(out)
        return self.dropout(out)


def ffn_variant(config) -> str | None:
    """The config's softmax variant, or None for an FFN its own config describes."""
    variant = getattr(config, CONFIG_FIELD, None)
    if variant is not None and variant not in SOFTMAX_VARIANTS:
        raise ParameterError(f"config.{CONFIG_FIELD}={variant!r} is not a known FFN variant; ffnlib knows "
                             f"{SOFTMAX_VARIANTS}.")
    if variant is not None and getattr(config, "model_type", "") != "gpt2":
        raise ParameterError(f"config.{CONFIG_FIELD} is only defined for GPT-2 models, not "
                             f"{getattr(config, 'model_type', '?')!r}.")
    return variant


def apply_ffn_variant(model: nn.Module) -> nn.Module:
    """Put the FFN that ``model.config.ffnlib_ffn`` names in every block (in place); no-op without the field."""
    variant = ffn_variant(model.config)
    if variant is None:
        return model
    config = model.config
    for block in model.transformer.h:
        if not isinstance(block.mlp, SlotSoftmaxMLP):
            block.mlp = SlotSoftmaxMLP(block.mlp, config.n_embd, variant == "softmax_ln", config.layer_norm_epsilon)
    return model


def load_variant_model(folder: str | Path, config) -> nn.Module:
    """A model saved with ``save_pretrained`` whose config names a softmax variant: built from its config, the
    variant applied, then every saved weight loaded (the variant's norm included, which ``from_pretrained``
    would drop as unexpected)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"The folder {folder} has a config naming the FFN variant "
                                 f"{getattr(config, CONFIG_FIELD)!r} but no .safetensors weights.")
    model = apply_ffn_variant(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", True) else set()
    if unexpected or set(missing) - tied:
        raise ModelNotFoundError(f"The weights in {folder} do not fit its config: missing {sorted(set(missing) - tied)}, "
                                 f"unexpected {sorted(unexpected)}.")
    model.tie_weights()
    return model
