"""Next-token negative log-likelihood: the one formula every held-out number is computed with.

:func:`token_nll` is ``logsumexp(logits) - logit[target]`` on float32 logits (float64 stays float64).
:mod:`ffnlib.evaluate` runs it on held-out sentences of a loaded model (knowledge neurons' and MoEfication's
perplexities); :func:`block_losses` runs it on the fixed-length held-out blocks of a model being trained
(:mod:`ffnlib.training`, notebook 08), which have no padding and need no adapter. It sits at the bottom of the
package, beside ``models``, so that training can use it.

>>> import torch
>>> logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
>>> token_nll(logits, torch.tensor([0, 0])).round(decimals=4)
tensor([0.6931, 0.1269])
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["token_nll", "block_losses"]


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n, vocab) logits and (n,) target ids: each target's NLL in nats, computed in float32 (float64 logits stay
    float64)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None])[:, 0]


@torch.no_grad()
def block_losses(model, blocks: torch.Tensor, batch: int = 32) -> np.ndarray:
    """Each block's mean next-token NLL (nats per token), (n_blocks,), for a causal LM's ``model(ids).logits`` on
    (n_blocks, context) token ids without padding: the unit of notebook 08's intervals."""
    model.eval()
    out = []
    for start in range(0, len(blocks), batch):
        ids = blocks[start: start + batch]
        logits = model(ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
        nll = token_nll(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        out.append(nll.view(ids.shape[0], -1).mean(dim=1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
