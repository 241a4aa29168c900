"""Fault injection for the interruption tests (tests/test_interruption.py); never used otherwise.

Python imports ``sitecustomize`` at start-up when this folder is on ``PYTHONPATH``, so these hooks
reach every process of a run: a test's script, the suite, and each notebook's kernel.

``FFNLIB_KILL="<glob>@<n>"``: SIGKILL the whole run at the ``n``-th atomic write in this process whose
file name matches ``<glob>``, before the file is in place: the process group of the first process that
loaded these hooks (the test's command; notebook kernels run in process groups of their own), then
this process's group. ``"<glob>@<n>~half"``: first
leave half of the data in a temporary file, as a write cut short leaves it.

``FFNLIB_WRITE_LOG=<file>``: append the path of every finished atomic write to ``<file>``.
"""

import os

_KILL = os.environ.get("FFNLIB_KILL")
if _KILL:
    os.environ.setdefault("FFNLIB_KILL_PGID", str(os.getpgrp()))  # inherited by every child process
_LOG = os.environ.get("FFNLIB_WRITE_LOG")

if _KILL or _LOG:
    import fnmatch
    import io
    import signal
    from pathlib import Path

    from ffnlib import storage

    _real_atomic_write = storage.atomic_write
    _pattern, _, _rest = (_KILL or "").partition("@")
    _n, _, _how = _rest.partition("~")
    _seen = [0]

    def _atomic_write(path, write):
        path = Path(path)
        if _KILL and fnmatch.fnmatch(path.name, _pattern):
            _seen[0] += 1
            if _seen[0] == int(_n):
                if _how == "half":
                    buffer = io.BytesIO()
                    write(buffer)
                    data = buffer.getvalue()
                    with open(path.parent / f".{path.name}.killed.tmp", "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                os.killpg(int(os.environ["FFNLIB_KILL_PGID"]), signal.SIGKILL)
                os.killpg(os.getpgrp(), signal.SIGKILL)
        _real_atomic_write(path, write)
        if _LOG:
            with open(_LOG, "a") as log:
                log.write(f"{os.getpid()} {path}\n")

    storage.atomic_write = _atomic_write
