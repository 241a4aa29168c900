"""The worker side of a cluster run: each worker process loads the model once and keeps it, and runs the shard tasks
(a mining shard's top-k state, an aggregation shard's rows), one at a time."""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .. import aggregation as _aggregation
from .. import mining as _mining
from ..config import check_int
from ..errors import FFNLibError, ParameterError
from ..storage import save_result

__all__ = ["ModelRef", "model_ref", "worker_model", "worker_stats", "arm_pause", "mine_shard", "aggregate_shard"]


# =====================================================================================================
# Worker side: the per-process model cache
# =====================================================================================================
@dataclass(frozen=True)
class ModelRef:
    """How a worker loads the client's model: ``load_model(name, device, precision=dtype)``, checked by file hash."""

    name: str
    file_hash: str
    device: str
    dtype: str
    torch_threads: int


_MODELS: dict[tuple, object] = {}  # (name, device, dtype) -> LoadedModel, one per worker process
_MODEL_LOCK = threading.Lock()  # one shard at a time uses a worker's model (hooks are per model)
_COUNTS = {"loads": 0, "shards": 0, "malloc_tuned": False}
_PAUSE: dict = {}  # tests: see arm_pause


def model_ref(loaded, device: str | None, torch_threads: int) -> ModelRef:
    """What a worker needs to load ``loaded`` itself (an embedded name, a .gguf path, a folder or a hub id)."""
    from ..models import EMBEDDED_MODELS

    name = loaded.name if loaded.name in EMBEDDED_MODELS else loaded.source
    if device is None:
        device = loaded.device.type
    if not isinstance(device, str):
        raise ParameterError(f"device must be a string such as 'cpu', 'cuda', 'cuda:1' or 'auto', got {device!r}.")
    if device != "auto":
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ParameterError(f"Unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'.") from exc
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    return ModelRef(str(name), str(loaded.file_hash), device, dtype, check_int("torch_threads", torch_threads))


def _worker_device(device: str) -> str:
    """``"cuda"`` on a worker that sees several GPUs: the GPU numbered by the worker's name, round robin
    (LocalCluster names its workers 0, 1, ...); any other device as given."""
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        try:
            from distributed import get_worker

            name = get_worker().name
        except ValueError:
            name = 0
        if isinstance(name, int) or str(name).isdigit():
            return f"cuda:{int(name) % torch.cuda.device_count()}"
    return device


def _tune_malloc() -> bool:
    """Undo the cost of Dask's ``MALLOC_TRIM_THRESHOLD_`` in this worker process (glibc only).

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to give memory back to the OS).
    Setting it switches off glibc's adaptive mmap threshold, so every tensor above 128 KiB is mapped
    and unmapped afresh: measured here, torch on CPU mines ~1.5x slower. This restores the usual
    behaviour (blocks below 32 MiB come from the heap, trimmed above 64 MiB). Returns whether it did.
    """
    if _COUNTS.get("malloc_tuned") or not os.environ.get("MALLOC_TRIM_THRESHOLD_") or not sys.platform.startswith(
            "linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        tuned = bool(libc.mallopt(-3, 32 << 20) and libc.mallopt(-1, 64 << 20))  # M_MMAP_ / M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False
    _COUNTS["malloc_tuned"] = tuned
    return tuned


def worker_model(ref: ModelRef):
    """The worker process's copy of the model (loaded on first use, then kept); sets torch's threads."""
    from ..models import load_model

    _tune_malloc()
    torch.set_num_threads(ref.torch_threads)  # per calling thread: Dask runs each task in its own thread
    device = _worker_device(ref.device)
    key = (ref.name, device, ref.dtype)
    loaded = _MODELS.get(key)
    if loaded is None:
        try:
            loaded = load_model(ref.name, device=device, precision=ref.dtype)
        except FFNLibError as exc:
            raise ParameterError(
                f"A Dask worker could not load the model {ref.name!r} on {device!r}: {exc} A cluster run needs a "
                f"model every worker can load by itself (an embedded name, a hub id, or a .gguf file or "
                f"folder at the same path on every machine) and the device on every worker.") from exc
        if str(loaded.file_hash) != ref.file_hash:
            raise ParameterError(
                f"The worker loaded {ref.name!r} with weights {loaded.file_hash!r}, but the client's model has "
                f"{ref.file_hash!r}: the machines hold different files. Give every worker the same model.")
        _MODELS[key] = loaded
        _COUNTS["loads"] += 1
    return loaded


def worker_stats() -> dict:
    """This worker process's model cache and shard count (``client.run(worker_stats)`` asks every worker)."""
    return {"pid": os.getpid(), "models": [list(k) for k in _MODELS], **_COUNTS,
            "malloc_trim_threshold": os.environ.get("MALLOC_TRIM_THRESHOLD_")}


def arm_pause(folder: str) -> None:
    """Tests only (run on the workers with ``client.run``): the first shard task, on any worker, that
    finds ``folder/armed`` claims it (an atomic rename), writes its process id to ``folder/pid`` and
    sleeps after its first batch, so that a test can kill that worker in the middle of a shard."""
    _PAUSE["folder"] = folder


def _maybe_pause() -> None:
    folder = _PAUSE.get("folder")
    if not folder:
        return
    try:
        os.rename(os.path.join(folder, "armed"), os.path.join(folder, "claimed"))
    except OSError:
        return  # another task claimed it
    tmp = os.path.join(folder, f".pid.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(folder, "pid"))
    deadline = time.monotonic() + 120  # the test kills us long before; never hang forever
    while time.monotonic() < deadline:
        time.sleep(0.05)


# =====================================================================================================
# Worker side: the shard tasks
# =====================================================================================================
def _shard_frame(scores: np.ndarray, keys: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"score": scores.reshape(-1).astype(np.float32), "key": keys.reshape(-1).astype(np.int64)})


def _worker_model_timed(ref: ModelRef, started: float) -> tuple[object, float]:
    """The worker's model (call with ``_MODEL_LOCK`` held) and the seconds spent loading it (0 when cached)."""
    loads = _COUNTS["loads"]
    loaded = worker_model(ref)
    return loaded, (time.perf_counter() - started if _COUNTS["loads"] > loads else 0.0)


def _shard_done(result: dict, started: float, cpu_started: float, load_seconds: float) -> dict:
    """A shard task's result with its timings (the load time apart), counted in :func:`worker_stats`."""
    _COUNTS["shards"] += 1
    return {**result, "load_seconds": load_seconds, "seconds": time.perf_counter() - started - load_seconds,
            "cpu_seconds": time.process_time() - cpu_started, "pid": os.getpid()}


def mine_shard(ref: ModelRef, spec: dict, token_ids: list, sentence_ids: np.ndarray, batches: list,
               save: dict | None) -> dict:
    """One mining shard (runs on a worker): the top-k state of its batches, saved to ``save`` if given."""
    started, cpu_started = time.perf_counter(), time.process_time()
    with _MODEL_LOCK:
        loaded, load_seconds = _worker_model_timed(ref, started)
        state = _mining.TopKState.empty(spec["layers"], spec["signs"], loaded.adapter.d_ff, spec["k"],
                                        device=loaded.device)
        ids = torch.as_tensor(np.asarray(sentence_ids, dtype=np.int64))
        tokens = padded = 0
        with _mining.hooked(loaded, state, spec["per_sentence"]) as miner, torch.inference_mode():
            for rows in batches:
                batch = miner.mine(loaded.model, [token_ids[r] for r in rows], ids[rows], spec["pad_id"])
                tokens += sum(len(token_ids[r]) for r in rows)
                padded += int(batch.ids.numel())
                _maybe_pause()
            miner.flush()
    scores, keys = state.scores.cpu().numpy(), state.keys.cpu().numpy()
    if save is not None:
        save_result(save["folder"], save["name"], _shard_frame(scores, keys), save["manifest"])
    return _shard_done({"scores": scores, "keys": keys, "tokens": tokens, "padded": padded}, started, cpu_started,
                       load_seconds)


def aggregate_shard(ref: ModelRef, examples: pd.DataFrame, batches: list, settings: dict, tables: dict,
                    save: dict | None) -> dict:
    """One aggregation shard (runs on a worker): the rows of its batches, saved to ``save`` if given."""
    started, cpu_started = time.perf_counter(), time.process_time()
    with _MODEL_LOCK:
        loaded, load_seconds = _worker_model_timed(ref, started)
        device = loaded.device
        top_positive = torch.tensor(tables["top_positive"], device=device)
        top_negative = None if tables["top_negative"] is None else torch.tensor(tables["top_negative"], device=device)
        value_norms = torch.tensor(tables["value_norms"], device=device)
        parts = []
        for batch in batches:
            parts.append(_aggregation.analyse_batch(loaded, examples, batch, settings, top_positive, top_negative,
                                                    value_norms))
            _maybe_pause()
    frame = pd.concat(parts, ignore_index=True)
    if save is not None:
        save_result(save["folder"], save["name"], frame, save["manifest"])
    tokens = int(sum(int(examples["position"].iat[i]) + 1 for batch in batches for i in batch))
    return _shard_done({"frame": frame, "tokens": tokens}, started, cpu_started, load_seconds)
