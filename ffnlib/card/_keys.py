"""The key's side of a card (notebook 01): its top trigger examples per sign, its pattern class and its removal
effect, read from notebook 01's cached mining, pattern table and removal experiment."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from ..keys import key_measures, trigger_table, with_tokens
from ..storage import fingerprint
from ._part import Part
from ._percentiles import Measure
from ._triggers import layer_triggers

__all__ = ["PATTERN_TOP", "keys_part"]

PATTERN_TOP = 25  # a key's top triggers for the pattern measures (notebook 01's min(25, k))
# notebook 01's per-layer table (positive side) -> the pattern frame's columns: the layer's means and random keys'
_CONTEXT = {"shallow_token": "layer_shallow_token", "topic_concentration": "layer_topic_concentration",
            "random_shallow_token": "random_shallow_token", "random_topic_concentration": "random_topic_concentration",
            "topic_base_rate": "topic_base_rate"}
_MEASURES = {"shallow_token": "shared last token (share of top triggers)", "topic_concentration": "topic concentration"}
_NO_CONTROL = "run notebook 01_keys with control='random-init': the control's mining is not in the results"


def _key_rows(frame: pd.DataFrame, index: dict, memory: int, sign: int) -> pd.DataFrame:
    """One key's rows (strongest first) of a layer's trigger rows, found by ``index`` ((sign, memory) -> row
    positions, :func:`_layer_index`)."""
    rows = frame.iloc[index.get((sign, memory), [])]
    return rows.sort_values("rank").reset_index(drop=True)


def _layer_index(run, examples, top_rows: pd.DataFrame, layer: int) -> tuple[list, dict, dict]:
    """Once per layer: the signs mined, and each key's row positions in the layer's trigger rows and top rows."""
    def compute():
        return (sorted({int(s) for s in examples.triggers["sign"].unique()}, reverse=True),
                examples.triggers.groupby(["sign", "memory"]).indices, top_rows.groupby(["sign", "memory"]).indices)

    return run.memo(("key_index",), compute, layer=layer)


def _per_key(run, examples, control: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The layer's top trigger rows with their last tokens and topics (``ffnlib.keys.with_tokens``), and
    ``ffnlib.keys.key_measures`` of every key of the layer, both signs (as notebook 01's pattern table)."""
    def compute():
        top = min(PATTERN_TOP, int(examples.manifest["k"]))
        rows = with_tokens(examples, examples.triggers[examples.triggers["rank"] < top])
        return rows, key_measures(rows).set_index(["sign", "memory"])

    return run.memo(("key_measures", control), compute, layer=int(examples.triggers["layer"].iloc[0]))


def _pattern(loaded, mine: pd.DataFrame, per_key: pd.DataFrame, memory: int, sign: int) -> dict:
    """One key's pattern class: its most common last token and that token's share of its top triggers (``mine``),
    and its Section 3 measures (``ffnlib.keys.key_measures``: shallow_token, shallow_bigram, topic_concentration)."""
    counts = mine["last_token"].value_counts()
    out = {"sign": sign, "most_common_last_token": loaded.token_strings([int(counts.index[0])])[0] if len(counts)
           else None, "its_share": float(counts.iloc[0] / len(mine)) if len(counts) else np.nan}
    measures = per_key.loc[(sign, memory)] if (sign, memory) in per_key.index else {}
    for column in ("shallow_token", "shallow_bigram", "labelled", "topic_concentration"):
        out[column] = measures.get(column, np.nan) if len(measures) else np.nan
    return out


def _top_coefficients(examples) -> pd.DataFrame:
    """|coefficient| of each key's strongest trigger, by sign and memory."""
    t = examples.triggers
    return t[t["rank"] == 0].assign(top=lambda f: f["coefficient"].abs()).set_index(["sign", "memory"])["top"]


def _sides(run, series: pd.Series | None, layer: int, key: tuple) -> dict | None:
    """A per-key number of every key of the layer (indexed by sign and memory), as an array per sign (once)."""
    if series is None:
        return None
    return run.memo(("key_sides", *key), lambda: {int(sign): series.xs(sign, level="sign").astype(np.float64)
                                                  for sign in series.index.get_level_values("sign").unique()},
                    layer=layer)


def _measure(label: str, mine: dict, theirs: dict | None, sign: int, memory: int) -> Measure:
    """A per-key number of this key (``mine``: per sign, every memory's, by memory), with the layer's and the
    control's."""
    other = None if theirs is None or sign not in theirs else theirs[sign].to_numpy()
    return Measure("keys", label, sign, float(mine[sign].get(memory, np.nan)), mine[sign].to_numpy(), other, "01_keys",
                   None if other is not None else _NO_CONTROL)


def _removal(run, examples, layer: int, control: bool) -> pd.DataFrame | None:
    """Notebook 01's removal experiment rows of ``layer`` (of the mining that gave ``examples``), or None."""
    names = run.find(control=control, analysis="removal", triggers=fingerprint(examples.manifest))
    if not names:
        return None
    return run.load(names[0], control=control, filters=[("layer", "==", int(layer))])


def _removal_by_key(removal: pd.DataFrame) -> pd.Series:
    """Mean relative change (in %) of each measured key's coefficient when the last token is removed."""
    last = removal[removal["variant"] == "last"]
    return last.groupby("memory")["relative_change"].mean() * 100


def _trigger_fields(loaded, run, part: Part, examples, control, layer: int, memory: int, n_triggers: int) -> None:
    """``triggers`` and ``pattern``, and the keys' numbers placed against the layer and the control."""
    context = run.table("01_pattern_measures")
    context = None if context is None else context.set_index("layer")
    (top_rows, per_key) = _per_key(run, examples, False)
    top = run.memo(("top_coefficients", False), lambda: _top_coefficients(examples), layer=layer)
    theirs = {}
    if control is not None:
        theirs = {"top": run.memo(("top_coefficients", True), lambda: _top_coefficients(control),
                                         layer=layer),
                  **_per_key(run, control, True)[1][list(_MEASURES)]}
    tables, patterns = [], []
    signs, rows_of, top_rows_of = _layer_index(run, examples, top_rows, layer)
    for sign in signs:
        one_key = dataclasses.replace(examples, triggers=_key_rows(examples.triggers, rows_of, memory, sign))
        tables.append(trigger_table(one_key, loaded.tokenizer, layer, memory, sign, n=n_triggers)
                      .drop(columns=["sentence_id", "position"]).assign(sign=sign))
        row = _pattern(loaded, top_rows.iloc[top_rows_of.get((sign, memory), [])], per_key, memory, sign)
        for column, shown in _CONTEXT.items():
            known = context is not None and layer in context.index and sign == 1
            row[shown] = float(context.at[layer, column]) if known else np.nan
        patterns.append(row)
        for column, label in (("top", "top trigger |coefficient|"), *_MEASURES.items()):
            mine = _sides(run, top if column == "top" else per_key[column], layer, (False, column))
            other = _sides(run, theirs.get(column), layer, (True, column))
            part.measures.append(_measure(label, mine, other, sign, memory))
    triggers = pd.concat(tables, ignore_index=True)
    part.fields["triggers"] = triggers[["sign"] + [c for c in triggers.columns if c != "sign"]]
    part.fields["pattern"] = pd.DataFrame(patterns)
    part.notes["triggers"] = f"notebook 01's mining ({examples.stats.get('result')}), layer {layer}"
    if context is None:
        part.notes["pattern"] = ("notebook 01's table of pattern measures (tables/01_pattern_measures.csv) is "
                                 "missing: no layer means or random keys to compare with")


def _removal_field(run, part: Part, examples, control, layer: int, memory: int) -> None:
    """``removal``: this key's rows of notebook 01's removal experiment, when 01 sampled it."""
    removal = _removal(run, examples, layer, control=False)
    if removal is None:
        part.lack("removal", "its removal experiment is not in the results")
        return
    if memory not in set(removal["memory"]):
        part.lack("removal", f"it measured the removal effect of {removal['memory'].nunique()} random keys of layer "
                             f"{layer}, not of memory {memory} (the scale's removal_keys)")
        return
    g = removal[removal["memory"] == memory].groupby("variant")["relative_change"]
    layer_mean = removal.groupby("variant")["relative_change"].mean() * 100
    part.fields["removal"] = pd.DataFrame({"prefixes": g.size(), "mean_change_pct": g.mean() * 100,
                                           "median_change_pct": g.median() * 100,
                                           "layer_mean_change_pct": layer_mean.reindex(g.size().index)}).reset_index()
    by_key = _removal_by_key(removal)
    theirs = None if control is None else _removal(run, control, layer, control=True)
    other = None if theirs is None else _removal_by_key(theirs).to_numpy(np.float64)
    part.measures.append(Measure("keys", "removing the last token (mean change %)", 1,
                                 float(by_key.get(memory, np.nan)), by_key.to_numpy(np.float64), other, "01_keys",
                                 None if other is not None else _NO_CONTROL))


def keys_part(loaded, run, layer: int, memory: int, n_triggers: int = 10) -> Part:
    """The card's ``triggers``, ``pattern`` and ``removal``, from notebook 01's results."""
    part = Part()
    examples = layer_triggers(run, layer)
    if examples is None:
        for name in ("triggers", "pattern", "removal"):
            part.lack(name, f"no cached trigger examples of layer {layer} in the results")
        return part
    control = layer_triggers(run, layer, control=True)
    _trigger_fields(loaded, run, part, examples, control, layer, memory, n_triggers)
    _removal_field(run, part, examples, control, layer, memory)
    return part
