"""Editing facts through the neurons' values (Dai et al.'s fact update, the lambda2 trade-off sweep). Weights
are written only inside :func:`edited_values`, which copies the originals back on exit, bit for bit."""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ...errors import ParameterError
from ...evaluate import heldout_nll, perplexity_of
from ...stats import binomial, resampled
from ...storage import ensure_dir, fingerprint, load_result, save_result
from ._evaluation import answer_probabilities, evaluate_prompts
from ._neurons import random_like

__all__ = ["edited_values", "update_vectors", "MAX_PERPLEXITY_RATIO", "edit_success", "edit_facts", "lambda2_sweep",
           "sweep_table"]

_VERSION = 1  # bump when a stored column's computation changes


@contextmanager
def edited_values(loaded, new_values: Mapping[tuple[int, int], torch.Tensor]) -> Iterator[None]:
    """Write new value vectors ``{(layer, memory): v}`` into the model's weights; on exit (errors included)
    the original weights are copied back, bit for bit."""
    adapter = loaded.adapter
    saved = []
    try:
        with torch.no_grad():
            for (layer, memory), vector in new_values.items():
                values = adapter.value_rows(layer)  # a view of the down module's weight, in the model's dtype
                saved.append((layer, int(memory), values[int(memory)].clone()))
                values[int(memory)].copy_(vector.to(values.dtype))
        yield
    finally:
        with torch.no_grad():
            for layer, memory, original in reversed(saved):
                adapter.value_rows(layer)[memory].copy_(original)


def update_vectors(loaded, neurons: Sequence[tuple[int, int, int]], old_token: int, new_token: int,
                   lambda1: float = 1.0, lambda2: float = 8.0) -> dict[tuple[int, int], torch.Tensor]:
    """Dai's fact update of each neuron's value: ``v - lambda1 |v|/|e_old| e_old + lambda2 |v|/|e_new| e_new``
    (e: input embeddings; their code: lambda1 = 1, lambda2 = 8). For a negative-side neuron (sign -1, it
    writes -v) the two terms change sign."""
    embeddings = loaded.model.get_input_embeddings().weight.detach()
    e_old, e_new = embeddings[old_token].float(), embeddings[new_token].float()
    out = {}
    for layer, memory, sign in neurons:
        v = loaded.adapter.values(layer)[memory].float()
        change = -lambda1 * v.norm() / e_old.norm() * e_old + lambda2 * v.norm() / e_new.norm() * e_new
        out[(int(layer), int(memory))] = v + sign * change
    return out


MAX_PERPLEXITY_RATIO = 1.5  # an update must leave held-out perplexity within 1.5x the unedited model's (ours)


def _check_ratio(max_ratio) -> float:
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not max_ratio >= 1:
        raise ParameterError(f"max_perplexity_ratio must be a number >= 1 (math.inf: any finite perplexity), "
                             f"got {max_ratio!r}.")
    return float(max_ratio)


def edit_success(rank: int, ppl_before: float, ppl_after: float, max_ratio: float = MAX_PERPLEXITY_RATIO) -> bool:
    """An update succeeds when the new answer is the top token (``rank == 0``) **and** held-out perplexity after
    the edit is at most ``max_ratio`` x the unedited model's. Dai et al. count rank 1 only and report intra- and
    inter-relation perplexity beside it, to show that an edit leaves other knowledge alone; an edit that
    destroys the model is no update, and 1.5x (the default) is a generous bound on "leaves the model working".
    A perplexity that is not finite (before or after) is a failure."""
    max_ratio = _check_ratio(max_ratio)
    return bool(int(rank) == 0 and math.isfinite(ppl_before) and math.isfinite(ppl_after)
                and ppl_after <= max_ratio * ppl_before)


def edit_facts(loaded, prompts: pd.DataFrame, neurons: pd.DataFrame, all_prompts: pd.DataFrame,
               heldout: Sequence[Sequence[int]], lambda1: float = 1.0, lambda2: float = 8.0, seed: int = 0,
               drop_shared: float = 0.1, n_others: int = 5, max_facts: int | None = None, batch_size: int = 32,
               max_perplexity_ratio: float = MAX_PERPLEXITY_RATIO) -> pd.DataFrame:
    """Dai's fact update: for each fact, one of its prompts the model gets right (seeded) and a new answer (the
    answer of another fact of the relation, seeded); the fact's neurons (without those of more than
    ``drop_shared`` of the relation's facts, as their code, and at least without those shared with another
    fact: with a handful of facts per relation 10% is less than one) have their values edited by
    :func:`update_vectors`, then the edit is undone. The same edit of as many random memories of the same
    layers is the control.

    Rows: fact_id, relation, kind, n_neurons, lambda1, lambda2, success (:func:`edit_success`: the new answer's
    first token on top and held-out perplexity within ``max_perplexity_ratio`` x), success_unbounded (on top,
    whatever the perplexity: Dai's success), success_at_5, changed (top token no longer the old answer),
    p_new_before/after, generalisation (share of the fact's other prompts whose top token becomes the new
    answer), intra/inter (mean NLL of the gold answer over ``n_others`` other facts of the same / other
    relations, before and after), heldout_ppl_before/after, heldout_ppl_ratio (after / before),
    max_perplexity_ratio. ``max_facts``: edit only the first facts (by fact_id) that qualify.
    """
    max_perplexity_ratio = _check_ratio(max_perplexity_ratio)
    d_ff = loaded.adapter.d_ff
    relation_counts = {rel: Counter((int(l), int(m)) for l, m in zip(g["layer"], g["memory"]))
                       for rel, g in neurons.groupby("relation")}
    relation_facts = neurons.groupby("relation")["fact_id"].nunique().to_dict()
    evaluated = prompts if "correct" in prompts.columns else evaluate_prompts(loaded, prompts, batch_size)
    pool = all_prompts.drop_duplicates("fact_id")
    base_ppl = perplexity_of(heldout_nll(loaded, heldout)) if len(heldout) else math.nan
    rows = []

    for fact, group in neurons.groupby("fact_id"):
        fact = int(fact)
        relation = group["relation"].iloc[0]
        limit = max(drop_shared * relation_facts[relation], 1)  # with few facts: shared by any other fact
        shared = {n for n, c in relation_counts[relation].items() if c > limit}
        chosen = [(int(l), int(m), int(s)) for l, m, s in zip(group["layer"], group["memory"], group["sign"])
                  if (int(l), int(m)) not in shared]
        mine = evaluated[evaluated["fact_id"] == fact]
        right = mine[mine["correct"]]
        if not chosen or right.empty or (max_facts is not None and len(rows) >= 2 * max_facts):
            continue
        rng = np.random.default_rng([seed, fact, 3])
        prompt = right.iloc[int(rng.integers(len(right)))]
        old = int(prompt["answer_token"])
        candidates = pool[(pool["relation"] == relation) & (pool["answer_token"] != old)]
        if candidates.empty:
            continue
        new = int(candidates.iloc[int(rng.integers(len(candidates)))]["answer_token"])
        intra_ids = pool[(pool["relation"] == relation) & (pool["fact_id"] != fact)]["fact_id"].to_numpy()
        inter_ids = pool[pool["relation"] != relation]["fact_id"].to_numpy()
        intra = all_prompts[all_prompts["fact_id"].isin(rng.choice(intra_ids, min(n_others, len(intra_ids)),
                                                                   replace=False))]
        inter = all_prompts[all_prompts["fact_id"].isin(rng.choice(inter_ids, min(n_others, len(inter_ids)),
                                                                   replace=False))]
        others = mine[mine["prompt_id"] != prompt["prompt_id"]]
        # one batch: the edited prompt and the fact's other prompts (read for the new answer), then the other
        # facts' prompts (read for their own answers)
        ids = ([prompt["prompt_ids"]] + others["prompt_ids"].tolist() + intra["prompt_ids"].tolist()
               + inter["prompt_ids"].tolist())
        tokens = [new] * (1 + len(others)) + intra["answer_token"].tolist() + inter["answer_token"].tolist()
        parts = np.repeat([0, 1, 2, 3], [1, len(others), len(intra), len(inter)])

        def measure():
            result = answer_probabilities(loaded, ids, tokens, batch_size=batch_size)
            return result, float(result.loc[parts == 2, "nll"].mean()), float(result.loc[parts == 3, "nll"].mean())

        before, intra_before, inter_before = measure()
        control = [(l, m, s) for (l, m), s in zip(random_like([(l, m) for l, m, _ in chosen], d_ff,
                                                              np.random.default_rng([seed, fact])),
                                                  [s for _, _, s in chosen])]
        for kind, edit in (("knowledge", chosen), ("random", control)):
            with edited_values(loaded, update_vectors(loaded, edit, old, new, lambda1, lambda2)):
                after, intra_after, inter_after = measure()
                ppl = perplexity_of(heldout_nll(loaded, heldout)) if len(heldout) else math.nan
            generalised = after.loc[parts == 1, "rank"]
            rank = int(after["rank"].iloc[0])
            rows.append({"fact_id": fact, "relation": relation, "kind": kind, "n_neurons": len(edit),
                         "lambda1": float(lambda1), "lambda2": float(lambda2),
                         "prompt_id": int(prompt["prompt_id"]), "old_token": old, "new_token": new,
                         "success": edit_success(rank, base_ppl, ppl, max_perplexity_ratio),
                         "success_unbounded": rank == 0, "success_at_5": rank < 5,
                         "changed": bool(after["top_token"].iloc[0] != old),
                         "p_new_before": float(before["p_answer"].iloc[0]),
                         "p_new_after": float(after["p_answer"].iloc[0]),
                         "generalisation": float((generalised == 0).mean()) if len(generalised) else math.nan,
                         "intra_nll_before": intra_before, "intra_nll_after": intra_after,
                         "inter_nll_before": inter_before, "inter_nll_after": inter_after,
                         "heldout_ppl_before": base_ppl, "heldout_ppl_after": ppl,
                         "heldout_ppl_ratio": ppl / base_ppl, "max_perplexity_ratio": max_perplexity_ratio})
    return pd.DataFrame(rows)


def lambda2_sweep(loaded, prompts: pd.DataFrame, neurons: pd.DataFrame, all_prompts: pd.DataFrame,
                  heldout: Sequence[Sequence[int]], lambda2s: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
                  lambda1: float = 1.0, seed: int = 0, drop_shared: float = 0.1, n_others: int = 5,
                  max_facts: int | None = None, batch_size: int = 32,
                  max_perplexity_ratio: float = MAX_PERPLEXITY_RATIO, out_dir=None,
                  progress: bool = True) -> pd.DataFrame:
    """:func:`edit_facts` at each lambda2 of ``lambda2s`` (the same facts, prompts, new answers and random
    controls at each): every edit's row, knowledge neurons and random memories. With ``out_dir`` each lambda2's
    rows are checkpointed (an interrupted sweep resumes) and the whole is cached with a manifest; a later call
    with the same request loads it. :func:`sweep_table` summarises it."""
    max_perplexity_ratio = _check_ratio(max_perplexity_ratio)
    lambda2s = [float(v) for v in lambda2s]
    if not lambda2s:
        raise ParameterError("lambda2s is empty: give at least one lambda2 to sweep.")

    def key(frame, columns):
        return fingerprint(frame[columns].to_json(orient="values"))

    request = {"analysis": "kn_lambda2_sweep", "version": _VERSION, "model": loaded.key,
               "file_hash": loaded.file_hash, "dtype": str(next(loaded.model.parameters()).dtype),
               "prompts": key(prompts, [c for c in ("prompt_id", "fact_id", "prompt_ids", "answer_token", "correct")
                                        if c in prompts.columns]),
               "all_prompts": key(all_prompts, ["prompt_id", "fact_id", "relation", "prompt_ids", "answer_token"]),
               "neurons": key(neurons, ["relation", "fact_id", "layer", "memory", "sign"]),
               "heldout": fingerprint([[int(t) for t in ids] for ids in heldout]), "lambda1": float(lambda1),
               "lambda2s": lambda2s, "seed": int(seed), "drop_shared": float(drop_shared), "n_others": int(n_others),
               "max_facts": max_facts, "max_perplexity_ratio": max_perplexity_ratio}
    name = f"kn-lambda2-sweep-{fingerprint(request)}"
    folder = ensure_dir(out_dir) if out_dir is not None else None
    if folder is not None:
        cached = load_result(folder, name, request)
        if cached is not None:
            if progress:
                print(f"Loaded the cached lambda2 sweep {folder / name}.parquet; not recomputing.")
            return cached
    partial = folder / f"{name}.partial" if folder is not None else None
    parts = []
    for index, lambda2 in enumerate(lambda2s):
        chunk = {**request, "chunk": index}
        part = load_result(partial, f"lambda2-{index:02d}", chunk) if partial is not None else None
        if part is None:
            part = edit_facts(loaded, prompts, neurons, all_prompts, heldout, lambda1, lambda2, seed, drop_shared,
                              n_others, max_facts, batch_size, max_perplexity_ratio)
            if partial is not None:
                save_result(partial, f"lambda2-{index:02d}", part, chunk)
        elif progress:
            print(f"Resuming the lambda2 sweep: lambda2 = {lambda2:g} read from its checkpoint in {partial}.")
        parts.append(part)
    sweep = pd.concat(parts, ignore_index=True)
    if folder is not None:
        import shutil

        save_result(folder, name, sweep, request)
        shutil.rmtree(partial, ignore_errors=True)
    return sweep


def sweep_table(sweep: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per (lambda2, kind) of :func:`lambda2_sweep`: edits, success (bounded) and success_unbounded with exact
    binomial 95% intervals, and the median held-out perplexity ratio (after / before; a non-finite ratio counts
    as infinite) with a bootstrap 95% interval over edits (``ffnlib.stats``)."""
    columns = ["lambda2", "kind", "edits", "max_perplexity_ratio", "success", "success_low", "success_high",
               "success_unbounded", "success_unbounded_low", "success_unbounded_high", "ppl_ratio", "ppl_ratio_low",
               "ppl_ratio_high"]
    rows = []
    for (lambda2, kind), group in sweep.groupby(["lambda2", "kind"], sort=True):
        row = {"lambda2": float(lambda2), "kind": kind, "edits": len(group),
               "max_perplexity_ratio": float(group["max_perplexity_ratio"].iloc[0])}
        for column in ("success", "success_unbounded"):
            rate = binomial(int(group[column].sum()), len(group), "edits")
            row.update({column: rate.value, f"{column}_low": rate.low, f"{column}_high": rate.high})
        ratio = group["heldout_ppl_ratio"].to_numpy(np.float64)
        ratio = np.where(np.isfinite(ratio), ratio, np.inf)
        interval = resampled(ratio, lambda r: float(np.median(r)), "edits", seed=seed)
        row.update(ppl_ratio=float(np.median(ratio)), ppl_ratio_low=interval.low, ppl_ratio_high=interval.high)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)
