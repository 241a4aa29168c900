"""Interventions: the next-token distribution and a greedy continuation, without and with edited memories."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import ParameterError
from ..interventions import intervene
from ._common import check_positive, check_prompt, top_distribution

__all__ = ["parse_edits", "format_edits", "greedy_continuation", "InterventionComparison", "compare_intervention"]


_EDIT = re.compile(r"^\s*L?(-?\d+)\s*[:/]\s*#?(\d+)\s*(?:=\s*(\S+))?\s*$", re.I)


def parse_edits(text: str) -> dict[tuple[int, int], float]:
    """Read edits written as ``layer:memory`` (switch off) or ``layer:memory=value`` (set the coefficient),
    separated by commas, semicolons or new lines, e.g. ``"28:1234, 20:77=5"``."""
    if not isinstance(text, str):
        raise ParameterError(f"Edits must be text like '28:1234, 20:77=5', got {text!r}.")
    edits: dict[tuple[int, int], float] = {}
    for part in re.split(r"[,;\n]", text):
        if not part.strip():
            continue
        match = _EDIT.match(part)
        if not match:
            raise ParameterError(f"Cannot read the edit {part.strip()!r}: write layer:memory to switch a memory "
                                 "off, or layer:memory=value to set its coefficient (e.g. 28:1234=0, 20:77=5).")
        layer, memory, value = int(match.group(1)), int(match.group(2)), match.group(3)
        if value is None or value.lower() == "off":
            amount = 0.0
        else:
            try:
                amount = float(value)
            except ValueError as exc:
                raise ParameterError(f"The value in {part.strip()!r} must be a number (or 'off').") from exc
            if not np.isfinite(amount):
                raise ParameterError(f"The value in {part.strip()!r} must be a finite number.")
        edits[(layer, memory)] = amount
    return edits


def format_edits(edits: Mapping[tuple[int, int], float]) -> str:
    """The inverse of :func:`parse_edits`."""
    return ", ".join(f"{layer}:{memory}" if value == 0 else f"{layer}:{memory}={value:g}"
                     for (layer, memory), value in edits.items())


@torch.no_grad()
def greedy_continuation(loaded, ids: Sequence[int], max_new_tokens: int = 10) -> list[int]:
    """The greedy continuation of ``ids`` (token ids), with the model's KV cache.

    Inside ``intervene`` every step runs under the edits (the cached keys and values of earlier positions
    were computed under them too), so the continuation is that of the edited model.
    """
    eos = loaded.tokenizer.eos_token_id
    new: list[int] = []
    past, step = None, torch.tensor([list(ids)], device=loaded.device)
    for _ in range(max_new_tokens):
        out = loaded.model(input_ids=step, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = int(out.logits[0, -1].argmax())
        new.append(token)
        if eos is not None and token == eos:
            break
        step = torch.tensor([[token]], device=loaded.device)
    return new


@dataclass
class InterventionComparison:
    """The next-token distribution and a greedy continuation, without and with the edits.

    ``changes``: the union of both top-k lists: token_id, token, p_before, p_after, logit_before,
    logit_after, logit_change, logprob_change.
    """

    prompt: str
    edits: dict
    before: pd.DataFrame
    after: pd.DataFrame
    changes: pd.DataFrame
    continuation_before: str
    continuation_after: str


@torch.no_grad()
def compare_intervention(loaded, prompt: str, edits: Mapping[tuple[int, int], float], k: int = 10,
                         max_new_tokens: int = 10, scale: bool = False,
                         track: Sequence[int] = ()) -> InterventionComparison:
    """Run the prompt without and with ``edits`` (``{(layer, memory): coefficient}``; 0 switches off).

    ``changes`` covers the top-``k`` tokens of both runs and the token ids in ``track``. Uses
    :func:`ffnlib.interventions.intervene`, whose hooks are removed afterwards in every case.
    """
    prompt = check_prompt(prompt)
    if not edits:
        raise ParameterError("No edits given: choose memories to switch off or set (e.g. 28:1234 or 20:77=5).")
    k = check_positive("k", k)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ParameterError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}.")
    ids = loaded.encode(prompt)
    inputs = torch.tensor([ids], device=loaded.device)
    base = loaded.model(inputs).logits[0, -1].float()
    continuation_before = greedy_continuation(loaded, ids, max_new_tokens)
    with intervene(loaded, dict(edits), scale=scale):
        edited = loaded.model(inputs).logits[0, -1].float()
        continuation_after = greedy_continuation(loaded, ids, max_new_tokens)
    before, after = top_distribution(loaded, base, k), top_distribution(loaded, edited, k)
    union = list(dict.fromkeys(before["token_id"].tolist() + after["token_id"].tolist() + [int(t) for t in track]))
    p_base, p_edit = base.softmax(-1), edited.softmax(-1)
    changes = pd.DataFrame({"token_id": union, "token": loaded.token_strings(union),
                            "p_before": p_base[union].cpu().numpy(), "p_after": p_edit[union].cpu().numpy(),
                            "logit_before": base[union].cpu().numpy(), "logit_after": edited[union].cpu().numpy()})
    changes["logit_change"] = changes["logit_after"] - changes["logit_before"]
    changes["logprob_change"] = np.log(changes["p_after"].clip(lower=1e-30)) - np.log(
        changes["p_before"].clip(lower=1e-30))
    decode = loaded.tokenizer.decode
    return InterventionComparison(prompt=prompt, edits=dict(edits), before=before, after=after, changes=changes,
                                  continuation_before=decode(continuation_before),
                                  continuation_after=decode(continuation_after))
