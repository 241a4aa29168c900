"""Batches: how sequences are grouped into batches and padded, for every pass over a corpus.

Each plan is a deterministic function of the lengths (ties keep the input order), so a resumed run rebuilds
exactly the batches it had planned, and a cached result stays valid.

- :func:`plan_batches` groups sequences of similar length greedily (a bounded padding share and number of tokens
  each): value and coefficient reads (:func:`ffnlib.mining.read_coefficients`) and held-out evaluation
  (:mod:`ffnlib.evaluate`).
- :func:`plan_least_padding` finds the plan of least padding plus :data:`BATCH_COST` per batch, exactly; the
  miner's :func:`plan_prefix_batches` runs it within each *prefix segment* of the corpus (its first 250 sentences,
  the next 250, the next 500, ... doubling, :func:`doubling_sizes`), so that the state after each segment is the
  result of a run on that prefix (notebook 10's snapshots).
- :func:`plan_shortest_first` groups sequences shortest first within a token budget: Section 5's example prefixes
  (:func:`prefix_inputs` pads a batch of them, for :mod:`ffnlib.aggregation` and :mod:`ffnlib.participation`)
  and notebook 09's sentences.
- :func:`consecutive` cuts ``0 .. n-1`` into batches of a fixed number of rows (notebook 06's short prompts).
- :func:`make_batch` right-pads one batch of sequences sorted longest first, with its runs of equal length (the
  miner's); :func:`pad_right` right-pads sequences in any order with their attention mask (everyone else's).

>>> [rows.tolist() for rows in plan_batches([3, 9, 4, 9], batch_tokens=20)]  # 4 and 3 would pad 1 of 8 tokens
[[1, 3], [2], [0]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import ParameterError

__all__ = ["Batch", "make_batch", "plan_batches", "BATCH_COST", "plan_least_padding", "doubling_sizes",
           "plan_prefix_batches", "plan_shortest_first", "consecutive", "pad_right", "prefix_inputs"]


@dataclass
class Batch:
    """One batch of right-padded sequences, rows sorted by length descending."""

    ids: torch.Tensor  # (rows, tokens)
    lengths: np.ndarray  # (rows,)
    groups: list[tuple[int, int, int]]  # runs of rows with equal length: (first row, end row, length)
    pad: torch.Tensor | None  # (rows, tokens - n_bos, 1) True at padding positions; None without padding


def make_batch(sequences: Sequence[Sequence[int]], pad_id: int, device, n_bos: int = 0) -> Batch:
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    if np.any(np.diff(lengths) > 0):
        raise AssertionError("batch rows must be sorted by length, longest first")
    ids = torch.full((len(sequences), int(lengths[0])), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    groups, start = [], 0
    for row in range(1, len(lengths) + 1):
        if row == len(lengths) or lengths[row] != lengths[start]:
            groups.append((start, row, int(lengths[start])))
            start = row
    pad = None
    if lengths[-1] != lengths[0]:
        steps = torch.arange(n_bos, int(lengths[0]))
        pad = (steps[None, :] >= torch.as_tensor(lengths)[:, None])[..., None].to(device)
    return Batch(ids.to(device), lengths, groups, pad)


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_padding: float = 0.05) -> list[np.ndarray]:
    """Cut sequences into batches, longest first: a batch grows while it stays within ``batch_tokens``
    padded tokens and its padding within ``max_padding`` of them (a sequence longer than the budget gets
    a batch of its own). Returns row indices per batch.

    Ties in length keep the input order, so the plan is a deterministic function of the lengths.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        width = int(lengths[order[start]])
        end, real = start + 1, width
        while end < len(order):
            rows = end - start + 1
            if rows * width > batch_tokens or rows * width - (real + lengths[order[end]]) > max_padding * rows * width:
                break
            real += int(lengths[order[end]])
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


BATCH_COST = 20  # the miner's fixed cost of one batch, in padded tokens: measured 14-26 (benchmarks/README.md, "Batch plans")


def plan_least_padding(lengths: Sequence[int], batch_tokens: int, batch_cost: int = BATCH_COST) -> list[np.ndarray]:
    """Cut sequences into batches of similar length at the least cost: the plan that minimises the padded
    tokens plus ``batch_cost`` per batch, each batch within ``batch_tokens`` padded tokens (a sequence
    longer than that gets a batch of its own). Exact, by dynamic programming over the sequences sorted
    longest first (the batches are runs of that order). Returns row indices per batch, longest first.

    Unlike :func:`plan_batches`' greedy bound on each batch's padding, it pads little even on a few hundred
    sentences, where few share a length: the miner's snapshots plan each corpus prefix segment alone.
    Ties in length keep the input order and ties in cost take the earliest cut, so the plan is a
    deterministic function of the lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    width = lengths[order]  # a batch order[j:i] is padded to width[j]
    n = len(order)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(n):  # extend the best plan of the first j sequences by the batch order[j:i]
        ends = np.arange(j + 1, min(n, j + max(1, batch_tokens // max(int(width[j]), 1))) + 1)
        cost = best[j] + (ends - j) * width[j] + batch_cost
        better = cost < best[ends]
        best[ends[better]] = cost[better]
        cut[ends[better]] = j
    batches, end = [], n
    while end > 0:
        batches.append(order[cut[end]:end])
        end = cut[end]
    return batches[::-1]


def doubling_sizes(n: int, floor: int | None) -> list[int]:
    """Prefix sizes of the snapshots of a corpus of ``n`` sentences: ``floor``, 2·floor, 4·floor, ... below
    ``n``, then ``n`` itself (``[n]`` alone when ``floor`` is None or at least ``n``)."""
    sizes = []
    if floor is not None:
        if int(floor) < 1:
            raise ParameterError(f"snapshot floor must be a positive number of sentences, got {floor}.")
        size = int(floor)
        while size < n:
            sizes.append(size)
            size *= 2
    return sizes + [int(n)]


def plan_prefix_batches(lengths: Sequence[int], batch_tokens: int, sizes: Sequence[int],
                        batch_cost: int = BATCH_COST) -> tuple[list[np.ndarray], list[int]]:
    """The miner's plan: :func:`plan_least_padding` within each prefix segment ``[sizes[j-1], sizes[j])`` of
    the rows (row order is the corpus order). Returns the batches (row indices) and, per size, how many
    batches complete that prefix. A run on the first ``sizes[j]`` rows with the same ``sizes[:j+1]`` plans
    exactly the same batches, so its result equals the state after those batches, bit for bit."""
    lengths = np.asarray(lengths, dtype=np.int64)
    batches, ends, start = [], [], 0
    for size in sizes:
        batches += [rows + start for rows in plan_least_padding(lengths[start:size], batch_tokens, batch_cost)]
        ends.append(len(batches))
        start = size
    if start != len(lengths):
        raise AssertionError(f"the prefix sizes {list(sizes)} must end at the number of rows ({len(lengths)})")
    return batches, ends


def plan_shortest_first(prefix_lengths, batch_tokens: int) -> list[np.ndarray]:
    """Example indices grouped into batches of at most ``batch_tokens`` padded tokens, shortest first.

    Deterministic in its inputs, so a resumed run rebuilds exactly the same batches.
    """
    lengths = np.asarray(prefix_lengths)
    order = np.lexsort((np.arange(len(lengths)), lengths))
    batches, current = [], []
    for index in order:
        if current and (len(current) + 1) * lengths[index] > batch_tokens:
            batches.append(np.array(current))
            current = []
        current.append(index)
    if current:
        batches.append(np.array(current))
    return batches


def consecutive(n: int, size: int) -> Iterator[np.ndarray]:
    """Indices ``0 .. n-1`` in consecutive batches of at most ``size`` rows (a count, not a token budget: prompts
    of a few tokens each, notebook 06)."""
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n))


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of any lengths and order, right-padded with ``pad_id``: (input_ids, attention_mask), on
    ``device`` (CPU when None). Padding comes after every real token, so with a causal model it never reaches a
    real position.

    >>> ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def prefix_inputs(examples: pd.DataFrame, batch: np.ndarray, pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded prefixes of the batch's examples: (input_ids, attention_mask, last positions)."""
    prefixes = [examples["token_ids"].iat[i][: examples["position"].iat[i] + 1] for i in batch]
    ids, mask = pad_right(prefixes, pad_id, device)
    last = torch.tensor([len(p) - 1 for p in prefixes], dtype=torch.long)
    return ids, mask, last.to(device)
