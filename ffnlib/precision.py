"""The dtype a model computes in: ``precision="float32"`` (the default, and the reports'), ``"bfloat16"``,
``"float16"`` (GPU only) or ``"auto"``.

Reduced precision halves the bytes every matmul moves, and hardware with native bf16 (CPUs with AVX-512 BF16 or
AMX, most recent GPUs) also does the arithmetic faster. Without it, torch emulates bf16 and a CPU matmul can be
tens of times *slower* than float32, so ``"auto"`` picks bf16 only where the hardware has it natively.

Only the model computes in the reduced dtype. Everything that ranks, accumulates or is compared stays float32:
:mod:`ffnlib.capture` hands every captured tensor over as float32 (:func:`full_precision`; float64 stays float64),
and the analyses' top-k states, vocabulary softmaxes, sums of sub-updates, bootstraps and perplexities read those.

>>> resolve_precision("float32", "cpu").dtype
torch.float32
"""

from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ParameterError

__all__ = ["PRECISIONS", "Precision", "full_precision", "cpu_flags", "native_bfloat16", "resolve_precision",
           "training_precision", "run_folder_name", "Tolerance", "TOLERANCES", "tolerance"]

PRECISIONS = ("float32", "bfloat16", "float16", "auto")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16 / AMX; "bf16" is aarch64's FEAT_BF16


@dataclass(frozen=True)
class Precision:
    """A resolved precision: its name (never ``"auto"``), the torch dtype, and why it was chosen."""

    name: str
    dtype: torch.dtype
    reason: str = ""


def full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when it is float32 or float64 (a view stays a view), else a float32 copy: what the analyses
    rank, sum and compare, whatever the model computes in."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags.update(line.split(":", 1)[-1].split())
    return flags


def native_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` does bf16 arithmetic natively (not emulated): a CUDA GPU that says so, or a CPU whose
    flags list AVX-512 BF16, AMX BF16 or (ARM) BF16. Apple silicon and CPUs that do not say are taken as not."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type != "cpu" or platform.system() != "Linux":
        return False
    return any(flag in cpu_flags() for flag in _CPU_BF16_FLAGS)


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> Precision:
    """Check ``precision`` against the device and return the dtype to compute in.

    Raises :class:`~ffnlib.errors.ParameterError` for an unknown name or float16 on a CPU; warns when bf16 is
    asked for on hardware that only emulates it (it works, slowly); ``"auto"`` then takes float32.
    """
    if precision not in PRECISIONS:
        raise ParameterError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    device = torch.device(device)
    if precision == "float32":
        return Precision("float32", torch.float32, "asked for")
    if precision == "float16":
        if device.type != "cuda":
            raise ParameterError("precision='float16' runs on a GPU only (CPU float16 matmuls are emulated and "
                                 "its range overflows in the residual stream). On a CPU use 'bfloat16' or "
                                 "'auto'.")
        return Precision("float16", torch.float16, "asked for")
    native = native_bfloat16(device)
    if precision == "bfloat16":
        if not native:
            warnings.warn(f"precision='bfloat16' on {device.type} without native bf16 arithmetic: torch emulates "
                          "it, and matmuls can be many times slower than float32. 'auto' would take float32 "
                          "here.", stacklevel=2)
        return Precision("bfloat16", torch.bfloat16, "asked for" + ("" if native else " (emulated: slow)"))
    if native:
        return Precision("bfloat16", torch.bfloat16, f"auto: {device.type} has native bf16")
    return Precision("float32", torch.float32, f"auto: {device.type} has no native bf16")


def training_precision(precision: str) -> Precision:
    """The precision small LMs train in on the CPU (notebook 08) for a run in ``precision``: bf16 autocast only where
    the CPU does bf16 natively, since emulated bf16 would slow training down; float32 otherwise."""
    if precision in ("float32", "auto"):
        return resolve_precision(precision, "cpu")
    if precision == "float16" or not native_bfloat16("cpu"):
        return Precision("float32", torch.float32, f"training on the CPU, which has no native {precision}")
    return Precision("bfloat16", torch.bfloat16, "CPU autocast, native bf16")


def run_folder_name(scale: str, precision: str = "float32") -> str:
    """The folder of a run under ``results_dir/<model>/``: the scale, with the precision appended when it is not
    float32, so a bf16 result never answers a float32 request (``run_folder_name("ci", "bfloat16") ==
    "ci-bfloat16"``)."""
    return scale if precision == "float32" else f"{scale}-{precision}"


@dataclass(frozen=True)
class Tolerance:
    """How close an exact identity comes in a dtype: ``relative`` for a decomposition against the output it
    sums to (Σ m_i·v_i = FF(x), a decomposition's completeness), ``logits`` (absolute) for logits recomputed
    from the final residual against the model's own."""

    relative: float
    logits: float


TOLERANCES = {  # float32: rounding only; bf16 keeps 8 bits of mantissa (2^-8 = 0.4% per rounding), fp16 11
    "float32": Tolerance(relative=1e-5, logits=1e-3),
    "bfloat16": Tolerance(relative=3e-2, logits=0.25),
    "float16": Tolerance(relative=4e-3, logits=0.05),
}


def tolerance(precision: str) -> Tolerance:
    """The :class:`Tolerance` of exactness checks for a model computing in ``precision`` (a resolved name)."""
    if precision not in TOLERANCES:
        raise ParameterError(f"No tolerance for precision {precision!r}: use one of {', '.join(TOLERANCES)}.")
    return TOLERANCES[precision]
