"""Section 3: keys capture input patterns.

A memory's *trigger examples* are the corpus prefixes that make its coefficient largest. The coefficient
of memory i for a prefix is m_i at the prefix's last token (for gated FFNs ``act(gate_i·x)·(up_i·x)``,
which can be negative: the most negative coefficients make the memory write ``-v_i``).

- :func:`mine_trigger_examples` streams a sentence corpus through the model and keeps, for every layer
  and memory, the top-k prefixes (and for gated models the k most negative). As in the authors' code a
  sentence gives at most one prefix per key (the position of its maximum); ``per_sentence="all"`` keeps
  every position. Memory use is bounded by layers x d_ff x k whatever the corpus size: each batch is
  reduced inside the forward pass, layer by layer, and merged into a running top-k state. The engine
  (the state and its exact merge, the miner, batches, checkpoints) is :mod:`ffnlib.mining`; this module
  holds what Section 3 asks of it. Runs checkpoint and resume; results are cached by manifest
  (:func:`trigger_request` names the result, for this process and for the Dask path alike).
- :func:`trigger_table` / :func:`trigger_html`: one key's trigger examples, readable.
- :func:`removal_experiment` (Fig. 3): remove the first, the last or a random token of each trigger
  prefix and measure the change of that key's coefficient.
- :func:`layer_pattern_measures` (Fig. 2 analogue, automatic): shallow patterns (triggers sharing
  their last token / bigram) and semantic patterns (topic concentration), against random keys.
- :func:`summarise_annotations`: human annotations (written with ``ffnlib.widgets.annotation``).
"""

from __future__ import annotations

import html
import io
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .config import check_int
from .errors import CorpusError, ParameterError
from .mining import (BATCH_COST, EMPTY, MAX_POSITION, PER_SENTENCE, POSITION_BITS, Checkpoint, TopKState,
                     _json_normal, corpus_fingerprint, doubling_sizes, hooked, merge, plan_batches, plan_prefix_batches,
                     prepare_sentences, read_coefficients)
from .progress import say
from .stats import N_BOOT, Estimate, bootstrap, share
from .storage import (atomic_write_bytes, ensure_dir, fingerprint, load_result, read_json, save_result, sha256_bytes,
                      write_json)

RESULT_VERSION = 1  # bump when what the miner computes changes
# the miner's batch plan (mining.plan_prefix_batches): part of a checkpoint's identity, since a checkpoint
# counts the batches done
MINING_PLAN = f"least padding + {BATCH_COST} tokens per batch, per prefix segment"
SNAPSHOT_FLOOR = 250  # the first snapshot's sentences ("auto": fewer on a small corpus, never fewer than k)
TRIGGER_COLUMNS = ["layer", "memory", "sign", "rank", "coefficient", "sentence_id", "position", "next_token"]


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
    # sentences mined -> the top-k state after that prefix of the corpus (a run without out_dir keeps
    # them here; with out_dir each is saved as the result of a run on that prefix: see trigger_snapshot)
    snapshots: dict = field(default_factory=dict, repr=False)

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


@dataclass(frozen=True)
class TriggerRequest:
    """A checked mining request: the sentence table (tokenized), the layers and signs, and the manifest
    (``request``) that names the cached result (``name``). Both mining paths (this process, and
    ``ffnlib.distributed``) build it with :func:`trigger_request`, so they cache and reuse each other's results."""

    table: pd.DataFrame
    layers: list[int]
    signs: list[int]
    k: int
    per_sentence: str
    batch_tokens: int
    request: dict
    name: str


def auto_snapshot_floor(n: int, k: int) -> int:
    """The first snapshot's size when ``snapshot_floor="auto"``: 250 sentences, or a quarter of a smaller
    corpus, never fewer than k (each key needs k sentences)."""
    return max(int(k), min(SNAPSHOT_FLOOR, int(n) // 4))


def check_snapshot_floor(snapshot_floor, n: int, k: int) -> int | None:
    if snapshot_floor == "auto":
        return auto_snapshot_floor(n, k)
    if snapshot_floor is None:
        return None
    floor = check_int("snapshot_floor", snapshot_floor)
    if floor < k:
        raise ParameterError(f"snapshot_floor={floor} is smaller than k={k}: a snapshot of fewer than k sentences "
                             f"cannot give every key k trigger examples. Use snapshot_floor >= {k}, \"auto\", or "
                             "None (no snapshots).")
    return floor


def trigger_request(loaded, sentences: pd.DataFrame, k: int = 50, per_sentence: str = "max",
                    negative: bool | None = None, layers=None, batch_tokens: int = 2048,
                    checkpoint_every: int = 1000, snapshot_floor="auto") -> TriggerRequest:
    """Check the arguments of :func:`mine_trigger_examples` (clear errors), tokenize the sentences and build
    the request that identifies the result."""
    adapter = loaded.adapter
    if per_sentence not in PER_SENTENCE:
        raise ParameterError(f"per_sentence must be one of {PER_SENTENCE}, got {per_sentence!r}.")
    negative = adapter.gated if negative is None else negative
    if not isinstance(negative, bool):
        raise ParameterError(f"negative must be True, False or None, got {negative!r}.")
    if isinstance(layers, (list, tuple)) and not layers:
        raise ParameterError("layers is empty: give layer indices, or None for all layers.")
    layer_list = adapter.check_layers(layers)
    k = check_int("k", k)
    batch_tokens = check_int("batch_tokens", batch_tokens)
    check_int("checkpoint_every", checkpoint_every)
    table = prepare_sentences(loaded, sentences)
    if k > len(table):
        raise ParameterError(f"k={k} is larger than the number of sentences ({len(table)}): each key can have at "
                             f"most one trigger per sentence. Use k <= {len(table)} or more sentences.")
    floor = check_snapshot_floor(snapshot_floor, len(table), k)
    request = {"analysis": "trigger_examples", "version": RESULT_VERSION, "model": loaded.name,
               "file_hash": loaded.file_hash, "corpus": corpus_fingerprint(table), "sentences": len(table),
               "k": k, "per_sentence": per_sentence, "negative": negative, "layers": layer_list,
               "n_bos": len(loaded.bos), "snapshot_floor": floor, "order": prefix_order(table, floor)}
    return TriggerRequest(table, layer_list, [1, -1] if negative else [1], k, per_sentence, batch_tokens, request,
                          f"triggers-{fingerprint(request)}")


def prefix_order(table: pd.DataFrame, floor: int | None) -> str | None:
    """The row order's fingerprint where it matters: with snapshots, each is a prefix of the corpus in row order
    (the corpus fingerprint ignores the order, so two orders of the same sentences must be told apart)."""
    if len(doubling_sizes(len(table), floor)) == 1:
        return None
    return fingerprint(table["sentence_id"].astype("int64").tolist())


def snapshot_request(request: dict, table: pd.DataFrame, size: int) -> tuple[dict, str]:
    """The request (and result name) of a run on the first ``size`` sentences of ``table`` with the same
    parameters, ``snapshot_floor`` included (the integer in the request, which ``"auto"`` resolved): what the
    snapshot at ``size`` is saved as, and equals."""
    prefix_table = table.iloc[:size]
    prefix = {**request, "corpus": corpus_fingerprint(prefix_table), "sentences": int(size),
              "order": prefix_order(prefix_table, request["snapshot_floor"])}
    return prefix, f"triggers-{fingerprint(prefix)}"


def mine_trigger_examples(loaded, sentences: pd.DataFrame, k: int = 50, per_sentence: str = "max",
                          negative: bool | None = None, layers=None, batch_tokens: int = 2048,
                          checkpoint_every: int = 1000, out_dir=None, progress: bool = True,
                          snapshot_floor="auto", on_batch=None) -> TriggerExamples:
    """Mine the top-k trigger examples of every memory of ``layers`` (all by default) over ``sentences``.

    - ``per_sentence="max"`` (the authors' code): at most one prefix per sentence per key, ending at the
      position of the key's maximum in that sentence (first position on ties); ``"all"``: every prefix.
    - ``negative`` (default: the model is gated): also keep the k most negative coefficients (sign -1).
    - Sentences are batched by length (``batch_tokens`` padded tokens per batch); order: coefficient
      descending, then sentence_id, then position, so results are exact and reproducible.
    - With ``out_dir``: a checkpoint every ``checkpoint_every`` sentences (an interrupted run resumes and
      ends with the same result), and the result is saved as Parquet with a manifest; a later call with
      the same manifest loads it instead of recomputing.
    - **Snapshots** (corpus size): the sentences are mined in prefix segments of the table's row order,
      doubling from ``snapshot_floor`` (``"auto"``: 250, or a quarter of a smaller corpus, at least k;
      None: one segment, no snapshots). The state after each prefix is exactly what a run on that prefix
      alone gives, bit for bit, with the same parameters and the same *resolved* floor (the integer in
      ``manifest["snapshot_floor"]``: ``"auto"`` on the prefix alone would resolve to a smaller one);
      :func:`trigger_snapshot` reads it. With ``out_dir`` each is saved as that prefix run's result (so such
      a run, given that floor, loads it). With snapshots the row order is part of the request.

    - ``on_batch(batches_done, sentences_done)``, when given, is called after every batch and its checkpoint:
      a benchmark runs its baselines there, a test interrupts the run there. It is not part of the request.

    The engine (top-k state, miner, batches) is :mod:`ffnlib.mining`.
    """
    req = trigger_request(loaded, sentences, k, per_sentence, negative, layers, batch_tokens, checkpoint_every,
                          snapshot_floor)
    table, request, name = req.table, req.request, req.name
    folder = ensure_dir(out_dir) if out_dir is not None else None
    if folder is not None:
        cached = load_cached_triggers(folder, name, request, table)
        if cached is not None:
            say(f"Loaded cached trigger examples from {folder / name} (same model, corpus and parameters); "
                "not recomputing.", progress)
            return cached

    lengths = np.array([len(t) for t in table["token_ids"]])
    sizes = doubling_sizes(len(table), request["snapshot_floor"])
    batches, ends = plan_prefix_batches(lengths, req.batch_tokens, sizes)
    snapshot_at = dict(zip(ends[:-1], sizes[:-1]))  # batches done -> sentences of the prefix it completes
    snapshots: dict[int, TopKState] = {}
    state = TopKState.empty(req.layers, req.signs, loaded.adapter.d_ff, req.k, device=loaded.device)
    plan = {"batch_tokens": req.batch_tokens, "plan": MINING_PLAN}  # a checkpoint counts batches of this plan
    checkpoint = Checkpoint(folder, name, {**request, **plan})
    done = {"batches": 0, "sentences": 0, "tokens": 0, "padded": 0}
    resumed, source = checkpoint.load(), f"the checkpoint {checkpoint.meta}"
    if resumed is not None:
        done = resumed[1]
    if folder is not None:  # a snapshot saved past the checkpoint is the state after its prefix: resume there
        for size, end in reversed(list(zip(sizes[:-1], ends[:-1]))):
            if size <= done["sentences"]:
                break
            saved = load_snapshot_state(folder, *snapshot_request(request, table, size)[::-1], plan=plan)
            if saved is not None:
                real = int(lengths[:size].sum())
                done = {"batches": end, "sentences": size, "tokens": real,
                        "padded": sum(len(rows) * int(lengths[rows].max()) for rows in batches[:end]) - real}
                resumed = ({"scores": saved[0].scores, "keys": saved[0].keys}, done)
                source = f"the saved snapshot of the first {size} sentences"
                break
    if resumed is not None:
        state.scores.copy_(resumed[0]["scores"])
        state.keys.copy_(resumed[0]["keys"])
        say(f"Resuming from {source}: {done['sentences']} of {len(table)} sentences already done "
            f"(resumed_from={done['sentences']}).", progress)
    resumed_from = int(done["sentences"])

    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    sentence_ids = torch.tensor(table["sentence_id"].to_numpy(np.int64))
    token_ids = table["token_ids"].tolist()
    from .progress import tqdm

    bar = tqdm(total=int(lengths.sum()), initial=int(done["tokens"]), unit="tok", unit_scale=True,
               desc="Mining trigger examples", disable=not progress)
    started, tokens_here, last_checkpoint = time.perf_counter(), 0, done["sentences"]
    snapshot_seconds = 0.0  # taking the snapshots: their cost
    try:
        with hooked(loaded, state, req.per_sentence) as miner, torch.inference_mode():
            for index in range(done["batches"], len(batches)):
                rows = batches[index]
                batch = miner.mine(loaded.model, [token_ids[r] for r in rows], sentence_ids[rows], pad_id)
                real = int(lengths[rows].sum())
                done = {"batches": index + 1, "sentences": done["sentences"] + len(rows),
                        "tokens": done["tokens"] + real,
                        "padded": done["padded"] + int(batch.ids.numel()) - real}
                tokens_here += real
                bar.update(real)
                bar.set_postfix(sentences=f"{done['sentences']}/{len(table)}")
                size = snapshot_at.get(index + 1)
                if size is not None:  # a prefix of the corpus is done: its snapshot (a run resumes from it too)
                    snapshot_started = time.perf_counter()
                    miner.flush()
                    keep_snapshot(snapshots, size, state, table, request, done, folder, plan)
                    last_checkpoint = done["sentences"]
                    snapshot_seconds += time.perf_counter() - snapshot_started
                if done["sentences"] - last_checkpoint >= checkpoint_every and index + 1 < len(batches):
                    miner.flush()
                    checkpoint.save({"scores": state.scores, "keys": state.keys}, done)
                    last_checkpoint = done["sentences"]
                if on_batch is not None:
                    on_batch(done["batches"], done["sentences"])
            miner.flush()
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    stats = {"sentences": len(table), "tokens": int(done["tokens"]), "batches": len(batches),
             "padding_share": done["padded"] / max(done["padded"] + done["tokens"], 1),
             "seconds": seconds, "tokens_per_second": tokens_here / max(seconds, 1e-9),
             "resumed_from": resumed_from, "from_cache": False, "snapshots": sizes[:-1],
             "snapshot_seconds": snapshot_seconds}
    result = trigger_examples_from_state(state, table, request, stats)
    result.snapshots = snapshots
    if folder is not None:
        save_trigger_examples(folder, name, result)
        checkpoint.remove()
        say(f"Saved the trigger examples to {folder / name}.parquet ({stats['tokens']} tokens, padding "
            f"{stats['padding_share']:.1%}, {stats['tokens_per_second']:.0f} tokens/s).", progress)
    return result


def keep_snapshot(snapshots: dict, size: int, state: TopKState, table: pd.DataFrame, request: dict,
                   done: dict, folder: Path | None, plan: dict) -> None:
    """The state after the first ``size`` sentences: saved as the result of a run on that prefix (with
    ``folder``; as its top-k state, :func:`save_snapshot_state`, naming the batch ``plan`` it was mined with),
    else kept in memory."""
    if folder is None:
        snapshots[size] = state.to("cpu").clone()
        return
    prefix_request, prefix_name = snapshot_request(request, table, size)
    sizes = doubling_sizes(size, request["snapshot_floor"])
    stats = {"sentences": size, "tokens": int(done["tokens"]), "snapshot_of": request["corpus"],
             "snapshots": sizes[:-1], "from_cache": False}
    save_snapshot_state(folder, prefix_name, state, prefix_request, stats, plan)


def save_snapshot_state(folder: Path, name: str, state: TopKState, request: dict, stats: dict,
                        plan: dict | None = None) -> None:
    """A snapshot as the result of a run on its corpus prefix, kept as the top-k state itself (far quicker to
    write than its trigger table, which :func:`load_cached_triggers` builds when it is read):
    ``<name>.state.pt`` (scores and keys), then ``<name>.state.json`` (the request, the batch plan, the run's
    statistics and the data's SHA-256). Each is written atomically, the data first, so a snapshot is whole
    or ignored. ``plan`` (batch_tokens and the planner) decides whether a longer run may resume from it."""
    buf = io.BytesIO()
    # each tensor on its own compact storage: equal states give equal bytes, however they were computed
    torch.save({"scores": state.scores.cpu().contiguous().clone(), "keys": state.keys.cpu().contiguous().clone()}, buf)
    data = buf.getvalue()
    atomic_write_bytes(folder / f"{name}.state.pt", data)
    write_json(folder / f"{name}.state.json", {"request": request, "plan": plan, "layers": list(state.layers),
                                               "signs": list(state.signs), "stats": stats,
                                               "sha256": sha256_bytes(data)})


def load_snapshot_state(folder: Path, name: str, request: dict, plan: dict | None = None
                        ) -> tuple[TopKState, dict] | None:
    """(state, stats) of a snapshot saved by :func:`save_snapshot_state` for exactly ``request`` (and, when
    given, mined with the batch ``plan``: to resume a run from it), else None (absent, of another request or
    plan, or damaged: a damaged one is reported and ignored)."""
    meta_path, path = Path(folder) / f"{name}.state.json", Path(folder) / f"{name}.state.pt"
    if not meta_path.exists():
        return None
    try:
        meta = read_json(meta_path)
        if meta.get("request") != _json_normal(request) or (plan is not None and meta.get("plan") != _json_normal(plan)):
            return None
        data = path.read_bytes()
        if sha256_bytes(data) != meta.get("sha256"):
            raise ValueError("its checksum does not match (corrupted or truncated)")
        tensors = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        warnings.warn(f"Ignoring the saved snapshot {path}: {exc}; it is mined again.", stacklevel=2)
        return None
    return TopKState(meta["layers"], meta["signs"], tensors["scores"], tensors["keys"]), meta["stats"]


def load_cached_triggers(folder, name: str, request: dict, table: pd.DataFrame) -> TriggerExamples | None:
    """A cached mining result for ``request`` on ``table`` (its prepared sentences): a snapshot saved by a
    longer run on the same corpus (its top-k state, read into trigger examples; first, since it is the latest
    pass's) or a run's saved result (:func:`load_trigger_examples`); else None."""
    saved = load_snapshot_state(folder, name, request)
    if saved is not None:
        return trigger_examples_from_state(saved[0], table, request, {**saved[1], "from_cache": True})
    return load_trigger_examples(folder, name, request)


def snapshot_sizes(examples: TriggerExamples) -> list[int]:
    """The prefix sizes (sentences) of ``examples``' snapshots, smallest first, then the whole corpus."""
    return doubling_sizes(int(examples.manifest["sentences"]), examples.manifest.get("snapshot_floor"))


def trigger_snapshot(examples: TriggerExamples, size: int, out_dir=None) -> TriggerExamples:
    """The trigger examples of the first ``size`` sentences of ``examples``' corpus, as mined in the same
    pass (one of :func:`snapshot_sizes`): from memory, or from ``out_dir`` where the run saved it."""
    sizes = snapshot_sizes(examples)
    if size not in sizes:
        raise ParameterError(f"No snapshot of {size} sentences: this mining run has snapshots at {sizes} "
                             f"(snapshot_floor={examples.manifest.get('snapshot_floor')}).")
    if size == sizes[-1]:
        return examples
    if size in examples.snapshots:
        table = examples.sentences.iloc[:size]
        request, _ = snapshot_request(examples.manifest, table, size)
        return trigger_examples_from_state(examples.snapshots[size], table, request,
                                           {"sentences": size, "snapshot_of": examples.manifest["corpus"],
                                            "tokens": int(table["token_ids"].map(len).sum())})
    if out_dir is not None:
        request, name = snapshot_request(examples.manifest, examples.sentences, size)
        found = load_cached_triggers(Path(out_dir), name, request, examples.sentences.iloc[:size])
        if found is not None:
            return found
    raise ParameterError(f"The snapshot of {size} sentences is neither in memory nor in {out_dir}: pass the "
                         "out_dir the examples were mined with (or mine them again with it).")


def trigger_examples_from_state(state: TopKState, table: pd.DataFrame, request: dict,
                                stats: dict | None = None) -> TriggerExamples:
    """The mined top-k state as trigger examples (the trigger table and the sentences it points into)."""
    sentence_frame = table[["sentence_id", "text", "title", "topic", "token_ids"]].copy()
    return TriggerExamples(_state_frame(state, table), sentence_frame, request, dict(stats or {}))


def save_trigger_examples(folder, name: str, result: TriggerExamples) -> None:
    """Save a mining result (Parquet with manifests, and its run statistics) under ``folder``."""
    folder = Path(folder)
    save_result(folder, name, result.triggers, result.manifest)
    save_result(folder, f"{name}-sentences", _sentences_for_parquet(result.sentences), result.manifest)
    write_json(folder / f"{name}.stats.json", result.stats)


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
    n = check_int("n", n)
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
    n_keys, top = check_int("n_keys", n_keys), check_int("top", top)
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
            say(f"Loaded the cached removal experiment from {Path(out_dir) / name}.parquet; not recomputing.",
                 progress)
            return cached

    reads, sequences = removal_plan(examples, d_ff, layer_list, n_keys, top, variants, sign, seed)
    say(f"Removal experiment: {len(reads):,} modified prefixes, read from {len(sequences):,} shared sequences "
         f"({sum(map(len, sequences)):,} tokens to run).", progress)
    checkpoint = Checkpoint(ensure_dir(out_dir), name, request) if out_dir is not None else None
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
    sentences = examples.sentences
    lengths = sentences["token_ids"].map(len).to_numpy(np.int64)
    flat = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in sentences["token_ids"]] or [np.zeros(0, np.int64)])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    ids = pd.Index(sentences["sentence_id"].astype("int64"))
    if not ids.is_unique:
        raise ParameterError("The mined sentences repeat a sentence_id: each sentence must have its own id.")
    row = ids.get_indexer(frame["sentence_id"].astype("int64"))
    pos = frame["position"].to_numpy(np.int64)
    length = lengths[np.maximum(row, 0)] if len(lengths) else np.zeros(len(row), np.int64)
    bad = (row < 0) | (pos < 0) | (pos >= length)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ParameterError(f"Trigger row {first} (sentence {int(frame['sentence_id'].iloc[first])}, position "
                             f"{int(pos[first])}) is not a token of the mined sentences: were the triggers and the "
                             "sentences mined together?")
    at = starts[row] + pos
    out = frame.copy()
    out["last_token"] = flat[at]
    out["previous_token"] = np.where(pos - 1 >= examples.n_bos, flat[np.maximum(at - 1, 0)], -1)
    out["topic"] = sentences["topic"].to_numpy(dtype=object)[row]
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


def key_pattern_table(examples: TriggerExamples, top: int = 25, sign: int = 1, min_labelled: int = 5,
                      exclude_topics: Sequence[str] = ("Uncategorized",)) -> pd.DataFrame:
    """:func:`key_measures` of every mined key's top-``top`` trigger examples (one row per key)."""
    t = examples.triggers
    t = t[(t["sign"] == sign) & (t["rank"] < check_int("top", top))]
    if t.empty:
        raise ParameterError(f"No trigger examples with sign {sign}.")
    return key_measures(_with_tokens(examples, t), min_labelled, exclude_topics)


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
    top = check_int("top", top)
    per_key = key_pattern_table(examples, top, sign, min_labelled, exclude_topics)
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
    """"Shallow in lower layers, semantic in upper layers", per layer pooled: the shares below and above
    ``split`` and their Spearman correlation with depth.

    Lower layers: relative depth <= ``split`` (the paper: layers 1-9 of 16 shallow, 10-16 semantic).
    Shallow is the last-token measure; semantic is the topic concentration above random keys. The verdicts
    (with intervals and a random-weights control) are :func:`section3_measures` and ``ffnlib.findings``.
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
    return result


def section3_measures(removal: pd.DataFrame | None, key_patterns: pd.DataFrame, n_layers: int, split: float = 9 / 16,
                      n_boot: int = N_BOOT, seed: int = 0) -> tuple[dict[str, Estimate], dict[str, str]]:
    """The measures of Section 3's findings (``ffnlib.findings``, notebook ``01_keys``), each with a 95%
    interval from a seeded bootstrap over keys (the sampled unit: the removal experiment's random keys, and
    every mined key for the patterns), and a line of detail per measure for the report.

    ``removal``: :func:`removal_experiment`'s rows (None: only the pattern measures); ``key_patterns``:
    :func:`key_pattern_table`. Lower
    layers: relative depth <= ``split`` (the paper's layers 1-9 of 16).
    """
    out: dict[str, Estimate] = {}
    details: dict[str, str] = {}
    if removal is None:  # the pattern measures alone (e.g. on every corpus-size snapshot)
        per_key = pd.DataFrame()
    else:
        finite = removal[np.isfinite(removal["relative_change"])]
        per_key = finite.pivot_table(index=["layer", "memory"], columns="variant", values="relative_change",
                                     aggfunc="mean")
    if {"last", "first", "random"} <= set(per_key.columns):
        per_key = per_key.dropna(subset=["last", "first", "random"])
        lower = ((per_key.index.get_level_values("layer").to_numpy() + 1) / n_layers) <= split
        last = per_key["last"].to_numpy()
        margin = last - per_key[["first", "random"]].min(axis=1).to_numpy()
        out["last_hurts_most"] = share(margin, "keys", n_boot, seed)
        details["last_hurts_most"] = (f"mean change: last {100 * last.mean():.0f}%, first "
                                      f"{100 * per_key['first'].mean():.0f}%, random {100 * per_key['random'].mean():.0f}%"
                                      f" ({len(per_key):,} keys)")
        columns = np.stack([last * lower, lower, last * ~lower, ~lower], 1).astype(np.float64)
        out["last_hurts_more_in_lower"] = bootstrap(columns, lambda s: s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3],
                                                    "keys", n_boot, seed)
        details["last_hurts_more_in_lower"] = (f"last token: {100 * last[lower].mean():.0f}% (lower layers) vs "
                                               f"{100 * last[~lower].mean():.0f}% (upper layers)"
                                               if lower.any() and (~lower).any() else "")
    keys_lower = ((key_patterns["layer"].to_numpy() + 1) / n_layers) <= split
    shallow = key_patterns["shallow_token"].to_numpy(np.float64)
    out["shallow_lower"] = bootstrap(np.stack([shallow * keys_lower, keys_lower, shallow * ~keys_lower,
                                               ~keys_lower], 1).astype(np.float64),
                                     lambda s: s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3], "keys", n_boot, seed)
    details["shallow_lower"] = (f"shared-last-token share {shallow[keys_lower].mean():.2f} (lower) vs "
                                f"{shallow[~keys_lower].mean():.2f} (upper)" if keys_lower.any() and (~keys_lower).any()
                                else "")
    topical = key_patterns["topic_concentration"].notna().to_numpy()
    topic = key_patterns["topic_concentration"].fillna(0).to_numpy(np.float64)
    up, low = topical & ~keys_lower, topical & keys_lower
    out["semantic_upper"] = bootstrap(np.stack([topic * up, up, topic * low, low], 1).astype(np.float64),
                                      lambda s: s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3], "keys", n_boot, seed)
    details["semantic_upper"] = (f"topic concentration {topic[up].mean():.3f} (upper) vs {topic[low].mean():.3f} "
                                 f"(lower), {int(topical.sum()):,} keys with >= 5 labelled prefixes"
                                 if up.any() and low.any() else "")
    return out, details


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
           "load_cached_triggers", "save_snapshot_state", "load_snapshot_state",
           "prepare_sentences", "corpus_fingerprint", "plan_batches", "trigger_table", "trigger_html",
           "read_coefficients", "removal_experiment", "removal_summary", "key_measures", "key_pattern_measures",
           "random_triggers", "layer_pattern_measures", "key_pattern_table", "pattern_trend", "section3_measures",
           "trigger_request", "trigger_examples_from_state", "save_trigger_examples", "read_annotations",
           "summarise_annotations", "covered_ranks", "ANNOTATION_COLUMNS", "PATTERN_KINDS"]
