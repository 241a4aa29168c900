"""Norms split linearly: a LayerNorm or RMSNorm of a sum, as a sum of one part per summand plus a bias term."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UnsupportedModelError

__all__ = ["NormSplit"]


@dataclass(frozen=True)
class NormSplit:
    """A LayerNorm or RMSNorm ``y = g ⊙ C(v)/s(v) + β``, split linearly with the statistic of the whole vector.

    ``C`` centres (LayerNorm) or is the identity (RMSNorm); ``s`` is ``sqrt(var + eps)`` or
    ``sqrt(mean(v²) + eps)``. With ``s`` of the whole sum, ``norm(Σ_j y_j + b) = Σ_j split(y_j) + split(b) + β``.
    """

    centre: bool
    gain: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    @classmethod
    def of(cls, module: nn.Module, plus_one: bool = False) -> "NormSplit":
        """Read a norm module: nn.LayerNorm, any ``*LayerNorm`` (OLMo's has no weight) or ``*RMSNorm``
        (``plus_one``: Gemma multiplies by ``1 + weight``)."""
        name = type(module).__name__
        if isinstance(module, nn.LayerNorm) or (name.endswith("LayerNorm") and "RMS" not in name):
            centre = True
        elif "RMSNorm" in name:
            centre = False
        else:
            raise UnsupportedModelError(f"Cannot split the norm {name}: only LayerNorm and RMSNorm are supported.")
        weight = getattr(module, "weight", None)
        size = weight.shape[0] if weight is not None else module.normalized_shape[0]
        gain = torch.ones(size) if weight is None else weight.detach().float()
        if plus_one and weight is not None:
            gain = 1.0 + gain
        bias = getattr(module, "bias", None)
        eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 1e-5
        return cls(centre, gain, None if bias is None else bias.detach().float(), float(eps))

    def statistic(self, v: torch.Tensor) -> torch.Tensor:
        """``s`` of each vector (last dimension), computed as the model does (float32)."""
        v = v.float()
        if self.centre:
            return (v.var(-1, unbiased=False) + self.eps).sqrt()
        return (v.pow(2).mean(-1) + self.eps).sqrt()

    def linear(self, y: torch.Tensor) -> torch.Tensor:
        """``g ⊙ C(y)``: the part that is linear in ``y`` (divide by the statistic afterwards)."""
        if self.centre:
            y = y - y.mean(-1, keepdim=True)
        return y * self.gain.to(y.device)

    def scaled(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``g ⊙ C(y) · scale`` with ``scale`` of y's shape without its last dimension, in one pass over ``y``."""
        if self.centre:
            y = y - y.mean(-1, keepdim=True)
        return y * (scale[..., None] * self.gain.to(y.device))

    def constant(self, like: torch.Tensor) -> torch.Tensor:
        """``β`` (the norm's bias) as a tensor like ``like``; zeros where the norm has none."""
        return torch.zeros_like(like) if self.bias is None else self.bias.to(like.device).expand_as(like)
