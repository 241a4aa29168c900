"""The card of one memory: the five analyses' views of (k_i, v_i), joined, from a run's cached results."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

from ..errors import ParameterError
from ._aggregation import aggregation_part
from ._corpus import corpus_part
from ._experts import experts_part
from ._folder import open_results
from ._keys import keys_part
from ._knowledge import knowledge_part
from ._part import FIELD_NOTEBOOKS, needs
from ._percentiles import percentile_table
from ._values import values_part

__all__ = ["MemoryCard", "memory_card", "jsonable"]


@dataclass
class MemoryCard:
    """What the suite knows about memory ``memory`` of ``layer``. Each DataFrame field is filled, or None with
    a line in ``missing`` (field -> ``"run notebook <name>: <why>"``); ``notes`` say where each came from.

    - ``triggers``: the key's top trigger examples per sign (01); ``pattern``: its most common last token and its
      share, the shared-last-token share and topic concentration of its top 25 triggers, beside the layer's
      means and random keys' (01); ``removal``: the change of its coefficient when a token of its trigger prefixes
      is removed (01, for the keys 01 sampled);
    - ``value_tokens``: the top tokens of v (and -v); ``value_agreement``: whether the value's top token follows
      its top trigger, how many of its top triggers it follows, the rank of the top trigger's next token (02);
    - ``aggregation``: per-memory numbers on held-out text (03); ``facts``, ``suppression``: the facts for which
      it is a knowledge neuron, with its attribution and the prompt notebook 06 asked, and the effect of suppressing
      it (06); ``experts``, ``router``: its expert under each split and the expert's other memories, the router's
      picks (07); ``corpus_size``: how much of its top-k trigger set survives from each corpus snapshot (10);
    - ``percentiles``: each number above with a counterpart for every memory, placed among the layer's memories
      and among the random-weights control's.
    """

    model: str
    layer: int
    memory: int
    results: str | None
    control: str | None
    value_norm: float
    triggers: pd.DataFrame | None = None
    pattern: pd.DataFrame | None = None
    removal: pd.DataFrame | None = None
    value_tokens: pd.DataFrame | None = None
    value_agreement: pd.DataFrame | None = None
    aggregation: pd.DataFrame | None = None
    facts: pd.DataFrame | None = None
    suppression: pd.DataFrame | None = None
    experts: pd.DataFrame | None = None
    router: pd.DataFrame | None = None
    corpus_size: pd.DataFrame | None = None
    percentiles: pd.DataFrame | None = None
    missing: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    @staticmethod
    def tables() -> list[str]:
        """The names of the card's DataFrame fields, in order."""
        return list(FIELD_NOTEBOOKS)

    def to_dict(self) -> dict:
        """The card as plain JSON-able data (DataFrames as lists of records, NaN as None)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict("records") if isinstance(value, pd.DataFrame) else value
        return jsonable(out)


def jsonable(obj):
    """``obj`` with numpy scalars and arrays as Python numbers and lists, and NaN as None (``json.dumps`` takes it)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is pd.NA or obj is pd.NaT:
        return None
    return obj


def memory_card(loaded, layer: int, memory: int, results="results", scale: str | None = None, seed: int = 0,
                n_triggers: int = 10) -> MemoryCard:
    """The card of memory ``memory`` of ``layer`` of ``loaded``, read from the run's cached results.

    ``results``: the run's folder (``results_dir/<model>/<scale>``), a ``results_dir`` with ``scale``, or a
    :class:`ffnlib.card.RunResults` (open it once with :func:`ffnlib.card.open_results` to draw many cards: each
    file is then read once). ``seed``: the run's seed (names notebook 06's facts). Nothing cached is computed
    again; a missing section says which notebook computes it. Only the value's top tokens are computed when
    notebook 02's projection is not cached (one value through the output embedding, ``ffnlib.values``).

    Usage::

        from ffnlib.card import memory_card
        card = memory_card(loaded, 20, 1066, results="results", scale="ci")
        card.value_tokens, card.missing
    """
    adapter = loaded.adapter
    layer = adapter.check_layer(layer)
    if isinstance(memory, bool) or not isinstance(memory, (int, np.integer)) or not 0 <= memory < adapter.d_ff:
        raise ParameterError(f"Memory {memory!r} is out of range: layers have {adapter.d_ff} memories "
                             f"(0..{adapter.d_ff - 1}).")
    memory = int(memory)
    run = open_results(loaded, results, scale)
    card = MemoryCard(model=loaded.name, layer=layer, memory=memory,
                      results=None if run.folder is None else str(run.folder), control=run.control_name,
                      value_norm=float(adapter.values(layer)[memory].float().norm()))
    parts = [keys_part(loaded, run, layer, memory, n_triggers), values_part(loaded, run, layer, memory),
             aggregation_part(run, layer, memory), knowledge_part(loaded, run, layer, memory, seed),
             experts_part(run, layer, memory), corpus_part(run, layer, memory)]
    measures = []
    for part in parts:
        for name, value in part.fields.items():
            setattr(card, name, value)
        card.missing.update(part.missing)
        card.notes.update(part.notes)
        measures.extend(part.measures)
    if measures:
        card.percentiles = percentile_table(measures)
        if run.control_folder is None:
            card.notes["percentiles"] = needs("percentiles", "the random-weights control's results are not in the "
                                                             "results (control='random-init')")
    else:
        card.missing["percentiles"] = needs("percentiles", "none of the numbers placed against the layer is in the "
                                                           "results (notebooks 01_keys, 02_values, 10_corpus_size)")
    if run.folder is None:
        card.notes["results"] = f"no results of {loaded.name} in {results}: run the suite (make run)"
    return card
