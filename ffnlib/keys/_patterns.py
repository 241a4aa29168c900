"""Pattern measures (Fig. 2 analogue, automatic): shallow and semantic patterns of triggers, against random keys."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..config import check_int
from ..errors import ParameterError
from ._examples import TriggerExamples

__all__ = ["with_tokens", "key_measures", "key_pattern_measures", "random_triggers", "key_pattern_table",
           "layer_pattern_measures", "pattern_trend"]


def with_tokens(examples: TriggerExamples, frame: pd.DataFrame) -> pd.DataFrame:
    """Add last_token, previous_token (or -1 at the first real token) and topic to trigger rows."""
    sentences = examples.sentences
    lengths = sentences["token_ids"].map(len).to_numpy(np.int64)
    flat = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in sentences["token_ids"]] or [np.zeros(0, np.int64)])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    ids = pd.Index(sentences["sentence_id"].astype("int64"))
    if not ids.is_unique:
        raise ParameterError("The mined sentences repeat a sentence_id: each sentence must have its own id.")
    row = ids.get_indexer(frame["sentence_id"].astype("int64"))
    pos = frame["position"].to_numpy(np.int64)
    length = lengths[np.maximum(row, 0)] if len(lengths) else np.zeros(len(row), np.int64)
    bad = (row < 0) | (pos < 0) | (pos >= length)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ParameterError(f"Trigger row {first} (sentence {int(frame['sentence_id'].iloc[first])}, position "
                             f"{int(pos[first])}) is not a token of the mined sentences: were the triggers and the "
                             "sentences mined together?")
    at = starts[row] + pos
    out = frame.copy()
    out["last_token"] = flat[at]
    out["previous_token"] = np.where(pos - 1 >= examples.n_bos, flat[np.maximum(at - 1, 0)], -1)
    out["topic"] = sentences["topic"].to_numpy(dtype=object)[row]
    return out


def key_measures(triggers: pd.DataFrame, min_labelled: int = 5,
                 exclude_topics: Sequence[str] = ("Uncategorized",)) -> pd.DataFrame:
    """Per key (layer, memory, sign) of trigger rows with last_token, previous_token and topic columns:

    - ``shallow_token``: share of the key's triggers whose last token is shared with >= 2 other triggers;
    - ``shallow_bigram``: the same for the last two tokens;
    - ``topic_concentration``: share of the most common topic among the triggers with a topic label
      (NaN when fewer than ``min_labelled`` have one); ``labelled``: how many have one.
    """
    t = triggers.copy()
    group = ["layer", "memory", "sign"]
    t["token_count"] = t.groupby(group + ["last_token"])["last_token"].transform("size")
    t["bigram_count"] = t.groupby(group + ["previous_token", "last_token"])["last_token"].transform("size")
    t["shared_token"] = t["token_count"] >= 3
    t["shared_bigram"] = (t["bigram_count"] >= 3) & (t["previous_token"] >= 0)
    out = t.groupby(group).agg(triggers=("last_token", "size"), shallow_token=("shared_token", "mean"),
                               shallow_bigram=("shared_bigram", "mean"))
    labelled = t[t["topic"].notna() & ~t["topic"].isin(list(exclude_topics))]
    counts = labelled.groupby(group + ["topic"]).size()
    top = counts.groupby(level=group).max()
    total = counts.groupby(level=group).sum()
    out["labelled"] = total.reindex(out.index).fillna(0).astype(int)
    conc = (top / total).reindex(out.index)
    out["topic_concentration"] = conc.where(out["labelled"] >= min_labelled)
    return out.reset_index()


def key_pattern_measures(loaded, examples: TriggerExamples, rows: pd.DataFrame, min_labelled: int = 5) -> dict:
    """The pattern measures of one key's trigger rows (as :func:`key_measures`), as a dict."""
    frame = key_measures(with_tokens(examples, rows), min_labelled=min_labelled)
    return {} if frame.empty else {c: frame.iloc[0][c] for c in ("triggers", "shallow_token", "shallow_bigram",
                                                                  "labelled", "topic_concentration")}


def random_triggers(examples: TriggerExamples, n_keys: int = 2000, top: int = 25, seed: int = 0) -> pd.DataFrame:
    """Trigger rows of "random keys": each draws ``top`` distinct sentences of the mined pool and a
    uniformly random real-token position in each (layer -1, sign 1)."""
    rng = np.random.default_rng(seed)
    sentences = examples.sentences
    n = len(sentences)
    top = min(top, n)
    lengths = np.array([len(t) for t in sentences["token_ids"]])
    picks = np.stack([rng.choice(n, size=top, replace=False) for _ in range(n_keys)])
    rows = picks.reshape(-1)
    nb = examples.n_bos
    position = nb + np.floor(rng.random(len(rows)) * (lengths[rows] - nb)).astype(np.int64)
    return pd.DataFrame({"layer": -1, "memory": np.repeat(np.arange(n_keys), top), "sign": 1,
                         "rank": np.tile(np.arange(top), n_keys),
                         "sentence_id": sentences["sentence_id"].to_numpy(np.int64)[rows], "position": position})


def key_pattern_table(examples: TriggerExamples, top: int = 25, sign: int = 1, min_labelled: int = 5,
                      exclude_topics: Sequence[str] = ("Uncategorized",)) -> pd.DataFrame:
    """:func:`key_measures` of every mined key's top-``top`` trigger examples (one row per key)."""
    t = examples.triggers
    t = t[(t["sign"] == sign) & (t["rank"] < check_int("top", top))]
    if t.empty:
        raise ParameterError(f"No trigger examples with sign {sign}.")
    return key_measures(with_tokens(examples, t), min_labelled, exclude_topics)


def layer_pattern_measures(examples: TriggerExamples, n_layers: int, top: int = 25, sign: int = 1,
                           min_labelled: int = 5, exclude_topics: Sequence[str] = ("Uncategorized",),
                           random_keys: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per layer, the mean over its keys of the shallow and semantic measures of :func:`key_measures`
    (each key's top-``top`` triggers), with the same measures for random keys
    (:func:`random_triggers`) and the corpus base rate of the most common topic.

    Columns: layer, relative_depth, keys, shallow_token, with_shared_token (share of keys where >= 3
    triggers share their last token: a shallow pattern by the paper's 3-prefix rule), shallow_bigram,
    topic_concentration, keys_with_topic, random_shallow_token, random_with_shared_token,
    random_shallow_bigram, random_topic_concentration,
    topic_base_rate, most_common_topic.
    """
    top = check_int("top", top)
    per_key = key_pattern_table(examples, top, sign, min_labelled, exclude_topics)
    g = per_key.groupby("layer")
    out = pd.DataFrame({"keys": g.size(), "shallow_token": g["shallow_token"].mean(),
                        "with_shared_token": g["shallow_token"].apply(lambda s: float((s > 0).mean())),
                        "shallow_bigram": g["shallow_bigram"].mean(),
                        "topic_concentration": g["topic_concentration"].mean(),
                        "keys_with_topic": g["topic_concentration"].count()}).reset_index()
    out.insert(1, "relative_depth", (out["layer"] + 1) / n_layers)
    rand = key_measures(with_tokens(examples, random_triggers(examples, random_keys, top, seed)),
                        min_labelled, exclude_topics)
    out["random_shallow_token"] = rand["shallow_token"].mean()
    out["random_with_shared_token"] = float((rand["shallow_token"] > 0).mean())
    out["random_shallow_bigram"] = rand["shallow_bigram"].mean()
    out["random_topic_concentration"] = rand["topic_concentration"].mean()
    topics = examples.sentences["topic"]
    topics = topics[topics.notna() & ~topics.isin(list(exclude_topics))]
    counts = topics.value_counts()
    out["topic_base_rate"] = float(counts.iloc[0] / counts.sum()) if len(counts) else np.nan
    out["most_common_topic"] = str(counts.index[0]) if len(counts) else None
    return out


def pattern_trend(measures: pd.DataFrame, split: float = 9 / 16) -> dict:
    """"Shallow in lower layers, semantic in upper layers", per layer pooled: the shares below and above
    ``split`` and their Spearman correlation with depth.

    Lower layers: relative depth <= ``split`` (the paper: layers 1-9 of 16 shallow, 10-16 semantic).
    Shallow is the last-token measure; semantic is the topic concentration above random keys. The verdicts
    (with intervals and a random-weights control) are :func:`section3_measures` and ``ffnlib.findings``.
    """
    lower = measures[measures["relative_depth"] <= split]
    upper = measures[measures["relative_depth"] > split]
    semantic = measures["topic_concentration"] - measures["random_topic_concentration"]
    result = {
        "split_relative_depth": split,
        "shallow_lower": float(lower["shallow_token"].mean()), "shallow_upper": float(upper["shallow_token"].mean()),
        "semantic_excess_lower": float(semantic[lower.index].mean()),
        "semantic_excess_upper": float(semantic[upper.index].mean()),
        "shallow_depth_correlation": float(measures["shallow_token"].corr(measures["relative_depth"],
                                                                          method="spearman")),
        "semantic_depth_correlation": float(semantic.corr(measures["relative_depth"], method="spearman")),
    }
    return result
