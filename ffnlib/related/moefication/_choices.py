"""MoEfication's choices and their checks: the splits, routers and methods by name, how many memories an expert
holds and how many experts a share keeps. Every other part checks its parameters here, so one error message
says what is allowed."""

from __future__ import annotations

import math

import numpy as np

from ...errors import ParameterError

__all__ = ["SPLITS", "ROUTERS", "METHODS", "CLUSTER_ROWS", "SPARSITY_TOPS", "check_choice", "default_expert_size",
           "check_expert_size", "check_share", "experts_kept"]

SPLITS = ("random", "kmeans", "coactivation")
ROUTERS = ("ground_truth", "similarity", "mlp", "random")
METHODS = ("dense", "experts", "cats", "teal")
CLUSTER_ROWS = ("gate", "up", "both")
SPARSITY_TOPS = (0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)  # shares of memories for the mass measure


def check_choice(name: str, value, choices) -> str:
    """``value`` when it is one of ``choices``; else a clear error naming them."""
    if value not in choices:
        raise ParameterError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


def default_expert_size(d_ff: int, preferred: int = 32) -> int:
    """The authors' 32 memories per expert where it divides ``d_ff``, else the divisor of ``d_ff`` nearest to it
    (the smaller on a tie) that leaves at least two experts: a model of any width gets equal-size experts."""
    if d_ff % preferred == 0 and d_ff > preferred:
        return preferred
    divisors = [d for d in range(1, d_ff // 2 + 1) if d_ff % d == 0]
    if not divisors:
        raise ParameterError(f"A layer of {d_ff} memories cannot be split into equal experts.")
    return min(divisors, key=lambda d: (abs(d - preferred), d))


def check_expert_size(d_ff: int, expert_size) -> int:
    """The number of experts, ``d_ff / expert_size``; a clear error when it does not divide."""
    if isinstance(expert_size, bool) or not isinstance(expert_size, (int, np.integer)) or expert_size < 1:
        raise ParameterError(f"expert_size must be a positive int (memories per expert), got {expert_size!r}.")
    if d_ff % expert_size:
        divisors = [d for d in range(2, min(d_ff, 512) + 1) if d_ff % d == 0]
        near = sorted(divisors, key=lambda d: abs(d - expert_size))[:6]
        raise ParameterError(f"expert_size={expert_size} does not divide this model's {d_ff} memories per layer, "
                             f"so the experts cannot all have the same size. Choose a divisor of {d_ff}, e.g. "
                             f"{sorted(near)}.")
    if expert_size == d_ff:
        raise ParameterError(f"expert_size={expert_size} makes one expert of the whole layer; choose a smaller "
                             "divisor of d_ff (32 by default).")
    return d_ff // int(expert_size)


def check_share(share, what: str = "share") -> float:
    """A share kept must be a number in (0, 1]."""
    if isinstance(share, bool) or not isinstance(share, (int, float, np.floating, np.integer)):
        raise ParameterError(f"{what} must be a number in (0, 1], got {share!r}.")
    share = float(share)
    if not (0.0 < share <= 1.0) or math.isnan(share):
        raise ParameterError(f"{what}={share} is outside (0, 1]: it is the share of the FFN kept (1 keeps "
                             "everything, 0.25 a quarter).")
    return share


def experts_kept(share: float, n_experts: int) -> int:
    """How many of ``n_experts`` a share keeps (rounded to the nearest; at least one)."""
    share = check_share(share)
    k = int(math.floor(share * n_experts + 0.5))
    if k < 1:
        raise ParameterError(f"share={share} keeps no expert out of {n_experts}: the smallest share is "
                             f"1/{n_experts} = {1 / n_experts:.4f}.")
    return k
