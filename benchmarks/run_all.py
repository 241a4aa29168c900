"""Run every benchmark on one model and print their Markdown tables, one after another.

    python benchmarks/run_all.py [--model smollm2-135m] [--device cpu|cuda] [--quick]

Every row is a ratio measured in the same run (these machines are shared and noisy, so absolute times
alone mean little); each row also gives the absolute figures. ``--quick`` uses smaller inputs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine  # noqa: E402

# script, arguments at full size, arguments with --quick
BENCHMARKS = [
    ("bench_load.py", [], []),
    ("bench_mining.py", [], ["--sentences", "200"]),
    ("bench_values.py", [], ["--layers", "0,15,29"]),
    ("bench_aggregation.py", ["--examples", "4000"], ["--examples", "500"]),
    ("bench_distributed.py", [], []),
    ("bench_contextualization.py", [], ["--repeats", "3", "--batch", "8", "--skip-memory"]),
    ("bench_knowledge_neurons.py", [], ["--layers", "0,15,29"]),
    ("bench_suite.py", [], ["--scales", "ci"]),
    ("bench_moefication.py", [], ["--rounds", "10"]),
    ("bench_training.py", ["--spec", "wiki-relu-lm"], ["--steps", "20", "--rounds", "2"]),
    ("bench_precision.py", [], ["--sentences", "60", "--forward-sentences", "16", "--train-steps", "10"]),
    ("bench_sharing.py", [], ["--sentences", "40", "--policies", "runtime,ffnlib"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", help="a subset of the scripts, e.g. bench_values.py")
    args = parser.parse_args()
    print(f"# ffnlib benchmarks\n\nMachine: {machine(args.device)}; model {args.model}\n")
    failed = 0
    for script, full, quick in BENCHMARKS:
        if args.only and script not in args.only or not (HERE / script).exists():
            continue
        cmd = [sys.executable, str(HERE / script), "--model", args.model, "--device", args.device,
               *(quick if args.quick else full)]
        start = time.perf_counter()
        print(f"## {script}\n", flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
        tables = [line for line in result.stdout.splitlines() if line.startswith("|") or line.startswith("-")]
        print("\n".join(tables) if tables else result.stdout)
        if result.returncode:
            failed += 1
            print(f"\n**{script} failed** (exit {result.returncode}):\n```\n{result.stderr[-2000:]}\n```")
        print(f"\n({time.perf_counter() - start:.0f} s)\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
