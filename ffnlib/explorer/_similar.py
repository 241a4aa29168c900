"""Memories like this one: the memories of the same model, across all layers, nearest to one memory by what its
value promotes (:func:`similar_by_value`) or by what its key fires on (:func:`similar_by_triggers`).

A memory ``j`` counts as similar through its nearer side: for gated FFNs, whose coefficients can be negative, the
similarity to ``j`` is the larger of those to ``v_j`` and to ``-v_j`` (the ``sign`` column says which). The memory
asked about is left out of its own list (its other side included). Each result carries two base rates: the median
similarity of this memory to every other one, and quantiles of the similarity of random pairs of memories.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..errors import ParameterError
from ..mining import POSITION_BITS
from ._common import check_memory, check_positive, check_sign, top_tokens
from ._search import ValueIndex

__all__ = ["SIMILAR_BY", "SimilarMemories", "TriggerSets", "similar_by_value", "similar_by_triggers"]

SIMILAR_BY = ("value", "triggers")
_MEASURES = {"value": "correlation of the values' logits over the vocabulary",
             "triggers": "Jaccard overlap of the keys' trigger examples (sentence, position)"}


@dataclass
class SimilarMemories:
    """The memories nearest to memory ``memory`` of ``layer`` (side ``sign``), best first.

    ``memories``: layer, memory, sign (the nearer side of that memory), similarity, shared (trigger examples in
    common; by triggers only), top_tokens (of that side's value). ``median``: the median similarity of this memory
    to every other one compared; ``random_pairs``: median, p95, p99 and n_pairs of the similarity of random pairs
    of memories, so that a similarity can be read against chance.
    """

    layer: int
    memory: int
    sign: int
    by: str
    memories: pd.DataFrame
    median: float
    random_pairs: dict = field(default_factory=dict)
    n_compared: int = 0

    @property
    def measure(self) -> str:
        return _MEASURES[self.by]


def _base_rate(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return {"median": float("nan"), "p95": float("nan"), "p99": float("nan"), "n_pairs": 0}
    median, p95, p99 = np.quantile(values, [0.5, 0.95, 0.99])
    return {"median": float(median), "p95": float(p95), "p99": float(p99), "n_pairs": int(len(values))}


def _random_pairs(n_memories: int, pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``pairs`` random pairs of distinct memories, as indices into ``range(n_memories)``."""
    if n_memories < 2 or pairs <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    first = rng.integers(0, n_memories, pairs)
    second = (first + rng.integers(1, n_memories, pairs)) % n_memories  # never the same memory
    return first, second


def _finish(loaded, found: pd.DataFrame, limit: int, k_tokens: int) -> pd.DataFrame:
    """The best ``limit`` rows, each with the top tokens of its side's value."""
    found = found.sort_values(["similarity", "layer", "memory"], ascending=[False, True, True], kind="stable")
    found = found.head(limit).reset_index(drop=True)
    tokens = [[] for _ in range(len(found))]
    for layer, rows in found.groupby("layer").groups.items():
        tables = top_tokens(loaded, int(layer), found.loc[rows, "memory"].tolist(), found.loc[rows, "sign"].tolist(),
                            k_tokens)
        for row, table in zip(rows, tables):
            tokens[row] = table["token"].tolist()
    return found.assign(top_tokens=tokens)


@torch.no_grad()
def similar_by_value(loaded, layer: int, memory: int, sign: int = 1, limit: int = 10, index: ValueIndex | None = None,
                     negative: bool | None = None, pairs: int = 2000, seed: int = 0,
                     k_tokens: int = 5) -> SimilarMemories:
    """The memories whose value's distribution over the vocabulary is most like that of ``sign · v_memory``:
    the Pearson correlation of their logit vectors, exact, from the head's moments (:meth:`ValueIndex.correlations`).

    ``negative`` compares ``-v_j`` too (default: for gated FFNs); ``pairs`` random pairs (``seed``) give the base rate.

    >>> like = similar_by_value(loaded, 20, 7, limit=5)
    >>> like.memories[["layer", "memory", "similarity", "top_tokens"]], like.median, like.random_pairs["p99"]
    """
    adapter = loaded.adapter
    layer, memory = check_memory(adapter, layer, memory)
    sign, limit = check_sign(sign), check_positive("limit", limit)
    signs = [1, -1] if (adapter.gated if negative is None else negative) else [1]
    index = index or ValueIndex(loaded)
    corr = index.correlations(layer, memory, sign, signs=signs)  # (signs, layers, d_ff)
    best, side = corr.max(0)
    best[layer, memory] = float("nan")  # the memory itself
    flat = best.flatten().cpu().numpy().astype(np.float64)
    keep = ~np.isnan(flat)
    d_ff = adapter.d_ff
    found = pd.DataFrame({"layer": np.arange(flat.size) // d_ff, "memory": np.arange(flat.size) % d_ff,
                          "sign": np.asarray(signs)[side.flatten().cpu().numpy()], "similarity": flat})[keep]
    rng = np.random.default_rng(seed)
    first, second = _random_pairs(adapter.n_layers * d_ff, check_positive("pairs", pairs), rng)
    a = np.stack([first // d_ff, first % d_ff, rng.choice(signs, len(first))], 1)
    random = torch.stack([index.pair_correlations(a, np.stack([second // d_ff, second % d_ff,
                                                               np.full(len(second), s)], 1))
                          for s in signs]).max(0).values
    return SimilarMemories(layer, memory, sign, "value", _finish(loaded, found, limit, check_positive("k_tokens",
                           k_tokens)), float(np.median(flat[keep])), _base_rate(random.cpu().numpy()), int(keep.sum()))


def _pack(layer, memory, sign):
    """A key (layer, memory, sign) as one int64 (ints or arrays), ordered by layer, memory, then +1 before -1."""
    return (layer << 40) | (memory << 1) | (sign < 0)


class TriggerSets:
    """Each mined key's trigger examples as a set of (sentence_id, position), for overlaps between keys.

    Built once from ``ffnlib.keys.TriggerExamples`` (a sort of the table); :meth:`overlaps` then finds every key
    sharing a trigger example with one key by binary search, in time that grows with the matches, not the table.
    ``keys``: layer, memory, sign of each key; ``sizes``: its number of trigger examples; ``memory_sides``: for each
    mined memory, its keys (+1 side, then -1 side; -1 where that side was not mined).

    >>> sets = TriggerSets(triggers)
    >>> keys, shared, jaccard = sets.overlaps(20, 7)
    """

    def __init__(self, triggers):
        if triggers is None:
            raise ParameterError("Trigger overlap needs mined trigger examples (ffnlib.keys.mine_trigger_examples).")
        table = triggers.triggers
        codes = (table["sentence_id"].to_numpy(np.int64) << POSITION_BITS) | table["position"].to_numpy(np.int64)
        packed = _pack(table["layer"].to_numpy(np.int64), table["memory"].to_numpy(np.int64),
                       table["sign"].to_numpy(np.int64))
        key_of_row, self.packed = pd.factorize(packed, sort=True)  # one entry per key (layer, memory, sign)
        self.keys = pd.DataFrame({"layer": self.packed >> 40, "memory": (self.packed >> 1) & ((1 << 39) - 1),
                                  "sign": np.where(self.packed & 1, -1, 1)})
        self.sizes = np.bincount(key_of_row, minlength=len(self.packed))
        order = np.argsort(codes)
        self._codes, self._key_of_code = codes[order], key_of_row[order]
        by_key = np.argsort(key_of_row, kind="stable")
        self._key_codes, self._starts = codes[by_key], np.concatenate([[0], np.cumsum(self.sizes)])
        # the memory (layer, memory) of each key, and up to two keys (its sides) per memory
        memory_of_key = np.unique(self.packed >> 1, return_inverse=True)[1]
        self.memory_sides = np.full((int(memory_of_key.max(initial=-1)) + 1, 2), -1, dtype=np.int64)
        self.memory_sides[memory_of_key, (self.packed & 1).astype(np.int64)] = np.arange(len(self.packed))
        self._random: dict[tuple[int, int], np.ndarray] = {}

    def __contains__(self, key: tuple[int, int, int]) -> bool:
        """Whether key (layer, memory, sign) was mined."""
        packed = _pack(*(int(x) for x in key))
        at = int(np.searchsorted(self.packed, packed))
        return at < len(self.packed) and self.packed[at] == packed

    def key(self, layer: int, memory: int, sign: int = 1) -> int:
        """The position of key (layer, memory, sign) in :attr:`keys`."""
        if (layer, memory, sign) not in self:
            layers = sorted(set(self.keys["layer"].tolist()))
            raise ParameterError(f"No trigger examples for layer {layer}, memory {memory}, sign {sign}: mined layers "
                                 f"are {layers}, signs {sorted(set(self.keys['sign'].tolist()))}.")
        return int(np.searchsorted(self.packed, _pack(int(layer), int(memory), int(sign))))

    def codes(self, key: int) -> np.ndarray:
        return self._key_codes[self._starts[key]: self._starts[key + 1]]

    def overlaps(self, layer: int, memory: int, sign: int = 1) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        """Every key (:attr:`keys`), the number of trigger examples it shares with key (layer, memory, sign), and
        their Jaccard overlap ``shared / (|A| + |B| - shared)``."""
        key = self.key(layer, memory, sign)
        mine = self.codes(key)
        low, high = np.searchsorted(self._codes, mine, "left"), np.searchsorted(self._codes, mine, "right")
        hits = np.concatenate([self._key_of_code[lo:hi] for lo, hi in zip(low, high)] or [np.empty(0, np.int64)])
        shared = np.bincount(hits, minlength=len(self.packed))
        return self.keys, shared, shared / np.maximum(self.sizes[key] + self.sizes - shared, 1)

    def random_pairs(self, pairs: int = 2000, seed: int = 0) -> np.ndarray:
        """The Jaccard overlap of ``pairs`` random pairs of distinct mined memories: a random side of the first,
        the nearer side of the second (as :func:`similar_by_triggers` counts a memory). Kept once computed."""
        if (pairs, seed) not in self._random:
            rng = np.random.default_rng(seed)
            values = []
            for a, b in zip(*_random_pairs(len(self.memory_sides), pairs, rng)):
                mine = int(rng.choice(self.memory_sides[a][self.memory_sides[a] >= 0]))
                values.append(max(self.jaccard(mine, int(other)) for other in self.memory_sides[b] if other >= 0))
            self._random[(pairs, seed)] = np.asarray(values, dtype=np.float64)
        return self._random[(pairs, seed)]

    def jaccard(self, first: int, second: int) -> float:
        """The Jaccard overlap of two keys (positions in :attr:`keys`)."""
        shared = len(np.intersect1d(self.codes(first), self.codes(second), assume_unique=True))
        return shared / max(int(self.sizes[first] + self.sizes[second]) - shared, 1)


def similar_by_triggers(loaded, triggers, layer: int, memory: int, sign: int = 1, limit: int = 10,
                        index: TriggerSets | None = None, pairs: int = 2000, seed: int = 0,
                        k_tokens: int = 5) -> SimilarMemories:
    """The memories whose keys share most trigger examples with key ``memory`` of ``layer`` (side ``sign``): the
    Jaccard overlap of their sets of (sentence_id, position), over every mined key (``ffnlib.keys``). Memories
    sharing none are not listed (the median and base rates count them).

    ``index``: a :class:`TriggerSets` of ``triggers``, when already built. ``pairs`` random pairs (``seed``) of
    mined memories give the base rate.

    >>> like = similar_by_triggers(loaded, triggers, 20, 7, limit=5)
    >>> like.memories[["layer", "memory", "similarity", "shared"]], like.median, like.random_pairs["p99"]
    """
    adapter = loaded.adapter
    layer, memory = check_memory(adapter, layer, memory)
    sign, limit = check_sign(sign), check_positive("limit", limit)
    index = index if index is not None else TriggerSets(triggers)
    keys, shared, jaccard = index.overlaps(layer, memory, sign)
    found = keys.assign(similarity=jaccard, shared=shared)
    found = found[~((found["layer"] == layer) & (found["memory"] == memory))]
    found = found.sort_values(["similarity", "shared"], ascending=False, kind="stable").drop_duplicates(
        ["layer", "memory"])  # a memory's nearer side
    median = float(found["similarity"].median()) if len(found) else float("nan")
    random = index.random_pairs(check_positive("pairs", pairs), seed)
    table = _finish(loaded, found[found["shared"] > 0], limit, check_positive("k_tokens", k_tokens))
    table = table[["layer", "memory", "sign", "similarity", "shared", "top_tokens"]].astype(
        {"layer": int, "memory": int, "sign": int, "shared": int})
    return SimilarMemories(layer, memory, sign, "triggers", table, median, _base_rate(random), len(found))
