"""Connecting to a Dask cluster: the ``cluster`` argument checked, a local cluster started (and closed), and the
environment variables a Dask nanny writes restored afterwards."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Iterator

from ..config import check_int
from ..errors import ParameterError
from ..progress import say

__all__ = ["ALLOWED_FAILURES", "check_cluster", "environ_snapshot", "restore_environ", "connect"]

ALLOWED_FAILURES = 3  # a shard may lose this many workers before the run fails (Dask's default)
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


def environ_snapshot() -> dict[str, str | None]:
    """This process's values of the variables a Dask nanny writes into ``os.environ`` before it spawns a
    worker (``OMP_NUM_THREADS=1``, ``MALLOC_TRIM_THRESHOLD_``, ...): they would leak into every program this
    process starts later (a notebook kernel would run torch on one thread)."""
    import dask

    names = set(dask.config.get("distributed.nanny.pre-spawn-environ", {})) | {"PYTHONHASHSEED"}
    return {name: os.environ.get(name) for name in names}


def restore_environ(saved: dict[str, str | None]) -> None:
    """Put back the variables :func:`environ_snapshot` saved (removing those that were not set)."""
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
        saved, local, client = environ_snapshot(), None, None
        try:
            with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                                  # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ for its workers, which makes every
                                  # large tensor a fresh mmap: torch on CPU runs ~1.5x slower. Not set here
                                  # (unless an earlier nanny left it in os.environ: _tune_malloc undoes it)
                                  "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                local = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                     dashboard_address=":0", silence_logs=logging.ERROR)  # any free port
            client = Client(local)
            say(f"Started a Dask LocalCluster at {local.scheduler_address} with {n_workers} worker processes.",
                 progress)
            yield client
        finally:
            if client is not None:
                client.close()
            if local is not None:
                local.close()
            restore_environ(saved)
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
    say(f"Connected to the Dask scheduler at {client.scheduler.address} ({workers} workers now"
         f"{'; the shards wait for workers to join' if workers == 0 else ''}).", progress)
    try:
        yield client
    finally:
        client.close()
