"""Scaling Sections 3 and 5 past one process or machine, with Dask's distributed scheduler.

The single-process analyses (:func:`ffnlib.keys.mine_trigger_examples`,
:func:`ffnlib.aggregation.analyse_aggregation`) walk a fixed *batch plan*: the sentences (examples) cut
into length-sorted batches. Here that plan is cut into **shards**, consecutive runs of its batches,
and each shard is one Dask task that produces a partial result:

- mining: a :class:`ffnlib.mining.TopKState` (the top-k candidates of the shard's sentences), merged
  with :func:`ffnlib.mining.merge` (score, then sentence id, then position: a total order, so the top-k
  of the union does not depend on the order in which shards finish);
- aggregation: the shard's rows (one per example and layer), concatenated and sorted.

Because every batch is exactly a batch of the single-process plan, each is computed with the same
tensor shapes, and the merged result equals the single-process one row for row, bit for bit, **when
both run on the same kind of device with the same number of torch threads per process** (float
reductions depend on the thread count; the tests compare at 1 thread each, the default here).

- ``cluster``: ``"local"`` starts a :class:`distributed.LocalCluster` on this machine (``n_workers``
  processes, one task thread each); a scheduler address (``"tcp://host:8786"``) connects to a running
  cluster; a ``distributed.Client`` or a cluster object (e.g. ``dask_jobqueue.SLURMCluster``) is used
  as it is. See docs/scaling.md.
- Each worker process loads the model once (by name or path, on ``device``) and keeps it in a
  per-process cache; ``torch_threads`` torch threads per worker.
- With ``out_dir`` (on storage every worker and the client can read: the same path everywhere),
  finished shards are saved as Parquet with manifests; a rerun computes only the missing ones, and
  the merged result is saved exactly as the single-process run saves it (same name and manifest: either
  run reuses the other's result).
- A worker that dies in the middle of a shard loses only that shard: Dask reschedules it on another
  worker (up to ``distributed.scheduler.allowed-failures`` times, 3 by default).

Notebooks call :func:`mine` and :func:`aggregate`, which run the single-process function when
``cluster`` is None.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from . import aggregation as _aggregation
from . import keys as _keys
from . import mining as _mining
from .config import check_int
from .errors import FFNLibError, ParameterError, ResultsError
from .progress import say as _say
from .storage import ensure_dir, load_result, save_result

log = logging.getLogger(__name__)

ALLOWED_FAILURES = 3  # a shard may lose this many workers before the run fails (Dask's default)
MIN_SHARD_TOKENS = 1 << 15  # automatic shard size: at least this many padded tokens ...
MAX_SHARD_TOKENS = 1 << 20  # ... at most this many ...
TARGET_SHARDS = 16  # ... and otherwise the plan cut into about this many shards
_ADDRESS = re.compile(r"^[a-z][a-z0-9+]*://\S+$|^[\w.\-\[\]]+:\d+$")  # tcp://host:8786, or host:8786


# =====================================================================================================
# Connecting to a cluster
# =====================================================================================================
def _cluster_error(cluster) -> ParameterError:
    return ParameterError(
        f"cluster must be None (one process, no Dask), 'local' (a Dask LocalCluster on this machine), a "
        f"scheduler address such as 'tcp://10.0.0.5:8786', a distributed.Client, or a Dask cluster object "
        f"(e.g. dask_jobqueue.SLURMCluster(...)); got {cluster!r}. See docs/scaling.md.")


def check_cluster(cluster) -> None:
    """Raise :class:`ParameterError` unless ``cluster`` is a value :func:`connect` accepts (or None)."""
    if cluster is None or cluster == "local":
        return
    if isinstance(cluster, str):
        if not _ADDRESS.match(cluster.strip()):
            raise _cluster_error(cluster)
        return
    from distributed import Client

    if isinstance(cluster, Client) or hasattr(cluster, "scheduler_address"):
        return
    raise _cluster_error(cluster)


def _environ_snapshot() -> dict[str, str | None]:
    """This process's values of the variables a Dask nanny writes into ``os.environ`` before it spawns a
    worker (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_, ...): they would leak into every program this
    process starts later (a notebook kernel would run torch on one thread)."""
    import dask

    names = set(dask.config.get("distributed.nanny.pre-spawn-environ", {})) | {"PYTHONHASHSEED"}
    return {name: os.environ.get(name) for name in names}


def _restore_environ(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def connect(cluster="local", n_workers: int = 2, connect_timeout: float = 30.0,
            progress: bool = True) -> Iterator:
    """A ``distributed.Client`` for ``cluster`` (see :func:`check_cluster`); what it starts it closes.

    ``"local"``: a ``LocalCluster`` of ``n_workers`` worker processes with one task thread each (each
    worker holds one model; torch's own threads are set per task, see ``torch_threads``). An address:
    connect within ``connect_timeout`` seconds, else :class:`ParameterError`.
    """
    import dask
    from distributed import Client, LocalCluster

    if cluster is None:
        raise ParameterError("cluster=None means no cluster: call the single-process function (or "
                             "ffnlib.distributed.mine / aggregate, which do so for None).")
    check_cluster(cluster)
    n_workers = check_int("n_workers", n_workers)
    if cluster == "local":
        saved, local, client = _environ_snapshot(), None, None
        try:
            with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                                  # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ for its workers, which makes every
                                  # large tensor a fresh mmap: torch on CPU runs ~1.5x slower. Not set here
                                  # (unless an earlier nanny left it in os.environ: _tune_malloc undoes it)
                                  "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                local = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                     dashboard_address=":0", silence_logs=logging.ERROR)  # any free port
            client = Client(local)
            _say(f"Started a Dask LocalCluster at {local.scheduler_address} with {n_workers} worker processes.",
                 progress)
            yield client
        finally:
            if client is not None:
                client.close()
            if local is not None:
                local.close()
            _restore_environ(saved)
        return
    if isinstance(cluster, Client):
        yield cluster
        return
    if isinstance(cluster, str):
        try:
            client = Client(cluster, timeout=f"{float(connect_timeout)}s")
        except (OSError, TimeoutError) as exc:
            raise ParameterError(
                f"Could not connect to the Dask scheduler at {cluster!r} within {connect_timeout:g} s "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Is the scheduler running "
                f"(`dask scheduler`) and reachable from here? Use cluster='local' for a cluster on this "
                f"machine, or cluster=None for one process.") from exc
    else:  # a cluster object (LocalCluster, dask_jobqueue.SLURMCluster, ...)
        client = Client(cluster)
    workers = len(client.scheduler_info().get("workers", {}))
    _say(f"Connected to the Dask scheduler at {client.scheduler.address} ({workers} workers now"
         f"{'; the shards wait for workers to join' if workers == 0 else ''}).", progress)
    try:
        yield client
    finally:
        client.close()


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
_PAUSE: dict = {}  # tests: see _arm_pause


def model_ref(loaded, device: str | None, torch_threads: int) -> ModelRef:
    """What a worker needs to load ``loaded`` itself (an embedded name, a .gguf path, a folder or a hub id)."""
    from .models import EMBEDDED_MODELS

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
    from .models import load_model

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


def _arm_pause(folder: str) -> None:
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
# Shards
# =====================================================================================================
def plan_shards(batch_tokens: Sequence[int], shard_tokens: int, cuts: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Cut a batch plan into shards: consecutive runs ``(first, end)`` of batches whose padded tokens add
    up to at most ``shard_tokens`` (a batch larger than that is a shard of its own). A shard also ends at
    every batch index in ``cuts`` (the ends of the corpus prefixes that mining snapshots)."""
    shard_tokens = check_int("shard_tokens", shard_tokens)
    cuts = set(int(c) for c in cuts)
    shards, first, total = [], 0, 0
    for index, cost in enumerate(batch_tokens):
        if index > first and (total + int(cost) > shard_tokens or index in cuts):
            shards.append((first, index))
            first, total = index, 0
        total += int(cost)
    if len(batch_tokens) > first:
        shards.append((first, len(batch_tokens)))
    return shards


def auto_shard_tokens(total_tokens: int) -> int:
    """Default shard size: the plan in about 16 shards, each 32Ki..1Mi padded tokens (deterministic in
    the inputs, so a rerun finds the same shards whatever the cluster's size)."""
    return int(min(MAX_SHARD_TOKENS, max(MIN_SHARD_TOKENS, math.ceil(total_tokens / TARGET_SHARDS))))


def _shard_frame(scores: np.ndarray, keys: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"score": scores.reshape(-1).astype(np.float32), "key": keys.reshape(-1).astype(np.int64)})


def _mine_shard(ref: ModelRef, spec: dict, token_ids: list, sentence_ids: np.ndarray, batches: list,
                save: dict | None) -> dict:
    """One mining shard (runs on a worker): the top-k state of its batches, saved to ``save`` if given."""
    started, cpu_started = time.perf_counter(), time.process_time()
    with _MODEL_LOCK:
        loads = _COUNTS["loads"]
        loaded = worker_model(ref)
        load_seconds = time.perf_counter() - started if _COUNTS["loads"] > loads else 0.0
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
    _COUNTS["shards"] += 1
    return {"scores": scores, "keys": keys, "tokens": tokens, "padded": padded, "load_seconds": load_seconds,
            "seconds": time.perf_counter() - started - load_seconds, "cpu_seconds": time.process_time() - cpu_started,
            "pid": os.getpid()}


def _aggregate_shard(ref: ModelRef, examples: pd.DataFrame, batches: list, settings: dict, tables: dict,
                     save: dict | None) -> dict:
    """One aggregation shard (runs on a worker): the rows of its batches, saved to ``save`` if given."""
    started, cpu_started = time.perf_counter(), time.process_time()
    with _MODEL_LOCK:
        loads = _COUNTS["loads"]
        loaded = worker_model(ref)
        load_seconds = time.perf_counter() - started if _COUNTS["loads"] > loads else 0.0
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
    _COUNTS["shards"] += 1
    tokens = int(sum(int(examples["position"].iat[i]) + 1 for batch in batches for i in batch))
    return {"frame": frame, "tokens": tokens, "load_seconds": load_seconds,
            "seconds": time.perf_counter() - started - load_seconds, "cpu_seconds": time.process_time() - cpu_started,
            "pid": os.getpid()}


def _run_shards(client, function, shards: list[tuple[int, int]], missing: set[int], build, cached: dict,
                on_result, desc: str, progress: bool) -> list[dict]:
    """Submit ``function(*build(index))`` for the ``missing`` shards; feed each result (the ``cached``
    ones first) to ``on_result(index, result)`` as it comes. Returns the computed shards' timings."""
    from distributed import KilledWorker, as_completed
    from .progress import tqdm

    bar = tqdm(total=len(shards), desc=desc, unit="shard", disable=not progress)
    for index in sorted(cached):
        on_result(index, cached.pop(index))
        bar.update(1)
    token = uuid.uuid4().hex[:8]
    futures = {}
    for index in sorted(missing):
        futures[client.submit(function, *build(index), key=f"{desc.replace(' ', '-')}-{token}-{index:05d}",
                              pure=False)] = index
    timings = []
    try:
        for future in as_completed(list(futures)):
            index = futures[future]
            try:
                result = future.result()
            except KilledWorker as exc:
                raise ResultsError(
                    f"Shard {index} was on more than {ALLOWED_FAILURES} workers that died while computing it ({exc}). "
                    f"Check the workers' memory and logs; finished shards are kept in out_dir, so a rerun "
                    f"computes only the missing ones.") from exc
            future.release()
            timings.append({"shard": index, "first_batch": shards[index][0], "end_batch": shards[index][1],
                            **{k: result.pop(k) for k in ("tokens", "seconds", "cpu_seconds", "load_seconds", "pid")}})
            on_result(index, result)
            bar.update(1)
    finally:
        bar.close()
        for future in futures:
            future.release()
    return sorted(timings, key=lambda t: t["shard"])


def _cluster_info(client, shards, computed: list[dict], shard_tokens: int, started: float) -> dict:
    return {"address": client.scheduler.address, "workers": len(client.scheduler_info().get("workers", {})),
            "shard_tokens": shard_tokens, "shards": len(shards), "computed_shards": [t["shard"] for t in computed],
            "cached_shards": len(shards) - len(computed), "shard_timings": computed,
            "seconds": time.perf_counter() - started}


# =====================================================================================================
# Section 3 on a cluster
# =====================================================================================================
def mine_trigger_examples_on_cluster(loaded, sentences: pd.DataFrame, k: int = 50, per_sentence: str = "max",
                                     negative: bool | None = None, layers=None, batch_tokens: int = 2048,
                                     checkpoint_every: int = 1000, out_dir=None, progress: bool = True, *,
                                     cluster="local", n_workers: int = 2, torch_threads: int = 1,
                                     device: str | None = None, shard_tokens: int | None = None,
                                     keep_shards: bool = False, connect_timeout: float = 30.0,
                                     snapshot_floor="auto") -> _keys.TriggerExamples:
    """:func:`ffnlib.keys.mine_trigger_examples` on a Dask cluster: same parameters, same result.

    The batch plan is cut into shards of about ``shard_tokens`` padded tokens (default
    :func:`auto_shard_tokens`); each worker mines its shards' top-k states and the client merges them.
    ``checkpoint_every`` is accepted for the same signature; shards are the checkpoints here. The
    result's ``stats["cluster"]`` says how the run went (shards, which were computed, per-shard
    seconds). See the module docstring for ``cluster``, ``device``, ``torch_threads``, ``out_dir``.

    Snapshots (``snapshot_floor``): a shard never spans the end of a snapshot's corpus prefix, and the
    shards are merged in plan order, so every snapshot falls on a shard boundary and equals the
    single-process snapshot (and a run on that prefix), bit for bit.
    """
    started = time.perf_counter()
    check_cluster(cluster)
    req = _keys.trigger_request(loaded, sentences, k, per_sentence, negative, layers, batch_tokens, checkpoint_every,
                                snapshot_floor)
    ref = model_ref(loaded, device, torch_threads)
    table, request, name, layer_list, signs = req.table, req.request, req.name, req.layers, req.signs
    folder = ensure_dir(out_dir) if out_dir is not None else None
    if folder is not None:
        cached = _keys.load_cached_triggers(folder, name, request, table)
        if cached is not None:
            _say(f"Loaded cached trigger examples from {folder / name} (same model, corpus and parameters); "
                 "not recomputing.", progress)
            return cached

    lengths = np.array([len(t) for t in table["token_ids"]])
    sizes = _mining.doubling_sizes(len(table), request["snapshot_floor"])
    batches, ends = _mining.plan_prefix_batches(lengths, req.batch_tokens, sizes)
    costs = [len(rows) * int(lengths[rows].max()) for rows in batches]
    shard_tokens = auto_shard_tokens(sum(costs)) if shard_tokens is None else check_int("shard_tokens",
                                                                                             shard_tokens)
    shards = plan_shards(costs, shard_tokens, cuts=ends[:-1])
    snapshot_after = {shard: size for size, end in zip(sizes[:-1], ends[:-1])
                      for shard, (_, shard_end) in enumerate(shards) if shard_end == end}
    pad_id = loaded.pad_id
    spec = {"layers": layer_list, "signs": signs, "k": req.k, "per_sentence": req.per_sentence,
            "pad_id": int(pad_id)}
    shape = (len(signs), len(layer_list), loaded.adapter.d_ff, req.k)
    shard_folder = folder / f"{name}.shards" if folder is not None else None

    def shard_save(index: int) -> dict | None:
        if shard_folder is None:
            return None
        first, end = shards[index]
        return {"folder": str(shard_folder), "name": f"shard-{index:05d}-of-{len(shards):05d}",
                "manifest": {**request, "batch_tokens": req.batch_tokens, "plan": _keys.MINING_PLAN,
                             "shard": index, "shards": len(shards),
                             "first_batch": first, "end_batch": end, "part": "top-k state"}}

    cached_states = {}
    for index in range(len(shards)):
        save = shard_save(index)
        frame = load_result(save["folder"], save["name"], save["manifest"]) if save else None
        if frame is not None and len(frame) == math.prod(shape):
            cached_states[index] = {"scores": frame["score"].to_numpy(np.float32).reshape(shape),
                                    "keys": frame["key"].to_numpy(np.int64).reshape(shape)}
    if cached_states:
        _say(f"Reusing {len(cached_states)} of {len(shards)} finished shards from {shard_folder}.", progress)
    missing = set(range(len(shards))) - set(cached_states)
    token_ids = table["token_ids"].tolist()
    sentence_ids = table["sentence_id"].to_numpy(np.int64)

    def build(index: int) -> tuple:
        first, end = shards[index]
        rows = np.concatenate(batches[first:end])
        local = np.empty(len(table), dtype=np.int64)
        local[rows] = np.arange(len(rows))
        return (ref, spec, [token_ids[r] for r in rows], sentence_ids[rows],
                [local[b] for b in batches[first:end]], shard_save(index))

    merged: list[_mining.TopKState | None] = [None]
    waiting: dict[int, _mining.TopKState] = {}  # shards done out of plan order, until their turn
    snapshots: dict[int, _mining.TopKState] = {}
    done = {"shards": 0, "tokens": 0}

    def on_result(index: int, result: dict) -> None:
        """Merge the shards in plan order (the merge is exact in any order; this order makes every prefix
        of shards, so every snapshot, available as it completes)."""
        waiting[index] = _mining.TopKState(layer_list, signs, torch.tensor(result["scores"]),
                                           torch.tensor(result["keys"]))
        while done["shards"] in waiting:
            shard = done["shards"]
            part = waiting.pop(shard)
            merged[0] = part if merged[0] is None else _mining.merge(merged[0], part)
            first, end = shards[shard]
            done["tokens"] += int(sum(lengths[rows].sum() for rows in batches[first:end]))
            done["shards"] += 1
            if shard in snapshot_after:
                _keys.keep_snapshot(snapshots, snapshot_after[shard], merged[0], table, request,
                                     {"tokens": done["tokens"]}, folder,
                                     {"batch_tokens": req.batch_tokens, "plan": _keys.MINING_PLAN})

    with connect(cluster, n_workers, connect_timeout, progress) if missing else contextlib.nullcontext() as client:
        computed = _run_shards(client, _mine_shard, shards, missing, build, cached_states, on_result,
                               "Mining shards", progress)
        info = (_cluster_info(client, shards, computed, shard_tokens, started) if client is not None else
                {"shards": len(shards), "computed_shards": [], "cached_shards": len(shards),
                 "shard_tokens": shard_tokens, "shard_timings": []})
    seconds = time.perf_counter() - started
    total_tokens = int(lengths.sum())
    padded = sum(costs) - total_tokens
    stats = {"sentences": len(table), "tokens": total_tokens, "batches": len(batches),
             "padding_share": padded / max(sum(costs), 1), "seconds": seconds,
             "tokens_per_second": total_tokens / max(seconds, 1e-9), "resumed_from": 0, "from_cache": False,
             "cluster": info, "snapshots": sizes[:-1]}
    result = _keys.trigger_examples_from_state(merged[0], table, request, stats)
    result.snapshots = snapshots
    if folder is not None:
        _keys.save_trigger_examples(folder, name, result)
        if not keep_shards:
            shutil.rmtree(shard_folder, ignore_errors=True)
        _say(f"Saved the trigger examples to {folder / name}.parquet ({total_tokens} tokens in {len(shards)} shards, "
             f"{len(info['computed_shards'])} computed, {stats['tokens_per_second']:.0f} tokens/s).", progress)
    return result


# =====================================================================================================
# Section 5 on a cluster
# =====================================================================================================
def analyse_aggregation_on_cluster(loaded, n_examples: int = 4000, seed: int = 0, active_threshold: float = 0.1,
                                   active_rule: str = "auto", norm_share: float = 0.9, batch_tokens: int = 2048,
                                   out_dir: str | Path | None = None, corpus="wiki", progress: bool = True,
                                   value_cache: str | Path | None = None, *, cluster="local", n_workers: int = 2,
                                   torch_threads: int = 1, device: str | None = None,
                                   shard_tokens: int | None = None, keep_shards: bool = False,
                                   connect_timeout: float = 30.0) -> _aggregation.AggregationResult:
    """:func:`ffnlib.aggregation.analyse_aggregation` on a Dask cluster: same parameters, same result.

    The examples, the values' top tokens and the value norms are computed here (the client) as the
    single-process run computes them and sent to the workers once; the batch plan is cut into shards of
    about ``shard_tokens`` padded tokens, and the shards' rows are concatenated. ``info["cluster"]``
    says how the run went. See the module docstring for the other parameters.
    """
    started = time.perf_counter()
    check_cluster(cluster)
    settings = _aggregation.check_settings(loaded, active_threshold, active_rule, norm_share, batch_tokens)
    ref = model_ref(loaded, device, torch_threads)
    examples, manifest, name = _aggregation.aggregation_request(loaded, n_examples, seed, corpus, settings)
    adapter = loaded.adapter
    cached = _aggregation.load_cached_aggregation(out_dir, name, manifest, examples, progress)
    if cached is not None:
        return cached

    lengths = examples["position"].to_numpy() + 1
    batches = _aggregation.make_batches(lengths, settings["batch_tokens"])
    costs = [len(b) * int(lengths[b].max()) for b in batches]
    shard_tokens = auto_shard_tokens(sum(costs)) if shard_tokens is None else check_int("shard_tokens",
                                                                                             shard_tokens)
    shards = plan_shards(costs, shard_tokens)
    shard_folder = Path(out_dir) / f"{name}.shards" if out_dir is not None else None

    def shard_save(index: int) -> dict | None:
        if shard_folder is None:
            return None
        first, end = shards[index]
        return {"folder": str(shard_folder), "name": f"shard-{index:05d}-of-{len(shards):05d}",
                "manifest": {**manifest, "shard": index, "shards": len(shards), "first_batch": first,
                             "end_batch": end}}

    parts: dict[int, pd.DataFrame] = {}
    cached_parts = {}
    for index in range(len(shards)):
        save = shard_save(index)
        frame = load_result(save["folder"], save["name"], save["manifest"]) if save else None
        if frame is not None:
            cached_parts[index] = {"frame": frame}
    if cached_parts:
        _say(f"Reusing {len(cached_parts)} of {len(shards)} finished shards from {shard_folder}.", progress)
    missing = set(range(len(shards))) - set(cached_parts)

    tables = None
    if missing:
        top_positive, top_negative = _aggregation.memory_top_tokens(
            loaded, negative=adapter.gated or settings["active_rule"] == "relative", cache=value_cache,
            progress=progress, projections=out_dir)
        value_norms = torch.stack([adapter.written_value_norms(layer) for layer in range(adapter.n_layers)])
        tables = {"top_positive": top_positive.cpu().numpy(),
                  "top_negative": None if top_negative is None else top_negative.cpu().numpy(),
                  "value_norms": value_norms.cpu().numpy()}

    def on_result(index: int, result: dict) -> None:
        parts[index] = result["frame"]

    with connect(cluster, n_workers, connect_timeout, progress) if missing else contextlib.nullcontext() as client:
        if client is not None:
            shared = client.scatter(tables, broadcast=True)

        def build(index: int) -> tuple:
            first, end = shards[index]
            rows = np.concatenate(batches[first:end])
            local = np.empty(len(examples), dtype=np.int64)
            local[rows] = np.arange(len(rows))
            subset = examples.iloc[rows].reset_index(drop=True)
            return (ref, subset, [local[b] for b in batches[first:end]], settings, shared, shard_save(index))

        computed = _run_shards(client, _aggregate_shard, shards, missing, build, cached_parts, on_result,
                               "Section 5 shards", progress)
        info = (_cluster_info(client, shards, computed, shard_tokens, started) if client is not None else
                {"shards": len(shards), "computed_shards": [], "cached_shards": len(shards),
                 "shard_tokens": shard_tokens, "shard_timings": []})
    frame = pd.concat([parts[i] for i in range(len(shards))], ignore_index=True)
    frame = frame.sort_values(["example", "layer"], kind="stable").reset_index(drop=True)
    if out_dir is not None:
        save_result(out_dir, name, frame, manifest)
        if not keep_shards:
            shutil.rmtree(shard_folder, ignore_errors=True)
        if progress and info["cached_shards"]:
            print(f"[ffnlib] resumed: {info['cached_shards']} of {len(shards)} shards came from {shard_folder}")
    return _aggregation.AggregationResult(frame, examples, manifest, info={
        "batches": len(batches), "resumed": sum(shards[i][1] - shards[i][0] for i in cached_parts),
        "cluster": info})


# =====================================================================================================
# What the notebooks call
# =====================================================================================================
def mine(loaded, sentences: pd.DataFrame, cluster=None, *, n_workers: int = 2, torch_threads: int = 1,
         device: str | None = None, shard_tokens: int | None = None, keep_shards: bool = False,
         connect_timeout: float = 30.0, **kwargs) -> _keys.TriggerExamples:
    """Mine trigger examples in this process (``cluster=None``) or on a Dask cluster (``"local"``, an
    address, a Client or a cluster object). ``kwargs`` are :func:`ffnlib.keys.mine_trigger_examples`'s;
    the cluster options are ignored when ``cluster`` is None."""
    check_cluster(cluster)
    if cluster is None:
        return _keys.mine_trigger_examples(loaded, sentences, **kwargs)
    return mine_trigger_examples_on_cluster(loaded, sentences, cluster=cluster, n_workers=n_workers,
                                            torch_threads=torch_threads, device=device, shard_tokens=shard_tokens,
                                            keep_shards=keep_shards, connect_timeout=connect_timeout, **kwargs)


def aggregate(loaded, cluster=None, *, n_workers: int = 2, torch_threads: int = 1, device: str | None = None,
              shard_tokens: int | None = None, keep_shards: bool = False, connect_timeout: float = 30.0,
              **kwargs) -> _aggregation.AggregationResult:
    """Section 5 in this process (``cluster=None``) or on a Dask cluster. ``kwargs`` are
    :func:`ffnlib.aggregation.analyse_aggregation`'s; the cluster options are ignored when ``cluster``
    is None."""
    check_cluster(cluster)
    if cluster is None:
        return _aggregation.analyse_aggregation(loaded, **kwargs)
    return analyse_aggregation_on_cluster(loaded, cluster=cluster, n_workers=n_workers, torch_threads=torch_threads,
                                          device=device, shard_tokens=shard_tokens, keep_shards=keep_shards,
                                          connect_timeout=connect_timeout, **kwargs)


__all__ = ["mine", "aggregate", "mine_trigger_examples_on_cluster", "analyse_aggregation_on_cluster", "connect",
           "check_cluster", "plan_shards", "auto_shard_tokens", "worker_model", "worker_stats", "ModelRef",
           "model_ref", "ALLOWED_FAILURES"]
