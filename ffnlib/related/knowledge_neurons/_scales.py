"""How much notebook 06 does at each scale (ci, default, full): a view of the ``kn_*`` sizes of
:data:`ffnlib.config.SCALES`."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import SCALES, Scale, get_scale

__all__ = ["KNScale", "KN_SCALES", "kn_scale"]


@dataclass(frozen=True)
class KNScale:
    """How much notebook 06 does at each ``scale``."""

    name: str
    relations: tuple[str, ...] | None  # None: every relation with templates
    screened_facts: int | None  # facts per relation whose accuracy is measured (seeded sample; None: all)
    facts_per_relation: int | None  # facts analysed per relation, among those right in >= 1 template
    templates: int | None  # templates per relation (the first ones; None: all)
    top_layers: int | None  # attribute only the top layers (None: every layer, as Dai)
    heldout_sentences: int  # held-out sentences for perplexity
    lambda2_sweep: tuple[float, ...]  # the fact update's lambda2 values of the trade-off sweep

    @classmethod
    def of_scale(cls, scale: Scale) -> "KNScale":
        return cls(scale.name, scale.kn_relations, scale.kn_screened_facts, scale.kn_facts_per_relation,
                   scale.kn_templates, scale.kn_top_layers, scale.kn_heldout_sentences, scale.kn_lambda2_sweep)


KN_SCALES = {name: KNScale.of_scale(scale) for name, scale in SCALES.items()}  # a view of ffnlib.config.SCALES


def kn_scale(scale: str) -> KNScale:
    """The sizes of ``scale``, or a clear error."""
    return KNScale.of_scale(get_scale(scale))
