"""Held-out evaluation, one owner: sentences through the model (optionally under an intervention), and per sentence
the summed next-token negative log-likelihood, the tokens predicted and the top-1 predictions; perplexity from them.

Knowledge neurons' held-out perplexity (before and after an edit) and MoEfication's evaluation of each sparsified
configuration both run :func:`heldout_predictions`. Each token's NLL is :func:`ffnlib.nll.token_nll`, the formula
notebook 08's training uses too. Sentences are batched by length (:func:`ffnlib.batching.plan_batches`,
right-padded by :func:`ffnlib.batching.make_batch` with :attr:`ffnlib.models.LoadedModel.pad_id`); each pass stops after
the last block, and the output head runs only at real positions, in chunks (:data:`MAX_LOGIT_ELEMENTS`). Logits
are float32 (``adapter.logits_from_residual``) whatever the model computes in, and so is every NLL; a sentence's
NLL is the float32 sum of its tokens', stored as a Python float, and :func:`perplexity_of` sums in float64.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .capture import capture, forward_until_stop, stop_after
from .batching import make_batch, plan_batches
from .nll import token_nll

__all__ = ["MAX_LOGIT_ELEMENTS", "MAX_PADDING", "SentenceBatch", "sentence_batches", "next_token_predictions",
           "heldout_predictions", "heldout_nll", "perplexity_of"]

MAX_LOGIT_ELEMENTS = 1 << 24  # the output head runs on at most this many logits at once
MAX_PADDING = 0.15  # the largest share of a batch's tokens that may be padding (in MoEfication's cache key)


@dataclass(frozen=True)
class SentenceBatch:
    """Sentences of similar length, right-padded, longest first."""

    rows: np.ndarray  # each row's index in the sentence list given
    ids: torch.Tensor  # (rows, width) token ids on the model's device
    lengths: np.ndarray  # (rows,) each sentence's tokens


def sentence_batches(loaded, token_lists: Sequence[Sequence[int]], batch_tokens: int = 1024,
                     max_padding: float = MAX_PADDING) -> list[SentenceBatch]:
    """``token_lists`` cut into batches of at most ``batch_tokens`` padded tokens (one longer sentence: a batch of
    its own) and ``max_padding`` padding, longest first; a deterministic function of the lengths."""
    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
    out = []
    for rows in plan_batches(lengths, batch_tokens, max_padding):
        batch = make_batch([token_lists[r] for r in rows], loaded.pad_id, loaded.device)
        out.append(SentenceBatch(rows, batch.ids, batch.lengths))
    return out


@torch.no_grad()
def next_token_predictions(adapter, residual: torch.Tensor, ids: torch.Tensor,
                           lengths: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row of a right-padded batch: (float32 NLL of each next token, top-1 token at each position), for
    positions 0..length-2, from the last block's output ``residual`` (rows, width, d_model)."""
    rows_idx, pos_idx = [], []
    for r, n in enumerate(lengths):
        rows_idx += [r] * (int(n) - 1)
        pos_idx += list(range(int(n) - 1))
    rows_t, pos_t = torch.tensor(rows_idx, dtype=torch.long), torch.tensor(pos_idx, dtype=torch.long)
    hidden = residual[rows_t, pos_t]
    targets = ids[rows_t, pos_t + 1]
    chunk = max(1, MAX_LOGIT_ELEMENTS // int(adapter.head.weight.shape[0]))
    nll, top = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = adapter.logits_from_residual(hidden[start: start + chunk]).float()
        top.append(logits.argmax(-1))
        nll.append(token_nll(logits, targets[start: start + chunk]))
    nll = torch.cat(nll).cpu().numpy() if nll else np.zeros(0, dtype=np.float32)
    top = torch.cat(top).cpu().numpy() if top else np.zeros(0, dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(np.maximum(lengths - 1, 0))])
    return [(nll[a:b], top[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


Under = Callable[[SentenceBatch], AbstractContextManager]


def heldout_predictions(loaded, batches: Iterable[SentenceBatch], under: Under | None = None) -> pd.DataFrame:
    """Run each batch through the model up to its last block and read the next-token predictions; one row per
    sentence, in batch order: sentence (its index in the list the batches came from), tokens (predicted: its
    length - 1), nll (summed), top1 (int64 array, the top token at each position).

    ``under(batch)``: a context manager entered around that batch's forward pass only (e.g. a sparsified FFN
    whose record needs the batch's real tokens); an intervention for the whole evaluation can also just wrap the
    call. The right padding needs no attention mask: with causal attention, real tokens never see it."""
    last = loaded.adapter.n_layers - 1
    rows = []
    for batch in batches:
        with torch.inference_mode():
            with ExitStack() as stack:
                if under is not None:
                    stack.enter_context(under(batch))
                final = stack.enter_context(capture(loaded, last, what=("residual_after",)))
                stack.enter_context(stop_after(loaded, last))
                forward_until_stop(loaded.model, input_ids=batch.ids, use_cache=False)
            predicted = next_token_predictions(loaded.adapter, final.residual_after[last], batch.ids, batch.lengths)
        rows += [{"sentence": int(r), "tokens": len(nll), "nll": float(nll.sum()), "top1": top.astype(np.int64)}
                 for r, (nll, top) in zip(batch.rows, predicted)]
    return pd.DataFrame(rows, columns=["sentence", "tokens", "nll", "top1"])


def heldout_nll(loaded, token_lists: Sequence[Sequence[int]], under: Under | None = None, batch_tokens: int = 1024,
                max_padding: float = MAX_PADDING) -> pd.DataFrame:
    """Per sentence of ``token_lists``, in their order: nll (summed over its tokens after the first) and tokens
    (their number); see :func:`heldout_predictions`. A one-token sentence predicts nothing (0 tokens, nll 0)."""
    frame = heldout_predictions(loaded, sentence_batches(loaded, token_lists, batch_tokens, max_padding), under)
    return frame.sort_values("sentence").reset_index(drop=True)[["nll", "tokens"]]


def perplexity_of(frame: pd.DataFrame) -> float:
    """exp(summed NLL / tokens), summed in float64; NaN when a sentence's NLL is NaN (pandas' sum would skip it: a
    broken model would get perplexity 1), inf past float range."""
    mean = frame["nll"].to_numpy(np.float64).sum() / max(frame["tokens"].sum(), 1)
    return math.inf if mean > 700 else float(math.exp(mean))
