"""From attribution scores to knowledge neurons: each prompt's coarse neurons (a threshold), a fact's neurons (the
refining rule over its prompts, p tuned per relation as the authors' code does), a relation's neurons, and random
memories of the same layers as the control of every experiment."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import pandas as pd

from ...errors import ParameterError

__all__ = ["coarse_neurons", "refine", "find_knowledge_neurons", "neurons_per_fact", "relation_neurons",
           "random_like", "fact_neurons"]


def coarse_neurons(scores: pd.DataFrame, threshold: float = 0.2, sign: int = 1) -> pd.DataFrame:
    """Each prompt's coarse neurons: the memories of side ``sign`` whose score is >= ``threshold`` x the
    prompt's largest score of that side (Dai's t = 0.2)."""
    if not 0 < threshold <= 1:
        raise ParameterError(f"threshold must be in (0, 1], got {threshold!r}.")
    if sign not in (1, -1):
        raise ParameterError(f"sign must be +1 or -1, got {sign!r}.")
    return scores[(scores["sign"] == sign) & (scores["ratio"] >= threshold - 1e-12)].reset_index(drop=True)


def refine(coarse_sets: Sequence[set], p: float, min_prompts: int = 3) -> set:
    """The neurons found in at least ``max(p x prompts, min_prompts)`` of a fact's prompts (Dai's refining;
    the authors' code uses ``min_prompts = 3``)."""
    counts = Counter(neuron for found in coarse_sets for neuron in set(found))
    needed = max(p * len(coarse_sets), min_prompts)
    return {neuron for neuron, count in counts.items() if count >= needed - 1e-9}


def find_knowledge_neurons(scores: pd.DataFrame, prompts: pd.DataFrame, threshold: float = 0.2, p: float = 0.7,
                           p_step: float = 0.05, target_range: tuple[float, float] = (2, 5), max_tries: int = 6,
                           min_prompts: int = 3, sign: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Knowledge neurons of every fact in ``prompts``, with p chosen per relation as the authors' code does.

    p starts at ``p``; while a relation's facts have fewer than ``target_range[0]`` neurons on average it
    moves down by ``p_step``, above ``target_range[1]`` up, at most ``max_tries`` evaluations; the last
    evaluation is kept. Returns (neurons, refining): neurons has relation, fact_id, layer, memory, sign,
    count (prompts where it is coarse), prompts (the fact's prompts), share, mean_ratio and p; refining has,
    per relation and try, p and the mean number of neurons per fact.
    """
    coarse = coarse_neurons(scores, threshold, sign)
    found = {pid: set(zip(g["layer"].astype(int), g["memory"].astype(int))) for pid, g in coarse.groupby("prompt_id")}
    mean_ratio = coarse.groupby(["prompt_id", "layer", "memory"])["ratio"].first()
    rows, history = [], []
    for relation, group in prompts.groupby("relation", sort=True):
        bags = {fact: [found.get(int(pid), set()) for pid in g["prompt_id"]] for fact, g in group.groupby("fact_id")}
        p_now = p
        for attempt in range(max_tries):
            refined = {fact: refine(bag, p_now, min_prompts) for fact, bag in bags.items()}
            mean = float(np.mean([len(r) for r in refined.values()])) if refined else 0.0
            history.append({"relation": relation, "try": attempt, "p": round(p_now, 6), "mean_neurons": mean,
                            "facts": len(refined)})
            if target_range[0] <= mean <= target_range[1]:
                break
            p_now = round(p_now - p_step if mean < target_range[0] else p_now + p_step, 6)
        for fact, neurons in refined.items():
            prompt_ids = group.loc[group["fact_id"] == fact, "prompt_id"].astype(int).tolist()
            for layer, memory in sorted(neurons):
                count = sum((layer, memory) in found.get(pid, set()) for pid in prompt_ids)
                ratios = [mean_ratio.get((pid, layer, memory)) for pid in prompt_ids]
                ratios = [r for r in ratios if r is not None]
                rows.append({"relation": relation, "fact_id": int(fact), "layer": int(layer), "memory": int(memory),
                             "sign": int(sign), "count": count, "prompts": len(prompt_ids),
                             "share": count / len(prompt_ids), "mean_ratio": float(np.mean(ratios)),
                             "p": history[-1]["p"]})
    columns = ["relation", "fact_id", "layer", "memory", "sign", "count", "prompts", "share", "mean_ratio", "p"]
    return pd.DataFrame(rows, columns=columns), pd.DataFrame(history)


def neurons_per_fact(neurons: pd.DataFrame, prompts: pd.DataFrame) -> pd.DataFrame:
    """fact_id, relation, subject, answer and n_neurons (0 for facts without any)."""
    facts = prompts.drop_duplicates("fact_id")[["fact_id", "relation", "subject", "answer"]]
    counts = neurons.groupby("fact_id").size().rename("n_neurons")
    return facts.merge(counts, left_on="fact_id", right_index=True, how="left").fillna({"n_neurons": 0}).astype(
        {"n_neurons": int}).reset_index(drop=True)


def relation_neurons(neurons: pd.DataFrame, share: float = 0.1, top: int | None = None) -> dict[str, list]:
    """Per relation, its neurons: those of at least ``share`` of its facts (Dai's relation KNs, 10%), or with
    ``top``, its ``top`` most common neurons (Dai's erasing: 20), ties by layer then memory."""
    out = {}
    for relation, group in neurons.groupby("relation"):
        n_facts = max(group["fact_id"].nunique(), 1)
        counts = group.groupby(["layer", "memory"])["fact_id"].nunique().reset_index(name="facts")
        counts = counts.sort_values(["facts", "layer", "memory"], ascending=[False, True, True])
        if top is not None:
            counts = counts.head(top)
        else:
            counts = counts[counts["facts"] >= share * n_facts - 1e-9]
        out[relation] = [(int(l), int(m)) for l, m in zip(counts["layer"], counts["memory"])]
    return out


def random_like(neurons: Sequence[tuple[int, int]], d_ff: int, rng: np.random.Generator,
                exclude: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """As many random memories as ``neurons``, from the same layers (one per neuron), none of ``exclude``."""
    taken = set(exclude) | set(neurons)
    out = []
    for layer, _ in neurons:
        while True:
            memory = int(rng.integers(d_ff))
            if (layer, memory) not in taken:
                taken.add((layer, memory))
                out.append((int(layer), memory))
                break
    return out


def fact_neurons(neurons: pd.DataFrame) -> dict[int, list[tuple[int, int]]]:
    """Each fact's neurons as (layer, memory) pairs."""
    return {int(f): [(int(l), int(m)) for l, m in zip(g["layer"], g["memory"])] for f, g in neurons.groupby("fact_id")}
