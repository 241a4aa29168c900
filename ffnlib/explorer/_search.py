"""Search: the memories whose value promotes a token, or whose trigger examples contain a word."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import ParameterError
from ._common import check_memory, check_positive, check_sign

__all__ = ["SEARCH_BY", "trigger_sentence_index", "ValueIndex", "search_value_token", "search_trigger_word"]

SEARCH_BY = ("value token", "trigger word")


def trigger_sentence_index(triggers) -> dict[int, list[int]]:
    """sentence_id -> token ids of mined trigger examples."""
    return triggers.token_index()


def _token_variants(tokenizer, word: str) -> list[list[int]]:
    """Token id sequences of ``word`` as it may appear in text: with and without a leading space,
    as typed, lower case and capitalised."""
    word = word.strip()
    forms = dict.fromkeys([word, word.lower(), word.capitalize(), word.upper()])
    seqs = []
    for form in forms:
        for text in (" " + form, form):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids and ids not in seqs:
                seqs.append(ids)
    return seqs


class ValueIndex:
    """Finds the memories whose value promotes a given token, without projecting every value.

    For a value ``v`` read as ``x = g ⊙ v`` (mean-centred first for a LayerNorm), the logit of token ``t``
    is ``x·e_t (+ b_t)``. Its z-score against the whole vocabulary, ``(x·e_t + b_t - mean) / std``, costs
    one matrix-vector product per layer, since the mean and spread of ``x·e`` over the vocabulary follow
    from the mean and covariance of the head's rows. The best candidates by z-score are then projected
    exactly (``Adapter.logits_from_values``) to get the token's rank and probability.

    The same moments give the Pearson correlation of two values' logit vectors over the vocabulary
    (:meth:`correlations`, :meth:`pair_correlations`): ``cov = x1ᵀ C x2 + (x1 + x2)·c + var(b)``, with ``C``
    the covariance of the head's rows and ``c`` their covariance with the head's bias. All are of the logits
    before a final softcap (Gemma 2), which changes no ranking.

    >>> index = ValueIndex(loaded)
    >>> index.correlations(20, 7)[0, 3]   # corr. of v_7 of layer 20 with every value of layer 3, over the vocabulary
    """

    def __init__(self, loaded):
        self.loaded = loaded
        adapter = loaded.adapter
        weight = adapter.head.weight.detach().float()
        bias = getattr(adapter.head, "bias", None)
        self.bias = bias.detach().float() if bias is not None else torch.zeros(weight.shape[0], device=weight.device)
        self.weight = weight
        self.mean = weight.mean(0)
        centred = weight - self.mean
        self.covariance = centred.T @ centred / weight.shape[0]
        self.bias_mean, self.bias_var = float(self.bias.mean()), float(self.bias.var(unbiased=False))
        self.bias_covariance = centred.T @ (self.bias - self.bias_mean) / weight.shape[0]  # Cov(e_t, b_t), (d,)
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _layer(self, layer: int):
        """(x, mean, xᵀCx, x·c) of every value of ``layer``: x as the head reads it, the mean of its logits over
        the vocabulary, and the two parts of their variance that depend on x (``var = xᵀCx + 2 x·c + var(b)``)."""
        if layer not in self._inputs:
            adapter = self.loaded.adapter
            x = adapter.values(layer).float()
            if adapter.is_layernorm():
                x = x - x.mean(-1, keepdim=True)
            x = x * adapter.norm_gain().float()
            mean = x @ self.mean + self.bias_mean
            self._inputs[layer] = (x, mean, ((x @ self.covariance) * x).sum(-1), x @ self.bias_covariance)
        return self._inputs[layer]

    def _std(self, quadratic: torch.Tensor, cross: torch.Tensor, sign=1) -> torch.Tensor:
        """The spread of the logits of ``sign · x`` over the vocabulary, from :meth:`_layer`'s parts."""
        return (quadratic + 2 * sign * cross + self.bias_var).clamp_min(1e-12).sqrt()

    @torch.no_grad()
    def correlations(self, layer: int, memory: int, sign: int = 1, layers: Iterable[int] | None = None,
                     signs: Sequence[int] = (1,)) -> torch.Tensor:
        """(len(signs), n_layers, d_ff): the Pearson correlation, over the vocabulary, of the logits of
        ``sign · v_memory`` of ``layer`` with those of ``s · v_j`` for each ``s`` in ``signs`` and every value
        ``v_j`` of ``layers`` (default: all)."""
        adapter = self.loaded.adapter
        layer_list = adapter.check_layers(layers)
        layer, memory = check_memory(adapter, layer, memory)
        sign = check_sign(sign)
        x, _, quadratic, cross = self._layer(layer)
        x1, q1, c1 = sign * x[memory], quadratic[memory], sign * cross[memory]
        std1 = self._std(q1, c1)
        pull = self.covariance @ x1 + self.bias_covariance  # cov(s·x, x1) = s·x·pull + x1·c + var(b)
        out = torch.empty(len(signs), len(layer_list), adapter.d_ff, device=x.device)
        for j, other in enumerate(layer_list):
            xs, _, quadratic, cross = self._layer(other)
            dot = xs @ pull
            for i, s in enumerate(signs):
                out[i, j] = (s * dot + c1 + self.bias_var) / (std1 * self._std(quadratic, cross, s))
        return out

    @torch.no_grad()
    def pair_correlations(self, first, second) -> torch.Tensor:
        """The correlation over the vocabulary of each pair of values' logits, pair by pair: ``first[n]`` and
        ``second[n]`` are (layer, memory, sign) triples (sequences, or (n, 3) integer arrays)."""
        first, second = (np.asarray(t, dtype=np.int64).reshape(-1, 3) for t in (first, second))
        if len(first) != len(second):
            raise ParameterError(f"Pairs need as many first as second values, got {len(first)} and {len(second)}.")
        (xa, qa, ca), (xb, qb, cb) = self._gather(first), self._gather(second)
        cov = ((xa @ self.covariance) * xb).sum(-1) + ca + cb + self.bias_var
        return cov / (self._std(qa, ca) * self._std(qb, cb))

    def _gather(self, triples: np.ndarray):
        """The signed x, xᵀCx and signed x·c of each (layer, memory, sign) row of ``triples``."""
        x = torch.zeros(len(triples), self.weight.shape[1], device=self.weight.device)
        quadratic, cross = torch.zeros(len(triples), device=x.device), torch.zeros(len(triples), device=x.device)
        for layer in np.unique(triples[:, 0]).tolist():
            picked = np.flatnonzero(triples[:, 0] == layer)
            values, _, q, c = self._layer(self.loaded.adapter.check_layer(layer))
            rows, memories = (torch.as_tensor(a, device=x.device) for a in (picked, triples[picked, 1]))
            signs = torch.as_tensor(triples[picked, 2], dtype=x.dtype, device=x.device)
            x[rows], quadratic[rows], cross[rows] = signs[:, None] * values[memories], q[memories], signs * c[memories]
        return x, quadratic, cross

    @torch.no_grad()
    def z_scores(self, token_id: int, layers: Iterable[int] | None = None) -> torch.Tensor:
        """(n_layers, d_ff) z-score of ``token_id``'s logit in each value's distribution (for ``+v_i``)."""
        layer_list = self.loaded.adapter.check_layers(layers)
        e, b = self.weight[token_id], float(self.bias[token_id])
        rows = []
        for layer in layer_list:
            x, mean, quadratic, cross = self._layer(layer)
            rows.append((x @ e + b - mean) / self._std(quadratic, cross))
        return torch.stack(rows)

    @torch.no_grad()
    def search(self, token_id: int, layers: Iterable[int] | None = None, negative: bool | None = None,
               limit: int = 20, candidates: int = 100) -> pd.DataFrame:
        """Memories whose value (or negated value, gated FFNs) ranks ``token_id`` highest.

        Returns layer, memory, sign, token_id, token, rank (0 = the value's top token), probability, z;
        sorted by rank, then probability.
        """
        adapter = self.loaded.adapter
        layer_list = adapter.check_layers(layers)
        negative = adapter.gated if negative is None else bool(negative)
        z = self.z_scores(token_id, layer_list)
        found = []
        for sign in ([1, -1] if negative else [1]):
            flat = (sign * z).flatten()
            best = flat.topk(min(candidates, flat.numel()))
            for value, position in zip(best.values.tolist(), best.indices.tolist()):
                found.append((layer_list[position // adapter.d_ff], position % adapter.d_ff, sign, value))
        rows = []
        for layer in sorted({f[0] for f in found}):
            picked = [f for f in found if f[0] == layer]
            vectors = adapter.values(layer)[[f[1] for f in picked]] * torch.tensor(
                [float(f[2]) for f in picked], device=adapter.values(layer).device)[:, None]
            logits = adapter.logits_from_values(vectors).float()
            ranks = (logits > logits[:, token_id: token_id + 1]).sum(-1)
            probs = logits.softmax(-1)[:, token_id]
            for (lay, memory, sign, value), rank, prob in zip(picked, ranks.tolist(), probs.tolist()):
                rows.append({"layer": lay, "memory": memory, "sign": sign, "token_id": token_id, "rank": int(rank),
                             "probability": float(prob), "z": float(value)})
        frame = pd.DataFrame(rows, columns=["layer", "memory", "sign", "token_id", "rank", "probability", "z"])
        frame.insert(4, "token", self.loaded.token_strings([token_id])[0] if len(frame) else [])
        frame = frame.sort_values(["rank", "probability"], ascending=[True, False], kind="stable")
        return frame.head(check_positive("limit", limit)).reset_index(drop=True)


def search_value_token(loaded, token: str, layers: Iterable[int] | None = None, limit: int = 20,
                       index: ValueIndex | None = None, negative: bool | None = None) -> pd.DataFrame:
    """Memories whose value promotes ``token`` (a word or piece that is one token of the model, with or
    without a leading space), best first. See :class:`ValueIndex`."""
    if not isinstance(token, str) or not token.strip():
        raise ParameterError(f"Search for a non-empty token, got {token!r}.")
    tokenizer = loaded.tokenizer
    singles = [ids[0] for ids in _token_variants(tokenizer, token) if len(ids) == 1]
    typed = [ids for ids in (tokenizer(" " + token.strip(), add_special_tokens=False)["input_ids"],
                             tokenizer(token.strip(), add_special_tokens=False)["input_ids"]) if len(ids) == 1]
    candidates = list(dict.fromkeys([ids[0] for ids in typed] + singles))[:2]
    if not candidates:
        pieces = loaded.token_strings(tokenizer(" " + token.strip(), add_special_tokens=False)["input_ids"])
        raise ParameterError(f"{token.strip()!r} is not a single token of {loaded.name}: it splits into {pieces}. "
                             "Search for one of those pieces.")
    index = index or ValueIndex(loaded)
    frames = [index.search(t, layers, negative=negative, limit=limit) for t in candidates]
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(["rank", "probability"], ascending=[True, False], kind="stable").head(limit).reset_index(
        drop=True)


def _occurrences(ids: Sequence[int], patterns: list[list[int]]) -> list[int]:
    """End positions of every occurrence of any pattern in ``ids``."""
    ends = []
    for pattern in patterns:
        n = len(pattern)
        for start in range(len(ids) - n + 1):
            if ids[start] == pattern[0] and list(ids[start: start + n]) == pattern:
                ends.append(start + n - 1)
    return sorted(set(ends))


def search_trigger_word(loaded, triggers, word: str, limit: int = 20, index: dict | None = None) -> pd.DataFrame:
    """Memories whose trigger examples contain ``word`` (any case, with or without a leading space).

    Returns layer, memory, sign, last (triggers whose prefix *ends* with the word), anywhere (triggers
    whose prefix contains it), best_rank (the best-ranked such trigger) and n_triggers; sorted by last,
    then anywhere, then best_rank.
    """
    if not isinstance(word, str) or not word.strip():
        raise ParameterError(f"Search for a non-empty word, got {word!r}.")
    if triggers is None:
        raise ParameterError("Searching triggers needs mined trigger examples (ffnlib.keys.mine_trigger_examples).")
    patterns = _token_variants(loaded.tokenizer, word)
    index = index if index is not None else trigger_sentence_index(triggers)
    first_end: dict[int, int] = {}
    ends: set[tuple[int, int]] = set()
    for sentence_id, ids in index.items():
        found = _occurrences([int(t) for t in ids], patterns)
        if found:
            first_end[sentence_id] = found[0]
            ends.update((sentence_id, e) for e in found)
    columns = ["layer", "memory", "sign", "last", "anywhere", "best_rank", "n_triggers"]
    if not first_end:
        return pd.DataFrame(columns=columns)
    table = triggers.triggers
    rows = table[table["sentence_id"].isin(list(first_end))]
    first = rows["sentence_id"].map(first_end)
    contains = rows["position"].to_numpy() >= first.to_numpy()
    rows = rows[contains].copy()
    end_keys = np.array([(s << 20) | e for s, e in ends], dtype=np.int64)
    rows["is_last"] = np.isin((rows["sentence_id"].to_numpy(np.int64) << 20) | rows["position"].to_numpy(np.int64),
                              end_keys)
    grouped = rows.groupby(["layer", "memory", "sign"]).agg(last=("is_last", "sum"), anywhere=("is_last", "size"),
                                                            best_rank=("rank", "min")).reset_index()
    k = (getattr(triggers, "manifest", None) or {}).get("k")
    if k is None:
        counts = table.groupby(["layer", "memory", "sign"]).size().rename("n_triggers").reset_index()
        grouped = grouped.merge(counts, on=["layer", "memory", "sign"])
    else:
        grouped["n_triggers"] = int(k)
    grouped = grouped.sort_values(["last", "anywhere", "best_rank"], ascending=[False, False, True], kind="stable")
    return grouped[columns].head(check_positive("limit", limit)).astype(
        {"last": int, "anywhere": int, "best_rank": int, "n_triggers": int}).reset_index(drop=True)
