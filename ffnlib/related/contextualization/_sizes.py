"""Notebook 09's sizes per scale. They live in the one registry of sizes, :data:`ffnlib.config.SCALES` (the
``maps_*`` fields of :class:`ffnlib.config.Scale`); :func:`notebook_sizes` reads them, with the notebook's own
parameters where given."""

from __future__ import annotations

from ...config import SCALES, Scale, check_int, get_scale
from ...errors import ParameterError

__all__ = ["SCALE_SIZES", "notebook_sizes"]


def _sizes_of(scale: Scale) -> dict[str, int]:
    return {"n_sentences": scale.maps_sentences, "max_tokens": scale.maps_max_tokens,
            "bigram_sentences": scale.maps_bigram_sentences, "control_sentences": scale.maps_control_sentences}


# scale -> held-out sentences decomposed, their largest token count, training sentences for bigrams, and how many of
# the sentences (the first ones) the random-weights control decomposes: a view of ffnlib.config.SCALES (edit those)
SCALE_SIZES: dict[str, dict[str, int]] = {name: _sizes_of(scale) for name, scale in SCALES.items()}


def notebook_sizes(scale: str, n_sentences: int | None = None, max_tokens: int | None = None,
                   bigram_sentences: int | None = None, control_sentences: int | None = None) -> dict:
    """The notebook's sizes: its parameters where given, else those of the scale (``ffnlib.config.SCALES``).
    ``control_sentences``: how many of the sentences (the first ones) the random-weights control decomposes; the
    scale's value is capped at ``n_sentences``, a value given larger than ``n_sentences`` is an error."""
    of_scale = _sizes_of(get_scale(scale))
    given = {"n_sentences": n_sentences, "max_tokens": max_tokens, "bigram_sentences": bigram_sentences,
             "control_sentences": control_sentences}
    sizes = {name: check_int(name, value if value is not None else of_scale[name]) for name, value in given.items()}
    if control_sentences is not None and sizes["control_sentences"] > sizes["n_sentences"]:
        raise ParameterError(f"control_sentences={control_sentences} is more than n_sentences={sizes['n_sentences']}: "
                             "the control decomposes the first control_sentences of the same sentences.")
    sizes["control_sentences"] = min(sizes["control_sentences"], sizes["n_sentences"])
    return sizes
