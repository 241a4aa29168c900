"""Notebook suite wall time: the whole suite (``python -m ffnlib.suite``) at CI size and at default size, with
the random-weights control, and the control's share of it.

    python benchmarks/bench_suite.py [--model smollm2-135m] [--scales ci default] [--control random-init|none]
                                     [--keep RESULTS_DIR] [--notebooks 00_quickstart 01_keys ...] [--control-draws N]

Each scale runs in a fresh results folder (nothing cached but the dense model copy and the sentence table;
``--keep`` keeps it, e.g. to publish its report). Notebooks 01-03 time the cells that compute the control
and 09 time the cells that compute the control (``summaries/*.json`` ``control.seconds``): the row "with the control
vs without" divides the suite's wall time by the same run's wall time less those seconds, so both figures come from
one run. The control is drawn the scale's number of times (3 at default); the ratio's target, set for one draw,
is also given with one draw's share of the control's seconds. The same ratio is given for the paper's part alone (notebooks 00-04, from the suite's per-notebook times),
since the related-work notebooks 06 and 07 have no control and would dilute it. ``--notebooks`` runs a subset
(e.g. the paper's part, 00-04, whose ratio is the target's, without notebook 08's two-hour sweep on a fresh
machine).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, table

from ffnlib.suite import SUITE

LIMITS = {"ci": 600, "default": 45 * 60}
CONTROL_RATIO = 1.6  # the suite with its control: at most 1.6x the suite without it


PAPER = ("00_quickstart", "01_keys", "02_values", "03_aggregation", "04_compare_models")


def control_seconds(run_dir: Path, notebooks=None) -> float:
    total = 0.0
    for path in sorted((run_dir / "summaries").glob("*.json")):
        if notebooks is not None and path.stem not in notebooks:
            continue
        control = json.loads(path.read_text()).get("control")
        if isinstance(control, dict):
            total += float(control.get("seconds") or 0.0)
    return total


def control_draws(run_dir: Path) -> int:
    """How many random initialisations the run's control was drawn from (the most any notebook names)."""
    draws = [len(json.loads(path.read_text()).get("control", {}).get("draws") or [1])
             for path in sorted((run_dir / "summaries").glob("*.json"))
             if isinstance(json.loads(path.read_text()).get("control"), dict)]
    return max(draws, default=1)


def control_rows(part: str, wall: float, spent: float, n_draws: int, note: str) -> list[dict]:
    """The rows "with the control vs without it" (the same run less the control's seconds) and, for a control
    drawn several times, the same with one draw's share (the target was set for one draw)."""
    base = max(wall - spent, 1e-9)
    rows = [{"row": f"… with the control vs without it{part} (less the control's {spent / 60:.1f} min, "
                    f"{n_draws} draw(s))",
             "ours": f"{wall / 60:.1f} min", "baseline": f"{base / 60:.1f} min", "ratio": wall / base,
             "target": f"≤ {CONTROL_RATIO}x", "met": wall / base <= CONTROL_RATIO, "note": note}]
    if n_draws > 1:
        one = base + spent / n_draws
        rows.append({"row": f"… with one control draw of the {n_draws} vs without it{part}",
                     "ours": f"{one / 60:.1f} min", "baseline": f"{base / 60:.1f} min", "ratio": one / base,
                     "target": f"≤ {CONTROL_RATIO}x", "met": one / base <= CONTROL_RATIO,
                     "note": "the control's seconds over its draws (they cost alike)"})
    return rows


def run(model: str, device: str, scales, control: str = "random-init", keep: str | None = None,
        notebooks=None, draws: int | None = None) -> list[dict]:
    rows = []
    for scale in scales:
        results = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="ffnlib-bench-suite-"))
        try:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "ffnlib.suite", "--model", model, "--scale", scale,
                                   "--device", device, "--results", str(results), "--control", control, "--quiet",
                                   *(["--notebooks", *notebooks] if notebooks else []),
                                   *(["--control-draws", str(draws)] if draws else [])],
                                  check=True, capture_output=True, text=True)
            wall = time.perf_counter() - start
            run_dirs = [p for p in results.glob(f"*/{scale}") if p.parent.name != "controls"]
            spent = sum(control_seconds(p, notebooks) for p in run_dirs)  # only what this run ran (--keep)
            spent_paper = sum(control_seconds(p, [n for n in PAPER if not notebooks or n in notebooks]) for p in run_dirs)
            n_draws = max((control_draws(p) for p in run_dirs), default=1)
            per_notebook = {m[1]: float(m[2]) for m in re.finditer(r"\[ffnlib\] (\S+)\.ipynb done in (\d+) s",
                                                                    done.stdout)}
            print("per notebook (s):", json.dumps(per_notebook), file=sys.stderr)
        finally:
            if not keep:
                shutil.rmtree(results, ignore_errors=True)
        which = f"notebooks {', '.join(n[:2] for n in notebooks)}" if notebooks else "Notebook suite"
        rows.append({"row": f"{which}, scale={scale}, control={control}", "ours": f"{wall / 60:.1f} min",
                     "baseline": f"limit {LIMITS[scale] / 60:.0f} min", "ratio": wall / LIMITS[scale],
                     "target": f"< {LIMITS[scale] / 60:.0f} min", "met": wall < LIMITS[scale],
                     "note": f"fresh results folder; executes {', '.join(per_notebook) or 'the suite'} with papermill"})
        if control != "none":
            rows += control_rows("", wall, spent, n_draws,
                                 "notebooks 01-03 and 09 time the cells that compute the random-weights control")
            paper = sum(t for name, t in per_notebook.items() if name in PAPER)
            if paper:
                rows += control_rows(", the paper's part alone (notebooks 00-04)", paper, spent_paper, n_draws,
                                     "the suite's own per-notebook wall times")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scales", nargs="*", default=["ci", "default"])
    parser.add_argument("--control", default="random-init", choices=["random-init", "none"])
    parser.add_argument("--keep", help="run in this results folder and keep it (one scale at a time)")
    parser.add_argument("--control-draws", type=int, help="the control's random initialisations (default: the scale's)")
    parser.add_argument("--notebooks", nargs="*", help="run only these notebooks (default: the whole suite)")
    args = parser.parse_args()
    unknown = sorted(set(args.notebooks or ()) - set(SUITE))
    if unknown:
        parser.error(f"no notebook(s) {unknown} in the suite: choose from {', '.join(SUITE)}")
    print(machine(args.device))
    print(table(run(args.model, args.device, args.scales, args.control, args.keep, args.notebooks,
                    args.control_draws)))
