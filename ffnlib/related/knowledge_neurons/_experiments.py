"""The experiments on knowledge neurons, each against as many random memories of the same layers: suppress (x0)
and amplify (x2) a fact's neurons at its prompts' last position, specificity (a relation's neurons on other
relations and on held-out perplexity; a fact's neurons on other facts with the same answer) and erasing a
relation's top neurons. Every change to the model is undone on exit."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ...evaluate import heldout_nll, perplexity_of
from ...interventions import intervene
from ._editing import edited_values
from ._evaluation import answer_probabilities
from ._facts import stable_seed
from ._neurons import fact_neurons, random_like, relation_neurons

__all__ = ["suppress_amplify", "suppress_each", "specificity", "same_answer_effect", "erase_relations"]


def _changes(loaded, jobs: list, meta: list, batch_size: int) -> list[dict]:
    """Run ``jobs`` (prompt ids, answer token, factors); each prompt's unchanged run (``meta`` None) comes first and
    is the ``p_before`` of the changed runs after it. One row per changed run: its meta, p_before, p_after, change."""
    result = answer_probabilities(loaded, [j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs],
                                  batch_size=batch_size)
    rows, before = [], None
    for info, p in zip(meta, result["p_answer"]):
        if info is None:
            before = float(p)
            continue
        rows.append({**info, "p_before": before, "p_after": float(p), "change": (float(p) - before) / before})
    return rows


def suppress_amplify(loaded, prompts: pd.DataFrame, neurons: pd.DataFrame, seed: int = 0,
                     factors: Mapping[str, float] | None = None, batch_size: int = 32) -> pd.DataFrame:
    """Dai's suppress (coefficient x 0) and amplify (x 2) of each fact's neurons at the last position of each
    of its prompts, against as many random memories of the same layers (seeded, none of the fact's).

    One row per (prompt, kind, operation): fact_id, relation, prompt_id, kind ("knowledge"/"random"),
    operation, n_neurons, p_before, p_after, change = (p_after - p_before) / p_before.
    """
    factors = {"suppress": 0.0, "amplify": 2.0} if factors is None else dict(factors)
    by_fact = fact_neurons(neurons)
    d_ff = loaded.adapter.d_ff
    jobs, meta = [], []
    for fact, group in prompts[prompts["fact_id"].isin(by_fact)].groupby("fact_id"):
        kn = by_fact[int(fact)]
        control = random_like(kn, d_ff, np.random.default_rng([seed, int(fact)]))
        for row in group.itertuples():
            jobs.append((row.prompt_ids, row.answer_token, {}))
            meta.append(None)
            for kind, chosen in (("knowledge", kn), ("random", control)):
                for operation, factor in factors.items():
                    jobs.append((row.prompt_ids, row.answer_token, {n: factor for n in chosen}))
                    meta.append({"fact_id": int(fact), "relation": row.relation, "prompt_id": int(row.prompt_id),
                                 "kind": kind, "operation": operation, "n_neurons": len(chosen)})
    if not jobs:
        return pd.DataFrame(columns=["fact_id", "relation", "prompt_id", "kind", "operation", "n_neurons",
                                     "p_before", "p_after", "change"])
    return pd.DataFrame(_changes(loaded, jobs, meta, batch_size))


def suppress_each(loaded, prompts: pd.DataFrame, neurons: pd.DataFrame, seed: int = 0, factor: float = 0.0,
                  batch_size: int = 32) -> pd.DataFrame:
    """Each knowledge neuron alone: its coefficient times ``factor`` (0: suppressed) at the last position of each
    of its fact's prompts, against one random memory of the same layer (seeded, none of the fact's) treated the
    same way. :func:`suppress_amplify` changes a fact's neurons together; this says what each one does (the
    memory card shows it).

    One row per (prompt, neuron, kind): fact_id, relation, prompt_id, layer, memory (the knowledge neuron; for
    ``kind="random"`` its random counterpart is in ``control_memory``), kind, p_before, p_after, change.
    """
    columns = ["fact_id", "relation", "prompt_id", "layer", "memory", "control_memory", "kind", "p_before",
               "p_after", "change"]
    by_fact = fact_neurons(neurons)
    jobs, meta = [], []
    for fact, group in prompts[prompts["fact_id"].isin(by_fact)].groupby("fact_id"):
        kn = by_fact[int(fact)]
        control = random_like(kn, loaded.adapter.d_ff, np.random.default_rng([seed, int(fact), 11]))
        for row in group.itertuples():
            jobs.append((row.prompt_ids, row.answer_token, {}))
            meta.append(None)
            for neuron, other in zip(kn, control):
                for kind, chosen in (("knowledge", neuron), ("random", other)):
                    jobs.append((row.prompt_ids, row.answer_token, {chosen: factor}))
                    meta.append({"fact_id": int(fact), "relation": row.relation, "prompt_id": int(row.prompt_id),
                                 "layer": neuron[0], "memory": neuron[1], "control_memory": other[1], "kind": kind})
    if not jobs:
        return pd.DataFrame(columns=columns)
    return pd.DataFrame(_changes(loaded, jobs, meta, batch_size), columns=columns)


def specificity(loaded, prompts: pd.DataFrame, neurons: pd.DataFrame, heldout: Sequence[Sequence[int]],
                seed: int = 0, share: float = 0.1, batch_size: int = 32) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Suppress one relation's neurons (Dai's relation KNs: those of >= ``share`` of its facts) at every
    position, and measure every analysed fact's answer and held-out perplexity; the control is as many
    random memories of the same layers. (Niu et al., 2024, ask whether the effect stays with the relation.)

    Returns (facts, heldout): facts has suppressed, kind, n_neurons, relation, same_relation, fact_id,
    prompt_id, p_before, p_after, change; heldout has suppressed, kind, n_neurons, ppl_before, ppl_after,
    change.
    """
    base = answer_probabilities(loaded, prompts["prompt_ids"].tolist(), prompts["answer_token"].tolist(),
                                batch_size=batch_size)["p_answer"].to_numpy()
    base_ppl = perplexity_of(heldout_nll(loaded, heldout)) if len(heldout) else math.nan
    fact_rows, ppl_rows = [], []
    for relation, kn in relation_neurons(neurons, share=share).items():
        if not kn:
            continue
        control = random_like(kn, loaded.adapter.d_ff, np.random.default_rng([seed, stable_seed(relation)]))
        for kind, chosen in (("knowledge", kn), ("random", control)):
            with intervene(loaded, {n: 0.0 for n in chosen}, scale=True):
                after = answer_probabilities(loaded, prompts["prompt_ids"].tolist(), prompts["answer_token"].tolist(),
                                             batch_size=batch_size)["p_answer"].to_numpy()
                ppl = perplexity_of(heldout_nll(loaded, heldout)) if len(heldout) else math.nan
            fact_rows.append(pd.DataFrame({"suppressed": relation, "kind": kind, "n_neurons": len(chosen),
                                           "relation": prompts["relation"].to_numpy(),
                                           "same_relation": prompts["relation"].to_numpy() == relation,
                                           "fact_id": prompts["fact_id"].to_numpy(),
                                           "prompt_id": prompts["prompt_id"].to_numpy(), "p_before": base,
                                           "p_after": after, "change": (after - base) / base}))
            ppl_rows.append({"suppressed": relation, "kind": kind, "n_neurons": len(chosen), "ppl_before": base_ppl,
                             "ppl_after": ppl, "change": (ppl - base_ppl) / base_ppl})
    facts = pd.concat(fact_rows, ignore_index=True) if fact_rows else pd.DataFrame()
    return facts, pd.DataFrame(ppl_rows)


def same_answer_effect(loaded, prompts: pd.DataFrame, neurons: pd.DataFrame, all_prompts: pd.DataFrame,
                       seed: int = 0, max_targets: int = 8, batch_size: int = 32) -> pd.DataFrame:
    """Suppress one fact's neurons (at the last position) and measure other facts that share its answer's
    first token (any relation, from ``all_prompts``), against facts of the same relation with another answer
    and against the fact itself; the control is as many random memories of the same layers.

    Rows: source_fact, target_fact, group ("self", "same answer", "same relation, other answer"), kind,
    prompt_id, p_before, p_after, change. At most ``max_targets`` target facts per group (seeded).
    """
    by_fact = fact_neurons(neurons)
    d_ff = loaded.adapter.d_ff
    pool = all_prompts.drop_duplicates("fact_id")[["fact_id", "relation", "answer_token"]]
    jobs, meta = [], []
    for fact, group in prompts[prompts["fact_id"].isin(by_fact)].groupby("fact_id"):
        fact = int(fact)
        rng = np.random.default_rng([seed, fact, 7])
        first = group.iloc[0]
        same = pool[(pool["answer_token"] == first.answer_token) & (pool["fact_id"] != fact)]["fact_id"].to_numpy()
        other = pool[(pool["relation"] == first.relation)
                     & (pool["answer_token"] != first.answer_token)]["fact_id"].to_numpy()
        targets = {"self": [fact]}
        for label, ids in (("same answer", same), ("same relation, other answer", other)):
            targets[label] = sorted(rng.choice(ids, min(max_targets, len(ids)), replace=False).tolist())
        kn = by_fact[fact]
        control = random_like(kn, d_ff, np.random.default_rng([seed, fact]))
        for label, ids in targets.items():
            for row in all_prompts[all_prompts["fact_id"].isin(ids)].itertuples():
                for kind, chosen in (("knowledge", kn), ("random", control)):
                    jobs.append((row.prompt_ids, row.answer_token, {n: 0.0 for n in chosen}))
                    meta.append({"source_fact": fact, "target_fact": int(row.fact_id), "group": label, "kind": kind,
                                 "prompt_id": int(row.prompt_id)})
    if not jobs:
        return pd.DataFrame(columns=["source_fact", "target_fact", "group", "kind", "prompt_id", "p_before", "p_after",
                                     "change"])
    frame = pd.DataFrame(meta)
    unique = all_prompts[all_prompts["prompt_id"].isin(frame["prompt_id"])]  # each target prompt's base run, once
    base = answer_probabilities(loaded, unique["prompt_ids"].tolist(), unique["answer_token"].tolist(),
                                batch_size=batch_size)
    before = dict(zip(unique["prompt_id"], base["p_answer"]))
    after = answer_probabilities(loaded, [j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs],
                                 batch_size=batch_size)
    frame["p_before"] = frame["prompt_id"].map(before).astype(float)
    frame["p_after"] = after["p_answer"].to_numpy()
    frame["change"] = (frame["p_after"] - frame["p_before"]) / frame["p_before"]
    return frame


def erase_relations(loaded, prompts: pd.DataFrame, neurons: pd.DataFrame, heldout: Sequence[Sequence[int]],
                    top: int = 20, seed: int = 0, batch_size: int = 32) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Dai's erasing: zero the values of a relation's ``top`` most common neurons (their code: 20), measure
    every analysed fact's answer (negative log-likelihood of its first token, and whether it stays the top
    token) and held-out perplexity, undo; the control zeroes as many random memories of the same layers.

    Returns (facts, heldout): facts has erased, kind, n_neurons, relation, same_relation, fact_id,
    prompt_id, nll_before, nll_after, correct_before, correct_after; heldout has erased, kind, n_neurons,
    ppl_before, ppl_after, change.
    """
    before = answer_probabilities(loaded, prompts["prompt_ids"].tolist(), prompts["answer_token"].tolist(),
                                  batch_size=batch_size)
    base_ppl = perplexity_of(heldout_nll(loaded, heldout)) if len(heldout) else math.nan
    fact_rows, ppl_rows = [], []
    for relation, kn in relation_neurons(neurons, top=top).items():
        control = random_like(kn, loaded.adapter.d_ff, np.random.default_rng([seed, stable_seed(relation), 5]))
        for kind, chosen in (("knowledge", kn), ("random", control)):
            zeros = {n: torch.zeros(loaded.adapter.d_model) for n in chosen}
            with edited_values(loaded, zeros):
                after = answer_probabilities(loaded, prompts["prompt_ids"].tolist(), prompts["answer_token"].tolist(),
                                             batch_size=batch_size)
                ppl = perplexity_of(heldout_nll(loaded, heldout)) if len(heldout) else math.nan
            fact_rows.append(pd.DataFrame({"erased": relation, "kind": kind, "n_neurons": len(chosen),
                                           "relation": prompts["relation"].to_numpy(),
                                           "same_relation": prompts["relation"].to_numpy() == relation,
                                           "fact_id": prompts["fact_id"].to_numpy(),
                                           "prompt_id": prompts["prompt_id"].to_numpy(),
                                           "nll_before": before["nll"].to_numpy(), "nll_after": after["nll"].to_numpy(),
                                           "correct_before": before["rank"].to_numpy() == 0,
                                           "correct_after": after["rank"].to_numpy() == 0}))
            ppl_rows.append({"erased": relation, "kind": kind, "n_neurons": len(chosen), "ppl_before": base_ppl,
                             "ppl_after": ppl, "change": (ppl - base_ppl) / base_ppl})
    facts = pd.concat(fact_rows, ignore_index=True) if fact_rows else pd.DataFrame()
    return facts, pd.DataFrame(ppl_rows)
