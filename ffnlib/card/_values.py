"""The value's side of a card (notebook 02): the top tokens of v and -v, and whether the value agrees with what
follows its key's top triggers, read from notebook 02's cached projection (or, for this one memory, projected
from the weights through ``ffnlib.values`` when the projection is not cached)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..values import ranks_in_rows, value_agreement, value_logits
from ._part import Part
from ._percentiles import Measure
from ._triggers import layer_triggers

__all__ = ["TOP_TOKENS", "projection_name", "layer_agreement", "values_part"]

TOP_TOKENS = 10  # top tokens shown per sign (notebook 02's value_top_k)
_VALUE_MEASURES = {"value top-token probability": "max_prob",
                   "share of top triggers followed by the value's top token": "agreeing_share",
                   "rank of the top trigger's next token": "target_rank"}
_NO_CONTROL = "run notebook 02_values with control='random-init': the control's projection is not in the results"


def projection_name(run, control: bool = False) -> str | None:
    """The name of notebook 02's cached value projection (of every layer), or None."""
    summary = run.control_summary("02_values") if control else run.summary("02_values")
    request = ((summary or {}).get("manifests") or {}).get("projection")
    if request:
        names = [n for n in run.find(request, control=control) if not n.endswith(".tokens")]
        if names:
            return names[0]
    ours = (run.model, *run.model_keys)
    found = [name for name, request in run.manifests(control).items()
             if request.get("kind") == "value_projection" and not name.endswith(".tokens")
             and (control or (request.get("model") in ours and request.get("file_hash") in (None, run.file_hash)))]
    return found[0] if found else None


def _layer_projection(run, name: str | None, layer: int, control: bool) -> pd.DataFrame | None:
    if name is None:
        return None
    return run.load(name, control=control, filters=[("layer", "==", int(layer))])


def _tokens_from_projection(loaded, run, name: str, layer: int, memory: int) -> pd.DataFrame | None:
    def by_memory():  # the layer's rows, read once, grouped by memory (many cards of a layer read it once)
        rows = run.load(f"{name}.tokens", filters=[("layer", "==", int(layer))])
        return None if rows is None else {int(m): group for m, group in rows.groupby("memory", sort=False)}

    rows = (run.memo(("value_tokens", name), by_memory, layer=layer) or {}).get(int(memory))
    if rows is None or rows.empty:
        return None
    rows = rows.sort_values(["sign", "rank"], ascending=[False, True])
    return pd.DataFrame({"sign": rows["sign"].astype(int).to_numpy(), "rank": rows["rank"].astype(int).to_numpy(),
                         "token_id": rows["token"].astype(int).to_numpy(),
                         "token": loaded.token_strings(rows["token"].astype(int).tolist()),
                         "probability": rows["prob"].astype(float).to_numpy()})


@torch.no_grad()
def _tokens_from_weights(loaded, layer: int, memory: int, signs) -> pd.DataFrame:
    """The top tokens of ``sign * v`` through the output embedding and the final norm's gain
    (``ffnlib.values.value_logits``), for this memory only."""
    frames = []
    for sign in signs:
        probs = value_logits(loaded.adapter, layer, [memory], sign)[0].float().softmax(-1)
        top = probs.topk(TOP_TOKENS)
        ids = top.indices.tolist()
        frames.append(pd.DataFrame({"sign": sign, "rank": np.arange(len(ids)), "token_id": ids,
                                    "token": loaded.token_strings(ids), "probability": top.values.numpy()}))
    return pd.concat(frames, ignore_index=True)


def _agreement(projection: pd.DataFrame, examples) -> pd.DataFrame:
    """``ffnlib.values.value_agreement`` of every memory of the layer (notebook 02's per-memory table)."""
    return value_agreement(projection, examples.triggers, n_triggers=int(examples.manifest["k"]))


def layer_agreement(run, layer: int) -> pd.DataFrame | None:
    """``ffnlib.values.value_agreement`` of every memory of ``layer`` (both signs where mined), from notebook 02's
    cached projection and notebook 01's triggers (computed once per reader); None when either is not cached."""
    def compute():
        examples = layer_triggers(run, layer)
        projection = _layer_projection(run, projection_name(run), layer, control=False)
        return None if examples is None or projection is None else _agreement(projection, examples)

    return run.memo(("agreement",), compute, layer=layer)


@torch.no_grad()
def _rank(loaded, layer: int, memory: int, sign: int, token: int) -> int:
    """The rank of ``token`` in ``sign * v``'s distribution (the number of tokens with a larger logit), as
    ``ffnlib.values.ranks_in_rows`` counts it; -1 for no token."""
    if token < 0:
        return -1
    logits = value_logits(loaded.adapter, layer, [memory], sign).float()
    return int(ranks_in_rows(logits, np.array([0]), np.array([token]), torch.empty_like(logits))[0])


def _agreement_of_one(loaded, examples, tokens: pd.DataFrame, layer: int, memory: int) -> pd.DataFrame:
    """The same columns for one memory whose projection is not cached: from its top tokens (projected from the
    weights) and its triggers."""
    rows = []
    for sign, group in tokens.groupby("sign", sort=False):
        t = examples.triggers
        mine = t[(t["memory"] == memory) & (t["sign"] == sign)].sort_values("rank")
        top = int(group["token_id"].iloc[0])
        nxt = int(mine["next_token"].iloc[0]) if len(mine) else -1
        rows.append({"layer": layer, "memory": memory, "sign": int(sign), "top_token": top,
                     "max_prob": float(group["probability"].iloc[0]), "trigger_next_token": nxt,
                     "agrees": bool(len(mine)) and nxt == top, "n_triggers": len(mine),
                     "n_agreeing": int((mine["next_token"] == top).sum()),
                     "agreeing_share": float((mine["next_token"] == top).mean()) if len(mine) else np.nan,
                     "target_rank": _rank(loaded, layer, memory, int(sign), nxt)})
    return pd.DataFrame(rows)


def _value_measures(run, per_memory: pd.DataFrame, layer: int, memory: int, signs) -> list[Measure]:
    """The value's numbers (top-token probability, agreeing share, rank of the top trigger's next token) with the
    layer's and the control's (notebook 02's control projection and the control's triggers)."""
    control_examples = layer_triggers(run, layer, control=True)
    control_projection = _layer_projection(run, projection_name(run, control=True), layer, control=True)
    theirs = None
    if control_examples is not None and control_projection is not None:
        theirs = run.memo(("control_agreement",), lambda: _agreement(control_projection, control_examples),
                          layer=layer)

    def known(column: pd.Series) -> pd.Series:  # -1: no target (a sentence's end)
        return column.astype(float).where(column.astype(float) >= 0)

    def columns(table, key):  # each sign's columns, indexed by memory, prepared once per layer and reader
        def split():
            out = {}
            for sign in signs:
                rows = table[table["sign"] == sign].set_index("memory")
                out[sign] = {c: known(rows[c]) for c in _VALUE_MEASURES.values() if c in rows.columns}
            return out
        return run.memo((key,), split, layer=layer)

    mine = columns(per_memory, "value_measures")
    control = None if theirs is None else columns(theirs, "control_value_measures")
    out = []
    for sign in signs:
        for label, column in _VALUE_MEASURES.items():
            values = mine[sign].get(column)
            if values is None or memory not in values.index:
                continue
            other = None if control is None or column not in control[sign] else control[sign][column].to_numpy()
            out.append(Measure("values", label, sign, float(values.get(memory, np.nan)), values.to_numpy(), other,
                               "02_values", None if other is not None else _NO_CONTROL))
    return out


def values_part(loaded, run, layer: int, memory: int) -> Part:
    """The card's ``value_tokens`` and ``value_agreement``, from notebook 02's results (and 01's triggers)."""
    part = Part()
    signs = [1, -1] if loaded.adapter.gated else [1]
    name = projection_name(run)
    tokens = None if name is None else _tokens_from_projection(loaded, run, name, layer, memory)
    if tokens is None:
        tokens = _tokens_from_weights(loaded, layer, memory, signs)
        part.notes["value_tokens"] = "projected from the weights (notebook 02's projection is not cached)"
    else:
        part.notes["value_tokens"] = f"notebook 02's projection ({name})"
    part.fields["value_tokens"] = tokens

    examples = layer_triggers(run, layer)
    if examples is None:
        part.lack("value_agreement", f"no cached trigger examples of layer {layer} to compare the value with",
                  notebook="01_keys")
        return part
    projection = _layer_projection(run, name, layer, control=False)
    if projection is None:
        per_memory = _agreement_of_one(loaded, examples, tokens, layer, memory)
        part.notes["value_agreement"] = ("from the value projected from the weights and notebook 01's triggers; "
                                         "no layer percentiles (notebook 02's projection is not cached)")
    else:
        per_memory = layer_agreement(run, layer)
    mine = per_memory[per_memory["memory"] == memory].copy()
    mine["top_token_text"] = loaded.token_strings(mine["top_token"].astype(int).tolist())
    mine["trigger_next_token_text"] = [loaded.token_strings([int(t)])[0] if t >= 0 else "(end of sentence)"
                                       for t in mine["trigger_next_token"]]
    columns = ["sign", "top_token", "top_token_text", "max_prob", "trigger_next_token", "trigger_next_token_text",
               "agrees", "n_triggers", "n_agreeing", "agreeing_share", "target_rank"]
    part.fields["value_agreement"] = (mine.sort_values("sign", ascending=False)
                                      .reindex(columns=columns).reset_index(drop=True))
    if projection is None:
        return part

    part.measures.extend(_value_measures(run, per_memory, layer, memory, signs))
    return part
