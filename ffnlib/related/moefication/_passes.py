"""Passes of a sentence table through the model: batches of right-padded token ids, the mask of their real tokens,
and the activations captured at some layers with the rest of the model skipped. The batching is the held-out
evaluation's (``ffnlib.evaluate.sentence_batches``, on the miner's), the capture and the early stop
``ffnlib.capture``'s; the co-activation counts of the co-activation split are the one pass that needs nothing else."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ...capture import capture, forward_until_stop, stop_after
from ...evaluate import MAX_PADDING, sentence_batches
from ...progress import tqdm
from ._ffn import memory_sizes, top_share_mask

__all__ = ["batches", "real_tokens", "run_until", "captured", "coactivation_counts"]

def batches(loaded, table: pd.DataFrame, batch_tokens: int, max_padding: float = MAX_PADDING):
    """(rows, ids (rows, T) right-padded on the model's device, lengths) per batch, longest first
    (:func:`ffnlib.evaluate.sentence_batches`: the miner's batching and ``LoadedModel.pad_id``)."""
    for batch in sentence_batches(loaded, table["token_ids"].tolist(), batch_tokens, max_padding):
        yield batch.rows, batch.ids, batch.lengths


def real_tokens(lengths: np.ndarray, width: int, n_bos: int, device) -> torch.Tensor:
    """(rows, width) True at real tokens after the BOS tokens (BOS activations are outliers: left out)."""
    steps = torch.arange(width, device=device)[None, :]
    return (steps < torch.as_tensor(lengths, device=device)[:, None]) & (steps >= n_bos)


def run_until(loaded, ids: torch.Tensor, last_layer: int) -> None:
    """Run right-padded ``ids`` through the model up to block ``last_layer`` (the rest is skipped). They need no
    attention mask: with causal attention, real tokens never see the padding."""
    with stop_after(loaded, last_layer):
        forward_until_stop(loaded.model, input_ids=ids, use_cache=False)


def captured(loaded, table: pd.DataFrame, layers: list[int], what, batch_tokens: int, desc: str, progress: bool):
    """Run ``table`` through the model, capturing ``what`` at ``layers``; yields (rows, real mask, acts)."""
    total = int(sum(len(t) for t in table["token_ids"]))
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not progress)
    try:
        with torch.inference_mode():
            for rows, ids, lengths in batches(loaded, table, batch_tokens):
                with capture(loaded, layers, what=what) as acts:
                    run_until(loaded, ids, max(layers))
                yield rows, real_tokens(lengths, ids.shape[1], len(loaded.bos), ids.device), acts
                bar.update(int(lengths.sum()))
    finally:
        bar.close()


def coactivation_counts(loaded, table: pd.DataFrame, layers: list[int], active_share: float = 0.1,
                        batch_tokens: int = 1024, progress: bool = True) -> dict[int, torch.Tensor]:
    """Per layer, (d_ff, d_ff) counts of training tokens where two memories are both active (in the token's
    top ``active_share`` by ``|m_i|·||v_i||``)."""
    adapter = loaded.adapter
    norms = {layer: adapter.written_value_norms(layer) for layer in layers}
    counts = {layer: torch.zeros(adapter.d_ff, adapter.d_ff) for layer in layers}
    for _, real, acts in captured(loaded, table, layers, ("coefficients",), batch_tokens,
                                  "Co-activation graph", progress):
        flat = real.reshape(-1)
        for layer in layers:
            m = acts.coefficients[layer].reshape(-1, adapter.d_ff)[flat]
            active = top_share_mask(memory_sizes(m, norms[layer]), active_share).float()
            counts[layer] += active.T @ active
    return counts
