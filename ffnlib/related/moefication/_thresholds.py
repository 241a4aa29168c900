"""CATS and TEAL thresholds (:func:`calibrate_thresholds`): per layer and share kept, the magnitude above which an
entry is kept, calibrated as quantiles of a seeded sample of the calibration sentences' gate activations (CATS),
FFN inputs and coefficients (TEAL). Cached by its request."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ...mining import corpus_fingerprint, prepare_sentences
from ...progress import say
from ...precision import full_precision
from ...storage import fingerprint, load_result, save_result
from ._cache import base_request
from ._choices import check_share
from ._passes import captured

__all__ = ["THRESHOLD_WHAT", "calibrate_thresholds"]


class _Sampler:
    """A seeded uniform sample of at most ``budget`` values out of ``total`` offered in chunks."""

    def __init__(self, budget: int, total: int, generator: torch.Generator):
        self.rate = min(1.0, budget / max(total, 1))
        self.generator = generator
        self.parts: list[torch.Tensor] = []

    def offer(self, values: torch.Tensor) -> None:
        values = values.reshape(-1).float()
        if self.rate < 1.0:
            keep = torch.rand(values.numel(), generator=self.generator) < self.rate
            values = values[keep.to(values.device)]
        self.parts.append(values.cpu())

    def quantiles(self, qs: Sequence[float]) -> np.ndarray:
        values = torch.cat(self.parts).numpy()
        return np.quantile(values, qs) if values.size else np.full(len(qs), np.nan)


THRESHOLD_WHAT = {"cats": ("gate_activation",), "teal": ("input", "coefficient")}


def calibrate_thresholds(loaded, sentences: pd.DataFrame, layers, keeps: Sequence[float], sample: int = 1 << 20,
                         seed: int = 0, batch_tokens: int = 1024, out_dir=None, progress: bool = True) -> pd.DataFrame:
    """Per layer and share kept, the magnitude thresholds of CATS and TEAL, calibrated on ``sentences``.

    Columns: method (cats/teal), what (gate_activation, input, coefficient), layer, keep, threshold: keep an
    entry when its magnitude is >= threshold, so that a share ``keep`` of the calibration entries is kept.
    ``gate_activation`` is ``|act(gate_i·x)|`` (for a plain FFN, ``|m_i|``), ``input`` is ``|x_j|``, and
    ``coefficient`` is ``|m_i|``. Each quantile is taken over a seeded sample of at most ``sample`` entries.
    """
    adapter = loaded.adapter
    layers = adapter.check_layers(layers)
    keeps = sorted({check_share(k, "keep") for k in keeps})
    table = prepare_sentences(loaded, sentences)
    request = {**base_request(loaded, layers, "thresholds"), "keeps": keeps, "sample": int(sample), "seed": int(seed),
               "corpus": corpus_fingerprint(table), "sentences": len(table)}
    name = f"moe-thresholds-{fingerprint(request)}"
    if out_dir is not None:
        cached = load_result(out_dir, name, request)
        if cached is not None:
            say(f"Reusing the cached CATS/TEAL thresholds {Path(out_dir) / name}.parquet.", progress)
            return cached
    tokens = int(sum(len(t) - len(loaded.bos) for t in table["token_ids"]))
    gen = torch.Generator().manual_seed(seed)
    widths = {"gate_activation": adapter.d_ff, "input": adapter.d_model, "coefficient": adapter.d_ff}
    samplers = {(what, layer): _Sampler(sample, tokens * widths[what], gen) for what in widths for layer in layers}
    acts_fn = {layer: adapter.activation(layer) for layer in layers}
    for _, real, acts in captured(loaded, table, layers, ("coefficients", "ffn_input"), batch_tokens,
                                   "Calibrating CATS and TEAL", progress):
        flat = real.reshape(-1)
        for layer in layers:
            x = acts.ffn_input[layer].reshape(-1, adapter.d_model)[flat]
            m = acts.coefficients[layer].reshape(-1, adapter.d_ff)[flat]
            gate_act = full_precision(acts_fn[layer](adapter.gate(layer)(x.to(adapter.dtype)))) if adapter.gated else m
            samplers[("gate_activation", layer)].offer(gate_act.abs())
            samplers[("input", layer)].offer(x.abs())
            samplers[("coefficient", layer)].offer(m.abs())
    rows = []
    for (what, layer), sampler in samplers.items():
        qs = sampler.quantiles([1.0 - k for k in keeps])
        method = "cats" if what == "gate_activation" else "teal"
        for keep, q in zip(keeps, qs):
            rows.append({"method": method, "what": what, "layer": layer, "keep": keep,
                         "threshold": 0.0 if keep >= 1.0 else float(q)})
    frame = pd.DataFrame(rows).sort_values(["method", "what", "layer", "keep"]).reset_index(drop=True)
    if out_dir is not None:
        save_result(out_dir, name, frame, request)
    return frame
