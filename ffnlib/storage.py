"""Atomic writes, checksummed manifests and cached results.

Every file ffnlib writes goes to a temporary file in the same folder first and is then renamed into
place, so an interrupted run never leaves a half-written file behind. A *result* is a Parquet file
plus a JSON manifest that records what produced it (model, corpus, parameters, library versions)
and the SHA-256 of the Parquet file. A cached result is reused only when the requested manifest
matches and the checksum verifies; otherwise the user is told why and it is recomputed.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .errors import ResultsError

__all__ = ["CACHE_ENV", "slug", "cache_dir", "ensure_dir", "atomic_write_bytes", "atomic_write", "write_json", "read_json",
           "sha256_file", "sha256_bytes", "fingerprint", "library_versions", "write_parquet", "save_result",
           "load_result"]

CACHE_ENV = "FFNLIB_CACHE"


def slug(name: str) -> str:
    """The folder name of a model's results under ``results_dir``: ``slug("org/model") == "org_model"``, and a
    ``.gguf`` file is named by its file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name if name.endswith(".gguf") else name).strip("_")


def cache_dir() -> Path:
    """The user cache folder (``$FFNLIB_CACHE`` or ``~/.cache/ffnlib``), created if missing."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ffnlib")
    return ensure_dir(root)


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) and check it is writable, with a clear error if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"Cannot create the folder {path}: {exc.strerror}. "
                           "Choose a writable folder (results_dir parameter or FFNLIB_CACHE).") from exc
    if not os.access(path, os.W_OK):
        raise ResultsError(f"The folder {path} is not writable. "
                           "Choose a writable folder (results_dir parameter or FFNLIB_CACHE).")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any]) -> None:
    """Call ``write(fileobj)`` on a temporary file, then rename it to ``path``.

    On any failure (a full disk included) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        if exc.errno == errno.ENOSPC:
            raise ResultsError(f"The disk is full: could not write {path}. Nothing was overwritten; "
                               "free some space (or set results_dir/FFNLIB_CACHE elsewhere) and rerun: "
                               "finished work is kept and resumes.") from exc
        raise ResultsError(f"Could not write {path}: {exc.strerror or exc}.") from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ResultsError(f"Could not read {path}: {exc}") from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (used to name cached results)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())[:16]


def library_versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    from . import __version__

    return {"ffnlib": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "pandas": pd.__version__, "numpy": numpy.__version__}


def write_parquet(path: str | os.PathLike, frame: pd.DataFrame) -> str:
    """Write ``frame`` to ``path`` atomically and return the file's SHA-256."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def save_result(folder: str | os.PathLike, name: str, frame: pd.DataFrame, manifest: dict) -> Path:
    """Persist ``frame`` as ``folder/name.parquet`` with ``folder/name.manifest.json``.

    The manifest records ``manifest`` (what produced the result), library versions, the row count
    and the Parquet file's checksum. The Parquet file is written first, the manifest last, so a
    result without a manifest is never taken as finished.
    """
    folder = ensure_dir(folder)
    path = folder / f"{name}.parquet"
    checksum = write_parquet(path, frame)
    write_json(folder / f"{name}.manifest.json",
               {"request": manifest, "versions": library_versions(), "rows": len(frame),
                "file": path.name, "sha256": checksum})
    return path


def load_result(folder: str | os.PathLike, name: str, manifest: dict) -> pd.DataFrame | None:
    """Return the cached result if its manifest matches ``manifest`` and its checksum verifies.

    Returns ``None`` (after a warning that names the file and the reason) when the result is
    missing, was produced by another request, or is truncated/corrupt: the caller then recomputes.
    """
    folder = Path(folder)
    path, mpath = folder / f"{name}.parquet", folder / f"{name}.manifest.json"
    if not mpath.exists() or not path.exists():
        return None
    try:
        stored = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"Ignoring {mpath}: the manifest is unreadable ({exc}); recomputing.", stacklevel=2)
        return None
    if _normalise(stored.get("request")) != _normalise(manifest):
        return None
    if sha256_file(path) != stored.get("sha256"):
        warnings.warn(f"Ignoring {path}: its checksum does not match the manifest (truncated or "
                      "modified); recomputing.", stacklevel=2)
        return None
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        warnings.warn(f"Ignoring {path}: it cannot be read ({exc}); recomputing.", stacklevel=2)
        return None


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))
