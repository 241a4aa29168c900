"""Shared helpers for the benchmark scripts: the machine line and the Markdown table."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import date

import torch


def machine(device: str = "cpu") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if device.startswith("cuda") and torch.cuda.is_available() else ""
    return (f"{date.today()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), device {device}{gpu}")


def table(rows: list[dict]) -> str:
    """rows: dicts with row, ours, baseline, ratio, target, met (bool or None), note."""
    out = ["| row | ours | baseline | ratio | target | met | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "—"}[r.get("met")]
        ratio = r.get("ratio")
        out.append(f"| {r['row']} | {r.get('ours', '')} | {r.get('baseline', '')} | "
                   f"{'' if ratio is None else f'{ratio:.2f}'} | {r.get('target', '')} | {met} | {r.get('note', '')} |")
    return "\n".join(out)


def run_python(code: str, env: dict | None = None) -> str:
    """Run ``code`` in a fresh interpreter (for cold-start and peak-memory figures) and return its stdout."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, check=True)
    return result.stdout.strip()
