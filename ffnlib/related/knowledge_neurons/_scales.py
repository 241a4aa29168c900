"""How much notebook 06 does at each scale (ci, default, full)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ParameterError

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


KN_SCALES = {
    "ci": KNScale("ci", ("capital", "official_language"), 8, 2, 3, 4, 4, (1.0, 8.0)),
    "default": KNScale("default", None, None, 4, None, None, 24, (1.0, 2.0, 4.0, 8.0)),
    "full": KNScale("full", None, None, 30, None, None, 200, (1.0, 2.0, 4.0, 8.0)),
}


def kn_scale(scale: str) -> KNScale:
    """The sizes of ``scale``, or a clear error."""
    if scale not in KN_SCALES:
        raise ParameterError(f"Unknown scale {scale!r}: choose one of {list(KN_SCALES)}.")
    return KN_SCALES[scale]
