"""Integrated gradients through the FFN's activation, in closed form (the linearisation of the activation).

The FFN's hidden vector ``m`` is split among the summands of its input with integrated gradients (IG) from a zero
baseline along the straight path that scales every summand together, so the shares add up exactly to ``m``.
Element-wise activations have the closed form ``share_j = p_j · g(p)/p`` (:func:`elementwise_ig_ratio`); gated FFNs
``m = act(a)·u`` have ``share_j = a_j · u·(act(a) − B)/a + u_j · B`` with ``B = ∫_0^1 act(α a) dα``
(:func:`gated_ig_coefficients`, :func:`path_average`, :func:`path_average_table`). :func:`ig_shares_by_riemann`
is the brute-force check the tests use.
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import UnsupportedModelError

__all__ = ["path_average", "check_activation", "path_average_table", "gated_ig_coefficients", "elementwise_ig_ratio",
           "ig_shares_by_riemann"]

_GL_NODES = 32
_LINEAR_BEYOND = 20.0  # |t| beyond which act(t) is t (t > 0) or 0 (t < 0) to float precision


def _gauss_legendre(nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.legendre.leggauss(nodes)
    return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)


def path_average(act, a: torch.Tensor, nodes: int = _GL_NODES, linear_beyond: float = _LINEAR_BEYOND) -> torch.Tensor:
    """``B(a) = ∫_0^1 act(α·a) dα`` element-wise, by Gauss-Legendre quadrature (float64).

    For ``|a| > linear_beyond`` the integral runs to ``±linear_beyond`` and the rest is added in closed form,
    since SiLU and GELU equal ``t`` (right) or ``0`` (left) there to float precision (checked by
    :func:`check_activation`). The nodes are evaluated in a few large batches (bounded memory).
    """
    alpha, weight = (v.to(a.device) for v in _gauss_legendre(nodes))
    a = a.double()
    c = a.clamp(-linear_beyond, linear_beyond)
    inner = torch.zeros_like(a)
    step = max(1, (1 << 22) // max(1, a.numel()))
    for k0 in range(0, nodes, step):
        at = c[..., None] * alpha[k0:k0 + step]
        inner += (act(at).double() * weight[k0:k0 + step]).sum(-1)
    big = a.abs() > linear_beyond
    if not bool(big.any()):
        return inner
    tail = torch.where(a > linear_beyond, (a * a - linear_beyond ** 2) / 2, torch.zeros_like(a))
    return torch.where(big, (c * inner + tail) / torch.where(big, a, torch.ones_like(a)), inner)


def check_activation(act, linear_beyond: float = _LINEAR_BEYOND) -> None:
    """Refuse a gate activation that is not ReLU-like far from 0 (the tails of :func:`path_average`)."""
    t = torch.tensor([-linear_beyond, linear_beyond], dtype=torch.float64)
    with torch.no_grad():
        out = act(t).double()
    if abs(float(out[0])) > 1e-4 or abs(float(out[1]) - linear_beyond) > 1e-4:
        raise UnsupportedModelError(f"The gate activation {act} is not ReLU-like beyond ±{linear_beyond} "
                                    f"(act({-linear_beyond:g}) = {float(out[0]):.3g}, act({linear_beyond:g}) = "
                                    f"{float(out[1]):.3g}); integrated gradients here assume SiLU/GELU-like gates.")


_TABLE_POINTS = (1 << 16) + 1
_AVERAGE_TABLES: dict[str, torch.Tensor] = {}


def path_average_table(act, a: torch.Tensor) -> torch.Tensor:
    """:func:`path_average` read from a table of it on a uniform grid over ``[-20, 20]`` (65,537 points, built once
    per activation by Gauss-Legendre in float64; linear interpolation, error below 1e-7), with the same closed-form
    tails. Evaluating the activation at every quadrature node of every hidden unit would cost as much as the
    down-projection."""
    key = f"{type(act).__module__}.{type(act).__qualname__}:{act!r}"
    if key not in _AVERAGE_TABLES:
        _AVERAGE_TABLES[key] = path_average(act, torch.linspace(-_LINEAR_BEYOND, _LINEAR_BEYOND, _TABLE_POINTS,
                                                                dtype=torch.float64))
    table = _AVERAGE_TABLES[key].to(a.device)
    a = a.double()
    c = a.clamp(-_LINEAR_BEYOND, _LINEAR_BEYOND)
    position = (c + _LINEAR_BEYOND) * ((_TABLE_POINTS - 1) / (2 * _LINEAR_BEYOND))
    low = position.floor().clamp(max=_TABLE_POINTS - 2)
    frac = position - low
    low = low.long()
    inner = table[low] * (1 - frac) + table[low + 1] * frac
    big = a.abs() > _LINEAR_BEYOND
    if not bool(big.any()):
        return inner
    tail = torch.where(a > _LINEAR_BEYOND, (a * a - _LINEAR_BEYOND ** 2) / 2, torch.zeros_like(a))
    return torch.where(big, (c * inner + tail) / torch.where(big, a, torch.ones_like(a)), inner)


def gated_ig_coefficients(act, a: torch.Tensor, u: torch.Tensor, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """IG of ``m = act(a)·u`` from a zero baseline, all summands scaled together: with ``a = Σ_j a_j`` and
    ``u = Σ_j u_j``, summand ``j`` gets ``a_j · coef_a + u_j · coef_u``, where ``coef_a = u·(act(a) − B)/a`` and
    ``coef_u = B = ∫_0^1 act(α a) dα`` (:func:`path_average_table`; ``exact``: :func:`path_average`). The shares
    add up to ``act(a)·u`` exactly, whatever B's accuracy."""
    average = path_average(act, a) if exact else path_average_table(act, a)
    a64 = a.double()
    safe = torch.where(a64.abs() < 1e-30, torch.full_like(a64, 1e-30), a64)
    slope = (act(a64).double() - average) / safe
    return (u.double() * slope).to(a.dtype), average.to(a.dtype)


def elementwise_ig_ratio(m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """IG of ``m = g(p)`` from a zero baseline (``g(0) = 0``): summand ``p_j`` gets ``p_j · g(p)/p``; this
    returns ``g(p)/p`` (0 where ``p`` is 0 to float precision, where ``m`` is 0 too)."""
    small = p.abs() < 1e-12
    return torch.where(small, torch.zeros_like(p), m / torch.where(small, torch.ones_like(p), p))


def ig_shares_by_riemann(function, summands: torch.Tensor, steps: int = 20000) -> torch.Tensor:
    """Brute-force IG (midpoint Riemann sum of the gradient along the straight path from 0), for tests:
    ``summands`` (n_summands, ...), ``function`` maps their sum to the output (same shape as one summand)."""
    summands = summands.double()
    total = torch.zeros_like(summands)
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    for chunk in alphas.split(2000):
        x = (chunk.view(-1, *[1] * summands.dim()) * summands).requires_grad_(True)
        out = function(x.sum(1))
        (grad,) = torch.autograd.grad(out.sum(), x)
        total += grad.sum(0)
    return summands * total / steps
