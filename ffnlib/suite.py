"""The main job: execute the notebook suite with papermill, in order, then write the report.

    python -m ffnlib.suite --model smollm2-135m --scale default --results results

Executed notebooks go to ``results/<model>/<scale>/notebooks/``; figures, tables and summaries are
written by the notebooks under ``results/<model>/<scale>/``. Each notebook reuses cached results
whose manifest matches (and says so), so a rerun after an interruption picks up where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

__all__ = ["ROOT", "NOTEBOOK_DIR", "SUITE", "suite_notebooks", "check_results_dir", "preflight",
           "check_notebook_parameters", "execute", "run_suite", "main"]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
# The explorer (05) is interactive and is not part of the batch run.
SUITE = ("00_quickstart", "01_keys", "02_values", "03_aggregation", "04_compare_models", "06_knowledge_neurons",
         "07_moefication", "08_relu_vs_softmax", "09_ff_attention_maps", "10_corpus_size")


def suite_notebooks(names=None) -> list[Path]:
    """The suite's notebooks to run, in the suite's order; ``names`` (a subset of :data:`SUITE`, with or without
    ``.ipynb``) must all be notebooks of the suite."""
    from .errors import ParameterError

    if not names:
        return [NOTEBOOK_DIR / f"{name}.ipynb" for name in SUITE]
    wanted = [Path(str(name)).name.removesuffix(".ipynb") for name in names]
    unknown = [name for name in wanted if name not in SUITE]
    if unknown:
        interactive = " (05_explorer is interactive: open it in JupyterLab)" if "05_explorer" in unknown else ""
        raise ParameterError(f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not "
                             f"{'a notebook' if len(unknown) == 1 else 'notebooks'} of the suite{interactive}. "
                             f"Its notebooks: {', '.join(SUITE)}.")
    return [NOTEBOOK_DIR / f"{name}.ipynb" for name in SUITE if name in wanted]


def check_results_dir(results) -> Path:
    """The results folder, resolved and created; a clear error when it is a file or cannot be written."""
    from .errors import ResultsError

    path = Path(results).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ResultsError(f"The results folder {path} is a file: give a folder (--results DIR).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".ffnlib-write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ResultsError(f"The results folder {path} cannot be written ({exc.strerror or exc}): give another "
                           "folder (--results DIR).") from exc
    return path


def preflight(model: str, scale: str, results, notebooks=None, device: str = "cpu",
              control: str = "random-init", precision: str = "float32") -> tuple[list[Path], Path]:
    """Check everything the suite can check before the first kernel starts: the notebook names, the scale, the
    control, the device, the precision, the results folder and the model (without loading its weights). Returns
    the notebooks to run and the results folder."""
    from .config import get_scale
    from .controls import check_control
    from .models import check_model, resolve_device
    from .precision import resolve_precision

    selected = suite_notebooks(notebooks)
    get_scale(scale)
    check_control(control)
    resolve_precision(precision, resolve_device(device))
    results_dir = check_results_dir(results)
    check_model(model)
    return selected, results_dir


def check_notebook_parameters(notebook: Path, params: dict) -> None:
    """Refuse parameters the notebook does not declare (papermill would only warn and ignore them)."""
    import papermill

    from .errors import ParameterError

    declared = papermill.inspect_notebook(str(notebook))
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ParameterError(f"{notebook.name} has no parameter(s) {unknown}; it takes {sorted(declared)}.")


def execute(notebook: Path, output: Path, params: dict, stream: bool = False) -> None:
    """Execute one notebook with papermill after checking its parameters' names; ``stream``: show what the
    notebook prints (its progress bars included) on this process's console as it runs."""
    import papermill
    from nbclient.exceptions import DeadKernelError

    from .errors import NotebookError, NotebookSkipped

    check_notebook_parameters(notebook, params)
    # papermill saves the notebook cell by cell; it is renamed into place when the run ends (with or
    # without an error), so a notebook at ``output`` is always a whole one
    running = output.with_name(f".{output.stem}.running.ipynb")
    try:
        papermill.execute_notebook(str(notebook), str(running), parameters=params, cwd=str(ROOT),
                                   kernel_name="python3", progress_bar=False, log_output=stream)
    except DeadKernelError as exc:
        raise NotebookError(f"The kernel running {notebook.name} died (out of memory, or killed). The executed "
                            f"notebook is {output}. Finished steps are cached: run the same command again to "
                            "resume (with a smaller scale if memory ran out).") from exc
    except papermill.PapermillExecutionError as exc:
        if exc.ename == "NothingToAnalyse":
            raise NotebookSkipped(f"{notebook.name}: {exc.evalue}") from exc
        raise NotebookError(f"{notebook.name} stopped in cell {exc.exec_count} with {exc.ename}: {exc.evalue}\n"
                            f"The executed notebook, with the error, is {output}. Finished steps are cached: "
                            "fix the cause and run the same command again to resume.") from exc
    finally:
        if running.exists():
            os.replace(running, output)


def run_suite(model: str = "smollm2-135m", scale: str = "default", results: str = "results", seed: int = 0,
              device: str = "cpu", notebooks=None, log=print, stream: bool = False,
              control: str = "random-init", precision: str = "float32", control_draws: int | None = None) -> Path:
    """Run the suite's notebooks in order, then write the report. ``control``: ``"random-init"`` (every
    finding judged against the same architecture with random weights) or ``"none"``; passed to the notebooks
    that take it, with ``control_draws`` (the control's random initialisations; None: the scale's).
    ``precision``: the dtype the models compute in (:mod:`ffnlib.precision`); a run in another precision than
    float32 has its own folder, ``<scale>-<precision>``."""
    import warnings

    import papermill

    from .config import check_int
    from .errors import NotebookSkipped
    from .models import resolve_device
    from .storage import slug
    from .precision import resolve_precision, run_folder_name
    from .threads import set_wait_policy

    with warnings.catch_warnings(record=True) as caught:  # said once here, not once per notebook
        warnings.simplefilter("always")
        selected, results_dir = preflight(model, scale, results, notebooks, device, control, precision)
        chosen = resolve_precision(precision, resolve_device(device))
    if control_draws is not None:
        check_int("control_draws", control_draws)
    for message in dict.fromkeys(str(w.message) for w in caught):
        log(f"[ffnlib] warning: {message}")
    if precision != "float32":
        log(f"[ffnlib] computing in {chosen.name} ({chosen.reason})")
    folder = run_folder_name(scale, chosen.name)
    out = results_dir / slug(model) / folder / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    params = {"model": model, "scale": scale, "seed": seed, "results_dir": str(results_dir), "device": device,
              "precision": precision}
    set_wait_policy()  # the kernels' OpenMP threads wait passively (ffnlib.threads), unless overridden
    if stream:  # the notebooks' progress bars as text lines on the console (ffnlib.progress)
        os.environ.setdefault("FFNLIB_PROGRESS", "text")
    for nb in selected:
        start = time.perf_counter()
        log(f"[ffnlib] running {nb.name} ({model}, scale={scale}) ...")
        declared = papermill.inspect_notebook(str(nb))
        control_params = {name: value for name, value in (("control", control), ("control_draws", control_draws))
                          if name in declared and value is not None}
        try:
            execute(nb, out / nb.name, {**params, **control_params}, stream=stream)
        except NotebookSkipped as exc:  # the model gives it nothing to analyse; its findings are not measured
            log(f"[ffnlib] {nb.name} stopped, nothing to analyse ({exc}); going on -> {out / nb.name}")
            continue
        log(f"[ffnlib] {nb.name} done in {time.perf_counter() - start:.0f} s -> {out / nb.name}")
    try:
        from .report import write_report
    except ImportError:
        return out.parent
    paths = write_report(out.parent)
    log(f"[ffnlib] report: {', '.join(str(p) for p in paths)}")
    return out.parent


def main(argv=None) -> int:
    from .config import SCALES
    from .precision import PRECISIONS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--scale", default="default", choices=list(SCALES))
    parser.add_argument("--results", default="results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                        help="the dtype the models compute in: float32 (the default, and the reports'), bfloat16, "
                             "float16 (GPU only), or auto (bf16 where the CPU or GPU has it natively)")
    parser.add_argument("--notebooks", nargs="*", help=f"a subset of {', '.join(SUITE)}")
    parser.add_argument("--control", default="random-init", choices=["random-init", "none"],
                        help="judge every finding against the same architecture with random weights (default), "
                             "or not")
    parser.add_argument("--control-draws", type=int, default=None,
                        help="random initialisations of the control, its interval covering them (default: the "
                             "scale's, 3 at default and full, 1 at ci)")
    parser.add_argument("--quiet", action="store_true",
                        help="do not stream the notebooks' output (progress bars, messages) to the console")
    args = parser.parse_args(argv)
    from .errors import FFNLibError

    try:
        if not args.quiet:
            import logging

            logging.basicConfig(level=logging.INFO, format="%(message)s")
        run_suite(args.model, args.scale, args.results, args.seed, args.device, args.notebooks,
                  stream=not args.quiet, control=args.control, precision=args.precision,
                  control_draws=args.control_draws)
    except FFNLibError as exc:
        print(f"ffnlib: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
