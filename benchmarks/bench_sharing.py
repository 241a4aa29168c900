"""Mining on a shared CPU: tokens per second with one competing busy process, divided by the same without it,
in a plain process and in a notebook kernel (papermill, as the suite runs notebooks), for each thread policy.

    python benchmarks/bench_sharing.py [--sentences 60] [--policies default,passive,one,auto]

Policies: ``runtime`` (torch's threads, the OpenMP runtime's own wait policy: ``FFNLIB_THREAD_POLICY=runtime``),
``ffnlib`` (the project's policy, :mod:`ffnlib.threads`: torch's threads, passive waiting), ``one`` (one thread).
The busy process is started by this script: a plain process shares its scheduling group, a kernel (started by
Jupyter with ``setsid``) does not, and Linux's autogroup scheduler shares the CPU between such groups.
Target: the ratio is at least 0.4 in both kinds of process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, table  # noqa: E402

MINE = """
import json, os, time
from ffnlib.corpus import wiki_sentences
from ffnlib.keys import mine_trigger_examples
from ffnlib.models import load_model
import torch
loaded = load_model("smollm2-135m")
table = wiki_sentences().head(int(os.environ["BENCH_SENTENCES"]))
mine_trigger_examples(loaded, table.head(8), k=4, progress=False, snapshot_floor=None)  # warm-up
ex = mine_trigger_examples(loaded, table, k=20, progress=True, snapshot_floor=None)
print("BENCH " + json.dumps({"tokens_per_second": ex.stats["tokens_per_second"], "threads": torch.get_num_threads(),
                            "wait": os.environ.get("OMP_WAIT_POLICY", "runtime")}))
"""

POLICIES = {"runtime": {"FFNLIB_THREAD_POLICY": "runtime"},  # the OpenMP runtime's own wait policy
            "ffnlib": {},  # the project's policy (ffnlib.threads): passive waiting, torch's threads
            "one": {"OMP_NUM_THREADS": "1"}}
CLEARED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "FFNLIB_THREADS",
           "FFNLIB_THREAD_POLICY")


def _env(policy: str, sentences: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    return {**env, **POLICIES[policy], "BENCH_SENTENCES": str(sentences)}


def _result(text: str) -> dict:
    for line in text.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(f"no result in the output:\n{text[-2000:]}")


def plain(policy: str, sentences: int) -> dict:
    out = subprocess.run([sys.executable, "-c", MINE], capture_output=True, text=True, env=_env(policy, sentences),
                         cwd=HERE.parent, check=True)
    return _result(out.stdout)


def kernel(policy: str, sentences: int) -> dict:
    """The same code as one cell of a notebook run by papermill (the kernel inherits this process's environment,
    as the suite's kernels do)."""
    import nbformat
    import papermill

    with tempfile.TemporaryDirectory() as tmp:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(MINE)]
        src, dst = Path(tmp) / "mine.ipynb", Path(tmp) / "out.ipynb"
        nbformat.write(nb, src)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(_env(policy, sentences))
        try:
            papermill.execute_notebook(str(src), str(dst), kernel_name="python3", progress_bar=False,
                                       cwd=str(HERE.parent))
        finally:
            os.environ.clear()
            os.environ.update(saved)
        cell = nbformat.read(dst, as_version=4).cells[0]
        return _result("".join(o.get("text", "") for o in cell.outputs))


def measured(run, policy: str, sentences: int, busy: bool) -> dict:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)
        return run(policy, sentences)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="(the benchmark mines SmolLM2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sentences", type=int, default=60)
    parser.add_argument("--policies", default="runtime,ffnlib,one")
    parser.add_argument("--kinds", default="plain,kernel")
    args = parser.parse_args()
    rows = []
    for kind in args.kinds.split(","):
        run = {"plain": plain, "kernel": kernel}[kind]
        for policy in args.policies.split(","):
            quiet = measured(run, policy, args.sentences, busy=False)
            shared = measured(run, policy, args.sentences, busy=True)
            ratio = shared["tokens_per_second"] / quiet["tokens_per_second"]
            rows.append({"row": f"mining, {kind} process, policy {policy} ({quiet['threads']} threads quiet, "
                                f"{shared['threads']} shared)",
                         "ours": f"{shared['tokens_per_second']:.0f} tok/s shared",
                         "baseline": f"{quiet['tokens_per_second']:.0f} tok/s quiet", "ratio": ratio,
                         "target": "≥ 0.4", "met": ratio >= 0.4})
            print(rows[-1], flush=True)
    print(f"\n## Mining on a shared CPU ({args.sentences} sentences)\n\nMachine: {machine(args.device)}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
