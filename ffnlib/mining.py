"""The mining engine: streaming the coefficients of a corpus through a model, batch by batch.

Section 3 (:mod:`ffnlib.keys`) and the Dask path (:mod:`ffnlib.distributed`) build on these parts:

- :func:`prepare_sentences` checks and tokenizes a sentence table; :mod:`ffnlib.batching` plans its batches (the
  miner's plan, :func:`ffnlib.batching.plan_prefix_batches`, makes each prefix segment of the corpus a *snapshot*:
  notebook 10 reads the findings against corpus size from them).
- :class:`TopKState` holds the running top-k candidates of every memory of several layers, for one or two
  signs, in a total order (score, then sentence id, then position), so that :func:`merge` of two partial
  states (e.g. two corpus shards) is exact.
- :class:`Miner` reduces each batch's coefficients inside the forward pass, layer by layer, into such a
  state. A candidate enters only if it is at least a memory's k-th score; entrants wait unsorted in spare
  slots until they run out, so the sorting cost is paid rarely and the result does not depend on when
  it is paid. :func:`hooked` hooks it into a model (through ``ffnlib.capture.hook_coefficients``, so the
  coefficients arrive as (batch, tokens, d_ff) for every family).
- :func:`read_coefficients` reads the coefficients at given (sequence, position, layer, memory) points.
- :class:`Checkpoint` saves and verifies the partial state of a long run, so that it resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from .batching import Batch, make_batch, plan_batches
from .capture import StopForward, forward_until_stop, hook_coefficients
from .errors import CorpusError, ParameterError
from .progress import say, tqdm
from .storage import atomic_write_bytes, read_json, sha256_bytes, write_json

__all__ = ["PER_SENTENCE", "POSITION_BITS", "MAX_POSITION", "MAX_SENTENCE_ID", "EMPTY", "DENSE_PAIRS_SHARE",
           "MAX_GROUP_VIEWS", "SPARE_SLOTS", "prepare_sentences", "corpus_fingerprint", "TopKState", "merge",
           "top_sorted", "sort_exact", "Miner", "hooked", "Checkpoint", "json_normal", "read_coefficients"]

PER_SENTENCE = ("max", "all")
POSITION_BITS = 20  # a candidate is stored as one int64: sentence_id << 20 | position
MAX_POSITION = (1 << POSITION_BITS) - 1
MAX_SENTENCE_ID = (1 << (62 - POSITION_BITS)) - 1
EMPTY = 1 << 62  # keys of empty slots are EMPTY + slot (unique, after every real candidate)
# How the miner finds positions; these change the speed, never the result (tests run both ways):
DENSE_PAIRS_SHARE = 0.15  # positions of more than 15% of a batch's (sentence, memory) pairs: found all at once
MAX_GROUP_VIEWS = 3  # a padded batch with up to 3 runs of equal length is reduced run by run (no copy)
SPARE_SLOTS = 2.0  # each memory's pool has k * SPARE_SLOTS unsorted slots for new candidates before it is sorted


# =====================================================================================================
# Sentences and batches
# =====================================================================================================
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
    limit = getattr(loaded, "max_positions", None)
    fits = table["token_ids"].map(len) <= limit if limit else None
    if fits is not None and not fits.all():
        # a model with learned positions cannot read past them (wiki-relu-lm: 128); such sentences are left out whole
        # rather than cut, so that every prefix keeps its true next token
        dropped = table.loc[~fits, "sentence_id"].tolist()
        if len(dropped) == len(table):
            raise CorpusError(f"Every sentence is longer than the {limit} positions {loaded.name} reads (BOS "
                              "included); give shorter sentences.")
        warnings.warn(f"{len(dropped):,} of {len(table):,} sentences are longer than the {limit} positions "
                      f"{loaded.name} reads (BOS included) and are left out (sentence_id {dropped[:10]}).",
                      stacklevel=2)
        table = table[fits].reset_index(drop=True)
    return table


def corpus_fingerprint(sentences: pd.DataFrame) -> str:
    """SHA-256 of the sentence ids and texts (in id order: the row order does not matter)."""
    h = hashlib.sha256()
    for sid, text in sorted(zip(sentences["sentence_id"].astype("int64").tolist(), sentences["text"])):
        h.update(f"{sid}\t{text}\n".encode())
    return h.hexdigest()


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

    def clone(self) -> "TopKState":
        return TopKState(list(self.layers), list(self.signs), self.scores.clone(), self.keys.clone())


def top_sorted(scores: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates of each row: score descending, then key ascending.

    A top-(k+1) by score settles a row when its first k+1 scores are all different (the set and its
    order are then fixed by the scores alone); rows with a tie there are sorted exactly, by key and then
    stably by score.
    """
    if scores.shape[-1] <= k:
        return sort_exact(scores, keys, k)
    values, order = scores.topk(k + 1, dim=-1)
    top_scores, top_keys = values[..., :k], keys.gather(-1, order[..., :k])
    tied = (values[..., 1:] == values[..., :-1]).any(-1)
    if bool(tied.any()):
        where = tied.nonzero(as_tuple=True)
        top_scores[where], top_keys[where] = sort_exact(scores[where], keys[where], k)
    return top_scores, top_keys


def sort_exact(scores: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    scores, keys = top_sorted(torch.cat([a.scores, b.scores.to(a.scores.device)], -1),
                               torch.cat([a.keys, b.keys.to(a.keys.device)], -1), a.k)
    return TopKState(list(a.layers), list(a.signs), scores, keys)


# =====================================================================================================
# The miner
# =====================================================================================================
def _first_position(view: torch.Tensor, extreme: torch.Tensor) -> torch.Tensor:
    """Index of the first token where ``view`` (rows, tokens, d_ff) equals ``extreme`` (rows, d_ff): the
    position of the maximum (or minimum), first on ties. Fast elementwise ops and a max reduction over
    small integers: each match is weighted by tokens - index, so the largest weight is the first match
    (``argmax`` over the middle dimension is several times slower on CPU)."""
    tokens = view.shape[1]
    dtype = torch.uint8 if tokens <= 255 else torch.int16 if tokens <= 32767 else torch.int32
    weights = torch.arange(tokens, 0, -1, dtype=dtype, device=view.device)[None, :, None]
    return tokens - ((view == extreme[:, None, :]) * weights).amax(dim=1).long()


class Miner:
    """Reduces one batch's coefficients, layer by layer inside the forward pass, into a TopKState."""

    def __init__(self, state: TopKState, per_sentence: str, n_bos: int):
        if per_sentence not in PER_SENTENCE:
            raise ParameterError(f"per_sentence must be one of {PER_SENTENCE}, got {per_sentence!r}.")
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
        self.batch: Batch | None = None
        self.sentence_ids: torch.Tensor | None = None  # (rows,) int64, on the state's device

    def __call__(self, layer: int, coefficients: torch.Tensor) -> None:
        """The hook (``ffnlib.capture.hook_coefficients``): reduce one layer's coefficients (batch, tokens,
        d_ff); after the deepest layer mined, stop the forward pass (the rest of the model is not needed)."""
        self.reduce(layer, coefficients)
        if layer == self.state.layers[-1]:
            raise StopForward

    def mine(self, model, sequences: Sequence[Sequence[int]], sentence_ids: torch.Tensor, pad_id: int) -> Batch:
        """Run one batch of token id sequences (longest first) through ``model`` while hooked
        (see :func:`hooked`), offering every memory's candidates to the pools.

        The batch is right-padded and no attention mask is needed: with causal attention the real tokens
        only ever attend to earlier (real) tokens, so padding after them changes nothing."""
        device = self.pool_scores.device
        self.batch = make_batch(sequences, pad_id, device, self.n_bos)
        self.sentence_ids = sentence_ids.to(device)
        forward_until_stop(model, input_ids=self.batch.ids, use_cache=False)
        return self.batch

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
            self.offer(si, li, extreme if sign == 1 else -extreme,
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
                self.offer(si, li, flat if sign == 1 else -flat, keys_of)

    def offer(self, si: int, li: int, cand: torch.Tensor, keys_of: Callable, offset: int = 0) -> None:
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
                self.offer(si, li, cand[first: first + self.spare], keys_of, offset + first)
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
        :func:`top_sorted`; the spare slots are emptied (the threshold, slot k-1, rises to the new k-th)."""
        k = self.k
        pool_scores, pool_keys = self.pool_scores[si, li], self.pool_keys[si, li]
        where = slice(None) if memories is None else memories
        scores, keys = top_sorted(pool_scores[where], pool_keys[where], k)
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


@contextmanager
def hooked(loaded, state: TopKState, per_sentence: str = "max") -> Iterator[Miner]:
    """A :class:`Miner` of ``state`` hooked into ``loaded``'s layers ``state.layers`` for the duration:
    ``with hooked(loaded, state) as miner: miner.mine(...)`` per batch, then ``miner.flush()``."""
    miner = Miner(state, per_sentence, len(loaded.bos))
    with hook_coefficients(loaded.adapter, state.layers, miner):
        yield miner


# =====================================================================================================
# Checkpoints
# =====================================================================================================
class Checkpoint:
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
        if meta.get("identity") != json_normal(self.identity):
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


def json_normal(obj):
    """``obj`` as it reads back from JSON (to compare a saved identity or request with a new one)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


# =====================================================================================================
# Reading coefficients of given (sequence, position, layer, memory) points, batched
# =====================================================================================================
def read_coefficients(loaded, sequences: Sequence[Sequence[int]], reads: pd.DataFrame,
                      batch_tokens: int = 2048, progress: bool = False, desc: str = "Forward passes",
                      checkpoint: "Checkpoint | None" = None, checkpoint_every: int = 50) -> np.ndarray:
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
    pad_id = loaded.pad_id
    current: dict = {}

    def read(layer: int, coefficients: torch.Tensor) -> None:
        reads_here = current["by_layer"].get(layer)
        if reads_here is not None:
            rows, positions, memories, targets = reads_here
            out[targets] = coefficients[rows, positions, memories].float().cpu().numpy()
        if layer == current["deepest"]:
            raise StopForward

    layers = sorted(set(layer_of.tolist()))

    batches = plan_batches(lengths, batch_tokens)
    start = 0
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        out[:] = resumed[0]["values"].numpy()
        start = int(resumed[1]["batches"])
        say(f"Resuming from the checkpoint {checkpoint.meta}: {start} of {len(batches)} batches done.", progress)
    with hook_coefficients(adapter, layers, read), torch.inference_mode():
        for index in tqdm(range(start, len(batches)), desc=desc, disable=not progress, unit="batch",
                          total=len(batches), initial=start):
            if checkpoint is not None and index > start and (index - start) % checkpoint_every == 0:
                checkpoint.save({"values": torch.from_numpy(out.copy())}, {"batches": index, "sentences": index})
            rows = batches[index]
            batch = make_batch([sequences[r] for r in rows], pad_id, device)
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
            forward_until_stop(loaded.model, input_ids=batch.ids, use_cache=False)
    return out
