"""The stages of one layer and where a family keeps what the decomposition needs.

The stages (:data:`STAGES`) are the intermediate vectors the maps decompose, in the order the model computes them;
:func:`stages_of` says which a family has at a layer. The attention's modules (its value and output projections,
the norm it reads, a norm after it) and the FFN's activation are facts of the family, declared once in its
:class:`ffnlib.adapters.FamilySpec` (``attention_value``, ``attention_out``, ``attention_norm``,
``attention_post_norm``, ``value_layout``, ``activation``); :func:`layout_of` checks that a model has them and
returns them as a :class:`LayerLayout`, a read-only view kept for code that used it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from ...adapters import FAMILIES, VALUE_LAYOUTS, Adapter, FamilySpec, submodule
from ...errors import UnsupportedModelError

__all__ = ["STAGES", "MAIN_STAGES", "STAGE_LABELS", "COMPONENTS", "CHECKED", "LayerLayout", "VALUE_LAYOUTS",
           "LAYOUTS", "layout_of", "next_norm", "stages_of", "before_ff"]

STAGES = ("ATB", "ATBLN", "ATBFF", "ATBFFLN", "ATBFFRES", "ATBFFRESLN")
MAIN_STAGES = ("ATB", "ATBFF", "ATBFFRES", "ATBFFRESLN")
STAGE_LABELS = {"ATB": "ATB (attention + residual)", "ATBLN": "ATBLN (FFN input norm)",
                "ATBFF": "ATBFF (FFN output)", "ATBFFLN": "ATBFFLN (norm after the FFN)",
                "ATBFFRES": "ATBFFRES (layer output)", "ATBFFRESLN": "ATBFFRESLN (next norm)"}
# the component that takes one stage to the next
COMPONENTS = {("ATB", "ATBLN"): "LN (FFN input)", ("ATBLN", "ATBFF"): "FF", ("ATB", "ATBFF"): "FF",
              ("ATBFF", "ATBFFLN"): "LN (FFN output)", ("ATBFF", "ATBFFRES"): "RES", ("ATBFFLN", "ATBFFRES"): "RES",
              ("ATBFFRES", "ATBFFRESLN"): "LN"}
# what decompose(check=True) compares with the model's own vectors: the stages, the FFN's first linear layer
# ("preactivation") and its hidden vector m ("hidden")
CHECKED = ("ATB", "ATBLN", "preactivation", "hidden", "ATBFF", "ATBFFLN", "ATBFFRES", "ATBFFRESLN")


@dataclass(frozen=True)
class LayerLayout:
    """A family's attention layout and FFN activation, as paths relative to a layer: a view of the fields of
    :class:`ffnlib.adapters.FamilySpec` that declare them (``value`` is ``attention_value``, ``out`` is
    ``attention_out``, the others have the FamilySpec's names). Declare a family's layout in its FamilySpec."""

    value: str
    out: str
    attention_norm: str | None
    attention_post_norm: str | None = None
    value_layout: str = "separate"
    activation: str | None = None

    @classmethod
    def of(cls, family: FamilySpec) -> "LayerLayout":
        return cls(family.attention_value, family.attention_out, family.attention_norm, family.attention_post_norm,
                   family.value_layout, family.activation)


# every family's layout, keyed by FamilySpec.name (derived from ffnlib.adapters.FAMILIES, where it is declared)
LAYOUTS: dict[str, LayerLayout] = {family.name: LayerLayout.of(family) for family in FAMILIES}


def layout_of(adapter: Adapter) -> LayerLayout:
    """The family's layout (its FamilySpec's attention fields), checked against layer 0 of the model (a clear
    error where the family declares none or the model does not fit it)."""
    family = adapter.family
    if not family.attention_value or not family.attention_out:
        raise UnsupportedModelError(f"The contribution maps need the attention layout of the {family.name} family: "
                                    "set attention_value, attention_out, attention_norm (and attention_post_norm, "
                                    "value_layout where they apply) in its FamilySpec (docs/adding-a-family.md).")
    if getattr(adapter.model.config, "apply_residual_connection_post_layernorm", False):
        raise UnsupportedModelError("This BLOOM checkpoint adds the normalised input as the residual "
                                    "(apply_residual_connection_post_layernorm=True); the maps support the "
                                    "usual residual only.")
    paths = [family.attention_value, family.attention_out, family.attention_norm, family.attention_post_norm]
    if adapter.gated:  # the gated FFN's shares need the gate's activation; a plain FFN's come from its output
        if not family.activation:
            raise UnsupportedModelError(f"The contribution maps of a gated FFN need its activation: set "
                                        f"activation in the {family.name} family's FamilySpec.")
        paths.append(family.activation)
    try:
        for path in paths:
            if path:
                submodule(adapter.layer(0), path)
    except AttributeError as exc:
        raise UnsupportedModelError(f"{type(adapter.model).__name__} does not have the attention layout of the "
                                    f"{family.name} family ({exc}).") from exc
    return LayerLayout.of(family)


def next_norm(adapter: Adapter, layer: int) -> nn.Module | None:
    """The norm that reads this layer's output: the next layer's attention norm, or the final norm."""
    if layer == adapter.n_layers - 1:
        return adapter.final_norm
    path = adapter.family.attention_norm
    return submodule(adapter.layer(layer + 1), path) if path else None


def stages_of(adapter: Adapter, layer: int) -> tuple[str, ...]:
    """The stages (of :data:`STAGES`) this family has at ``layer``, in the order the model computes them."""
    layer = adapter.check_layer(layer)
    layout_of(adapter)
    stages = ["ATB"]
    if not adapter.parallel and adapter.family.ffn_norm:
        stages.append("ATBLN")
    stages.append("ATBFF")
    if adapter.family.post_ffn_norm:
        stages.append("ATBFFLN")
    stages.append("ATBFFRES")
    if next_norm(adapter, layer) is not None:
        stages.append("ATBFFRESLN")
    return tuple(stages)


def before_ff(stages: Sequence[str]) -> str:
    """The stage the FFN reads: its input norm's output where it has one, else ATB."""
    return "ATBLN" if "ATBLN" in stages else "ATB"
