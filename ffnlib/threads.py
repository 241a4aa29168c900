"""The CPU thread policy: torch's threads wait *passively* (``OMP_WAIT_POLICY=PASSIVE``) unless you say otherwise.

Why: torch splits each operation over its OpenMP threads, and by default a thread that finishes its share first
*spins* at the barrier. On a quiet machine that saves a wake-up; on a shared one it burns the time slice the other
threads need. It is worst in a Jupyter kernel: Linux's autogroup scheduler shares the CPU between process groups
started with ``setsid``, and Jupyter starts every kernel that way: against one busy process elsewhere the kernel's two threads
share about one core, and each barrier waits out a time slice. Mining ran at 0.03x its quiet speed there (0.26x in
a plain process); with passive waiting 0.67x and 0.74x, at a cost of about 20% on a quiet machine
(``benchmarks/bench_sharing.py``; dated figures in ``benchmarks/README.md``).

The policy:

- **threads**: torch's default, one per core it may run on. ``FFNLIB_THREADS=N`` (or ``OMP_NUM_THREADS``) sets
  another number; :func:`apply_thread_policy` applies ``FFNLIB_THREADS`` in a running process.
- **waiting**: passive. ``import ffnlib`` sets ``OMP_WAIT_POLICY=PASSIVE`` when it is not set yet and torch is not
  loaded yet (the OpenMP runtime reads it once, when torch loads it); ``python -m ffnlib.suite`` passes it to the
  notebooks' kernels. ``OMP_WAIT_POLICY=ACTIVE`` (about 20% faster on a machine of your own) or
  ``FFNLIB_THREAD_POLICY=runtime`` (the OpenMP runtime's own default) override it.
"""

from __future__ import annotations

import os
import sys

__all__ = ["PASSIVE", "set_wait_policy", "apply_thread_policy", "describe_threads"]

PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}


def set_wait_policy(environ=None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` (this process's environment by default) unless it is set or
    ``FFNLIB_THREAD_POLICY=runtime``. Returns whether it set it. In this process it takes effect only if torch has
    not been imported yet."""
    environ = os.environ if environ is None else environ
    if environ.get("FFNLIB_THREAD_POLICY", "passive") == "runtime" or "OMP_WAIT_POLICY" in environ:
        return False
    environ.update(PASSIVE)
    return True


def apply_thread_policy() -> int:
    """Give torch ``FFNLIB_THREADS`` threads when that is set (a positive int); returns torch's thread count."""
    import torch

    wanted = os.environ.get("FFNLIB_THREADS")
    if wanted:
        from .errors import ParameterError

        if not wanted.isdigit() or int(wanted) < 1:
            raise ParameterError(f"FFNLIB_THREADS must be a positive integer, got {wanted!r}.")
        torch.set_num_threads(int(wanted))
    return torch.get_num_threads()


def describe_threads() -> str:
    """One line for a benchmark or a log: threads and the wait policy in effect."""
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else "torch not loaded"
    return f"{threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset (runtime default)')}"
