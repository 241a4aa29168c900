"""Configurations: one sparsified model each (:class:`Config`: dense, experts of a split with a router, CATS or
TEAL, at a share kept), and the set notebook 07 evaluates (:func:`default_configs`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from ._choices import METHODS, ROUTERS, SPLITS, check_choice, check_share
from ._partitions import split_kind

__all__ = ["Config", "default_configs", "replace_share"]


@dataclass(frozen=True)
class Config:
    """One sparsified model: ``method`` dense / experts (a split and a router) / cats / teal, and ``share``:
    the share of experts kept (experts), of memories kept (cats), of entries kept (teal). ``split`` may name
    a draw of the random split (``random.2``)."""

    method: str
    split: str = ""
    router: str = ""
    share: float = 1.0

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_share(self.share)
        if self.method == "experts":
            check_choice("split", split_kind(self.split), SPLITS)
            check_choice("router", self.router, ROUTERS)

    @property
    def name(self) -> str:
        if self.method == "dense":
            return "dense"
        parts = [self.method] + ([self.split, self.router] if self.method == "experts" else [])
        return "-".join(parts + [f"{self.share:.4f}".rstrip("0").rstrip(".")])

    def as_dict(self) -> dict:
        return {"config": self.name, "method": self.method, "split": self.split, "router": self.router,
                "share": self.share}


def default_configs(shares: Sequence[float], splits: Sequence[str] = SPLITS,
                    routers: Sequence[str] = ("ground_truth", "similarity", "mlp")) -> list[Config]:
    """Dense; every split x router; random experts of the random split (the control); CATS; TEAL. ``splits``
    may list the random split's draws (``ExpertSplits.splits``): each draw gets every router."""
    shares = [check_share(s) for s in shares if s < 1.0]
    out = [Config("dense")]
    out += [Config("experts", s, r, share) for s in splits for r in routers for share in shares]
    out += [Config("experts", s, "random", share) for s in splits if split_kind(s) == "random" for share in shares]
    out += [Config("cats", share=share) for share in shares]
    out += [Config("teal", share=share) for share in shares]
    return out


def replace_share(config: Config, share: float) -> Config:
    """``config`` at another share kept."""
    return replace(config, share=check_share(share))
