"""The memory view: one memory's trigger examples, value tokens, pattern measures and coefficients."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ._common import check_memory, check_positive, top_tokens
from ._sample import CoefficientSample

__all__ = ["pattern_measures", "layer_key_measures", "key_rows", "MemorySide", "MemoryView", "memory_view"]

_KEY_MEASURES = ("triggers", "shallow_token", "shallow_bigram", "labelled", "topic_concentration")


def layer_key_measures(triggers, layer: int) -> pd.DataFrame:
    """``ffnlib.keys.key_measures`` of every key of ``layer`` (all its trigger rows), indexed by (memory, sign):
    what :func:`pattern_measures` computes for one key, for a whole layer at once (the atlas's pages)."""
    from ..keys import key_measures, with_tokens

    table = triggers.triggers
    rows = table[table["layer"] == layer]
    return key_measures(with_tokens(triggers, rows)).set_index(["memory", "sign"])


def pattern_measures(loaded, triggers, rows: pd.DataFrame, known=None) -> dict:
    """Section 3's pattern measures of one key's trigger rows (``ffnlib.keys.key_pattern_measures``:
    ``shallow_token``, ``shallow_bigram``, ``topic_concentration``, ...), plus the most common last token
    of the triggers and its share, for display. ``known``: the key's row of :func:`layer_key_measures`, when
    already computed."""
    from ..keys import key_pattern_measures

    raw = {} if rows.empty else (key_pattern_measures(loaded, triggers, rows) if known is None
                                 else {name: known[name] for name in _KEY_MEASURES})
    measures = {}
    for name, value in raw.items():
        value = value.item() if hasattr(value, "item") else value
        if isinstance(value, float) and not np.isfinite(value):
            value = None
        elif name in ("triggers", "labelled") and value is not None:
            value = int(value)
        measures[name] = value
    if not rows.empty:
        index = triggers.token_index()
        lasts = pd.Series([int(index[int(s)][int(p)]) for s, p in zip(rows["sentence_id"], rows["position"])])
        counts = lasts.value_counts()
        measures["most_common_last_token"] = loaded.token_strings([int(counts.index[0])])[0]
        measures["its_share"] = float(counts.iloc[0] / len(rows))
    return measures


def key_rows(triggers, layer: int, memory: int, sign: int = 1) -> pd.DataFrame:
    """One key's rows of ``triggers.triggers`` (strongest first), as ``triggers.of`` gives them.

    The miner writes its table in blocks of k rows ordered by sign (+1 first), layer and memory, so the
    block is found by arithmetic; it is checked, and ``triggers.of`` (a scan of the whole table) is used
    whenever the table is laid out otherwise.
    """
    table, manifest = triggers.triggers, getattr(triggers, "manifest", None) or {}
    try:
        layers, k = [int(x) for x in manifest["layers"]], int(manifest["k"])
        signs = [1, -1] if manifest.get("negative") else [1]
        d_ff = len(table) // (len(signs) * len(layers) * k)
        if sign in signs and layer in layers and 0 <= memory < d_ff:
            start = ((signs.index(sign) * len(layers) + layers.index(layer)) * d_ff + memory) * k
            rows = table.iloc[start: start + k]
            if (len(rows) == k and (rows["layer"].to_numpy() == layer).all()
                    and (rows["memory"].to_numpy() == memory).all() and (rows["sign"].to_numpy() == sign).all()
                    and (rows["rank"].to_numpy() == np.arange(k)).all()):
                return rows.reset_index(drop=True)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    return triggers.of(layer, memory, sign)


def _mined_negative(triggers, adapter) -> bool:
    """Whether the trigger examples have a negative side (sign -1)."""
    manifest = getattr(triggers, "manifest", None) or {}
    if "negative" in manifest:
        return bool(manifest["negative"])
    return bool((triggers.triggers["sign"] == -1).any())


@dataclass
class MemorySide:
    """One sign of a memory: sign +1 is v_i with its top positive coefficients, sign -1 is -v_i with the
    most negative coefficients (gated FFNs only)."""

    sign: int
    triggers: pd.DataFrame  # rank, coefficient, sentence_id, position, next_token, prefix, last_token, ...
    top_tokens: pd.DataFrame  # rank, token_id, token, probability
    measures: dict


@dataclass
class MemoryView:
    layer: int
    memory: int
    value_norm: float
    sides: list[MemorySide]
    sample: np.ndarray | None = None  # the memory's coefficient at every token of a corpus sample
    n_sample_sentences: int = 0

    def side(self, sign: int) -> MemorySide | None:
        return next((s for s in self.sides if s.sign == sign), None)


def memory_view(loaded, triggers, layer: int, memory: int, n_triggers: int = 10, k_tokens: int = 10,
                sample: CoefficientSample | None = None, negative: bool | None = None,
                key_measures: pd.DataFrame | None = None) -> MemoryView:
    """Everything the memory view shows for memory ``memory`` of ``layer`` (see the ``ffnlib.explorer`` docstring).

    ``triggers`` is a ``ffnlib.keys.TriggerExamples`` (or ``None``: values only). ``negative`` adds the
    negative side, ``-v_i`` and the most negative coefficients (default: when the triggers were mined with
    a negative side, i.e. for gated FFNs). ``key_measures``: :func:`layer_key_measures` of the layer, when
    already computed (many views of one layer).
    """
    adapter = loaded.adapter
    layer, memory = check_memory(adapter, layer, memory)
    n_triggers, k_tokens = check_positive("n_triggers", n_triggers), check_positive("k_tokens", k_tokens)
    if negative is None:
        negative = _mined_negative(triggers, adapter) if triggers is not None else adapter.gated
    signs = [1, -1] if negative else [1]
    tokens = top_tokens(loaded, layer, [memory] * len(signs), signs, k_tokens)
    sides = []
    for sign, table in zip(signs, tokens):
        if triggers is not None:
            from ..keys import trigger_table

            rows = key_rows(triggers, layer, memory, sign)
            one_key = dataclasses.replace(triggers, triggers=rows)  # trigger_table then scans k rows, not all
            shown = trigger_table(one_key, loaded.tokenizer, layer, memory, sign, n=n_triggers)
            known = key_measures is not None and (memory, sign) in key_measures.index
            measures = pattern_measures(loaded, triggers, rows, key_measures.loc[(memory, sign)] if known else None)
        else:
            shown, measures = pd.DataFrame(), {}
        sides.append(MemorySide(sign=sign, triggers=shown, top_tokens=table, measures=measures))
    return MemoryView(layer=layer, memory=memory, value_norm=float(adapter.values(layer)[memory].float().norm()),
                      sides=sides, sample=sample.of(layer, memory) if sample is not None else None,
                      n_sample_sentences=sample.n_sentences if sample is not None else 0)
