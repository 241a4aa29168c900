"""Notebook suite wall time: the whole suite (``python -m ffnlib.suite``) at CI size and at default size.

    python benchmarks/bench_suite.py [--model smollm2-135m] [--scales ci default]

Each scale runs in a fresh results folder (nothing cached but the dense model copy and the sentence table).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

from common import machine, table

LIMITS = {"ci": 600, "default": 45 * 60}


def run(model: str, device: str, scales) -> list[dict]:
    rows = []
    for scale in scales:
        with tempfile.TemporaryDirectory() as results:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ffnlib.suite", "--model", model, "--scale", scale,
                            "--device", device, "--results", results], check=True, capture_output=True)
            wall = time.perf_counter() - start
        rows.append({"row": f"Notebook suite, scale={scale}", "ours": f"{wall / 60:.1f} min",
                     "baseline": f"limit {LIMITS[scale] / 60:.0f} min", "ratio": wall / LIMITS[scale],
                     "target": f"< {LIMITS[scale] / 60:.0f} min", "met": wall < LIMITS[scale],
                     "note": "fresh results folder; executes notebooks 00-04 with papermill"})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scales", nargs="*", default=["ci", "default"])
    args = parser.parse_args()
    print(machine(args.device))
    print(table(run(args.model, args.device, args.scales)))
