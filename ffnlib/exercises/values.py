"""Exercises 02 · values (Section 4): a value read through the final norm's gain and the head, and its agreement
with the token after its key's trigger prefix."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .checking import CheckFailed, call_student, compare, name_of, passed

__all__ = ["check_value_distribution", "check_agrees"]


def check_value_distribution(fn, loaded, layer: int, memories: Sequence[int] = (0, 1, 2)) -> None:
    """``fn(value, norm_gain, head_weight)`` -> p (vocab,), against ``adapter.logits_from_values``."""
    adapter = loaded.adapter
    values, gain, head = adapter.values(layer), adapter.norm_gain(), adapter.head.weight.detach()
    with torch.no_grad():
        for memory in memories:
            v = values[memory]
            expected = torch.softmax(adapter.logits_from_values(v[None]).float(), dim=-1)[0]
            got = call_student(fn, v, gain, head)
            if isinstance(got, torch.Tensor) and got.shape == expected.shape and abs(float(got.sum()) - 1) > 1e-3:
                raise CheckFailed(f"`{name_of(fn)}`: your numbers sum to {float(got.sum()):.3g}, not 1. These look "
                                  "like logits: turn them into probabilities with a softmax over the vocabulary.")
            mistakes = [(torch.softmax((v @ head.T).float(), dim=-1),
                         "you projected the raw value. The model reads its residual through the final norm: "
                         "multiply by the norm's gain g first, p = softmax((g ⊙ v) · Eᵀ)."),
                        (torch.softmax(((v / gain) @ head.T).float(), dim=-1),
                         "you divided by the gain; the final norm multiplies by it: p = softmax((g ⊙ v) · Eᵀ).")]
            compare(fn, got, expected, "one probability per vocabulary token: (vocab,)", mistakes,
                    rtol=1e-3, atol=1e-7)
    passed(fn, f"the same distribution as ffnlib's projection for memories {list(memories)} of layer {layer}.")


def check_agrees(fn, loaded, sentences: pd.DataFrame, n_cases: int = 60, seed: int = 0) -> None:
    """``fn(value_top_token, token_ids, position)`` -> bool: does the token after the trigger prefix (which
    ends at ``position``) equal the value's top token? Against :func:`ffnlib.values.value_agreement`."""
    from ..values import value_agreement

    rng = np.random.default_rng(seed)
    token_lists = [list(loaded.encode(t)) for t in sentences["text"].head(20)]
    cases = []
    for case in range(n_cases):
        ids = token_lists[case % len(token_lists)]
        position = len(ids) - 1 if case % 5 == 4 else int(rng.integers(0, len(ids) - 1))
        nxt = ids[position + 1] if position + 1 < len(ids) else -1
        kind = case % 3
        top = nxt if kind == 0 and nxt >= 0 else ids[position] if kind == 1 else int(rng.integers(0, 1000))
        cases.append((top, ids, position, nxt))
    # ffnlib's own answer: one memory per case, whose top-1 trigger ends at that position
    memories = pd.DataFrame({"layer": 0, "memory": range(n_cases), "sign": 1,
                             "top_token": [c[0] for c in cases], "max_prob": 0.5})
    triggers = pd.DataFrame({"layer": 0, "memory": range(n_cases), "sign": 1, "rank": 0,
                             "next_token": [c[3] for c in cases]})
    expected = value_agreement(memories, triggers)["agrees"].tolist()
    got, off_by_one = [], []
    for top, ids, position, _ in cases:
        try:
            answer = call_student(fn, top, ids, position)
        except CheckFailed as exc:
            if position == len(ids) - 1 and isinstance(exc.__cause__, IndexError):
                raise CheckFailed(f"`{name_of(fn)}` crashed with IndexError where the trigger prefix is the whole "
                                  f"sentence (position {position} of {len(ids)} tokens): nothing follows it. Check "
                                  "for that case first and answer False (the authors count it as disagreeing)."
                                  ) from exc.__cause__
            raise
        if not isinstance(answer, (bool, np.bool_)) and not (isinstance(answer, torch.Tensor) and answer.numel() == 1):
            raise CheckFailed(f"`{name_of(fn)}` returned {type(answer).__name__}; it should return True or False.")
        got.append(bool(answer))
        off_by_one.append(ids[position] == top)
    # the same trap with the sentence end handled (False there, as asked)
    guarded = [o and position + 1 < len(ids) for o, (_, ids, position, _) in zip(off_by_one, cases)]
    if got == expected:
        passed(fn, f"the same verdict as ffnlib's value_agreement on {n_cases} (value, trigger) pairs, sentence "
                   "ends included.")
        return
    if got in (off_by_one, guarded):
        raise CheckFailed(f"`{name_of(fn)}` compares the value's top token with the LAST token of the trigger prefix "
                          "(token_ids[position]). The value predicts the token that FOLLOWS the prefix: "
                          "token_ids[position + 1]. This is the paper's off-by-one trap.")
    wrong = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
    top, ids, position, nxt = cases[wrong]
    if nxt < 0:
        raise CheckFailed(f"`{name_of(fn)}` said {got[wrong]} for a prefix that is the whole sentence (position "
                          f"{position} of {len(ids)} tokens): nothing follows it, so it cannot agree.")
    raise CheckFailed(f"`{name_of(fn)}` said {got[wrong]} for value_top_token={top}, position={position} "
                      f"(the next token is {nxt}); ffnlib says {expected[wrong]}.")
