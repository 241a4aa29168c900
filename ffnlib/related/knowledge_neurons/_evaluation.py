"""Running prompts: the answer's probability and rank at each prompt's last position (optionally with coefficients
scaled there), the model's accuracy per relation, the facts it knows, and the held-out sentences whose perplexity
``ffnlib.evaluate`` measures."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ...batching import consecutive, pad_right
from ...errors import ParameterError
from ...interventions import scale_at_positions
from ...nll import token_nll
from ._facts import stable_seed

__all__ = ["wide", "answer_probabilities", "evaluate_prompts", "accuracy_by_relation", "select_facts",
           "heldout_token_lists"]


def wide(tensor: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors; float64 stays float64."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


@torch.no_grad()
def answer_probabilities(loaded, prompt_ids: Sequence[Sequence[int]], answer_tokens: Sequence[int],
                         factors: Sequence[Mapping[tuple[int, int], float]] | None = None,
                         batch_size: int = 32) -> pd.DataFrame:
    """For each prompt: the probability of its answer token at the last position (``p_answer``), its rank
    (0 = the model's top token), its negative log-probability (``nll``) and the top token.

    A prompt whose logits are not all finite (NaN or inf, e.g. after an edit that broke the model) gets
    ``rank`` = the vocabulary size (below every real rank, so never "correct" nor a success) and
    ``top_token`` = -1: NaN compares false, and would otherwise give rank 0.

    ``factors``: one mapping ``{(layer, memory): factor}`` per prompt (or ``None``); each listed coefficient
    is multiplied by its factor **at that prompt's last position only**, as Dai et al.'s suppress (0) and
    amplify (2) do. Prompts are batched by length and right-padded (padding never reaches a real position);
    the head runs only at the batch's last positions.
    """
    adapter, model = loaded.adapter, loaded.model
    n = len(prompt_ids)
    if factors is not None and len(factors) != n:
        raise ParameterError(f"factors has {len(factors)} entries for {n} prompts.")
    pad = loaded.pad_id
    out = {"p_answer": np.zeros(n), "rank": np.zeros(n, np.int64), "nll": np.zeros(n),
           "top_token": np.zeros(n, np.int64)}
    order = np.argsort([len(ids) for ids in prompt_ids], kind="stable")
    for part in consecutive(n, batch_size):
        rows = order[part]
        lengths = torch.tensor([len(prompt_ids[r]) for r in rows])
        ids, mask = pad_right([prompt_ids[r] for r in rows], pad)
        last = lengths - 1
        by_layer: dict[int, torch.Tensor] = {}  # per edited layer: (rows, d_ff) factors at each row's last position
        for j, r in enumerate(rows):
            for (layer, memory), factor in (factors[r] if factors is not None else {}).items():
                layer = adapter.check_layer(int(layer))
                if layer not in by_layer:
                    by_layer[layer] = torch.ones(len(rows), adapter.d_ff)
                by_layer[layer][j, int(memory)] = float(factor)
        keep = torch.unique(last)  # the head runs at these positions only
        with scale_at_positions(adapter, {layer: m.to(loaded.device) for layer, m in by_layer.items()},
                                last.to(loaded.device)):
            logits = model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                           logits_to_keep=keep.to(loaded.device)).logits
        column = torch.searchsorted(keep, last)
        final = wide(logits[torch.arange(len(rows)), column.to(logits.device)])
        answers = torch.tensor([int(answer_tokens[r]) for r in rows], device=final.device)[:, None]
        nll = token_nll(final, answers[:, 0])
        out["p_answer"][rows] = (-nll).exp().cpu().numpy()
        out["nll"][rows] = nll.cpu().numpy()
        broken = ~torch.isfinite(final).all(-1)  # NaN compares false: without this a broken row ranks 0
        rank = (final > final.gather(1, answers)).sum(-1)
        out["rank"][rows] = torch.where(broken, final.shape[-1], rank).cpu().numpy()
        out["top_token"][rows] = torch.where(broken, -1, final.argmax(-1)).cpu().numpy()
    return pd.DataFrame(out)


def evaluate_prompts(loaded, prompts: pd.DataFrame, batch_size: int = 32) -> pd.DataFrame:
    """``prompts`` with the model's answer: p_answer, rank, nll, top_token, correct (rank 0), top10."""
    result = answer_probabilities(loaded, prompts["prompt_ids"].tolist(), prompts["answer_token"].tolist(),
                                  batch_size=batch_size)
    out = prompts.reset_index(drop=True).copy()
    for column in result.columns:
        out[column] = result[column].to_numpy()
    out["correct"] = out["rank"] == 0
    out["top10"] = out["rank"] < 10
    return out


def accuracy_by_relation(evaluated: pd.DataFrame) -> pd.DataFrame:
    """Per relation: facts, prompts, accuracy (answer's first token at rank 1) and top-10 accuracy over
    prompts, and the facts the model gets right in at least one template (those analysed)."""
    per_fact = evaluated.groupby(["relation", "fact_id"])["correct"].any().rename("any_correct").reset_index()
    table = evaluated.groupby("relation").agg(facts=("fact_id", "nunique"), prompts=("prompt_id", "size"),
                                               accuracy=("correct", "mean"), top10_accuracy=("top10", "mean"))
    table["facts_right_once"] = per_fact.groupby("relation")["any_correct"].sum()
    table["share_right_once"] = table["facts_right_once"] / table["facts"]
    return table.reset_index()


def select_facts(evaluated: pd.DataFrame, per_relation: int | None, seed: int = 0) -> pd.DataFrame:
    """The prompts of up to ``per_relation`` facts per relation (seeded sample) among the facts the model gets
    right in at least one template (None: all of them)."""
    right = evaluated.groupby("fact_id")["correct"].transform("any")
    pool = evaluated[right]
    chosen = []
    for relation, group in pool.groupby("relation", sort=True):
        ids = np.array(sorted(group["fact_id"].unique()))
        if per_relation is not None and len(ids) > per_relation:
            rng = np.random.default_rng([seed, stable_seed(relation)])
            ids = np.sort(rng.choice(ids, per_relation, replace=False))
        chosen.extend(ids.tolist())
    return evaluated[evaluated["fact_id"].isin(chosen)].reset_index(drop=True)


def heldout_token_lists(loaded, sentences: pd.DataFrame, max_tokens: int = 64) -> list[list[int]]:
    """Held-out sentences as the model reads them (BOS included), cut to ``max_tokens``; one-token ones dropped."""
    lists = [loaded.encode(text)[:max_tokens] for text in sentences["text"]]
    return [ids for ids in lists if len(ids) > 1]
