"""Notebooks 00-04 with the control in float32 and in bf16, one after the other on the same machine: wall time,
verdicts and estimates compared (used by bench_precision.py --suite; runs for an hour or more on 2 cores)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ffnlib.report import load_summaries
from ffnlib.suite import run_suite

NOTEBOOKS = ["00_quickstart", "01_keys", "02_values", "03_aggregation", "04_compare_models"]


def timed_run(model: str, scale: str, device: str, precision: str, results: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    run_dir = run_suite(model, scale, str(results), device=device, notebooks=NOTEBOOKS, precision=precision,
                        log=lambda *a: None)
    return time.perf_counter() - start, load_summaries(run_dir)


def findings(summaries: dict) -> dict[str, dict]:
    return {f["key"]: f for s in summaries.values() for f in s.get("findings") or [] if f.get("key")}


def compare_runs(model: str, scale: str, device: str) -> list[dict]:
    """Benchmark rows: the suite's speed in bf16, then the verdicts and estimates that differ from float32's."""
    with tempfile.TemporaryDirectory(prefix="ffnlib-fidelity-") as tmp:
        t32, s32 = timed_run(model, scale, device, "float32", Path(tmp) / "f32")
        t16, s16 = timed_run(model, scale, device, "bfloat16", Path(tmp) / "bf16")
    rows = [{"row": f"notebooks 00-04 with the control at scale {scale}: float32 time / bf16 time",
             "ours": f"{t16 / 60:.1f} min bf16", "baseline": f"{t32 / 60:.1f} min float32", "ratio": t32 / t16,
             "target": "≥ 1.7", "met": t32 / t16 >= 1.7}]
    a, b = findings(s32), findings(s16)
    changed = [k for k in a if k in b and a[k]["verdict"] != b[k]["verdict"]]
    rows.append({"row": "verdicts that differ from float32's", "ours": f"{len(changed)} of {len(a)}",
                 "target": "0", "met": not changed,
                 "note": "; ".join(f"{k}: {a[k]['verdict']} -> {b[k]['verdict']}" for k in changed)})
    outside = []
    for key in a:
        ea, eb = a[key].get("estimate"), (b.get(key) or {}).get("estimate")
        if not ea or not eb or ea.get("low") is None or eb.get("value") is None:
            continue
        if not ea["low"] <= eb["value"] <= ea["high"]:
            outside.append(f"{key}: bf16 {eb['value']:.4g} outside float32 [{ea['low']:.4g}, {ea['high']:.4g}]")
    rows.append({"row": "bf16 estimates outside float32's 95% interval", "ours": str(len(outside)), "target": "0",
                 "met": not outside, "note": "; ".join(outside)})
    return rows
