"""The key-value view (:func:`expert_coherence`): do an expert's memories share trigger topics (notebook 01's mining,
:func:`memory_topics`) or value tokens (notebook 02's projection)? The random split is the control: its share of
pairs is the base rate of two memories of a layer."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ...stats import percentile_interval, resample_indices, two_level
from ._partitions import split_draw, split_kind
from ._splits import ExpertSplits

__all__ = ["memory_topics", "expert_coherence"]


def memory_topics(examples, layers: Sequence[int], top: int = 25, min_labelled: int = 5,
                  exclude_topics: Sequence[str] = ("Uncategorized",)) -> pd.DataFrame:
    """Each memory's dominant trigger topic (sign +1, top-``top`` triggers; notebook 01's mining): the most
    common topic among its triggers whose sentence has one (ties: first by name); memories with fewer than
    ``min_labelled`` labelled triggers are left out. Columns: layer, memory, topic."""
    t = examples.triggers
    t = t[(t["sign"] == 1) & (t["rank"] < top) & t["layer"].isin(list(layers))]
    topics = examples.sentences.set_index("sentence_id")["topic"]
    t = t.assign(topic=topics.reindex(t["sentence_id"].to_numpy()).to_numpy())
    t = t[t["topic"].notna() & ~t["topic"].isin(list(exclude_topics))]
    counts = t.groupby(["layer", "memory", "topic"]).size().rename("n").reset_index()
    labelled = counts.groupby(["layer", "memory"])["n"].transform("sum")
    counts = counts[labelled >= min_labelled]
    best = counts.sort_values(["layer", "memory", "n", "topic"], ascending=[True, True, False, True])
    return best.drop_duplicates(["layer", "memory"])[["layer", "memory", "topic"]].reset_index(drop=True)


def _pair_share_topics(topics: np.ndarray) -> tuple[int, int]:
    """(pairs with the same topic, pairs) among the labelled members of one expert."""
    n = len(topics)
    if n < 2:
        return 0, 0
    _, counts = np.unique(topics, return_counts=True)
    return int((counts * (counts - 1) // 2).sum()), n * (n - 1) // 2


def _pair_share_tokens(tokens: np.ndarray) -> tuple[int, int]:
    """(pairs sharing at least one top token, pairs) among the members of one expert; tokens (n, k)."""
    n = len(tokens)
    if n < 2:
        return 0, 0
    shared = (tokens[:, None, :, None] == tokens[None, :, None, :]).any(axis=(2, 3))
    return int(np.triu(shared, 1).sum()), n * (n - 1) // 2


def expert_coherence(splits: ExpertSplits, examples=None, projection=None, top_triggers: int = 25,
                     top_tokens: int = 10, min_labelled: int = 5, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Do an expert's memories share trigger topics (``examples``: notebook 01's mining) or value tokens
    (``projection``: notebook 02's value projection)? Per view and split: the share of pairs of memories
    of one expert that share their dominant trigger topic / at least one of their top-``top_tokens`` value
    tokens (sign +1), pooled over experts, with a bootstrap 95% interval over experts. The ``random`` split
    is the control (its share is the base rate of two memories of the layer): one row, the mean over its
    ``draws``, with an interval over the draws and their experts."""
    views = {}
    if examples is not None:
        topics = memory_topics(examples, splits.layers, top_triggers, min_labelled)
        views["trigger_topic"] = {(int(l), int(m)): t for l, m, t in topics.itertuples(index=False)}
    if projection is not None:
        tok = projection.tokens
        tok = tok[(tok["sign"] == 1) & (tok["rank"] < top_tokens) & tok["layer"].isin(splits.layers)]
        tok = tok.sort_values(["layer", "memory", "rank"])
        views["value_tokens"] = {(int(l), int(m)): g["token"].to_numpy(np.int64)
                                 for (l, m), g in tok.groupby(["layer", "memory"])}
    rows = []
    for view, per_memory in views.items():
        units = {}  # split -> (experts with a pair, 2): pairs sharing, pairs
        for split in splits.splits:
            same, pairs = [], []
            for layer in splits.layers:
                labels = splits.labels(split, layer)
                for e in range(splits.n_experts):
                    members = [m for m in np.flatnonzero(labels == e) if (layer, int(m)) in per_memory]
                    if view == "trigger_topic":
                        s, p = _pair_share_topics(np.array([per_memory[(layer, int(m))] for m in members]))
                    else:
                        s, p = _pair_share_tokens(np.stack([per_memory[(layer, int(m))] for m in members])
                                                  if members else np.zeros((0, top_tokens), dtype=np.int64))
                    if p:
                        same.append(s)
                        pairs.append(p)
            units[split] = np.asarray([same, pairs], dtype=np.float64).T.reshape(-1, 2)
        for split in splits.splits:
            if split_kind(split) == "random":
                if split_draw(split) == 0:  # one row for every draw: their mean, over draws and experts
                    rows.append(_random_coherence(view, [units[s] for s in splits.random_splits], n_boot, seed))
                continue
            same, pairs = units[split][:, 0], units[split][:, 1]
            row = {"view": view, "split": split, "experts": len(pairs), "pairs": int(pairs.sum()), "draws": 1}
            if len(pairs):
                idx = resample_indices(len(pairs), n_boot, seed)
                row["share"] = float(same.sum() / pairs.sum())
                row["share_low"], row["share_high"] = percentile_interval(same[idx].sum(1) / pairs[idx].sum(1))
            else:
                row.update(share=np.nan, share_low=np.nan, share_high=np.nan)
            rows.append(row)
    return pd.DataFrame(rows, columns=["view", "split", "experts", "pairs", "share", "share_low", "share_high",
                                       "draws"])


def _random_coherence(view: str, draws: list[np.ndarray], n_boot: int, seed: int) -> dict:
    """The random split's coherence row: the mean over draws of each draw's share of pairs, with a two-level
    interval (draws, then each draw's own experts)."""
    draws = [d for d in draws if len(d)]
    row = {"view": view, "split": "random", "experts": int(sum(len(d) for d in draws)),
           "pairs": int(sum(d[:, 1].sum() for d in draws)), "draws": len(draws)}
    e = two_level(draws, lambda t: t[..., 0] / t[..., 1], "experts", n_boot, seed, crossed=False)
    return {**row, "share": e.value, "share_low": e.low, "share_high": e.high}
