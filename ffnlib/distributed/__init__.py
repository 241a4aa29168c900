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

from ._analyses import aggregate, analyse_aggregation_on_cluster, mine, mine_trigger_examples_on_cluster
from ._cluster import ALLOWED_FAILURES, check_cluster, connect, environ_snapshot, restore_environ
from ._shards import MAX_SHARD_TOKENS, MIN_SHARD_TOKENS, TARGET_SHARDS, auto_shard_tokens, plan_shards
from ._worker import ModelRef, arm_pause, model_ref, worker_model, worker_stats

__all__ = ["mine", "aggregate", "mine_trigger_examples_on_cluster", "analyse_aggregation_on_cluster", "connect",
           "check_cluster", "environ_snapshot", "restore_environ", "plan_shards", "auto_shard_tokens", "worker_model",
           "worker_stats", "arm_pause", "ModelRef", "model_ref", "ALLOWED_FAILURES", "MIN_SHARD_TOKENS",
           "MAX_SHARD_TOKENS", "TARGET_SHARDS"]
