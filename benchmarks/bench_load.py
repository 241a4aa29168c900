"""Model load: the dense cached copy against GGUF dequantization, each in a fresh process.

    python benchmarks/bench_load.py [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import tempfile

from common import machine, run_python, table

LOAD = """
import time
t0 = time.perf_counter()
from ffnlib.models import load_model
t1 = time.perf_counter()
load_model({model!r})
print(t1 - t0, time.perf_counter() - t1)
"""


def run(model: str = "smollm2-135m", device: str = "cpu") -> list[dict]:
    with tempfile.TemporaryDirectory() as cold:
        run_python(LOAD.format(model=model), env={"FFNLIB_CACHE": cold})  # warm the OS page cache
    with tempfile.TemporaryDirectory() as cold:
        _, gguf = map(float, run_python(LOAD.format(model=model), env={"FFNLIB_CACHE": cold}).splitlines()[-1].split())
        imports, dense = map(float, run_python(LOAD.format(model=model), env={"FFNLIB_CACHE": cold}).splitlines()[-1].split())
    return [{"row": f"Model load ({model})", "ours": f"{dense:.2f} s (dense cached copy)",
             "baseline": f"{gguf:.2f} s (GGUF dequantization + saving the copy)", "ratio": dense / gguf,
             "target": "second load < 2 s", "met": dense < 2.0,
             "note": f"fresh process each; importing torch/transformers/ffnlib takes another {imports:.1f} s"}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(machine(args.device))
    print(table(run(args.model, args.device)))
