"""BIG-bench task data, read out of the ``bigbench==1.0.0`` source distribution on PyPI (Apache-2.0).

Two analyses use it, only when asked: notebook 06's Wikidata facts (``qa_wikidata``) and the larger corpus
``"wiki+"`` (``paragraph_segmentation``'s English Wikipedia paragraphs, :mod:`ffnlib.corpus`). The sdist is
358 MB, so :func:`task` downloads it once, caches the JSON of every task in :data:`TASKS` (about 52 MB) in the
user cache, and deletes the archive; later calls read the cache. The data carries BIG-bench's canary: it must
not be used to train models; reading a model's activations on it is fine.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import ParameterError, ResultsError
from .storage import atomic_write_bytes, cache_dir, ensure_dir, read_json

VERSION = "1.0.0"
PYPI_SIMPLE = "https://pypi.org/simple/bigbench/"  # the index pip reads (PEP 691 JSON form)
TASKS = {  # task name -> its file in the sdist
    "qa_wikidata": "bigbench/benchmark_tasks/qa_wikidata/task.json",
    "paragraph_segmentation": "bigbench/benchmark_tasks/paragraph_segmentation/task.json",
}


def download_sdist(folder: Path, version: str = VERSION, timeout: float = 60.0, hint: str = "") -> Path:
    """Download the bigbench sdist (358 MB) from PyPI into ``folder`` and check its SHA-256.

    ``pip download --no-deps bigbench==1.0.0`` cannot do it with pip >= 26: pip prepares the sdist's metadata,
    which declares a direct URL dependency (bleurt @ file://...), and refuses PyPI distributions that do. So
    the file's address and digest are read from PyPI's simple index, as pip reads them (PEP 691), and the
    file is fetched with urllib. ``FFNLIB_PYPI_SIMPLE`` points at another index (a mirror). ``hint``: what
    the caller can do instead, added to the error.
    """
    index = os.environ.get("FFNLIB_PYPI_SIMPLE", PYPI_SIMPLE)
    filename = f"bigbench-{version}.tar.gz"
    target = folder / filename
    partial = folder / f".{filename}.partial"
    try:
        request = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            listing = json.load(response)
        entry = next(f for f in listing["files"] if f["filename"] == filename)
        url, expected = urllib.parse.urljoin(index, entry["url"]), entry["hashes"]["sha256"]
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        partial.unlink(missing_ok=True)
        raise ResultsError(
            f"Could not download {filename} from PyPI ({type(exc).__name__}: {exc}). It is needed once (358 MB; "
            f"then only the task files are kept). {hint}Or put {filename} into {folder} yourself (e.g. pip download "
            f"--no-deps bigbench=={version} with a pip older than 26) and rerun.") from exc
    if digest.hexdigest() != expected:
        partial.unlink(missing_ok=True)
        raise ResultsError(f"The downloaded {filename} does not match PyPI's SHA-256; it was deleted. Rerun.")
    os.replace(partial, target)
    return target


def read_tasks(archive: str | os.PathLike, names) -> dict[str, dict]:
    """The JSON of the tasks ``names`` that the sdist tarball ``archive`` holds (missing ones are left out)."""
    wanted = {TASKS[name]: name for name in names}
    found = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                name = next((n for path, n in wanted.items() if member.name.endswith(path)), None)
                if name is not None:
                    found[name] = json.loads(tar.extractfile(member).read().decode("utf-8"))
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise ResultsError(f"Cannot read the BIG-bench tasks from {archive}: {exc}. Delete the file and retry.") from exc
    return found


def task(name: str, cache: str | os.PathLike | None = None, download: bool = True, hint: str = "") -> dict:
    """The JSON of BIG-bench task ``name`` (one of :data:`TASKS`), from the user cache.

    The first call downloads the sdist (unless ``download=False``: a clear error then), caches every task of
    :data:`TASKS` it holds as JSON, and deletes the archive."""
    if name not in TASKS:
        raise ParameterError(f"Unknown BIG-bench task {name!r}; known: {sorted(TASKS)}.")
    folder = ensure_dir(Path(cache) if cache is not None else cache_dir() / "bigbench")
    cached = folder / f"{name}-{VERSION}.json"
    if not cached.exists():
        archive = folder / f"bigbench-{VERSION}.tar.gz"
        if not archive.exists():
            if not download:
                raise ResultsError(f"The BIG-bench task {name} is not cached ({cached} is missing) and download=False.")
            archive = download_sdist(folder, hint=hint)
        tasks = read_tasks(archive, TASKS)
        if name not in tasks:
            raise ResultsError(f"{archive} has no {TASKS[name]}: is it the bigbench {VERSION} sdist?")
        for other, data in tasks.items():
            atomic_write_bytes(folder / f"{other}-{VERSION}.json", json.dumps(data).encode("utf-8"))
        archive.unlink(missing_ok=True)
    return read_json(cached)


__all__ = ["VERSION", "TASKS", "task", "download_sdist", "read_tasks"]
