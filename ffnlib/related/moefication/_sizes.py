"""Notebook 07's sizes per scale. They live in the one registry of sizes, :data:`ffnlib.config.SCALES` (the
``moe_*`` fields of :class:`ffnlib.config.Scale`); :class:`Sizes` is the notebook's view of one scale's fields, and
:func:`get_sizes` reads it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...config import SCALES, Scale, get_scale

__all__ = ["Sizes", "SIZES", "get_sizes", "spread_layers"]


@dataclass(frozen=True)
class Sizes:
    """How much data each step of notebook 07 uses at one ``scale`` (a view of ``ffnlib.config.SCALES``: edit
    those)."""

    train_sentences: int  # co-activation graph (the authors used up to 200k tokens per FFN)
    router_sentences: int  # MLP router training data (their tokens, 90/10 split)
    calibration_sentences: int  # CATS / TEAL thresholds ("a few hundred")
    heldout_sentences: int  # quality evaluation
    shares: tuple[float, ...]  # shares of the FFN kept (experts, TEAL) or of memories kept (CATS)
    n_layers: int | None  # None: every layer is MoEfied; n: n layers spread over the depth
    kmeans_iter: int  # balanced Lloyd steps after the k-means start
    router_epochs: int  # the authors: 30
    n_boot: int = 1000
    random_splits: int = 5  # seeded random splits (the control's draws); random experts are their mean

    @classmethod
    def of_scale(cls, scale: Scale) -> "Sizes":
        return cls(train_sentences=scale.moe_train_sentences, router_sentences=scale.moe_router_sentences,
                   calibration_sentences=scale.moe_calibration_sentences,
                   heldout_sentences=scale.moe_heldout_sentences, shares=tuple(scale.moe_shares),
                   n_layers=scale.moe_layers, kmeans_iter=scale.moe_kmeans_iter,
                   router_epochs=scale.moe_router_epochs, n_boot=scale.n_boot,
                   random_splits=scale.moe_random_splits)


SIZES: dict[str, Sizes] = {name: Sizes.of_scale(scale) for name, scale in SCALES.items()}


def get_sizes(scale: str) -> Sizes:
    """The sizes of ``scale`` (a clear error for an unknown one)."""
    return Sizes.of_scale(get_scale(scale))


def spread_layers(n_layers: int, n: int | None) -> list[int]:
    """``n`` layers spread evenly over the depth (first and last included); all when ``n`` is None."""
    if n is None or n >= n_layers:
        return list(range(n_layers))
    return sorted({int(round(i)) for i in np.linspace(0, n_layers - 1, n)})
