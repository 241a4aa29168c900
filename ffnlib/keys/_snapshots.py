"""Mining results on disk and corpus-prefix snapshots: saved, loaded, and read back as trigger examples."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import ParameterError
from ..batching import doubling_sizes
from ..mining import EMPTY, MAX_POSITION, POSITION_BITS, TopKState, json_normal
from ..storage import atomic_write_bytes, load_result, read_json, save_result, sha256_bytes, write_json
from ._examples import TriggerExamples
from ._request import snapshot_request

__all__ = ["keep_snapshot", "save_snapshot_state", "load_snapshot_state", "load_cached_triggers", "snapshot_sizes",
           "trigger_snapshot", "trigger_examples_from_state", "save_trigger_examples", "load_trigger_examples",
           "state_frame"]


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
        if meta.get("request") != json_normal(request) or (plan is not None and meta.get("plan") != json_normal(plan)):
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
    return TriggerExamples(state_frame(state, table), sentence_frame, request, dict(stats or {}))


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


def state_frame(state: TopKState, table: pd.DataFrame) -> pd.DataFrame:
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
