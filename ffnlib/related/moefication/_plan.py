"""A plan (:class:`Plan`): the splits, routers and thresholds that turn a :class:`Config` into sparsifying rules for
every MoEfied layer, and what share of the FFN's weights a configuration reads per token."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from ...errors import ParameterError
from ._choices import experts_kept
from ._configs import Config
from ._partitions import RANDOM_SEED_STEP, random_split_seed, split_draw, split_kind
from ._routers import Routers, centroid_keys
from ._sparsify import CatsRule, ExpertRule, Record, Rule, TealRule, sparsify
from ._splits import ExpertSplits

__all__ = ["Plan"]


@dataclass
class Plan:
    """Everything needed to sparsify the model by a :class:`Config`: splits, routers, thresholds."""

    loaded: object
    splits: ExpertSplits
    routers: Routers | None = None
    thresholds: pd.DataFrame | None = None
    seed: int = 0
    cluster_rows: str = "gate"

    @property
    def layers(self) -> list[int]:
        return self.splits.layers

    def norms(self) -> dict[int, torch.Tensor]:
        return {layer: self.loaded.adapter.written_value_norms(layer) for layer in self.layers}

    def _threshold(self, method: str, what: str, layer: int, keep: float) -> float:
        if self.thresholds is None:
            raise ParameterError(f"{method} needs calibrated thresholds: pass thresholds=calibrate_thresholds(...).")
        t = self.thresholds
        rows = t[(t["method"] == method) & (t["what"] == what) & (t["layer"] == layer) & np.isclose(t["keep"], keep)]
        if rows.empty:
            raise ParameterError(f"No {method} threshold for layer {layer} at keep={keep}: calibrated keeps are "
                                 f"{sorted(t['keep'].unique().tolist())}.")
        return float(rows["threshold"].iloc[0])

    def rules(self, config: Config) -> dict[int, Rule]:
        adapter = self.loaded.adapter
        if config.method == "dense":
            return {}
        rules: dict[int, Rule] = {}
        for layer in self.layers:
            if config.method == "cats":
                rules[layer] = CatsRule(self._threshold("cats", "gate_activation", layer, config.share),
                                         adapter.activation(layer) if adapter.gated else None)
            elif config.method == "teal":
                rules[layer] = TealRule(self._threshold("teal", "input", layer, config.share),
                                         self._threshold("teal", "coefficient", layer, config.share))
            else:
                labels = self.splits.labels(config.split, layer)
                n_experts = self.splits.n_experts
                k = experts_kept(config.share, n_experts)
                w = c2 = mlp = gen = None
                if config.router == "similarity":
                    w, c2 = centroid_keys(adapter, layer, labels, n_experts, self.cluster_rows)
                elif config.router == "mlp":
                    if self.routers is None:
                        raise ParameterError("The mlp router needs trained routers: pass routers=train_routers(...).")
                    mlp = self.routers.router(config.split, layer)
                elif config.router == "random":
                    gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * layer + 17
                                                        + RANDOM_SEED_STEP * split_draw(config.split))
                rules[layer] = ExpertRule(labels, n_experts, k, config.router, adapter.written_value_norms(layer),
                                           w, c2, mlp, gen)
        return rules

    def split_seeds(self, config: Config) -> list[int] | None:
        """Per layer, the seed of a random split's draw (None for the other configurations): part of the
        evaluation cache's key."""
        if config.method != "experts" or split_kind(config.split) != "random":
            return None
        seed = int(self.splits.manifest.get("seed", 0))
        return [random_split_seed(seed, layer, split_draw(config.split)) for layer in self.layers]

    @contextmanager
    def applied(self, config: Config, record: Record | None = None) -> Iterator[None]:
        """Run the model sparsified by ``config`` inside the block (hooks removed on exit)."""
        with sparsify(self.loaded.adapter, self.rules(config), record):
            yield

    def ffn_share(self, config: Config, kept_memories: float, kept_inputs: float) -> float:
        """The share of the FFN's weights a configuration reads per token (routers' own cost left out)."""
        gated = self.loaded.adapter.gated
        n = 3 if gated else 2
        if config.method == "dense":
            return 1.0
        if config.method == "experts":
            return experts_kept(config.share, self.splits.n_experts) / self.splits.n_experts
        if config.method == "cats":  # the whole gate (or, plain, the whole key matrix) is computed
            return (1 + (n - 1) * kept_memories) / n
        return ((n - 1) * kept_inputs + kept_memories) / n  # teal
