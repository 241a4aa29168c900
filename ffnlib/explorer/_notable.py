"""Which memories stand out, and for what: the atlas index's lists, ranked over every memory of the chosen layers
from a run's cached results (``ffnlib.card``) and a held-out coefficient sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd

from ..card import knowledge_neurons, layer_agreement, layer_survival, needs, open_results

__all__ = ["NOTABLE", "NOTABLE_COLUMNS", "Notable", "notable_memories"]

# reason -> (title, what makes a memory notable for it)
NOTABLE = {
    "agreement": ("Top agreement", "the value's top token is the next token of the largest share of the key's top "
                                   "trigger examples (notebook 02)"),
    "knowledge_neuron": ("Knowledge neurons", "every knowledge neuron notebook 06 found for its facts"),
    "active": ("Most active", "active at the largest share of held-out tokens (notebook 03's rule)"),
    "unstable": ("Least stable across corpus sizes", "the smallest share of the key's top-k trigger set, mined on "
                                                     "smaller prefixes of the corpus, still in its top-k on the whole "
                                                     "corpus (notebook 10)"),
}
NOTABLE_COLUMNS = ["reason", "rank", "layer", "memory", "sign", "score", "detail"]


@dataclass
class Notable:
    """The notable memories (``table``: one row per memory and reason, columns :data:`NOTABLE_COLUMNS`; sign 0:
    both signs), and per reason a line on how it was ranked, or which notebook computes what it lacks."""

    table: pd.DataFrame
    notes: dict = field(default_factory=dict)
    missing: dict = field(default_factory=dict)

    def of(self, reason: str) -> pd.DataFrame:
        return self.table[self.table["reason"] == reason].reset_index(drop=True)

    def memories(self) -> list[tuple[int, int]]:
        """Every notable (layer, memory), once, in the table's order."""
        return list(dict.fromkeys(zip(self.table["layer"].astype(int), self.table["memory"].astype(int))))


def _frame(reason: str, rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.reset_index(drop=True).assign(reason=reason)
    rows["rank"] = np.arange(1, len(rows) + 1)
    return rows.reindex(columns=NOTABLE_COLUMNS)


def _agreement(loaded, run, layers, n, out: Notable) -> pd.DataFrame | None:
    tables = [t for t in (layer_agreement(run, layer) for layer in layers) if t is not None]
    if not tables:
        out.missing["agreement"] = needs("value_agreement", "its value projection (or notebook 01's triggers) is not "
                                                            "in the results")
        return None
    rows = pd.concat(tables, ignore_index=True)
    rows = rows[rows["agreeing_share"] > 0].sort_values(["agreeing_share", "max_prob", "layer", "memory"],
                                                         ascending=[False, False, True, True], kind="stable").head(n)
    tokens = loaded.token_strings(rows["top_token"].astype(int).tolist())
    rows = rows.assign(score=rows["agreeing_share"], detail=[
        f"{int(r.n_agreeing)} of its {int(r.n_triggers)} top triggers are followed by {t!r}, its value's top token"
        for r, t in zip(rows.itertuples(), tokens)])
    out.notes["agreement"] = (f"{len(rows)} memories whose value's top token follows at least one of their top "
                              f"triggers, over {len(tables)} layers (score: the share of top triggers it follows)")
    return _frame("agreement", rows)


def _knowledge(run, layers, out: Notable) -> pd.DataFrame | None:
    neurons = knowledge_neurons(run)
    if neurons is None:
        out.missing["knowledge_neuron"] = needs("facts", "its knowledge neurons (tables/06_neurons.csv) are not in "
                                                         "the results")
        return None
    neurons = neurons[neurons["layer"].isin(list(layers))]
    rows = []
    for (layer, memory, sign), group in neurons.groupby(["layer", "memory", "sign"], sort=False):
        facts = ", ".join(f"{relation} #{fact}" for relation, fact in zip(group["relation"], group["fact_id"]))
        rows.append({"layer": layer, "memory": memory, "sign": sign, "score": len(group),
                     "mean_ratio": group["mean_ratio"].mean(),
                     "detail": f"knowledge neuron of {len(group)} fact{'s' if len(group) > 1 else ''}: {facts}"})
    rows = pd.DataFrame(rows, columns=["layer", "memory", "sign", "score", "mean_ratio", "detail"])
    rows = rows.sort_values(["score", "mean_ratio", "layer", "memory"], ascending=[False, False, True, True],
                            kind="stable")
    out.notes["knowledge_neuron"] = (f"{len(rows)} knowledge neurons of notebook 06 in these layers (score: the "
                                     "number of facts; a fact is named by its relation and id)")
    return _frame("knowledge_neuron", rows)


def _active(loaded, run, layers, n, sample, out: Notable) -> pd.DataFrame | None:
    if sample is None:
        out.missing["active"] = "no held-out coefficient sample was given (sample=CoefficientSample(...))"
        return None
    request = ((run.summary("03_aggregation") or {}).get("manifests") or {}).get("aggregation") or {}
    rule = request.get("active_rule") or ("relative" if loaded.adapter.gated else "positive")
    threshold = float(request.get("active_threshold", 0.1))
    shares = sample.active_share(layers, rule, threshold)
    rows = pd.DataFrame([(layer, memory, share) for layer, values in shares.items()
                         for memory, share in enumerate(values)], columns=["layer", "memory", "score"])
    rows = rows.sort_values(["score", "layer", "memory"], ascending=[False, True, True], kind="stable").head(n)
    how = f"|m| > {threshold:g}·max|m| of the layer" if rule == "relative" else "m > 0"
    rows = rows.assign(sign=0, detail=[f"active at {share:.0%} of {sample.n_tokens} held-out tokens"
                                       for share in rows["score"]])
    out.notes["active"] = (f"active: {how}, notebook 03's rule, at each token of {sample.n_sentences} held-out "
                           "sentences (the histogram's sample)")
    return _frame("active", rows)


def _unstable(run, layers, n, out: Notable) -> pd.DataFrame | None:
    tables = [t.assign(layer=layer) for layer in layers for t in [layer_survival(run, layer)] if t is not None]
    if not tables:
        out.missing["unstable"] = needs("corpus_size", "the mining saved no corpus-size snapshots (notebooks 01 and "
                                                       "10)")
        return None
    sizes = tables[0].attrs.get("sizes", [])
    rows = pd.concat(tables, ignore_index=True).sort_values(
        ["mean_kept_share", "first_kept_share", "layer", "memory"], kind="stable").head(n)
    rows = rows.assign(score=rows["mean_kept_share"], detail=[
        f"{first:.0%} of its top-k after {sizes[0]} sentences kept on the whole corpus ({sizes[-1]}); "
        f"{mean:.0%} on average over the snapshots" for first, mean in zip(rows["first_kept_share"],
                                                                         rows["mean_kept_share"])])
    out.notes["unstable"] = (f"snapshots at {sizes} sentences (score: the mean share of the top-k kept on the whole "
                             "corpus)")
    return _frame("unstable", rows)


def notable_memories(loaded, results, layers: Iterable[int] | None = None, n: int = 10, sample=None) -> Notable:
    """The ``n`` memories of ``layers`` (default: all) with the top value agreement, the largest active share on
    ``sample`` (a :class:`ffnlib.explorer.CoefficientSample`) and the least stable trigger sets across corpus
    sizes, and every knowledge neuron, read from a run's results (a folder or ``ffnlib.card.RunResults``)."""
    run = open_results(loaded, results)
    layers = range(loaded.adapter.n_layers) if layers is None else sorted({int(x) for x in layers})
    out = Notable(table=pd.DataFrame(columns=NOTABLE_COLUMNS))
    for layer in layers:  # each layer's per-memory numbers, then only those are kept (one layer's rows at a time)
        layer_agreement(run, layer), layer_survival(run, layer)
        run.forget_layer(layer)
    frames = [_agreement(loaded, run, layers, n, out), _knowledge(run, layers, out),
              _active(loaded, run, layers, n, sample, out), _unstable(run, layers, n, out)]
    frames = [f for f in frames if f is not None and len(f)]
    if frames:
        out.table = pd.concat(frames, ignore_index=True)
        for column in ("rank", "layer", "memory", "sign"):
            out.table[column] = out.table[column].astype(int)
    return out
