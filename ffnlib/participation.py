"""Section 5 per memory: how often each memory takes part in its layer's prediction on held-out text.

:func:`ffnlib.aggregation.analyse_aggregation` keeps one row per (example, layer): how many memories are active,
how many agree with the layer's prediction. This module turns the same examples around, one row per (layer,
memory), so a memory's card can say how it takes part:

- ``active_rate``: the share of held-out examples where the memory is active, under the run's ``active_rule``
  (``|m_i| > threshold · max_j |m_j|`` for gated FFNs, ``m_i > 0`` for ReLU ones);
- ``mean_update_share``: its mean share of the layer's update sizes, ``|m_i|·||v_i|| / Σ_j |m_j|·||v_j||``
  (``||v_i||`` as the residual receives it, ``Adapter.written_value_norms``, as ``n_norm`` ranks them);
- ``agreeing_rate``: the share of examples where it is active and its own prediction (the top token of ``v_i``,
  or of ``-v_i`` for a negative coefficient) is the layer output's top token (``agree_output``, the authors'
  code's reading).

The numbers are exact tallies of the Section 5 columns: per layer, ``Σ_i active_rate_i · n`` is ``Σ n_active``
and ``Σ_i agreeing_rate_i · n`` is ``Σ agree_output`` (tested). They need the coefficients of every memory, which
the per-example table does not keep, so one more forward pass over the same prefixes (stopped after the last
block, no vocabulary projection) computes them; the result is cached next to the Section 5 result, and an
interrupted run resumes from its finished batches.

Usage::

    from ffnlib import aggregation, participation
    result = aggregation.analyse_aggregation(loaded, n_examples=200, out_dir="results/smollm2-135m/ci")
    memories = participation.analyse_memories(loaded, result, out_dir="results/smollm2-135m/ci")
    memories.sort_values("agreeing_rate", ascending=False).head()
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .aggregation import AggregationResult, active_mask, memory_predictions, memory_top_tokens
from .batching import plan_shortest_first, prefix_inputs
from .capture import capture, forward_until_stop, stop_after
from .errors import ParameterError
from .progress import tqdm
from .storage import fingerprint, load_result, save_result

__all__ = ["MEMORY_ANALYSIS", "MEMORY_COLUMNS", "memory_tallies", "value_tops", "batch_tallies", "tallies_frame",
           "memories_request", "analyse_memories", "load_memories"]

MEMORY_ANALYSIS = "section5-memories"  # the cached result's manifest "analysis"
MEMORY_COLUMNS = {"active_rate": "share of held-out examples where it is active",
                  "mean_update_share": "mean share of the layer's update |m|·||v||",
                  "agreeing_rate": "share of held-out examples where it agrees with the layer's prediction"}
_TALLIES = ("active", "update_share", "agreeing")
_VERSION = 1


@torch.no_grad()
def memory_tallies(coefficients: torch.Tensor, value_norms: torch.Tensor, active: torch.Tensor,
                   predictions: torch.Tensor, layer_top: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per memory, sums over the examples of one batch; inputs are (layers, examples, d_ff), ``value_norms``
    (layers, d_ff), ``layer_top`` (layers, examples). Returns (layers, d_ff) float64 tensors: ``active`` (count),
    ``update_share`` (sum of ``|m_i|·||v_i|| / Σ_j |m_j|·||v_j||``; 0 where every coefficient is 0) and
    ``agreeing`` (count of active memories whose prediction is the layer's top token)."""
    sizes = coefficients.abs().double() * value_norms.double()[:, None, :]
    total = sizes.sum(dim=-1, keepdim=True)
    shares = torch.where(total > 0, sizes / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    agreeing = (predictions == layer_top.unsqueeze(-1)) & active
    return {"active": active.double().sum(dim=1), "update_share": shares.sum(dim=1),
            "agreeing": agreeing.double().sum(dim=1)}


def tallies_frame(tallies: dict[str, np.ndarray], n_examples: int) -> pd.DataFrame:
    """One row per (layer, memory) with the rates of :data:`MEMORY_COLUMNS`, from tallies summed over
    ``n_examples`` examples."""
    if n_examples <= 0:
        raise ParameterError(f"n_examples must be positive, got {n_examples}.")
    n_layers, d_ff = np.asarray(tallies["active"]).shape
    return pd.DataFrame({
        "layer": np.repeat(np.arange(n_layers, dtype=np.int32), d_ff),
        "memory": np.tile(np.arange(d_ff, dtype=np.int32), n_layers),
        "active_rate": np.asarray(tallies["active"], np.float64).reshape(-1) / n_examples,
        "mean_update_share": np.asarray(tallies["update_share"], np.float64).reshape(-1) / n_examples,
        "agreeing_rate": np.asarray(tallies["agreeing"], np.float64).reshape(-1) / n_examples,
        "n_examples": np.int32(n_examples)})


def memories_request(loaded, result: AggregationResult) -> tuple[dict, str]:
    """The manifest and result name of the per-memory table of one Section 5 result."""
    if not isinstance(result, AggregationResult):
        raise ParameterError(f"analyse_memories needs the AggregationResult of analyse_aggregation, got "
                             f"{type(result).__name__}.")
    if result.manifest.get("model") != loaded.key:
        raise ParameterError(f"The Section 5 result is of {result.manifest.get('model')!r}, not of {loaded.key!r}.")
    manifest = {"analysis": MEMORY_ANALYSIS, "version": _VERSION, "model": loaded.key,
                "weights": loaded.file_hash, "of": fingerprint(result.manifest),
                **{k: result.manifest[k] for k in ("n_examples", "seed", "layers", "d_ff", "active_rule",
                                                   "active_threshold", "batch_tokens")}}
    return manifest, f"aggregation-memories-{fingerprint(manifest)}"


def load_memories(out_dir, loaded, result: AggregationResult) -> pd.DataFrame | None:
    """The cached per-memory table of ``result`` in ``out_dir``, or None."""
    manifest, name = memories_request(loaded, result)
    return None if out_dir is None else load_result(out_dir, name, manifest)


def value_tops(loaded, result: AggregationResult, value_cache=None, out_dir=None, progress: bool = False):
    """Each memory's own prediction as the Section 5 ``result`` read it: the top token of ``v_i`` and, where
    negative coefficients count (gated FFNs, the relative rule), of ``-v_i`` (``(layers, d_ff)`` tensors, the
    second None otherwise); cached, ``ffnlib.aggregation.memory_top_tokens``."""
    negative = loaded.adapter.gated or result.manifest["active_rule"] == "relative"
    return memory_top_tokens(loaded, negative=negative, cache=value_cache, progress=progress, projections=out_dir)


@torch.no_grad()
def batch_tallies(loaded, result, batch, settings, top_positive, top_negative, value_norms, layer_tops):
    """:func:`memory_tallies` of one batch of ``result``'s examples, from one forward pass (stopped after the last
    block); ``layer_tops`` is the layer output's top token per (layer, example)."""
    adapter = loaded.adapter
    ids, mask, last = prefix_inputs(result.examples, batch, loaded.pad_id, loaded.device)
    rows = torch.arange(len(batch), device=loaded.device)
    with capture(loaded, what=("coefficients",)) as acts, stop_after(loaded, adapter.n_layers - 1):
        forward_until_stop(loaded.model, input_ids=ids, attention_mask=mask, use_cache=False)
        coefficients = torch.stack([acts.coefficients[layer][rows, last]
                                    for layer in range(adapter.n_layers)]).float()
    active = active_mask(coefficients, settings["active_rule"], settings["active_threshold"])
    predictions = memory_predictions(coefficients, top_positive[:, None, :],
                                     None if top_negative is None else top_negative[:, None, :])
    layer_top = torch.as_tensor(layer_tops[:, batch], device=coefficients.device)
    return memory_tallies(coefficients, value_norms, active, predictions, layer_top)


def analyse_memories(loaded, result: AggregationResult, out_dir: str | Path | None = None,
                     value_cache: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """The per-memory table (layer, memory, :data:`MEMORY_COLUMNS`, n_examples) of a Section 5 ``result``, on
    the same examples and settings; cached in ``out_dir`` under a manifest with ``analysis`` =
    :data:`MEMORY_ANALYSIS`, reused when asked again, resumed batch by batch when interrupted."""
    manifest, name = memories_request(loaded, result)
    cached = load_memories(out_dir, loaded, result)
    if cached is not None:
        return cached
    adapter, settings = loaded.adapter, result.manifest
    frame = result.frame.sort_values(["example", "layer"], kind="stable")
    layer_tops = frame["output_top"].to_numpy(np.int64).reshape(len(result.examples), adapter.n_layers).T
    top_positive, top_negative = value_tops(loaded, result, value_cache, out_dir, progress)
    value_norms = torch.stack([adapter.written_value_norms(layer) for layer in range(adapter.n_layers)])
    batches = plan_shortest_first(result.examples["position"].to_numpy() + 1, int(settings["batch_tokens"]))
    partial = Path(out_dir) / f"{name}.partial" if out_dir is not None else None
    totals = {key: np.zeros((adapter.n_layers, adapter.d_ff)) for key in _TALLIES}
    for index, batch in enumerate(tqdm(batches, desc="Section 5 per memory", disable=not progress)):
        checkpoint = {**manifest, "batch": index, "batch_examples": [int(i) for i in batch]}
        part = load_result(partial, f"batch-{index:05d}", checkpoint) if partial is not None else None
        if part is None:
            tallies = batch_tallies(loaded, result, batch, settings, top_positive, top_negative, value_norms,
                                     layer_tops)
            part = pd.DataFrame({key: tallies[key].cpu().numpy().reshape(-1) for key in _TALLIES})
            if partial is not None:
                save_result(partial, f"batch-{index:05d}", part, checkpoint)
        for key in _TALLIES:
            totals[key] += part[key].to_numpy(np.float64).reshape(adapter.n_layers, adapter.d_ff)
    table = tallies_frame(totals, len(result.examples))
    if out_dir is not None:
        save_result(out_dir, name, table, manifest)
        shutil.rmtree(partial, ignore_errors=True)
    return table
