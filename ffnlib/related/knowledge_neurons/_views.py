"""The key-value view of knowledge neurons (Geva et al.): does a neuron's value promote the answer
(:func:`value_view`), does its key fire on text about the subject (:func:`trigger_view`, notebook 01's mining), and
do the neurons sit where Section 4 found values agreeing with keys (:func:`layer_view`)?"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ...errors import ParameterError
from ...reference import relative_depth
from ._neurons import random_like

__all__ = ["value_view", "cached_trigger_examples", "trigger_view", "layer_view"]


@torch.no_grad()
def value_view(loaded, neurons: pd.DataFrame, prompts: pd.DataFrame, seed: int = 0, k_tokens: int = 5) -> pd.DataFrame:
    """The key-value view of each knowledge neuron's value: the top tokens of ``sign x v_i`` as the model reads
    its residual (``Adapter.logits_from_values`` on ``written_values``) and the rank of the fact's answer token
    in p_i (0 = top), next to a random memory of the same layer (seeded) read for the same answer.

    Rows: fact_id, relation, answer, layer, memory, sign, kind ("knowledge"/"random"), answer_rank,
    answer_prob, top_tokens (list of str), top_token_ids.
    """
    adapter = loaded.adapter
    answers = prompts.drop_duplicates("fact_id").set_index("fact_id")
    rows, vectors = [], []
    rng = np.random.default_rng([seed, 11])
    for row in neurons.itertuples():
        control = random_like([(row.layer, row.memory)], adapter.d_ff, rng)[0]
        for kind, (layer, memory) in (("knowledge", (row.layer, row.memory)), ("random", control)):
            vectors.append(row.sign * adapter.written_values(int(layer))[int(memory)])
            rows.append({"fact_id": int(row.fact_id), "relation": row.relation,
                         "answer": answers.at[row.fact_id, "answer"],
                         "answer_token": int(answers.at[row.fact_id, "answer_token"]), "layer": int(layer),
                         "memory": int(memory), "sign": int(row.sign), "kind": kind})
    if not rows:
        return pd.DataFrame(columns=["fact_id", "relation", "answer", "layer", "memory", "sign", "kind", "answer_rank",
                                     "answer_prob", "top_tokens", "top_token_ids"])
    for start in range(0, len(vectors), 256):
        logits = adapter.logits_from_values(torch.stack(vectors[start: start + 256])).float()
        probs = logits.softmax(-1)
        top = logits.topk(k_tokens, dim=-1).indices
        for j in range(logits.shape[0]):
            row = rows[start + j]
            answer_logit = logits[j, row["answer_token"]]
            row["answer_rank"] = int((logits[j] > answer_logit).sum())
            row["answer_prob"] = float(probs[j, row["answer_token"]])
            row["top_token_ids"] = top[j].tolist()
            row["top_tokens"] = loaded.token_strings(top[j].tolist())
    return pd.DataFrame(rows)


def cached_trigger_examples(loaded, sentences: pd.DataFrame, k: int, out_dir):
    """Notebook 01's mined trigger examples if they are cached in ``out_dir`` (the same request as notebook 01's:
    model, corpus, k, one prefix per sentence, all layers, its snapshots), ``None`` if they are not there (nothing
    is mined here: mining takes most of notebook 01's time)."""
    from ...keys import load_cached_triggers, trigger_request

    request = trigger_request(loaded, sentences, k)
    return load_cached_triggers(out_dir, request.name, request.request, request.table)


def trigger_view(loaded, neurons: pd.DataFrame, prompts: pd.DataFrame, triggers, top: int = 25,
                 seed: int = 0) -> pd.DataFrame:
    """Does a knowledge neuron's key fire on text about the fact? For each knowledge neuron (and a random
    memory of the same layer and sign, seeded) its top-``top`` trigger examples from notebook 01's mining:
    how many prefixes (up to and including the trigger token) or their articles' titles name the subject,
    and how many prefixes contain the answer.

    Rows: fact_id, relation, subject, answer, layer, memory, sign, kind, triggers, about_subject,
    mentions_answer, any_about_subject, any_mentions_answer.
    """
    if triggers is None:
        raise ParameterError("No trigger examples: run notebook 01 (or ffnlib.keys.mine_trigger_examples) first.")
    facts = prompts.drop_duplicates("fact_id").set_index("fact_id")
    table = triggers.triggers
    mined = set(triggers.layers)
    signs = set(table["sign"].unique().tolist())
    rng = np.random.default_rng([seed, 13])
    pairs = []  # (neuron row, kind, layer, memory)
    for row in neurons.itertuples():
        if row.layer in mined and row.sign in signs:
            control = random_like([(row.layer, row.memory)], loaded.adapter.d_ff, rng)[0]
            pairs += [(row, "knowledge", int(row.layer), int(row.memory)), (row, "random", *control)]
    needed = pd.DataFrame([(l, m, r.sign) for r, _, l, m in pairs], columns=["layer", "memory", "sign"])
    needed = needed.drop_duplicates()
    table = table[table["layer"].isin(needed["layer"].unique()) & (table["rank"] < top)]
    table = table.merge(needed.astype({c: table[c].dtype for c in needed.columns}), on=["layer", "memory", "sign"])
    grouped = {key: g for key, g in table.groupby(["layer", "memory", "sign"])}
    index = triggers.token_index()
    titles = triggers.sentences.set_index("sentence_id")["title"].to_dict()
    decode = loaded.tokenizer.decode
    rows = []
    for row, kind, layer, memory in pairs:
        subject, answer = facts.at[row.fact_id, "subject"], facts.at[row.fact_id, "answer"]
        found = grouped.get((layer, memory, row.sign))
        about = mentions = n = 0
        if found is not None:
            for t in found.itertuples():
                ids = index[int(t.sentence_id)]
                prefix = decode(ids[triggers.n_bos: int(t.position) + 1])
                title = titles.get(int(t.sentence_id)) or ""
                about += subject in prefix or subject in str(title)
                mentions += answer in prefix
                n += 1
        rows.append({"fact_id": int(row.fact_id), "relation": row.relation, "subject": subject, "answer": answer,
                     "layer": layer, "memory": memory, "sign": int(row.sign), "kind": kind, "triggers": n,
                     "about_subject": about, "mentions_answer": mentions, "any_about_subject": about > 0,
                     "any_mentions_answer": mentions > 0})
    return pd.DataFrame(rows)


def layer_view(neurons: pd.DataFrame, n_layers: int, agreement: pd.DataFrame | None = None,
               layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Knowledge neurons per attributed layer (``layers``, all by default): count, share, relative depth and the
    share a uniform spread would give, next to Section 4's agreement by layer (notebook 02's ``agreement``
    column, sign +1) when given; ``attrs["spearman"]``: the rank correlation of the two over the attributed
    layers and its p-value."""
    layers = list(range(n_layers)) if layers is None else sorted(int(l) for l in layers)
    counts = neurons.groupby("layer").size().reindex(layers, fill_value=0)
    frame = pd.DataFrame({"layer": layers, "relative_depth": relative_depth(np.array(layers), n_layers),
                          "neurons": counts.to_numpy(), "share": counts.to_numpy() / max(counts.sum(), 1),
                          "uniform": 1.0 / len(layers)})
    if agreement is not None and len(agreement):
        positive = agreement[agreement["sign"] == 1] if "sign" in agreement.columns else agreement
        frame = frame.merge(positive[["layer", "agreement"]], on="layer", how="left")
        both = frame.dropna(subset=["agreement"])
        if len(both) >= 3 and both["neurons"].nunique() > 1 and both["agreement"].nunique() > 1:
            from scipy.stats import spearmanr

            result = spearmanr(both["share"], both["agreement"])
            frame.attrs["spearman"] = {"rho": float(result.statistic), "p": float(result.pvalue), "layers": len(both)}
    return frame
