"""Notebook plumbing: turn the parameter cell into a loaded model, sizes and an output folder.

A notebook's first code cells are::

    # parameters
    model = "smollm2-135m"; scale = "default"; seed = 0; results_dir = "results"; device = "cpu"
    precision = "float32"

    run = ffnlib.notebook.start(model=model, scale=scale, seed=seed, results_dir=results_dir, device=device,
                                precision=precision)

``run.out`` is ``results_dir/<model>/<scale>/`` (results, tables, figures), shared by all notebooks
of the suite so that each one finds (or computes) what an earlier one produced. A run in another precision
than float32 has its own folder, ``<scale>-<precision>`` (:func:`ffnlib.precision.run_folder_name`).
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import Scale, check_int, check_parameters, get_scale
from .errors import ParameterError
from .models import LoadedModel, load_model, resolve_device
from .precision import resolve_precision, run_folder_name
from .threads import apply_thread_policy
from .storage import atomic_write, atomic_write_bytes, ensure_dir, slug, write_json

__all__ = ["Run", "slug", "seed_everything", "start"]


@dataclass
class Run:
    """What a notebook works with: the model, the sizes, the seed and where results go."""

    loaded: LoadedModel
    scale: Scale
    seed: int
    out: Path
    device: str
    params: dict = field(default_factory=dict)
    _controls: dict = field(default_factory=dict, repr=False)  # draw -> the control's Run

    @property
    def model_name(self) -> str:
        return self.loaded.name

    def control(self, draw: int = 0) -> "Run":
        """The random-weights control of this run: the same architecture re-initialised by its own initialiser
        (seeded by the run's seed plus ``draw``, ``ffnlib.controls.random_init``), the same tokenizer and sizes.
        Its results are cached under ``results_dir/controls/<control>/<scale>/``, keyed by the architecture and
        the seed, so every notebook (and every model of the same architecture) computes them once."""
        if draw not in self._controls:
            from .controls import random_init

            loaded = random_init(self.loaded, self.seed + draw)
            out = ensure_dir(self.out.parent.parent / "controls" / loaded.name
                             / run_folder_name(self.scale.name, loaded.precision))
            self._controls[draw] = Run(loaded=loaded, scale=self.scale, seed=self.seed, out=out, device=self.device,
                                       params={**self.params, "control_of": self.model_name, "draw": draw})
        return self._controls[draw]

    def controls(self, draws: int | None = None) -> list["Run"]:
        """The control's random draws: ``draws`` initialisations (None: the scale's ``control_draws``), the first
        being :meth:`control`. A notebook measures each and combines them with
        :func:`ffnlib.stats.over_draws_by_key`, so the control's interval covers the initialisation too."""
        n = check_int("control_draws", self.scale.control_draws if draws is None else draws)
        return [self.control(i) for i in range(n)]

    def resamples(self, n_boot: int | None = None) -> int:
        """Bootstrap resamples for the notebook's intervals: ``n_boot``, or the scale's ``n_boot`` where it is None
        (1,000 at ``default`` and ``full``, 200 at ``ci``)."""
        return check_int("n_boot", self.scale.n_boot if n_boot is None else n_boot)

    def save_figure(self, fig, name: str) -> list[Path]:
        """Save a matplotlib figure as PNG and SVG under ``out/figures``."""
        folder = ensure_dir(self.out / "figures")
        paths = [folder / f"{name}.png", folder / f"{name}.svg"]
        atomic_write(paths[0], lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
        atomic_write(paths[1], lambda f: fig.savefig(f, format="svg", bbox_inches="tight"))
        return paths

    def save_table(self, frame, name: str) -> Path:
        """Save a result table as CSV under ``out/tables`` (for readers; Parquet results live in ``out``)."""
        path = ensure_dir(self.out / "tables") / f"{name}.csv"
        atomic_write_bytes(path, frame.to_csv(index=False).encode())
        return path

    def save_summary(self, name: str, summary: dict) -> Path:
        """Save the numbers a notebook reports (used by the report) as JSON under ``out/summaries``, with the
        code that computed them (``code``: :func:`ffnlib.version.code_version`)."""
        from .version import code_version

        path = ensure_dir(self.out / "summaries") / f"{name}.json"
        write_json(path, {**summary, "code": summary.get("code") or code_version()})
        return path

    def nothing_to_analyse(self, name: str, reason: str, findings: list[dict]) -> None:
        """Stop the notebook: the model gives it nothing to analyse. Saves a summary with the reason and the
        findings (all "not measured"), then raises :class:`NothingToAnalyse`; the suite goes on."""
        from .errors import NothingToAnalyse

        findings = [{**f, "figure": None} for f in findings]  # no figure was drawn
        self.save_summary(name, {"model": self.loaded.describe(), "skipped": reason, "findings": findings})
        raise NothingToAnalyse(reason)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start(model: str = "smollm2-135m", scale: str = "default", seed: int = 0, results_dir: str = "results",
          device: str = "cpu", precision: str = "float32", extra_types: dict[str, type] | None = None,
          **extra) -> Run:
    """Check the notebook's parameters, seed everything, load the model and create the output folder.

    ``precision`` is the dtype the model computes in (:mod:`ffnlib.precision`; ``"auto"`` is resolved here and
    printed). ``extra`` are the notebook's own parameters; ``extra_types`` their expected types.
    """
    unknown = sorted(set(extra) - set(extra_types or {}))
    if unknown:
        allowed = list(inspect.signature(start).parameters)[:6] + sorted(extra_types or {})
        raise ParameterError(f"Unknown parameter(s) {unknown}. This notebook takes: {allowed}.")
    params = {"model": model, "scale": scale, "seed": seed, "results_dir": results_dir, "device": device,
              "precision": precision, **extra}
    check_parameters(params, extra_types)
    if seed < 0:
        raise ParameterError(f"seed must be a non-negative int, got {seed}.")
    sizes = get_scale(scale)
    apply_thread_policy()  # FFNLIB_THREADS, if set (ffnlib.threads)
    chosen = resolve_precision(precision, resolve_device(device))  # "auto" resolved once, before any folder
    out = ensure_dir(Path(results_dir) / slug(model) / run_folder_name(scale, chosen.name))
    seed_everything(seed)
    loaded = load_model(model, device=device, precision=chosen.name)
    if precision != "float32":
        print(f"Computing in {chosen.name} ({chosen.reason}); results go to {out}.")
    return Run(loaded=loaded, scale=sizes, seed=seed, out=out, device=str(loaded.device), params=params)
