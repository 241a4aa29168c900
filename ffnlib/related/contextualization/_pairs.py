"""FF-amplified pairs: the input tokens whose share in a query's map the FFN raises most, their classes (sub-word
pieces of one word, a capitalised multi-word span, a frequent corpus bigram, other) and those classes' base rates."""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ...config import check_int
from ...errors import ParameterError
from ._layout import before_ff
from ._maps import MapsResult
from ._normalise import normalised_maps
from ._resampling import difference_of_means, interval, mean, mean_columns

__all__ = ["CLASSES", "corpus_bigrams", "classify_pairs", "amplification", "amplified_pairs", "amplified_classes"]

CLASSES = ("subword", "capitalised span", "frequent bigram", "other")


def corpus_bigrams(loaded, texts: Sequence[str], min_count: int = 5, min_pmi: float = 3.0) -> pd.DataFrame:
    """Frequent, collocated token bigrams of a corpus: adjacent token pairs (as the tokenizer splits the texts,
    no BOS) seen at least ``min_count`` times with PMI ``log2(p(ab) / (p(a) p(b)))`` at least ``min_pmi``.
    Columns: ``first``, ``second`` (token ids), ``count``, ``pmi``, ``bigram`` (decoded)."""
    min_count = check_int("min_count", min_count)
    if not texts:
        raise ParameterError("corpus_bigrams needs some texts.")
    encoded = loaded.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    vocab = max(len(loaded.tokenizer), 1 + max((max(ids) for ids in encoded if ids), default=0))
    unigrams = np.bincount(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded if ids]),
                           minlength=vocab)
    keys = np.concatenate([np.asarray(ids[:-1], dtype=np.int64) * vocab + np.asarray(ids[1:], dtype=np.int64)
                           for ids in encoded if len(ids) > 1])
    pairs, counts = np.unique(keys, return_counts=True)
    first, second = pairs // vocab, pairs % vocab
    total_pairs, total_tokens = counts.sum(), unigrams.sum()
    pmi = np.log2(counts / total_pairs) - np.log2(unigrams[first] / total_tokens) - np.log2(
        unigrams[second] / total_tokens)
    keep = (counts >= min_count) & (pmi >= min_pmi)
    frame = pd.DataFrame({"first": first[keep], "second": second[keep], "count": counts[keep], "pmi": pmi[keep]})
    frame["bigram"] = [loaded.tokenizer.decode([int(a), int(b)]) for a, b in zip(frame["first"], frame["second"])]
    return frame.sort_values("count", ascending=False, kind="stable").reset_index(drop=True)


def _pair_key(sentence, i, j) -> np.ndarray:
    return (np.asarray(sentence, dtype=np.int64) << 16) | (np.asarray(i, dtype=np.int64) << 8) | np.asarray(j, np.int64)


def classify_pairs(result: MapsResult, bigrams: pd.DataFrame | None = None, exclude_first: bool = True) -> pd.DataFrame:
    """Every candidate pair (query ``i``, input token ``j < i``) of every sentence, with its class: ``subword``
    (both tokens in one word, from the tokenizer's offsets), ``capitalised span`` (tokens of two different words
    of one run of capitalised words), ``frequent bigram`` (adjacent tokens forming a pair of ``bigrams``) or
    ``other``, checked in that order. Self-pairs are never candidates; ``exclude_first`` also leaves out input
    position 0 (BOS, or the first token where the model has none: an attention sink).
    Columns: ``sentence``, ``i``, ``j``, ``distance``, ``pair_class``."""
    tokens = result.tokens
    parts = []
    first = 1 if exclude_first else 0
    for sentence, n in zip(result.sentences["sentence"], result.sentences["n_tokens"]):
        i, j = np.tril_indices(int(n), -1)
        keep = j >= first
        parts.append((np.full(keep.sum(), sentence), i[keep], j[keep]))
    sentence = np.concatenate([p[0] for p in parts]).astype(np.int64)
    i = np.concatenate([p[1] for p in parts]).astype(np.int64)
    j = np.concatenate([p[2] for p in parts]).astype(np.int64)
    offsets = np.zeros(len(result.sentences) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(result.sentences["n_tokens"].to_numpy())
    ordered = tokens.sort_values(["sentence", "position"], kind="stable")
    word, span, token_id = (ordered[c].to_numpy() for c in ("word", "span", "token_id"))
    row_i, row_j = offsets[sentence] + i, offsets[sentence] + j
    subword = (word[row_i] == word[row_j]) & (word[row_i] >= 0)
    in_span = (span[row_i] == span[row_j]) & (span[row_i] >= 0) & ~subword
    bigram = np.zeros(len(i), dtype=bool)
    if bigrams is not None and len(bigrams):
        vocab = int(max(token_id.max(), bigrams["first"].max(), bigrams["second"].max())) + 1
        known = bigrams["first"].to_numpy(np.int64) * vocab + bigrams["second"].to_numpy(np.int64)
        bigram = (i - j == 1) & np.isin(token_id[row_j].astype(np.int64) * vocab + token_id[row_i], known)
    bigram &= ~subword & ~in_span
    pair_class = np.select([subword, in_span, bigram], list(CLASSES[:3]), CLASSES[3])
    return pd.DataFrame({"sentence": sentence, "i": i, "j": j, "distance": i - j, "pair_class": pair_class})


def amplification(result: MapsResult, normalise: str = "row") -> pd.DataFrame:
    """FF-amplification of every map entry: the normalised map after the FFN (ATBFF) minus the one it reads
    (ATBLN, or ATB where the FFN has no input norm). Columns ``sentence``, ``layer``, ``i``, ``j``, ``before``,
    ``after``, ``amp``."""
    norm = normalised_maps(result, normalise)
    with_ln = [layer for layer in result.layers if before_ff(result.stages(layer)) == "ATBLN"]
    use_ln = norm["layer"].isin(with_ln).to_numpy()
    before = np.where(use_ln, norm["ATBLN"].to_numpy(), norm["ATB"].to_numpy())
    after = norm["ATBFF"].to_numpy()
    return pd.DataFrame({"sentence": norm["sentence"], "layer": norm["layer"], "i": norm["i"], "j": norm["j"],
                         "before": before, "after": after, "amp": after - before})


def amplified_pairs(result: MapsResult, bigrams: pd.DataFrame | None = None, top_k: int = 3,
                    exclude_first: bool = True, normalise: str = "row") -> pd.DataFrame:
    """The ``top_k`` candidate pairs (see :func:`classify_pairs`) per sentence and layer whose normalised weight
    the FFN raises most (positive amplification only), with their class and tokens: ``sentence``, ``layer``,
    ``i``, ``j``, ``query``, ``key``, ``before``, ``after``, ``amp``, ``distance``, ``pair_class``, ``rank``."""
    top_k = check_int("top_k", top_k)
    amp = amplification(result, normalise)
    candidates = classify_pairs(result, bigrams, exclude_first)
    keys = pd.Index(_pair_key(candidates["sentence"], candidates["i"], candidates["j"]))
    where = keys.get_indexer(_pair_key(amp["sentence"], amp["i"], amp["j"]))
    keep = (where >= 0) & (amp["amp"].to_numpy() > 0)
    amp, where = amp[keep], where[keep]
    amp = amp.assign(distance=candidates["distance"].to_numpy()[where],
                     pair_class=candidates["pair_class"].to_numpy()[where])
    top = (amp.sort_values(["sentence", "layer", "amp"], ascending=[True, True, False], kind="stable")
           .groupby(["sentence", "layer"], sort=False).head(top_k).copy())
    top["rank"] = top.groupby(["sentence", "layer"], sort=False).cumcount()
    token = result.tokens.set_index(["sentence", "position"])["token"]
    top["query"] = token.reindex(pd.MultiIndex.from_arrays([top["sentence"], top["i"]])).to_numpy()
    top["key"] = token.reindex(pd.MultiIndex.from_arrays([top["sentence"], top["j"]])).to_numpy()
    columns = ["sentence", "layer", "i", "j", "query", "key", "before", "after", "amp", "distance", "pair_class",
               "rank"]
    return top[columns].reset_index(drop=True)


def amplified_classes(result: MapsResult, bigrams: pd.DataFrame | None = None, top_k: int = 3,
                      exclude_first: bool = True, normalise: str = "row", layers: Iterable[int] | None = None,
                      by_layer: bool = False, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The classes of the FF-amplified pairs against their base rates.

    ``top_share``: the share of each class among the top-``top_k`` pairs of every sentence and layer (each
    sentence weighs the same); ``base_rate``: its share among all candidate pairs (the control; each sentence
    weighs the same); ``matched_rate``: the base rate at the top pairs' distances ``i − j`` (a stricter control:
    amplified pairs are often adjacent, and so are sub-word pieces). 95% intervals by a seeded bootstrap over
    sentences (``ffnlib.stats``), and the interval of the paired difference ``top_share − base_rate``;
    ``n_top_pairs``, ``n_candidates`` and ``n_sentences`` count what they rest on. ``by_layer``: one row per
    (layer, class). ``layers``: the layers whose top pairs count (default all).

    In a parallel block (GPT-J, GPT-NeoX with ``use_parallel_residual``) the FFN reads the block's input, not the
    attention's output, so its map adds weight to each token itself only: no pair ``j < i`` is FF-amplified, the
    rows' ``n_top_pairs`` are 0 and their shares NaN (the findings are then "not measured").
    """
    n_boot = check_int("n_boot", n_boot)
    top = amplified_pairs(result, bigrams, top_k, exclude_first, normalise)
    if layers is not None:
        top = top[top["layer"].isin(list(layers))]
    candidates = classify_pairs(result, bigrams, exclude_first)
    n_sent = len(result.sentences)
    max_distance = int(result.sentences["n_tokens"].max())
    class_code = {c: k for k, c in enumerate(CLASSES)}
    cand = np.zeros((n_sent, max_distance + 1, len(CLASSES)))
    np.add.at(cand, (candidates["sentence"].to_numpy(), candidates["distance"].to_numpy(),
                     candidates["pair_class"].map(class_code).to_numpy(dtype=np.int64)), 1)
    base_rows = _shares(cand.sum(1))  # (sentence, class): each sentence's class shares among its candidates
    cand_total = cand.sum(2)  # (sentence, distance): its candidates at each distance
    if by_layer:  # every layer gets its rows, also one where no pair is FF-amplified (its shares are NaN)
        shown = [layer for layer in result.layers if layers is None or layer in set(layers)]
        groups = [(layer, top[top["layer"] == layer]) for layer in shown]
    else:
        groups = [(None, top)]
    rows = []
    for layer, part in groups:
        hits = np.zeros((n_sent, max_distance + 1, len(CLASSES)))
        np.add.at(hits, (part["sentence"].to_numpy(), part["distance"].to_numpy(),
                         part["pair_class"].map(class_code).to_numpy(dtype=np.int64)), 1)
        points = _point_statistics(hits, cand)
        top_rows = _shares(hits.sum(1))  # (sentence, class) shares among its top pairs; NaN: no top pair
        distances = _shares(hits.sum(2))  # (sentence, distance): the distances of its top pairs; NaN: no top pair
        has_top = np.isfinite(distances).all(1)[:, None]
        distance_columns = np.hstack([np.where(has_top, distances, 0.0), has_top.astype(np.float64)])
        for c, name in enumerate(CLASSES):
            row = {"layer": layer, "pair_class": name} if by_layer else {"pair_class": name}
            top_c, base_c = mean_columns(top_rows[:, c]), mean_columns(base_rows[:, c])
            matched_c = np.hstack([distance_columns, cand[:, :, c], cand_total])
            statistics = {"top_share": (top_c, mean), "base_rate": (base_c, mean),
                          "matched_rate": (matched_c, _matched_rate(max_distance + 1))}
            for key, (columns, statistic) in statistics.items():
                row[key] = float(points[key][c])
                row[f"{key.split('_')[0]}_low"], row[f"{key.split('_')[0]}_high"] = interval(
                    columns, statistic, n_boot, seed, row[key])
            row["difference_low"], row["difference_high"] = interval(np.hstack([top_c, base_c]), difference_of_means,
                                                                     n_boot, seed)
            row["enrichment"] = row["top_share"] / row["base_rate"] if row["base_rate"] > 0 else float("nan")
            row["n_top_pairs"] = int(hits[:, :, c].sum())
            row["n_candidates"] = int(cand[:, :, c].sum())
            row["n_sentences"] = n_sent
            rows.append(row)
    return pd.DataFrame(rows)


def _shares(counts: np.ndarray) -> np.ndarray:
    """Shares along the last axis, NaN where there is nothing to share (a sentence without pairs)."""
    total = counts.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts / total, np.nan)


def _matched_rate(n_distances: int):
    """The distance-matched base rate of one class, ``Σ_d P_top(d) · P(class | d)``, as a statistic of the summed
    columns ``[distance shares of the top pairs (D), 1 (sentences with top pairs), the class's candidates at each
    distance (D), all candidates at each distance (D)]``: P_top(d) is the mean over sentences of their top pairs'
    distance shares, P(class | d) is pooled over the sentences."""
    d = n_distances

    def statistic(sums: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            p_top_d = np.nan_to_num(sums[..., :d] / sums[..., d:d + 1])
            p_class_d = np.nan_to_num(sums[..., d + 1:2 * d + 1] / sums[..., 2 * d + 1:])
        return (p_top_d * p_class_d).sum(-1)

    return statistic


def _point_statistics(hits: np.ndarray, cand: np.ndarray) -> dict[str, np.ndarray]:
    """The point values, per class: mean over sentences of each sentence's class shares among its top pairs and
    among its candidates, and the distance-matched base rate. ``hits``/``cand``: (sentence, distance, class)
    counts of the top pairs and of all candidate pairs."""
    index = np.arange(hits.shape[0])[None, :]  # the sentences, once (the sums of every sentence)
    with warnings.catch_warnings():  # a class without top pairs gives NaN, as it should
        warnings.simplefilter("ignore", RuntimeWarning)
        top_share = np.nanmean(_shares(hits.sum(1))[index], axis=1)
        base_rate = np.nanmean(_shares(cand.sum(1))[index], axis=1)
        # distance-matched: Σ_d P_top(d) · P(class | d), with P(class | d) pooled over the sentences
        p_top_d = np.nanmean(_shares(hits.sum(2))[index], axis=1)  # (1, D)
    weights = np.stack([np.bincount(row, minlength=cand.shape[0]) for row in index])  # (1, S): every sentence once
    cand_d = np.einsum("bs,sdc->bdc", weights, cand)  # (1, D, C)
    p_class_d = np.nan_to_num(_shares(cand_d))
    matched = np.einsum("bd,bdc->bc", np.nan_to_num(p_top_d), p_class_d)
    return {"top_share": top_share[0], "base_rate": base_rate[0], "matched_rate": matched[0]}
