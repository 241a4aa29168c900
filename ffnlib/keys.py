"""Section 3: keys capture input patterns.

A memory's *trigger examples* are the corpus prefixes that make its coefficient largest. The coefficient
of memory i for a prefix is m_i at the prefix's last token (for gated FFNs ``act(gate_i·x)·(up_i·x)``,
which can be negative: the most negative coefficients make the memory write ``-v_i``).

- :func:`mine_trigger_examples` streams a sentence corpus through the model and keeps, for every layer
  and memory, the top-k prefixes (and for gated models the k most negative). As in the authors' code a
  sentence gives at most one prefix per key (the position of its maximum); ``per_sentence="all"`` keeps
  every position. Memory use is bounded by layers x d_ff x k whatever the corpus size: each batch is
  reduced inside the forward pass, layer by layer, and merged into a running top-k state
  (:class:`TopKState`, with an exact :func:`merge` for shards). A candidate enters only if it is at least
  a memory's k-th score; entrants wait unsorted in spare slots until they run out, so the sorting cost is
  paid rarely and the result does not depend on when it is paid. Runs checkpoint and resume; results are
  cached by manifest.
- :func:`trigger_table` / :func:`trigger_html`: one key's trigger examples, readable.
- :func:`removal_experiment` (Fig. 3): remove the first, the last or a random token of each trigger
  prefix and measure the change of that key's coefficient.
- :func:`layer_pattern_measures` (Fig. 2 analogue, automatic): shallow patterns (triggers sharing
  their last token / bigram) and semantic patterns (topic concentration), against random keys.
- :func:`summarise_annotations`: human annotations (written with ``ffnlib.widgets.annotation``).
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import CorpusError, ParameterError
from .storage import (atomic_write_bytes, ensure_dir, fingerprint, load_result, read_json, save_result,
                      sha256_bytes, write_json)

log = logging.getLogger(__name__)

PER_SENTENCE = ("max", "all")
POSITION_BITS = 20  # a candidate is stored as one int64: sentence_id << 20 | position
MAX_POSITION = (1 << POSITION_BITS) - 1
MAX_SENTENCE_ID = (1 << (62 - POSITION_BITS)) - 1
EMPTY = 1 << 62  # keys of empty slots are EMPTY + slot (unique, after every real candidate)
RESULT_VERSION = 1  # bump when what the miner computes changes
# How the miner finds positions; these change the speed, never the result (tests run both ways):
DENSE_PAIRS_SHARE = 0.15  # positions of more than 15% of a batch's (sentence, memory) pairs: found all at once
MAX_GROUP_VIEWS = 3  # a padded batch with up to 3 runs of equal length is reduced run by run (no copy)
SPARE_SLOTS = 2.0  # each memory's pool has k * SPARE_SLOTS unsorted slots for new candidates before it is sorted
TRIGGER_COLUMNS = ["layer", "memory", "sign", "rank", "coefficient", "sentence_id", "position", "next_token"]


# =====================================================================================================
# The running top-k state
# =====================================================================================================
@dataclass
class TopKState:
    """Running top-k trigger candidates of several layers, for one or two signs.

    ``scores[s, l, i, r]`` is ``signs[s] * coefficient`` of the candidate of rank r of memory i in layer
    ``layers[l]`` (so larger is better for both signs); ``keys`` holds ``sentence_id << 20 | position``.
    Each row is sorted by score descending, then key ascending (sentence id, then position): this order
    is total, so the top-k of a union is the same whatever order the candidates came in. Empty slots
    have score ``-inf`` and key ``EMPTY + slot`` (unique, so the order stays total).
    """

    layers: list[int]
    signs: list[int]
    scores: torch.Tensor  # (signs, layers, d_ff, k) float32
    keys: torch.Tensor  # (signs, layers, d_ff, k) int64

    @classmethod
    def empty(cls, layers: Sequence[int], signs: Sequence[int], d_ff: int, k: int,
              device: torch.device | str = "cpu") -> "TopKState":
        shape = (len(signs), len(layers), d_ff, k)
        return cls(list(layers), list(signs), torch.full(shape, float("-inf"), device=device),
                   (EMPTY + torch.arange(k, device=device)).expand(shape).contiguous())

    @property
    def k(self) -> int:
        return self.scores.shape[-1]

    @property
    def d_ff(self) -> int:
        return self.scores.shape[-2]

    def to(self, device) -> "TopKState":
        return TopKState(self.layers, self.signs, self.scores.to(device), self.keys.to(device))


def _top_sorted(scores: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates of each row: score descending, then key ascending.

    A top-(k+1) by score settles a row when its first k+1 scores are all different (the set and its
    order are then fixed by the scores alone); rows with a tie there are sorted exactly, by key and then
    stably by score.
    """
    if scores.shape[-1] <= k:
        return _sort_exact(scores, keys, k)
    values, order = scores.topk(k + 1, dim=-1)
    top_scores, top_keys = values[..., :k], keys.gather(-1, order[..., :k])
    tied = (values[..., 1:] == values[..., :-1]).any(-1)
    if bool(tied.any()):
        where = tied.nonzero(as_tuple=True)
        top_scores[where], top_keys[where] = _sort_exact(scores[where], keys[where], k)
    return top_scores, top_keys


def _sort_exact(scores: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates of each row by two stable sorts: by key, then by score descending."""
    order = torch.argsort(keys, dim=-1, stable=True)
    keys, scores = keys.gather(-1, order), scores.gather(-1, order)
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :k]
    return scores.gather(-1, order), keys.gather(-1, order)


def merge(a: TopKState, b: TopKState) -> TopKState:
    """The exact top-k of the union of two partial states (e.g. two shards of a corpus).

    The shards must hold disjoint candidates (different sentences); the result does not depend on the
    order of the arguments.
    """
    if a.layers != b.layers or a.signs != b.signs or a.scores.shape != b.scores.shape:
        raise ParameterError(f"Cannot merge top-k states of different shapes: layers {a.layers} vs {b.layers}, "
                             f"signs {a.signs} vs {b.signs}, {tuple(a.scores.shape)} vs {tuple(b.scores.shape)}.")
    scores, keys = _top_sorted(torch.cat([a.scores, b.scores.to(a.scores.device)], -1),
                               torch.cat([a.keys, b.keys.to(a.keys.device)], -1), a.k)
    return TopKState(list(a.layers), list(a.signs), scores, keys)


class _StopForward(Exception):
    """Raised by a hook once the last layer needed has been read: the rest of the model is skipped."""


@dataclass
class _Batch:
    """One batch of right-padded sequences, rows sorted by length descending."""

    ids: torch.Tensor  # (rows, tokens)
    lengths: np.ndarray  # (rows,)
    groups: list[tuple[int, int, int]]  # runs of rows with equal length: (first row, end row, length)
    pad: torch.Tensor | None  # (rows, tokens - n_bos, 1) True at padding positions; None without padding


def _make_batch(sequences: Sequence[Sequence[int]], pad_id: int, device, n_bos: int = 0) -> _Batch:
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
    return _Batch(ids.to(device), lengths, groups, pad)


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


def _forward(model, ids: torch.Tensor) -> None:
    """Run the model on right-padded ids. No attention mask is needed: with causal attention the real
    tokens only ever attend to earlier (real) tokens, so padding after them changes nothing."""
    try:
        model(input_ids=ids, use_cache=False)
    except _StopForward:
        pass


def _first_position(view: torch.Tensor, extreme: torch.Tensor) -> torch.Tensor:
    """Index of the first token where ``view`` (rows, tokens, d_ff) equals ``extreme`` (rows, d_ff): the
    position of the maximum (or minimum), first on ties. Fast elementwise ops and a max reduction over
    small integers: each match is weighted by tokens - index, so the largest weight is the first match
    (``argmax`` over the middle dimension is several times slower on CPU)."""
    tokens = view.shape[1]
    dtype = torch.uint8 if tokens <= 255 else torch.int16 if tokens <= 32767 else torch.int32
    weights = torch.arange(tokens, 0, -1, dtype=dtype, device=view.device)[None, :, None]
    return tokens - ((view == extreme[:, None, :]) * weights).amax(dim=1).long()


class _Miner:
    """Reduces one batch's coefficients, layer by layer inside the forward pass, into a TopKState."""

    def __init__(self, state: TopKState, per_sentence: str, n_bos: int):
        self.state = state
        self.per_sentence = per_sentence
        self.n_bos = n_bos
        # Each memory's pool: its sorted top k (from ``state``), then spare slots that candidates are
        # appended to unsorted; call flush() to sort them back into ``state``.
        self.k = k = state.k
        self.spare = max(1, int(SPARE_SLOTS * k))
        device = state.scores.device
        self.spare_keys = EMPTY + torch.arange(k, k + self.spare, device=device)  # unique, after every real key
        self.pool_scores = torch.cat([state.scores, torch.full((*state.scores.shape[:-1], self.spare), float("-inf"),
                                                               device=device)], -1)
        self.pool_keys = torch.cat([state.keys, self.spare_keys.expand(*state.keys.shape[:-1], self.spare)], -1)
        self.fill = torch.full(state.scores.shape[:-1], k, dtype=torch.long, device=device)  # slots in use
        # The k-th score at the last compaction: slot k-1, which only a compaction changes (new candidates go
        # to slots k and up), so a view of the pool.
        self.threshold = self.pool_scores[..., k - 1]
        self.layer_index = {layer: i for i, layer in enumerate(state.layers)}
        self.batch: _Batch | None = None
        self.sentence_ids: torch.Tensor | None = None  # (rows,) int64, on the state's device

    def hook(self, layer: int, last: bool) -> Callable:
        def pre_hook(module, args):
            self.reduce(layer, args[0])
            if last:
                raise _StopForward
        return pre_hook

    # ---- per batch and layer ---------------------------------------------------------------------
    def reduce(self, layer: int, x: torch.Tensor) -> None:
        x = x.detach().float()
        li = self.layer_index[layer]
        if self.per_sentence == "max":
            self._reduce_max(li, x)
        else:
            self._reduce_all(li, x)

    def _real_views(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """(first row, view) pairs covering the batch's real tokens after BOS, (rows, tokens, d_ff) each:
        one view per run of equal-length rows (no copy). With many runs, one copy of the batch whose
        padding positions hold the row's first real token, which changes neither a row's maximum or
        minimum nor where it first occurs."""
        nb = self.n_bos
        if self.batch.pad is None:
            return [(0, x[:, nb:])]
        if len(self.batch.groups) <= MAX_GROUP_VIEWS:
            return [(a, x[a:b, nb:length]) for a, b, length in self.batch.groups]
        view = x[:, nb:]
        return [(0, torch.where(self.batch.pad, view[:, :1], view))]

    def _reduce_max(self, li: int, x: torch.Tensor) -> None:
        views = self._real_views(x)
        cat = (lambda parts: parts[0]) if len(views) == 1 else torch.cat
        high = cat([view.amax(dim=1) for _, view in views])  # (rows, d_ff); amax/amin are fast reductions
        low = cat([view.amin(dim=1) for _, view in views]) if -1 in self.state.signs else None
        for si, sign in enumerate(self.state.signs):
            extreme = high if sign == 1 else low
            self._offer(si, li, extreme if sign == 1 else -extreme,
                        lambda rows, memories, extreme=extreme, sign=sign:
                        self._max_keys(views, extreme, rows, memories, sign))

    def _max_keys(self, views, extreme: torch.Tensor, rows: torch.Tensor, memories: torch.Tensor,
                  sign: int) -> torch.Tensor:
        """Keys of (sentence row, memory) pairs: the position of the maximum (the first one on ties)."""
        if rows.numel() > DENSE_PAIRS_SHARE * extreme.numel():  # many pairs: find every first position at once
            first = [_first_position(view, extreme[a: a + view.shape[0]]) for a, view in views]
            positions = (first[0] if len(first) == 1 else torch.cat(first))[rows, memories]
        else:
            positions = torch.empty_like(rows)
            for a, view in views:
                sel = ((rows >= a) & (rows < a + view.shape[0])).nonzero().squeeze(1)
                values = view[rows[sel] - a, :, memories[sel]]  # (pairs, tokens)
                positions[sel] = values.argmax(1) if sign == 1 else values.argmin(1)
        return (self.sentence_ids[rows] << POSITION_BITS) | (positions + self.n_bos)

    def _reduce_all(self, li: int, x: torch.Tensor) -> None:
        nb = self.n_bos
        for a, b, length in self.batch.groups:
            width = length - nb
            flat = x[a:b, nb:length].reshape(-1, x.shape[-1])  # (rows * real tokens, d_ff)

            def keys_of(cand_rows, memories, a=a, width=width):
                sentence = self.sentence_ids[a + torch.div(cand_rows, width, rounding_mode="floor")]
                return (sentence << POSITION_BITS) | (nb + cand_rows % width)

            for si, sign in enumerate(self.state.signs):
                self._offer(si, li, flat if sign == 1 else -flat, keys_of)

    def _offer(self, si: int, li: int, cand: torch.Tensor, keys_of: Callable, offset: int = 0) -> None:
        """Add candidates ``cand`` (n, d_ff) (scores, larger is better) to the pool of one layer.

        Only candidates at least as good as a memory's k-th score at its last compaction can enter (the
        k-th can only rise, so no candidate of the final top-k is turned away); their keys (which need the
        argmax position) are computed for those alone and they are appended, unsorted, to the memory's
        spare slots. A memory's pool is sorted (:meth:`_compact`) only when its spare slots run out, so
        once the state has filled up a batch costs little more than its maxima.
        """
        pool_scores, pool_keys = self.pool_scores[si, li], self.pool_keys[si, li]  # (d_ff, k + spare) views
        fill, threshold = self.fill[si, li], self.threshold[si, li]
        ok = cand >= threshold
        counts = ok.sum(0)
        most = int(counts.max())
        if most == 0:
            return
        if most > self.spare and cand.shape[0] > self.k:  # e.g. an empty state: the batch's own k-th bounds it
            ok = cand >= torch.maximum(threshold, cand.topk(self.k, dim=0).values[-1])
            counts = ok.sum(0)
            most = int(counts.max())
        if most > self.spare:  # more than the spare slots hold (ties, or tiny spare): offer the rows in parts
            for first in range(0, cand.shape[0], self.spare):
                self._offer(si, li, cand[first: first + self.spare], keys_of, offset + first)
            return
        full = fill + counts > pool_scores.shape[1]
        if bool(full.any()):
            self._compact(si, li, full.nonzero().squeeze(1))
        memories, rows = ok.T.nonzero(as_tuple=True)  # grouped by memory, rows ascending within each
        first_of_memory = torch.cumsum(counts, 0) - counts
        slots = fill[memories] + torch.arange(memories.shape[0], device=cand.device) - first_of_memory[memories]
        pool_scores[memories, slots] = cand[rows, memories]
        pool_keys[memories, slots] = keys_of(rows + offset, memories)
        fill += counts

    def _compact(self, si: int, li: int, memories: torch.Tensor | None = None) -> None:
        """Sort the pools of ``memories`` (all by default) and keep their top k: the exact order of
        :func:`_top_sorted`; the spare slots are emptied (the threshold, slot k-1, rises to the new k-th)."""
        k = self.k
        pool_scores, pool_keys = self.pool_scores[si, li], self.pool_keys[si, li]
        where = slice(None) if memories is None else memories
        scores, keys = _top_sorted(pool_scores[where], pool_keys[where], k)
        pool_scores[where, :k] = scores
        pool_keys[where, :k] = keys
        pool_scores[where, k:] = float("-inf")
        pool_keys[where, k:] = self.spare_keys
        self.fill[si, li, where] = k

    def flush(self) -> TopKState:
        """Compact every pool into the sorted top-k state (before a checkpoint and at the end)."""
        for si in range(self.pool_scores.shape[0]):
            for li in range(self.pool_scores.shape[1]):
                if bool((self.fill[si, li] > self.k).any()):
                    self._compact(si, li)
        self.state.scores.copy_(self.pool_scores[..., : self.k])
        self.state.keys.copy_(self.pool_keys[..., : self.k])
        return self.state


# =====================================================================================================
# Mining
# =====================================================================================================
@dataclass
class TriggerExamples:
    """Mined trigger examples (see the module docstring and the column contract in ``triggers``).

    - ``triggers``: layer, memory, sign (+1 top positive / -1 most negative coefficients), rank (0 =
      strongest), coefficient, sentence_id, position (index of the prefix's last token in the
      sentence's token ids), next_token (token id at position + 1, or -1 at the sentence's end);
    - ``sentences``: sentence_id, text, title, topic, token_ids (exactly as ``loaded.encode`` gives);
    - ``manifest``: what produced it; ``stats``: how the run went (throughput, padding, resume, cache).
    """

    triggers: pd.DataFrame
    sentences: pd.DataFrame
    manifest: dict
    stats: dict = field(default_factory=dict)

    def of(self, layer: int, memory: int, sign: int = 1) -> pd.DataFrame:
        """One key's trigger examples, strongest first."""
        t = self.triggers
        rows = t[(t["layer"] == layer) & (t["memory"] == memory) & (t["sign"] == sign)]
        if rows.empty:
            layers = sorted(t["layer"].unique().tolist())
            raise ParameterError(f"No trigger examples for layer {layer}, memory {memory}, sign {sign}: mined layers "
                                 f"are {layers}, memories 0..{int(t['memory'].max())}, signs "
                                 f"{sorted(t['sign'].unique().tolist())}.")
        return rows.sort_values("rank").reset_index(drop=True)

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.manifest["layers"]]

    @property
    def n_bos(self) -> int:
        return int(self.manifest.get("n_bos", 0))

    def token_index(self) -> dict[int, list[int]]:
        """sentence_id -> token ids."""
        return dict(zip(self.sentences["sentence_id"].astype("int64").tolist(), self.sentences["token_ids"]))

    def state(self) -> TopKState:
        """The result as a :class:`TopKState` (e.g. to :func:`merge` the results of two corpus shards)."""
        signs = [1, -1] if self.manifest["negative"] else [1]
        t = self.triggers.sort_values(["sign", "layer", "memory", "rank"], ascending=[False, True, True, True])
        shape = (len(signs), len(self.layers), -1, int(self.manifest["k"]))
        sign = t["sign"].to_numpy(np.float32)
        scores = torch.from_numpy((t["coefficient"].to_numpy(np.float32) * sign).reshape(shape))
        keys = torch.from_numpy(((t["sentence_id"].to_numpy(np.int64) << POSITION_BITS)
                                 | t["position"].to_numpy(np.int64)).reshape(shape))
        return TopKState(self.layers, signs, scores, keys)


def _int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"{name} must be an int, got {value!r}.")
    if value < low:
        raise ParameterError(f"{name} must be >= {low}, got {value}.")
    return int(value)


def prepare_sentences(loaded, sentences: pd.DataFrame) -> pd.DataFrame:
    """Check a sentence table and tokenize it: sentence_id, text, title, topic, token_ids (BOS included).

    Raises :class:`CorpusError` for an empty table, missing columns, duplicate or negative ids, and empty
    sentences (naming them).
    """
    if not isinstance(sentences, pd.DataFrame):
        raise CorpusError(f"sentences must be a sentence table (DataFrame with sentence_id and text), got "
                          f"{type(sentences).__name__}. Use ffnlib.corpus.load_corpus(...).")
    missing = [c for c in ("sentence_id", "text") if c not in sentences]
    if missing:
        raise CorpusError(f"The sentence table lacks the column(s) {missing}; it has {list(sentences.columns)}. "
                          "Use ffnlib.corpus.load_corpus(...).")
    if sentences.empty:
        raise CorpusError("The sentence table is empty: give at least one sentence (and at least k).")
    table = pd.DataFrame({"sentence_id": sentences["sentence_id"].to_numpy()})
    if not pd.api.types.is_integer_dtype(table["sentence_id"]):
        raise CorpusError("sentence_id must hold integers.")
    table["sentence_id"] = table["sentence_id"].astype("int64")
    ids = table["sentence_id"]
    if ids.duplicated().any():
        raise CorpusError(f"sentence_id must be unique; duplicated: {ids[ids.duplicated()].head(5).tolist()}.")
    if (ids < 0).any() or (ids > MAX_SENTENCE_ID).any():
        raise CorpusError(f"sentence_id must be in 0..{MAX_SENTENCE_ID}.")
    texts = sentences["text"].tolist()
    empty = [int(i) for i, t in zip(ids, texts) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise CorpusError(f"{len(empty)} sentence(s) are empty (sentence_id {empty[:10]}). Remove them "
                          "(e.g. table[table.text.str.strip() != '']) and rerun.")
    table["text"] = texts
    for column in ("title", "topic"):
        table[column] = sentences[column].to_numpy() if column in sentences else None
    encoded = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = list(loaded.bos)
    no_tokens = [int(i) for i, e in zip(ids, encoded) if not e]
    if no_tokens:
        raise CorpusError(f"{len(no_tokens)} sentence(s) give no tokens (sentence_id {no_tokens[:10]}); remove them.")
    too_long = [int(i) for i, e in zip(ids, encoded) if len(e) + len(bos) > MAX_POSITION]
    if too_long:
        raise CorpusError(f"Sentences {too_long[:10]} are longer than {MAX_POSITION} tokens; split them.")
    table["token_ids"] = [bos + list(e) for e in encoded]
    return table


def corpus_fingerprint(sentences: pd.DataFrame) -> str:
    """SHA-256 of the sentence ids and texts (in id order: the row order does not matter)."""
    h = hashlib.sha256()
    for sid, text in sorted(zip(sentences["sentence_id"].astype("int64").tolist(), sentences["text"])):
        h.update(f"{sid}\t{text}\n".encode())
    return h.hexdigest()


def _say(message: str, progress: bool) -> None:
    log.info(message)
    if progress:
        print(message)


def _after_batch(batches_done: int, sentences_done: int) -> None:
    """Called after every mining batch (and its checkpoint). A no-op; tests patch it to interrupt runs."""


class _Checkpoint:
    """A checkpoint is a data file ``<name>.checkpoint-<sentences done>.pt`` plus ``<name>.checkpoint.json``
    naming it with its SHA-256. Each is written atomically, the data file first, and the JSON switches
    to the new data file in one rename, so a checkpoint is always whole and verified (or reported and
    ignored), whenever a run is killed."""

    def __init__(self, folder: Path | None, name: str, identity: dict):
        self.folder, self.name, self.identity = folder, name, identity
        self.meta = folder / f"{name}.checkpoint.json" if folder else None

    def _data_files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.name}.checkpoint-*.pt"))

    def save(self, tensors: dict, progress: dict) -> None:
        if self.folder is None:
            return
        buf = io.BytesIO()
        torch.save({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}, buf)
        data = buf.getvalue()
        path = self.folder / f"{self.name}.checkpoint-{progress['sentences']:012d}.pt"
        atomic_write_bytes(path, data)
        write_json(self.meta, {"identity": self.identity, "progress": progress, "file": path.name,
                               "sha256": sha256_bytes(data)})
        for old in self._data_files():
            if old != path:
                old.unlink(missing_ok=True)

    def load(self) -> tuple[dict, dict] | None:
        """(tensors, progress) of a valid checkpoint, else None (a damaged one is reported and ignored)."""
        if self.folder is None or not self.meta.exists():
            return None
        try:
            meta = read_json(self.meta)
            path = self.folder / meta["file"]
        except Exception as exc:
            warnings.warn(f"Ignoring the checkpoint {self.meta}: unreadable ({exc}); recomputing from the start.",
                          stacklevel=3)
            return None
        if meta.get("identity") != _json_normal(self.identity):
            warnings.warn(f"Ignoring the checkpoint {self.meta}: it was written by a run with other settings; "
                          "recomputing from the start.", stacklevel=3)
            return None
        try:
            data = path.read_bytes()
        except OSError as exc:
            warnings.warn(f"Ignoring the checkpoint {path}: cannot read it ({exc}); recomputing from the start.",
                          stacklevel=3)
            return None
        if sha256_bytes(data) != meta.get("sha256"):
            warnings.warn(f"Ignoring the checkpoint {path}: its checksum does not match (corrupted or "
                          "truncated); recomputing from the start.", stacklevel=3)
            return None
        try:
            tensors = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as exc:
            warnings.warn(f"Ignoring the checkpoint {path}: it cannot be read ({exc}); recomputing from "
                          "the start.", stacklevel=3)
            return None
        return tensors, meta["progress"]

    def remove(self) -> None:
        if self.folder is None:
            return
        self.meta.unlink(missing_ok=True)
        for path in self._data_files():
            path.unlink(missing_ok=True)


def _json_normal(obj):
    import json

    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def mine_trigger_examples(loaded, sentences: pd.DataFrame, k: int = 50, per_sentence: str = "max",
                          negative: bool | None = None, layers=None, batch_tokens: int = 2048,
                          checkpoint_every: int = 1000, out_dir=None, progress: bool = True) -> TriggerExamples:
    """Mine the top-k trigger examples of every memory of ``layers`` (all by default) over ``sentences``.

    - ``per_sentence="max"`` (the authors' code): at most one prefix per sentence per key, ending at the
      position of the key's maximum in that sentence (first position on ties); ``"all"``: every prefix.
    - ``negative`` (default: the model is gated): also keep the k most negative coefficients (sign -1).
    - Sentences are batched by length (``batch_tokens`` padded tokens per batch); order: coefficient
      descending, then sentence_id, then position, so results are exact and reproducible.
    - With ``out_dir``: a checkpoint every ``checkpoint_every`` sentences (an interrupted run resumes and
      ends with the same result), and the result is saved as Parquet with a manifest; a later call with
      the same manifest loads it instead of recomputing.
    """
    adapter = loaded.adapter
    if per_sentence not in PER_SENTENCE:
        raise ParameterError(f"per_sentence must be one of {PER_SENTENCE}, got {per_sentence!r}.")
    negative = adapter.gated if negative is None else negative
    if not isinstance(negative, bool):
        raise ParameterError(f"negative must be True, False or None, got {negative!r}.")
    if isinstance(layers, (list, tuple)) and not layers:
        raise ParameterError("layers is empty: give layer indices, or None for all layers.")
    layer_list = adapter.check_layers(layers)
    k = _int("k", k)
    batch_tokens = _int("batch_tokens", batch_tokens)
    checkpoint_every = _int("checkpoint_every", checkpoint_every)
    table = prepare_sentences(loaded, sentences)
    if k > len(table):
        raise ParameterError(f"k={k} is larger than the number of sentences ({len(table)}): each key can have at "
                             f"most one trigger per sentence. Use k <= {len(table)} or more sentences.")
    signs = [1, -1] if negative else [1]
    request = {"analysis": "trigger_examples", "version": RESULT_VERSION, "model": loaded.name,
               "file_hash": loaded.file_hash, "corpus": corpus_fingerprint(table), "sentences": len(table),
               "k": k, "per_sentence": per_sentence, "negative": negative, "layers": layer_list,
               "n_bos": len(loaded.bos)}
    name = f"triggers-{fingerprint(request)}"
    folder = ensure_dir(out_dir) if out_dir is not None else None
    if folder is not None:
        cached = load_trigger_examples(folder, name, request)
        if cached is not None:
            _say(f"Loaded cached trigger examples from {folder / name}.parquet (same model, corpus and "
                 "parameters); not recomputing.", progress)
            return cached

    lengths = np.array([len(t) for t in table["token_ids"]])
    batches = plan_batches(lengths, batch_tokens)
    device = loaded.device
    state = TopKState.empty(layer_list, signs, adapter.d_ff, k, device=device)
    checkpoint = _Checkpoint(folder, name, {**request, "batch_tokens": batch_tokens})
    done = {"batches": 0, "sentences": 0, "tokens": 0, "padded": 0}
    resumed = checkpoint.load()
    if resumed is not None:
        tensors, done = resumed
        state.scores.copy_(tensors["scores"])
        state.keys.copy_(tensors["keys"])
        _say(f"Resuming from the checkpoint {checkpoint.meta}: {done['sentences']} of {len(table)} sentences "
             f"already done (resumed_from={done['sentences']}).", progress)
    resumed_from = int(done["sentences"])

    miner = _Miner(state, per_sentence, len(loaded.bos))
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    sentence_ids = torch.tensor(table["sentence_id"].to_numpy(np.int64))
    token_ids = table["token_ids"].tolist()
    handles = [adapter.down(layer).register_forward_pre_hook(miner.hook(layer, layer == layer_list[-1]))
               for layer in layer_list]
    from .progress import tqdm

    bar = tqdm(total=int(lengths.sum()), initial=int(done["tokens"]), unit="tok", unit_scale=True,
               desc="Mining trigger examples", disable=not progress)
    started, tokens_here, last_checkpoint = time.perf_counter(), 0, done["sentences"]
    try:
        with torch.inference_mode():
            for index in range(done["batches"], len(batches)):
                rows = batches[index]
                miner.batch = _make_batch([token_ids[r] for r in rows], pad_id, device, len(loaded.bos))
                miner.sentence_ids = sentence_ids[rows].to(device)
                _forward(loaded.model, miner.batch.ids)
                real = int(lengths[rows].sum())
                done = {"batches": index + 1, "sentences": done["sentences"] + len(rows),
                        "tokens": done["tokens"] + real,
                        "padded": done["padded"] + int(miner.batch.ids.numel()) - real}
                tokens_here += real
                bar.update(real)
                bar.set_postfix(sentences=f"{done['sentences']}/{len(table)}")
                if done["sentences"] - last_checkpoint >= checkpoint_every and index + 1 < len(batches):
                    miner.flush()
                    checkpoint.save({"scores": state.scores, "keys": state.keys}, done)
                    last_checkpoint = done["sentences"]
                _after_batch(done["batches"], done["sentences"])
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    miner.flush()
    seconds = time.perf_counter() - started
    stats = {"sentences": len(table), "tokens": int(done["tokens"]), "batches": len(batches),
             "padding_share": done["padded"] / max(done["padded"] + done["tokens"], 1),
             "seconds": seconds, "tokens_per_second": tokens_here / max(seconds, 1e-9),
             "resumed_from": resumed_from, "from_cache": False}
    triggers = _state_frame(state, table)
    sentence_frame = table[["sentence_id", "text", "title", "topic", "token_ids"]].copy()
    result = TriggerExamples(triggers, sentence_frame, request, stats)
    if folder is not None:
        save_result(folder, name, triggers, request)
        save_result(folder, f"{name}-sentences", _sentences_for_parquet(sentence_frame), request)
        write_json(folder / f"{name}.stats.json", stats)
        checkpoint.remove()
        _say(f"Saved the trigger examples to {folder / name}.parquet ({stats['tokens']} tokens, padding "
             f"{stats['padding_share']:.1%}, {stats['tokens_per_second']:.0f} tokens/s).", progress)
    return result


def _sentences_for_parquet(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for column in ("title", "topic"):
        out[column] = out[column].astype(object).where(out[column].notna(), None)
    return out


def load_trigger_examples(folder, name: str, request: dict) -> TriggerExamples | None:
    """A cached mining result whose manifest equals ``request`` (else None)."""
    folder = Path(folder)
    triggers = load_result(folder, name, request)
    if triggers is None:
        return None
    sentences = load_result(folder, f"{name}-sentences", request)
    if sentences is None:
        return None
    sentences["token_ids"] = [np.asarray(t).tolist() for t in sentences["token_ids"]]
    stats_path = folder / f"{name}.stats.json"
    stats = read_json(stats_path) if stats_path.exists() else {}
    stats["from_cache"] = True
    return TriggerExamples(triggers, sentences, request, stats)


def _state_frame(state: TopKState, table: pd.DataFrame) -> pd.DataFrame:
    """The state as the trigger table (sign +1 first, then by layer, memory, rank)."""
    n_signs, n_layers, d_ff, k = state.scores.shape
    scores = state.scores.cpu().numpy()
    keys = state.keys.cpu().numpy()
    signs = np.asarray(state.signs, dtype=np.int8)
    sign_col = np.repeat(signs, n_layers * d_ff * k)
    coefficient = (scores * signs[:, None, None, None]).reshape(-1).astype(np.float32)
    keys = keys.reshape(-1)
    if (keys >= EMPTY).any():
        raise AssertionError("empty top-k slots left: fewer candidates than k")
    sentence_id = keys >> POSITION_BITS
    position = (keys & MAX_POSITION).astype(np.int32)
    ids = table["sentence_id"].to_numpy(np.int64)
    if len(ids) and ids.min() >= 0 and ids.max() < 8 * len(ids) + (1 << 20):  # a direct lookup table
        lookup = np.empty(int(ids.max()) + 1, dtype=np.int64)
        lookup[ids] = np.arange(len(ids))
        row = lookup[sentence_id]
    else:
        order = np.argsort(ids)
        row = order[np.searchsorted(ids, sentence_id, sorter=order)]
    token_lists = table["token_ids"].tolist()
    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = np.fromiter((t for ids_ in token_lists for t in ids_), dtype=np.int64, count=int(lengths.sum()))
    has_next = position + 1 < lengths[row]
    next_token = np.where(has_next, flat[np.minimum(offsets[row] + position + 1, len(flat) - 1)], -1)
    return pd.DataFrame({
        "layer": np.tile(np.repeat(np.asarray(state.layers, dtype=np.int16), d_ff * k), n_signs),
        "memory": np.tile(np.repeat(np.arange(d_ff, dtype=np.int32), k), n_signs * n_layers),
        "sign": sign_col,
        "rank": np.tile(np.arange(k, dtype=np.int16), n_signs * n_layers * d_ff),
        "coefficient": coefficient,
        "sentence_id": sentence_id.astype(np.int64),
        "position": position,
        "next_token": next_token.astype(np.int64),
    })


# =====================================================================================================
# Views
# =====================================================================================================
def _decode_parts(tokenizer, ids: list[int], position: int, n_bos: int) -> tuple[str, str, str]:
    """(text before the last token, the last token, the next token) of a prefix."""
    decode = tokenizer.decode
    before = decode(ids[n_bos:position])
    whole = decode(ids[n_bos: position + 1])
    last = whole[len(before):] if whole.startswith(before) else decode(ids[position: position + 1])
    following = decode(ids[position + 1: position + 2]) if position + 1 < len(ids) else ""
    return before, last, following


def trigger_table(examples: TriggerExamples, tokenizer, layer: int, memory: int, sign: int = 1,
                  n: int = 25) -> pd.DataFrame:
    """One key's top-n trigger examples as text: rank, coefficient, prefix (text before the last token),
    last_token, next_token, sentence_id, position, title, topic."""
    n = _int("n", n)
    rows = examples.of(layer, memory, sign).head(n)
    index = examples.token_index()
    meta = examples.sentences.set_index("sentence_id")
    out = []
    for r in rows.itertuples():
        ids = [int(t) for t in index[int(r.sentence_id)]]
        before, last, following = _decode_parts(tokenizer, ids, int(r.position), examples.n_bos)
        out.append({"rank": int(r.rank), "coefficient": float(r.coefficient), "prefix": before, "last_token": last,
                    "next_token": following, "sentence_id": int(r.sentence_id), "position": int(r.position),
                    "title": meta.at[int(r.sentence_id), "title"], "topic": meta.at[int(r.sentence_id), "topic"]})
    return pd.DataFrame(out)


def trigger_html(examples: TriggerExamples, tokenizer, layer: int, memory: int, sign: int = 1, n: int = 25) -> str:
    """One key's trigger examples as an HTML table: the prefix with its last token highlighted, the
    coefficient and the next token (display with ``IPython.display.HTML``)."""
    table = trigger_table(examples, tokenizer, layer, memory, sign, n)
    esc = html.escape
    side = "most negative" if sign == -1 else "top"
    rows = "".join(
        f"<tr><td>{r.rank}</td><td style='text-align:right'>{r.coefficient:.3f}</td>"
        f"<td style='text-align:left'>{esc(r.prefix)}<mark><b>{esc(r.last_token)}</b></mark></td>"
        f"<td style='text-align:left;color:#666'>{esc(r.next_token)}</td></tr>"
        for r in table.itertuples())
    return (f"<div><b>Layer {layer}, memory {memory}</b> ({side} coefficients)<table>"
            "<tr><th>rank</th><th>coefficient</th><th>prefix (last token marked)</th><th>next token</th></tr>"
            f"{rows}</table></div>")


# =====================================================================================================
# Reading coefficients of given (sequence, position, layer, memory) points, batched
# =====================================================================================================
def read_coefficients(loaded, sequences: Sequence[Sequence[int]], reads: pd.DataFrame,
                      batch_tokens: int = 2048, progress: bool = False, desc: str = "Forward passes",
                      checkpoint: "_Checkpoint | None" = None, checkpoint_every: int = 50) -> np.ndarray:
    """Coefficient m_memory at ``position`` of ``sequences[sequence]`` in ``layer``, for every row of
    ``reads`` (columns sequence, position, layer, memory). Sequences are batched by length; only the
    needed layers are hooked and each forward pass stops after the deepest layer its batch needs.
    With a ``checkpoint``, the values read so far are saved every ``checkpoint_every`` batches and an
    interrupted call resumes."""
    adapter = loaded.adapter
    out = np.full(len(reads), np.nan, dtype=np.float32)
    if len(reads) == 0:
        return out
    seq_of = reads["sequence"].to_numpy(np.int64)
    pos_of = reads["position"].to_numpy(np.int64)
    layer_of = reads["layer"].to_numpy(np.int64)
    mem_of = reads["memory"].to_numpy(np.int64)
    lengths = np.array([len(s) for s in sequences])
    if np.any(pos_of >= lengths[seq_of]) or np.any(pos_of < 0):
        raise ParameterError("A read position lies outside its sequence.")
    order = np.argsort(seq_of, kind="stable")
    cuts = np.flatnonzero(np.diff(seq_of[order])) + 1
    by_sequence = {int(seq_of[part[0]]): part for part in np.split(order, cuts)}
    device = loaded.device
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    current: dict = {}

    def make_hook(layer: int):
        def pre_hook(module, args):
            reads_here = current["by_layer"].get(layer)
            if reads_here is not None:
                rows, positions, memories, targets = reads_here
                out[targets] = args[0][rows, positions, memories].float().cpu().numpy()
            if layer == current["deepest"]:
                raise _StopForward
        return pre_hook

    layers = sorted(set(layer_of.tolist()))
    handles = [adapter.down(layer).register_forward_pre_hook(make_hook(layer)) for layer in layers]
    from .progress import tqdm

    batches = plan_batches(lengths, batch_tokens)
    start = 0
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        out[:] = resumed[0]["values"].numpy()
        start = int(resumed[1]["batches"])
        _say(f"Resuming from the checkpoint {checkpoint.meta}: {start} of {len(batches)} batches done.", progress)
    try:
        with torch.inference_mode():
            for index in tqdm(range(start, len(batches)), desc=desc, disable=not progress, unit="batch",
                              total=len(batches), initial=start):
                if checkpoint is not None and index > start and (index - start) % checkpoint_every == 0:
                    checkpoint.save({"values": torch.from_numpy(out.copy())}, {"batches": index, "sentences": index})
                rows = batches[index]
                batch = _make_batch([sequences[r] for r in rows], pad_id, device)
                targets = np.concatenate([by_sequence[r] for r in rows if r in by_sequence] or [np.zeros(0, int)])
                if len(targets) == 0:
                    continue
                row_in_batch = {int(r): i for i, r in enumerate(rows)}
                b = np.array([row_in_batch[int(s)] for s in seq_of[targets]])
                by_layer = {}
                for layer in np.unique(layer_of[targets]):
                    sel = layer_of[targets] == layer
                    by_layer[int(layer)] = (torch.as_tensor(b[sel], device=device),
                                            torch.as_tensor(pos_of[targets][sel], device=device),
                                            torch.as_tensor(mem_of[targets][sel], device=device), targets[sel])
                current.update(by_layer=by_layer, deepest=max(by_layer))
                _forward(loaded.model, batch.ids)
    finally:
        for handle in handles:
            handle.remove()
    return out


# =====================================================================================================
# Removal experiment (Fig. 3)
# =====================================================================================================
REMOVAL_VARIANTS = ("first", "last", "random")


def removal_experiment(loaded, examples: TriggerExamples, n_keys: int = 100, top: int = 50, layers=None,
                       variants: Sequence[str] = REMOVAL_VARIANTS, sign: int = 1, seed: int = 0,
                       batch_tokens: int = 2048, out_dir=None, progress: bool = True) -> pd.DataFrame:
    """Fig. 3: for ``n_keys`` random keys per layer and each key's top-``top`` trigger prefixes, remove the
    first, the last or a random token of the prefix (never the BOS token) and recompute that key's
    coefficient at the new last position.

    Returns one row per (key, trigger, variant): layer, memory, rank, sentence_id, position, variant,
    removed (index of the removed token), coefficient (original), new_coefficient, relative_change
    ``(new - original) / |original|``. Prefixes with a single real token cannot lose one and are left out.

    Every modified prefix is a prefix of "the sentence without token r", so one forward pass per
    (sentence, r) serves all keys and triggers that share it (for "last": the original sentence). The
    random token of each prefix is uniform over its real tokens (first and last included); to share
    forward passes, the prefixes of one sentence draw it from one stream of random positions (each takes
    the first draw inside it), so prefixes of one sentence often lose the same token.
    """
    for v in variants:
        if v not in REMOVAL_VARIANTS:
            raise ParameterError(f"Unknown removal variant {v!r}: choose from {REMOVAL_VARIANTS}.")
    if not variants:
        raise ParameterError("variants is empty.")
    n_keys, top = _int("n_keys", n_keys), _int("top", top)
    if sign not in (1, -1):
        raise ParameterError(f"sign must be 1 or -1, got {sign!r}.")
    mined = examples.layers
    layer_list = mined if layers is None else sorted({loaded.adapter.check_layer(l) for l in
                                                      ([layers] if isinstance(layers, int) else layers)})
    missing = sorted(set(layer_list) - set(mined))
    if missing:
        raise ParameterError(f"Layers {missing} were not mined; mined layers: {mined}.")
    d_ff = loaded.adapter.d_ff
    if n_keys > d_ff:
        raise ParameterError(f"n_keys={n_keys} is larger than the number of memories per layer ({d_ff}).")
    k = int(examples.manifest["k"])
    if top > k:
        raise ParameterError(f"top={top} is larger than the k={k} trigger examples mined per key.")
    request = {"analysis": "removal", "version": RESULT_VERSION, "triggers": fingerprint(examples.manifest),
               "n_keys": n_keys, "top": top, "layers": layer_list, "variants": list(variants), "sign": sign,
               "seed": seed}
    name = f"removal-{fingerprint(request)}"
    if out_dir is not None:
        cached = load_result(out_dir, name, request)
        if cached is not None:
            _say(f"Loaded the cached removal experiment from {Path(out_dir) / name}.parquet; not recomputing.",
                 progress)
            return cached

    reads, sequences = removal_plan(examples, d_ff, layer_list, n_keys, top, variants, sign, seed)
    _say(f"Removal experiment: {len(reads):,} modified prefixes, read from {len(sequences):,} shared sequences "
         f"({sum(map(len, sequences)):,} tokens to run).", progress)
    checkpoint = _Checkpoint(ensure_dir(out_dir), name, request) if out_dir is not None else None
    values = read_coefficients(loaded, sequences, reads[["sequence", "layer", "memory"]].assign(
        position=reads["read_at"]), batch_tokens=batch_tokens, progress=progress, desc="Removal experiment",
        checkpoint=checkpoint)
    reads["new_coefficient"] = values
    reads["relative_change"] = (reads["new_coefficient"] - reads["coefficient"]) / reads["coefficient"].abs()
    result = reads[["layer", "memory", "rank", "sentence_id", "position", "variant", "removed", "coefficient",
                    "new_coefficient", "relative_change"]].copy()
    result["variant"] = result["variant"].astype(str)
    if out_dir is not None:
        save_result(out_dir, name, result, request)
        checkpoint.remove()
    return result


def removal_plan(examples: TriggerExamples, d_ff: int, layers: Sequence[int], n_keys: int, top: int,
                 variants: Sequence[str] = REMOVAL_VARIANTS, sign: int = 1, seed: int = 0
                 ) -> tuple[pd.DataFrame, list[list[int]]]:
    """The reads (one row per key, trigger and variant, with the shared sequence it is read from and the
    position ``read_at``) and the token sequences of :func:`removal_experiment`, without running the model.
    ``sum(map(len, sequences))`` is the number of tokens its forward passes will cost."""
    layer_list = list(layers)
    rng = np.random.default_rng(seed)
    chosen = {layer: np.sort(rng.choice(d_ff, size=n_keys, replace=False)) for layer in layer_list}
    t = examples.triggers
    t = t[(t["sign"] == sign) & (t["rank"] < top) & t["layer"].isin(layer_list)]
    keep = np.zeros(len(t), dtype=bool)
    for layer, memories in chosen.items():
        keep |= ((t["layer"] == layer) & t["memory"].isin(memories)).to_numpy()
    t = t[keep].sort_values(["layer", "memory", "rank"]).reset_index(drop=True)
    nb = examples.n_bos
    t = t[t["position"] - nb >= 1].reset_index(drop=True)  # at least two real tokens
    index = examples.token_index()
    frames, sequence_ids, sequences = [], {}, []
    for variant in variants:
        position = t["position"].to_numpy(np.int64)
        if variant == "first":
            removed = np.full(len(t), nb)
        elif variant == "last":
            removed = position.copy()
        else:
            removed = _random_removals(t["sentence_id"].to_numpy(np.int64), position, index, nb, rng)
        frame = t[["layer", "memory", "rank", "sentence_id", "position", "coefficient"]].copy()
        frame["variant"], frame["removed"] = variant, removed
        # the shared sequence: the sentence without token `removed` ("last": the sentence itself)
        seq = []
        for sid, r, p in zip(frame["sentence_id"].tolist(), removed.tolist(), position.tolist()):
            key = (sid, -1 if r == p else r)
            if key not in sequence_ids:
                sequence_ids[key] = len(sequences)
                ids = index[sid]
                sequences.append(list(ids) if r == p else list(ids[:r]) + list(ids[r + 1:]))
            seq.append(sequence_ids[key])
        frame["sequence"] = seq
        frames.append(frame)
    reads = pd.concat(frames, ignore_index=True)
    reads["read_at"] = reads["position"] - 1  # the prefix lost one token: its last token moved back by one
    # truncate each shared sequence after the last position read from it (every sequence is read)
    last_read = reads.groupby("sequence")["read_at"].max()
    sequences = [seq[: int(last_read[i]) + 1] for i, seq in enumerate(sequences)]
    return reads, sequences


def _random_removals(sentence_ids: np.ndarray, positions: np.ndarray, index: dict, n_bos: int,
                     rng: np.random.Generator) -> np.ndarray:
    """A uniformly random real token of each prefix (sentence_id, last position), by rejection sampling
    from one stream of uniform positions per sentence: a prefix takes the first draw that falls inside
    it, which is uniform over its tokens, and prefixes of a sentence mostly share a few draws."""
    removed = np.empty(len(positions), dtype=np.int64)
    order = np.argsort(sentence_ids, kind="stable")
    cuts = np.flatnonzero(np.diff(sentence_ids[order])) + 1
    for part in np.split(order, cuts):
        if len(part) == 0:
            continue
        length = len(index[int(sentence_ids[part[0]])])
        todo = part
        while len(todo):
            r = int(rng.integers(n_bos, length))
            inside = positions[todo] >= r
            removed[todo[inside]] = r
            todo = todo[~inside]
    return removed


def removal_summary(removal: pd.DataFrame, n_layers: int | None = None) -> pd.DataFrame:
    """Per layer and variant: mean and median relative change (in %), and the number of prefixes."""
    g = removal.groupby(["layer", "variant"])["relative_change"]
    out = pd.DataFrame({"mean_change_pct": g.mean() * 100, "median_change_pct": g.median() * 100,
                        "prefixes": g.size()}).reset_index()
    if n_layers:
        out["relative_depth"] = (out["layer"] + 1) / n_layers
    return out


# =====================================================================================================
# Pattern measures (Fig. 2 analogue, automatic)
# =====================================================================================================
def _with_tokens(examples: TriggerExamples, frame: pd.DataFrame) -> pd.DataFrame:
    """Add last_token, previous_token (or -1 at the first real token) and topic to trigger rows."""
    index = examples.token_index()
    last, prev = [], []
    nb = examples.n_bos
    for sid, pos in zip(frame["sentence_id"].tolist(), frame["position"].tolist()):
        ids = index[sid]
        last.append(int(ids[pos]))
        prev.append(int(ids[pos - 1]) if pos - 1 >= nb else -1)
    topics = dict(zip(examples.sentences["sentence_id"].astype("int64"), examples.sentences["topic"]))
    out = frame.copy()
    out["last_token"], out["previous_token"] = last, prev
    out["topic"] = [topics.get(int(s)) for s in frame["sentence_id"]]
    return out


def key_measures(triggers: pd.DataFrame, min_labelled: int = 5,
                 exclude_topics: Sequence[str] = ("Uncategorized",)) -> pd.DataFrame:
    """Per key (layer, memory, sign) of trigger rows with last_token, previous_token and topic columns:

    - ``shallow_token``: share of the key's triggers whose last token is shared with >= 2 other triggers;
    - ``shallow_bigram``: the same for the last two tokens;
    - ``topic_concentration``: share of the most common topic among the triggers with a topic label
      (NaN when fewer than ``min_labelled`` have one); ``labelled``: how many have one.
    """
    t = triggers.copy()
    group = ["layer", "memory", "sign"]
    t["token_count"] = t.groupby(group + ["last_token"])["last_token"].transform("size")
    t["bigram_count"] = t.groupby(group + ["previous_token", "last_token"])["last_token"].transform("size")
    t["shared_token"] = t["token_count"] >= 3
    t["shared_bigram"] = (t["bigram_count"] >= 3) & (t["previous_token"] >= 0)
    out = t.groupby(group).agg(triggers=("last_token", "size"), shallow_token=("shared_token", "mean"),
                               shallow_bigram=("shared_bigram", "mean"))
    labelled = t[t["topic"].notna() & ~t["topic"].isin(list(exclude_topics))]
    counts = labelled.groupby(group + ["topic"]).size()
    top = counts.groupby(level=group).max()
    total = counts.groupby(level=group).sum()
    out["labelled"] = total.reindex(out.index).fillna(0).astype(int)
    conc = (top / total).reindex(out.index)
    out["topic_concentration"] = conc.where(out["labelled"] >= min_labelled)
    return out.reset_index()


def key_pattern_measures(loaded, examples: TriggerExamples, rows: pd.DataFrame, min_labelled: int = 5) -> dict:
    """The pattern measures of one key's trigger rows (as :func:`key_measures`), as a dict."""
    frame = key_measures(_with_tokens(examples, rows), min_labelled=min_labelled)
    return {} if frame.empty else {c: frame.iloc[0][c] for c in ("triggers", "shallow_token", "shallow_bigram",
                                                                  "labelled", "topic_concentration")}


def random_triggers(examples: TriggerExamples, n_keys: int = 2000, top: int = 25, seed: int = 0) -> pd.DataFrame:
    """Trigger rows of "random keys": each draws ``top`` distinct sentences of the mined pool and a
    uniformly random real-token position in each (layer -1, sign 1)."""
    rng = np.random.default_rng(seed)
    sentences = examples.sentences
    n = len(sentences)
    top = min(top, n)
    lengths = np.array([len(t) for t in sentences["token_ids"]])
    picks = np.stack([rng.choice(n, size=top, replace=False) for _ in range(n_keys)])
    rows = picks.reshape(-1)
    nb = examples.n_bos
    position = nb + np.floor(rng.random(len(rows)) * (lengths[rows] - nb)).astype(np.int64)
    return pd.DataFrame({"layer": -1, "memory": np.repeat(np.arange(n_keys), top), "sign": 1,
                         "rank": np.tile(np.arange(top), n_keys),
                         "sentence_id": sentences["sentence_id"].to_numpy(np.int64)[rows], "position": position})


def layer_pattern_measures(examples: TriggerExamples, n_layers: int, top: int = 25, sign: int = 1,
                           min_labelled: int = 5, exclude_topics: Sequence[str] = ("Uncategorized",),
                           random_keys: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per layer, the mean over its keys of the shallow and semantic measures of :func:`key_measures`
    (each key's top-``top`` triggers), with the same measures for random keys
    (:func:`random_triggers`) and the corpus base rate of the most common topic.

    Columns: layer, relative_depth, keys, shallow_token, with_shared_token (share of keys where >= 3
    triggers share their last token: a shallow pattern by the paper's 3-prefix rule), shallow_bigram,
    topic_concentration, keys_with_topic, random_shallow_token, random_with_shared_token,
    random_shallow_bigram, random_topic_concentration,
    topic_base_rate, most_common_topic.
    """
    top = _int("top", top)
    t = examples.triggers
    t = t[(t["sign"] == sign) & (t["rank"] < top)]
    if t.empty:
        raise ParameterError(f"No trigger examples with sign {sign}.")
    per_key = key_measures(_with_tokens(examples, t), min_labelled, exclude_topics)
    g = per_key.groupby("layer")
    out = pd.DataFrame({"keys": g.size(), "shallow_token": g["shallow_token"].mean(),
                        "with_shared_token": g["shallow_token"].apply(lambda s: float((s > 0).mean())),
                        "shallow_bigram": g["shallow_bigram"].mean(),
                        "topic_concentration": g["topic_concentration"].mean(),
                        "keys_with_topic": g["topic_concentration"].count()}).reset_index()
    out.insert(1, "relative_depth", (out["layer"] + 1) / n_layers)
    rand = key_measures(_with_tokens(examples, random_triggers(examples, random_keys, top, seed)),
                        min_labelled, exclude_topics)
    out["random_shallow_token"] = rand["shallow_token"].mean()
    out["random_with_shared_token"] = float((rand["shallow_token"] > 0).mean())
    out["random_shallow_bigram"] = rand["shallow_bigram"].mean()
    out["random_topic_concentration"] = rand["topic_concentration"].mean()
    topics = examples.sentences["topic"]
    topics = topics[topics.notna() & ~topics.isin(list(exclude_topics))]
    counts = topics.value_counts()
    out["topic_base_rate"] = float(counts.iloc[0] / counts.sum()) if len(counts) else np.nan
    out["most_common_topic"] = str(counts.index[0]) if len(counts) else None
    return out


def pattern_trend(measures: pd.DataFrame, split: float = 9 / 16) -> dict:
    """Does "shallow in lower layers, semantic in upper layers" hold?

    Lower layers: relative depth <= ``split`` (the paper: layers 1-9 of 16 shallow, 10-16 semantic).
    Shallow is the last-token measure; semantic is the topic concentration above random keys.
    ``holds`` needs both: more shallow below than above, and more semantic above than below.
    """
    lower = measures[measures["relative_depth"] <= split]
    upper = measures[measures["relative_depth"] > split]
    semantic = measures["topic_concentration"] - measures["random_topic_concentration"]
    result = {
        "split_relative_depth": split,
        "shallow_lower": float(lower["shallow_token"].mean()), "shallow_upper": float(upper["shallow_token"].mean()),
        "semantic_excess_lower": float(semantic[lower.index].mean()),
        "semantic_excess_upper": float(semantic[upper.index].mean()),
        "shallow_depth_correlation": float(measures["shallow_token"].corr(measures["relative_depth"],
                                                                          method="spearman")),
        "semantic_depth_correlation": float(semantic.corr(measures["relative_depth"], method="spearman")),
    }
    result["shallow_lower_than_upper"] = result["shallow_lower"] > result["shallow_upper"]
    result["semantic_upper_than_lower"] = result["semantic_excess_upper"] > result["semantic_excess_lower"]
    result["holds"] = bool(result["shallow_lower_than_upper"] and result["semantic_upper_than_lower"])
    return result


# =====================================================================================================
# Human annotations
# =====================================================================================================
ANNOTATION_COLUMNS = ["model", "layer", "memory", "sign", "pattern_id", "pattern", "kind", "covered",
                      "n_triggers", "annotator", "saved_at"]
PATTERN_KINDS = ("shallow", "semantic")


def read_annotations(path) -> pd.DataFrame:
    """All annotation rows in a CSV file, or in every CSV file of a folder (empty frame if none)."""
    path = Path(path)
    files = sorted(path.glob("*.csv")) if path.is_dir() else ([path] if path.exists() else [])
    frames = [pd.read_csv(f, keep_default_na=False, dtype={"covered": str, "pattern": str}) for f in files]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=ANNOTATION_COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    missing = [c for c in ANNOTATION_COLUMNS if c not in frame]
    if missing:
        raise CorpusError(f"Annotation file(s) {[str(f) for f in files]} lack the columns {missing}.")
    return frame


def covered_ranks(text) -> set[int]:
    return {int(x) for x in str(text).split(";") if x.strip() != ""}


def summarise_annotations(annotations: pd.DataFrame, n_layers: int | None = None) -> dict:
    """Patterns per key and share of prefixes covered by at least one pattern, overall and per layer.

    A key annotated with no pattern (a row with ``kind == "none"``) counts with 0 patterns. If a key was
    annotated more than once (same model, layer, memory, sign, annotator), the last save counts.
    """
    if annotations.empty:
        return {"keys": 0}
    a = annotations.copy()
    a["saved_at"] = a["saved_at"].astype(str)
    key = ["model", "layer", "memory", "sign", "annotator"]
    latest = a.groupby(key)["saved_at"].transform("max")
    a = a[a["saved_at"] == latest]
    rows = []
    for (model, layer, memory, sign, annotator), g in a.groupby(key):
        patterns = g[g["kind"].isin(PATTERN_KINDS)]
        covered = set().union(*[covered_ranks(c) for c in patterns["covered"]]) if len(patterns) else set()
        n = int(g["n_triggers"].iloc[0])
        rows.append({"model": model, "layer": int(layer), "memory": int(memory), "sign": int(sign),
                     "annotator": annotator, "patterns": len(patterns),
                     "shallow": int((patterns["kind"] == "shallow").sum()),
                     "semantic": int((patterns["kind"] == "semantic").sum()),
                     "coverage": len(covered) / n if n else np.nan})
    per_key = pd.DataFrame(rows)
    per_layer = per_key.groupby("layer").agg(keys=("patterns", "size"), patterns_per_key=("patterns", "mean"),
                                             coverage=("coverage", "mean"), shallow=("shallow", "sum"),
                                             semantic=("semantic", "sum")).reset_index()
    if n_layers:
        per_layer["relative_depth"] = (per_layer["layer"] + 1) / n_layers
    return {"keys": len(per_key), "patterns_per_key": float(per_key["patterns"].mean()),
            "coverage": float(per_key["coverage"].mean()), "per_key": per_key, "per_layer": per_layer}


__all__ = ["TopKState", "merge", "TriggerExamples", "mine_trigger_examples", "load_trigger_examples",
           "prepare_sentences", "corpus_fingerprint", "plan_batches", "trigger_table", "trigger_html",
           "read_coefficients", "removal_experiment", "removal_summary", "key_measures", "key_pattern_measures",
           "random_triggers", "layer_pattern_measures", "pattern_trend", "read_annotations",
           "summarise_annotations", "covered_ranks", "ANNOTATION_COLUMNS", "PATTERN_KINDS"]
