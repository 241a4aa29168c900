"""The prompt view: the memories that contribute most at a prompt's last position, and its "attribute" action."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import pandas as pd
import torch

from ..capture import capture
from ._common import check_positive, check_prompt, top_distribution, top_tokens

__all__ = ["PromptAnalysis", "analyse_prompt", "PromptAttribution", "attribute_prediction"]


@dataclass
class PromptAnalysis:
    """What the model does with a prompt at its last position, layer by layer.

    ``memories``: one row per (layer, rank): memory, coefficient m_i, value_norm ||v_i||,
    score = |m_i|·||v_i||, sign (+1: the memory writes v_i; -1: it writes -v_i), top_tokens (list of str)
    and top_token_ids. ``layers``: one row per layer: the top token and its probability of the residual
    before the FFN and after it (``before_*``, ``after_*``), ``changed`` (the FFN changed the top token),
    and the probability each gives the model's final prediction (``before_p_final``, ``after_p_final``).
    ``prediction``: the model's own next-token distribution (top tokens).
    """

    prompt: str
    token_ids: list[int]
    tokens: list[str]
    memories: pd.DataFrame
    layers: pd.DataFrame
    prediction: pd.DataFrame

    def contributors(self, n: int | None = None) -> pd.DataFrame:
        """The memories of all layers by score, largest first (``n`` of them)."""
        frame = self.memories.sort_values("score", ascending=False, kind="stable")
        return frame.head(n) if n is not None else frame


@torch.no_grad()
def analyse_prompt(loaded, prompt: str, layers: Iterable[int] | None = None, top_memories: int = 5,
                   k_tokens: int = 5, k_prediction: int = 10) -> PromptAnalysis:
    """Per layer, the memories that contribute most at the prompt's last position, and the residual's top
    prediction before and after the FFN (see :class:`PromptAnalysis`)."""
    prompt = check_prompt(prompt)
    top_memories, k_tokens = check_positive("top_memories", top_memories), check_positive("k_tokens", k_tokens)
    adapter = loaded.adapter
    layer_list = adapter.check_layers(layers)
    ids = loaded.encode(prompt)
    inputs = torch.tensor([ids], device=loaded.device)
    with capture(loaded, layer_list, what=("coefficients", "residual_before", "residual_after")) as acts:
        logits = loaded.model(inputs).logits[0, -1]
    final = int(logits.argmax())
    memory_rows, vectors = [], []
    for layer in layer_list:
        m = acts.coefficients[layer][0, -1].float()
        values = adapter.values(layer)
        norms = values.float().norm(dim=-1).to(m.device)
        score = m.abs() * norms
        for rank, memory in enumerate(score.topk(min(top_memories, adapter.d_ff)).indices.tolist()):
            sign = 1 if float(m[memory]) >= 0 else -1
            vectors.append(sign * values[memory])
            memory_rows.append({"layer": layer, "rank": rank, "memory": memory, "coefficient": float(m[memory]),
                                "value_norm": float(norms[memory]), "score": float(score[memory]), "sign": sign})
    # every projection of the analysis in two batched calls: memories (sign * v_i), then residuals
    top = adapter.logits_from_values(torch.stack(vectors)).float().softmax(-1).topk(k_tokens, dim=-1)
    for row, ids_ in zip(memory_rows, top.indices.tolist()):
        row["top_tokens"], row["top_token_ids"] = loaded.token_strings(ids_), ids_
    residuals = torch.stack([getattr(acts, f"residual_{side}")[layer][0, -1]
                             for layer in layer_list for side in ("before", "after")])
    probs = adapter.logits_from_residual(residuals).float().softmax(-1).reshape(len(layer_list), 2, -1)
    layer_rows = []
    for i, layer in enumerate(layer_list):
        row = {"layer": layer}
        for j, side in enumerate(("before", "after")):
            best = int(probs[i, j].argmax())
            row.update({f"{side}_token_id": best, f"{side}_token": loaded.token_strings([best])[0],
                        f"{side}_prob": float(probs[i, j, best]), f"{side}_p_final": float(probs[i, j, final])})
        row["changed"] = row["before_token_id"] != row["after_token_id"]
        layer_rows.append(row)
    return PromptAnalysis(prompt=prompt, token_ids=ids, tokens=loaded.token_strings(ids),
                          memories=pd.DataFrame(memory_rows), layers=pd.DataFrame(layer_rows),
                          prediction=top_distribution(loaded, logits, k_prediction))


@dataclass
class PromptAttribution:
    """The memories that most support the model's prediction at the prompt's last position.

    ``memories``: one row per memory, largest attribution first: layer, memory, score (integrated gradients of
    the predicted token's probability, Dai et al.'s knowledge-neuron attribution), coefficient m_i, sign
    (+1: the memory writes v_i; -1: m_i < 0, it writes -v_i), top_tokens and top_token_ids of ``sign * v_i``.
    """

    prompt: str
    tokens: list[str]
    token_id: int
    token: str
    probability: float
    layers: list[int]
    steps: int
    memories: pd.DataFrame


def attribute_prediction(loaded, prompt: str, top: int = 10, layers: Iterable[int] | None = None, steps: int = 20,
                         k_tokens: int = 5) -> PromptAttribution:
    """The ``top`` memories with the largest attribution for the model's own next-token prediction.

    Every memory of ``layers`` (all by default) at the prompt's last position is scored by
    :func:`ffnlib.related.knowledge_neurons.knowledge_attribution` (zero baseline, ``steps`` points); the
    positive scores are ranked. On a CPU this takes a few seconds for SmolLM2's 30 layers.
    """
    from ..related.knowledge_neurons import knowledge_attribution

    prompt = check_prompt(prompt)
    top, k_tokens = check_positive("top", top), check_positive("k_tokens", k_tokens)
    ids = loaded.encode(prompt)
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids], device=loaded.device)).logits[0, -1].float()
    token = int(logits.argmax())
    result = knowledge_attribution(loaded, ids, [token], layers=layers, steps=steps)
    scores = result.scores.flatten()
    best = scores.topk(min(top, int((scores > 0).sum()) or 1)).indices.tolist()
    d_ff = result.scores.shape[1]
    rows = []
    for index in best:
        layer, memory = result.layers[index // d_ff], index % d_ff
        coefficient = float(result.coefficients[index // d_ff, memory])
        rows.append({"layer": layer, "memory": memory, "score": float(scores[index]), "coefficient": coefficient,
                     "sign": 1 if coefficient >= 0 else -1})
    for row in rows:
        table = top_tokens(loaded, row["layer"], [row["memory"]], row["sign"], k=k_tokens)[0]
        row["top_tokens"], row["top_token_ids"] = table["token"].tolist(), table["token_id"].tolist()
    return PromptAttribution(prompt=prompt, tokens=loaded.token_strings(ids), token_id=token,
                             token=loaded.token_strings([token])[0], probability=float(logits.softmax(-1)[token]),
                             layers=result.layers, steps=result.steps, memories=pd.DataFrame(rows))
