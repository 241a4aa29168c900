"""Exercises 01 · keys (Section 3): a key's memory coefficients, and the trigger prefix where it fires most."""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from ..capture import capture
from .checking import CheckFailed, call_student, compare, name_of, passed

__all__ = ["check_memory_coefficients", "check_trigger_prefix"]


def check_memory_coefficients(fn, loaded, layer: int,
                              text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(x, keys, gates, activation)`` -> m (tokens, d_ff), on ``layer`` of the real model (gated or not)
    and on a plain ReLU FFN of random weights."""
    adapter = loaded.adapter
    ids = torch.tensor([loaded.encode(text)], device=loaded.device)
    with torch.no_grad(), capture(loaded, layer, what=("ffn_input", "coefficients")) as acts:
        loaded.model(ids)
    x, expected = acts.ffn_input[layer][0], acts.coefficients[layer][0]
    keys, act = adapter.keys(layer), adapter.activation(layer)
    gates = adapter.gates(layer) if adapter.gated else None
    meaning = "one row per token, one column per memory: (tokens, d_ff)"
    with torch.no_grad():
        got = call_student(fn, x, keys, gates, act)
        mistakes = []
        if gates is not None:
            up, gate = x @ keys.T, x @ gates.T
            mistakes = [(act(up) * gate, "the activation is on the wrong half. In a gated FFN it goes on the "
                                         "gate half: m = f(x · Gᵀ) ⊙ (x · Kᵀ)."),
                        (act(up), "this is the plain FFN's formula, but this model is gated: multiply by the "
                                  "gate half, m = f(x · Gᵀ) ⊙ (x · Kᵀ)."),
                        (gate * up, "the activation f is missing: m = f(x · Gᵀ) ⊙ (x · Kᵀ).")]
        compare(fn, got, expected, meaning, mistakes)
        # the paper's plain FFN, m = ReLU(x Kᵀ), on random weights
        gen = torch.Generator().manual_seed(0)
        x2, k2 = torch.randn(5, 16, generator=gen), torch.randn(32, 16, generator=gen)
        got = call_student(fn, x2, k2, None, torch.relu)
        compare(fn, got, torch.relu(x2 @ k2.T), "(tokens, d_ff)",
                [(x2 @ k2.T, "with gates=None (a plain FFN) m = f(x · Kᵀ): the activation is missing.")])
    passed(fn, f"equals the model's own coefficients at layer {layer} ({tuple(expected.shape)}), and the plain "
               "FFN's ReLU(x · Kᵀ).")


def check_trigger_prefix(fn, loaded, layer: int, sentences: pd.DataFrame, memories: Sequence[int] = (0, 1, 2, 3)
                         ) -> None:
    """``fn(token_ids, coefficients, memory)`` -> the prefix (a list of ids) where ``memory``'s key fires most,
    against ffnlib's trigger-example miner on the same sentences (one prefix per sentence, the authors' choice)."""
    from ..keys import mine_trigger_examples
    from ..mining import prepare_sentences

    # a model with few learned positions (wiki-relu-lm: 128) leaves longer sentences out: k counts those it reads
    sentences = prepare_sentences(loaded, sentences).drop(columns="token_ids")
    mined = mine_trigger_examples(loaded, sentences, k=len(sentences), layers=[layer], negative=False,
                                  progress=False, snapshot_floor=None)
    tokens, coefficients = mined.token_index(), {}
    for memory in memories:
        rows = mined.of(layer, memory)
        for row in rows.itertuples():
            ids = list(tokens[int(row.sentence_id)])
            if row.sentence_id not in coefficients:
                with torch.no_grad(), capture(loaded, layer, what=("coefficients",)) as acts:
                    loaded.model(torch.tensor([ids], device=loaded.device))
                coefficients[row.sentence_id] = acts.coefficients[layer][0]
            m = coefficients[row.sentence_id].clone()
            got = call_student(fn, ids, m, memory)
            if isinstance(got, torch.Tensor):
                got = got.tolist()
            expected = ids[: int(row.position) + 1]
            if list(got) == expected:
                continue
            where = f"memory {memory}, sentence {int(row.sentence_id)}: the key fires most at position {int(row.position)}"
            if list(got) == ids[: int(row.position)]:
                raise CheckFailed(f"`{name_of(fn)}` is off by one ({where}): your prefix stops just before the token "
                                  "where the key fires. The trigger example x_1 … x_j includes x_j.")
            if list(got) == ids[: int(row.position) + 2]:
                raise CheckFailed(f"`{name_of(fn)}` is off by one ({where}): your prefix also holds the next token. "
                                  "That token is what the value should predict (Section 4), not part of the trigger.")
            raise CheckFailed(f"`{name_of(fn)}` returned a prefix of {len(got)} tokens; ffnlib's miner found "
                              f"{len(expected)} ({where}).")
    passed(fn, f"the same prefixes as ffnlib's miner for memories {list(memories)} of layer {layer} on "
               f"{len(sentences)} sentences.")
