"""The contributions panel: Kobayashi et al.'s (ICLR 2024) maps of a prompt at one layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..related import contextualization as ctx
from ._common import check_prompt

__all__ = ["ContributionMaps", "contribution_maps"]


@dataclass
class ContributionMaps:
    """The contribution maps of one prompt at one layer: ``maps[stage]`` is a (n, n) array whose row ``i`` says
    how position ``i``'s vector at that stage shares itself among the input tokens ``j ≤ i`` (row-normalised
    norms ``‖y_{i←j}‖``); ``stages`` are those of :data:`ffnlib.related.contextualization.MAIN_STAGES` this layer
    has."""

    prompt: str
    layer: int
    tokens: list[str]
    stages: tuple[str, ...]
    maps: dict[str, np.ndarray]


def contribution_maps(loaded, prompt: str, layer: int, max_tokens: int = ctx.MAX_TOKENS) -> ContributionMaps:
    """The four maps (ATB, ATBFF, ATBFFRES, ATBFFRESLN) of ``prompt`` at ``layer`` (see :class:`ContributionMaps`).
    A prompt longer than ``max_tokens`` or a layer out of range raises a ParameterError that says so."""
    prompt = check_prompt(prompt)
    layer = loaded.adapter.check_layer(layer)
    result = ctx.decompose(loaded, prompt, layers=[layer], max_tokens=max_tokens)
    stages = tuple(stage for stage in ctx.MAIN_STAGES if stage in result.stages[layer])
    maps = {}
    for stage in stages:
        raw = result.map(layer, stage)
        total = raw.sum(1, keepdims=True)
        maps[stage] = raw / np.where(total > 0, total, 1.0)
    return ContributionMaps(prompt, layer, loaded.token_strings(result.token_ids[0]), stages, maps)
