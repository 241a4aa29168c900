"""Every token's coefficients of a layer over a corpus sample, for the memory view's histogram."""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from ..batching import pad_right
from ..capture import capture, forward_until_stop, stop_after
from ..errors import ParameterError
from ._common import check_memory, check_positive

__all__ = ["CoefficientSample"]


class CoefficientSample:
    """Every token's coefficients of one layer over a sample of sentences, for the memory view's histogram.

    A layer is computed when first asked for (one batched forward pass that stops after that layer) and
    the last ``cached_layers`` layers are kept; :meth:`prefetch` gets many memories of many layers in one
    pass. BOS positions and padding are left out. Sentences are cut to ``max_tokens`` tokens.
    """

    def __init__(self, loaded, texts: Iterable[str] | pd.DataFrame, max_tokens: int = 48, batch_size: int = 16,
                 cached_layers: int = 4):
        if isinstance(texts, pd.DataFrame):
            texts = texts["text"].tolist()
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise ParameterError("CoefficientSample needs at least one non-empty sentence.")
        self.loaded = loaded
        self.batch_size = check_positive("batch_size", batch_size)
        self.cached_layers = check_positive("cached_layers", cached_layers)
        self.ids = [loaded.encode(t)[:check_positive("max_tokens", max_tokens)] for t in texts]
        self._start = len(loaded.bos)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._columns: dict[tuple[int, int], np.ndarray] = {}

    @property
    def n_sentences(self) -> int:
        return len(self.ids)

    @property
    def kept_layers(self) -> list[int]:
        """The layers whose whole coefficients are kept (at most ``cached_layers``, the most recent last)."""
        return list(self._cache)

    @property
    def n_tokens(self) -> int:
        return sum(max(0, len(ids) - self._start) for ids in self.ids)

    def _run(self, layers: list[int], keep) -> None:
        """One batched pass over the sample that stops after the last of ``layers``; ``keep(layer, m)`` gets
        each layer's coefficients (real tokens only, BOS left out) batch by batch."""
        pad = self.loaded.pad_id
        for start in range(0, len(self.ids), self.batch_size):
            batch = self.ids[start: start + self.batch_size]
            inputs, mask = pad_right(batch, pad)
            with capture(self.loaded, layers, what=("coefficients",)) as acts, \
                    stop_after(self.loaded, max(layers)), torch.no_grad():
                forward_until_stop(self.loaded.model, input_ids=inputs.to(self.loaded.device),
                                   attention_mask=mask.to(self.loaded.device), use_cache=False)
            real = mask.bool()
            real[:, : self._start] = False
            for layer in layers:
                keep(layer, acts.coefficients[layer].float().cpu()[real])

    def layer(self, layer: int) -> torch.Tensor:
        """The coefficients (n_tokens, d_ff) of one layer, on the CPU."""
        layer = self.loaded.adapter.check_layer(layer)
        if layer in self._cache:
            self._cache.move_to_end(layer)
            return self._cache[layer]
        parts: list[torch.Tensor] = []
        self._run([layer], lambda _, m: parts.append(m))
        self._cache[layer] = torch.cat(parts)
        while len(self._cache) > self.cached_layers:
            self._cache.popitem(last=False)
        return self._cache[layer]

    def prefetch(self, memories: Iterable[tuple[int, int]]) -> None:
        """Compute the coefficients of many memories, of any layers, in one pass over the sample (the atlas
        uses this), keeping only those memories' columns."""
        wanted: dict[int, list[int]] = {}
        for layer, memory in memories:
            layer, memory = check_memory(self.loaded.adapter, layer, memory)
            if (layer, memory) not in self._columns and layer not in self._cache:
                wanted.setdefault(layer, []).append(memory)
        if not wanted:
            return
        parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in wanted}
        self._run(sorted(wanted), lambda layer, m: parts[layer].append(m[:, wanted[layer]]))
        for layer, chunks in parts.items():
            columns = torch.cat(chunks)
            for j, memory in enumerate(wanted[layer]):
                self._columns[(layer, memory)] = columns[:, j].numpy()

    def active_share(self, layers: Iterable[int], rule: str = "relative",
                     threshold: float = 0.1) -> dict[int, np.ndarray]:
        """Per layer, the share of the sample's tokens at which each memory is active under notebook 03's rule
        (``ffnlib.aggregation.active_mask``), in one pass over the sample."""
        from ..aggregation import active_mask

        layers = sorted({self.loaded.adapter.check_layer(layer) for layer in layers})
        counts = {layer: torch.zeros(self.loaded.adapter.d_ff, dtype=torch.float64) for layer in layers}
        if layers:
            self._run(layers, lambda layer, m: counts[layer].add_(active_mask(m, rule, threshold).sum(0)))
        return {layer: (count / max(self.n_tokens, 1)).numpy() for layer, count in counts.items()}

    def of(self, layer: int, memory: int) -> np.ndarray:
        """The coefficients of one memory at every token of the sample."""
        layer, memory = check_memory(self.loaded.adapter, layer, memory)
        if (layer, memory) in self._columns and layer not in self._cache:
            return self._columns[(layer, memory)]
        return self.layer(layer)[:, memory].numpy()
