"""A suite run's results folder, read back: summaries, tables and cached results found by their manifests.

Every cached result of ffnlib is ``<name>.parquet`` with ``<name>.manifest.json`` (``ffnlib.storage``), and every
notebook's summary records the manifests of the results it used (``summaries/<notebook>.json``, ``"manifests"``),
its random-weights control's too (``"control"``). So a result is found by its request, whatever its file name,
and nothing is recomputed to find it.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import SCALES
from ..errors import ParameterError, ResultsError
from ..precision import run_folder_name
from ..storage import read_json, sha256_file, slug

__all__ = ["RunResults", "open_results"]

# the summaries that name the random-weights control of the run (notebooks that take ``control``)
_CONTROL_SUMMARIES = ("01_keys", "02_values", "03_aggregation", "10_corpus_size")


def _normal(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


@dataclass
class RunResults:
    """One run's results folder (``results_dir/<model>/<scale>``) and its control's
    (``results_dir/controls/<control>/<scale>``), read lazily and kept in memory, so that the cards of many
    memories of one run read each file once. ``folder`` is None when the run has no results at all.

    Usage::

        results = open_results(loaded, "results", scale="ci")
        results.summary("01_keys")            # summaries/01_keys.json, or None
    """

    folder: Path | None
    model: str
    file_hash: str | None = None
    model_keys: tuple = ()  # how the run's cached results name the model (its name; with a precision, its key)
    control_folder: Path | None = None
    control_name: str | None = None
    triggers: object = None  # the run's trigger examples already in memory (open_results(..., triggers=...))
    _memo: dict = field(default_factory=dict, repr=False)

    # ---- files written by the notebooks ---------------------------------------------------------------------
    def summary(self, notebook: str) -> dict | None:
        """``summaries/<notebook>.json`` (the numbers a notebook reports, and the manifests it used), or None."""
        return self.memo(("summary", notebook), lambda: self._json(self._path("summaries", f"{notebook}.json")))

    def table(self, name: str) -> pd.DataFrame | None:
        """``tables/<name>.csv`` (a table a notebook saved for readers), or None."""
        path = self._path("tables", f"{name}.csv")
        return self.memo(("table", name), lambda: pd.read_csv(path) if path and path.exists() else None)

    def manifests(self, control: bool = False) -> dict[str, dict]:
        """Every finished cached result of the run (or of its control): result name -> its request."""
        folder = self.control_folder if control else self.folder

        def index():
            out = {}
            for path in sorted(folder.glob("*.manifest.json")) if folder is not None and folder.is_dir() else []:
                stored = self._json(path) or {}
                if isinstance(stored.get("request"), dict) and stored.get("file"):
                    out[path.name[: -len(".manifest.json")]] = stored["request"]
            return out

        return self.memo(("manifests", control), index)

    def find(self, request: dict | None = None, control: bool = False, **match) -> list[str]:
        """Names of the cached results whose request equals ``request`` (when given) and has the fields of
        ``match`` (e.g. ``analysis="removal"``); the run's own results must also be of this model."""
        wanted = None if request is None else _normal(request)
        names = []
        for name, stored in self.manifests(control).items():
            if wanted is not None and _normal(stored) != wanted:
                continue
            if any(stored.get(key) != value for key, value in match.items()):
                continue
            if not control and stored.get("model") not in (None, self.model, *self.model_keys):
                continue
            names.append(name)
        return names

    def load(self, name: str, control: bool = False, filters=None, columns=None) -> pd.DataFrame | None:
        """The cached result ``name`` (checksum verified once per process), only the rows of ``filters``
        (pyarrow's filters, e.g. ``[("layer", "==", 7)]``: a layer's rows of a large table without reading the
        rest); None when absent or damaged."""
        folder = self.control_folder if control else self.folder
        if folder is None:
            return None
        path = folder / f"{name}.parquet"
        layer = next((value for column, op, value in filters or [] if column == "layer" and op == "=="), None)
        key = ("load", control, name, _normal(filters), _normal(columns))

        def read():
            if not path.exists():
                return None
            if not self.verified(path, folder / f"{name}.manifest.json"):
                warnings.warn(f"Ignoring {path}: its checksum does not match its manifest (truncated or modified); "
                              "the card leaves out what it holds.", stacklevel=3)
                return None
            return pd.read_parquet(path, filters=filters, columns=columns)

        return self.memo(key, read, layer=layer)

    def verified(self, path: Path, manifest: Path) -> bool:
        """Whether ``path``'s SHA-256 is the one its manifest records (computed once per file and process)."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _CHECKED:
            stored = self._json(manifest) or {}
            _CHECKED[key] = stored.get("sha256") == sha256_file(path)
        return _CHECKED[key]

    # ---- the control -------------------------------------------------------------------------------------
    def control_summary(self, notebook: str) -> dict | None:
        """The ``"control"`` part of a notebook's summary (its name and the manifests it used), or None."""
        summary = self.summary(notebook) or {}
        return summary.get("control") if isinstance(summary.get("control"), dict) else None

    # ---- helpers -----------------------------------------------------------------------------------------
    def _path(self, *parts: str) -> Path | None:
        return None if self.folder is None else self.folder.joinpath(*parts)

    def memo(self, key: tuple, compute, layer: int | None = None):
        """``compute()``, once per key: what this object has read is kept for the next card. ``layer``: what it
        holds belongs to that layer (:meth:`forget_layer` drops it)."""
        if layer is not None:
            key = ("layer", int(layer), *key)
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def forget_layer(self, layer: int) -> None:
        """Drop what was read or computed for ``layer`` (its rows, tables and pattern measures), keeping its
        per-memory numbers (value agreement, survival, percentile columns): a reader that walks every layer, as
        the atlas does, then holds one layer's rows at a time."""
        for key in [k for k in self._memo if k[:2] == ("layer", int(layer)) and k[2] not in _PER_MEMORY]:
            del self._memo[key]

    @staticmethod
    def _json(path: Path | None):
        if path is None or not path.exists():
            return None
        try:
            return read_json(path)
        except ResultsError:
            return None


_CHECKED: dict = {}  # (path, size, mtime) -> checksum verified
# what a layer keeps after forget_layer: one number (or a few) per memory
_PER_MEMORY = {"agreement", "control_agreement", "value_measures", "control_value_measures", "top_coefficients",
               "key_sides", "first_survival", "layer_survival"}


def _folder_name(loaded, scale: str) -> str:
    """A run's folder under ``results_dir/<model>/``: the scale, and the precision when it is not float32."""
    return run_folder_name(scale, loaded.precision)


def _run_folder(loaded, results: Path, scale: str | None) -> Path | None:
    """``results`` itself when it is a run's folder, else ``results/<model>/<scale>``."""
    if (results / "summaries").is_dir() or any(results.glob("*.manifest.json")):
        return results
    model_folder = results / slug(loaded.name)
    if scale is not None:
        return model_folder / _folder_name(loaded, scale)
    names = {_folder_name(loaded, s) for s in SCALES}
    runs = sorted(p.name for p in model_folder.iterdir() if p.is_dir() and p.name in names) \
        if model_folder.is_dir() else []
    if len(runs) > 1:
        raise ParameterError(f"{model_folder} holds the results of several scales ({', '.join(runs)}): pass "
                             "scale=... to choose one.")
    return model_folder / runs[0] if runs else None


def _control(run: RunResults) -> tuple[Path | None, str | None]:
    """The control's folder and name, as the run's summaries name it (``Run.control``: under
    ``results_dir/controls/<control>/<scale>``); none when no summary names one (a run with ``control="none"``)."""
    if run.folder is None:
        return None, None
    for notebook in _CONTROL_SUMMARIES:
        name = (run.control_summary(notebook) or {}).get("name")
        folder = run.folder.parent.parent / "controls" / str(name) / run.folder.name
        if name and folder.is_dir():
            return folder, name
    return None, None


def open_results(loaded, results, scale: str | None = None, triggers=None) -> RunResults:
    """The results of ``loaded``'s run: ``results`` is a run's folder (``results_dir/<model>/<scale>``), a
    ``results_dir`` (then ``scale`` picks the run; it may be left out when there is only one), or a
    :class:`RunResults` already open (returned as it is). A folder without results gives a :class:`RunResults`
    whose every section is missing. ``triggers``: the run's trigger examples when already loaded (a
    ``ffnlib.keys.TriggerExamples`` of the mining its notebooks used): cards then take a layer's rows from them
    instead of reading them (used only when their manifest is the cached mining's)."""
    if isinstance(results, RunResults):
        if triggers is not None and results.triggers is None:
            results.triggers = triggers
        return results
    if not isinstance(results, (str, os.PathLike)):
        raise ParameterError(f"results must be a folder (str or Path) or a RunResults, got {type(results).__name__}.")
    path = Path(results).expanduser()
    folder = _run_folder(loaded, path, scale) if path.is_dir() else None
    run = RunResults(folder=folder if folder is not None and folder.is_dir() else None, model=loaded.name,
                     file_hash=getattr(loaded, "file_hash", None), model_keys=(loaded.key,), triggers=triggers)
    run.control_folder, run.control_name = _control(run)
    return run
