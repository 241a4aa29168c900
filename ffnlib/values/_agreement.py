"""Agreement between keys and values (Fig. 4), and agreement against the value's confidence (Fig. 6, Table 2)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import ParameterError, ResultsError
from ..reference import PAPER_LAYERS, relative_depth
from ._projection import KEYS, ValueProjection, require_columns

__all__ = ["END_OF_SENTENCE", "BINNINGS", "PAPER_UPPER_FROM", "check_next_tokens", "value_agreement", "derangement",
           "agreement_by_layer", "agreement_by_depth", "agreement_by_confidence", "confident_values",
           "confident_summary", "confident_examples"]

END_OF_SENTENCE = ("disagree", "exclude")
BINNINGS = ("quantile", "uniform")
PAPER_UPPER_FROM = 10 / PAPER_LAYERS  # the paper's upper layers 11-16 of 16: relative depth > 10/16


def check_next_tokens(triggers: pd.DataFrame, sentences: pd.DataFrame) -> int:
    """Check that every trigger's ``next_token`` is the token after its prefix: ``token_ids[position + 1]``,
    or -1 when the prefix is the whole sentence. Returns the number of triggers checked.

    Raises ResultsError naming the first mismatch (an off-by-one in the miner would show here).
    """
    require_columns(triggers, ["sentence_id", "position", "next_token"], "triggers")
    require_columns(sentences, ["sentence_id", "token_ids"], "sentences")
    ids = sentences["sentence_id"].to_numpy(dtype=np.int64)
    lengths = np.array([len(t) for t in sentences["token_ids"]], dtype=np.int64)
    flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in sentences["token_ids"]] or [np.zeros(0, np.int64)])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    where = pd.Series(np.arange(len(ids)), index=ids)
    row = where.reindex(triggers["sentence_id"].to_numpy()).to_numpy()
    if np.isnan(row.astype(float)).any():
        raise ResultsError("Some triggers refer to sentence ids missing from the sentences table.")
    row = row.astype(np.int64)
    position = triggers["position"].to_numpy(dtype=np.int64)
    nxt = position + 1
    inside = nxt < lengths[row]
    if ((position < 0) | (position >= lengths[row])).any():
        raise ResultsError("Some triggers have a position outside their sentence's token ids.")
    expected = np.where(inside, flat[offsets[row] + np.minimum(nxt, lengths[row] - 1)], -1)
    actual = triggers["next_token"].to_numpy(dtype=np.int64)
    bad = np.flatnonzero(expected != actual)
    if bad.size:
        first = triggers.iloc[bad[0]]
        raise ResultsError(f"{bad.size} trigger(s) have a next_token that is not token_ids[position + 1]; first: "
                           f"sentence {first['sentence_id']}, position {first['position']}, next_token "
                           f"{first['next_token']}, expected {expected[bad[0]]}.")
    return int(len(triggers))


def value_agreement(projection, triggers: pd.DataFrame, n_triggers: int = 50, seed: int = 0,
                    end_of_sentence: str = "disagree") -> pd.DataFrame:
    """Per memory (and sign): does the value's top token follow the key's top-1 trigger prefix?

    projection: a :class:`ValueProjection` or its ``memories`` frame. triggers: ``TriggerExamples.triggers``.
    Columns: layer, memory, sign, top_token, max_prob, (target_rank), has_trigger, trigger_next_token
    (-1: none or end of sentence), end_of_sentence, counted (in the rate's denominator), agrees,
    n_triggers (top-``n_triggers`` triggers considered), n_agreeing (those followed by the value's top
    token), agreeing_share, partner (the other memory this one is paired with for the baseline; -1: not
    counted), baseline_next_token (the partner's top-1 trigger's next token), baseline_agrees,
    baseline_n_agreeing (the partner's top-n triggers followed by this value's top token).
    See the ``ffnlib.values`` docstring for the choices.
    """
    memories = projection.memories if isinstance(projection, ValueProjection) else projection
    require_columns(memories, KEYS + ["top_token", "max_prob"], "the projection's memories")
    require_columns(triggers, KEYS + ["rank", "next_token"], "triggers")
    if isinstance(n_triggers, bool) or not isinstance(n_triggers, (int, np.integer)) or n_triggers < 1:
        raise ParameterError(f"n_triggers must be a positive int, got {n_triggers!r}.")
    if end_of_sentence not in END_OF_SENTENCE:
        raise ParameterError(f"end_of_sentence must be one of {END_OF_SENTENCE}, got {end_of_sentence!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"seed must be a non-negative int, got {seed!r}.")
    keep = KEYS + ["top_token", "max_prob"] + [c for c in ("target_rank",) if c in memories.columns]
    out = memories[keep].astype({"layer": "int64", "memory": "int64", "sign": "int8"}).reset_index(drop=True)

    trig = triggers.loc[triggers["rank"] < n_triggers, KEYS + ["rank", "next_token"]]
    trig = trig.astype({"layer": "int64", "memory": "int64", "sign": "int8", "next_token": "int64"})
    top1 = trig[trig["rank"] == 0].drop(columns="rank").rename(columns={"next_token": "trigger_next_token"})
    if top1.duplicated(KEYS).any():
        raise ParameterError("triggers has several rank-0 rows for one (layer, memory, sign).")
    out = out.merge(top1, on=KEYS, how="left")
    out["has_trigger"] = out["trigger_next_token"].notna()
    out["trigger_next_token"] = out["trigger_next_token"].fillna(-1).astype("int64")
    out["end_of_sentence"] = out["has_trigger"] & (out["trigger_next_token"] < 0)
    out["counted"] = out["has_trigger"] & ((end_of_sentence == "disagree") | ~out["end_of_sentence"])
    out["agrees"] = out["has_trigger"] & (out["trigger_next_token"] == out["top_token"])

    if end_of_sentence == "exclude":
        trig = trig[trig["next_token"] >= 0]
    each = trig.merge(out[KEYS + ["top_token"]], on=KEYS, how="inner")
    each["hit"] = each["next_token"] == each["top_token"]
    counts = each.groupby(KEYS).agg(n_triggers=("hit", "size"), n_agreeing=("hit", "sum")).reset_index()
    out = out.merge(counts, on=KEYS, how="left")
    out["n_triggers"] = out["n_triggers"].fillna(0).astype("int64")
    out["n_agreeing"] = out["n_agreeing"].fillna(0).astype("int64")
    out["agreeing_share"] = (out["n_agreeing"] / out["n_triggers"].where(out["n_triggers"] > 0)).astype("float64")

    # the empirical baseline: each counted memory is paired with another counted key of its layer and sign
    out["partner"] = np.int64(-1)
    for (layer, sign), group in out[out["counted"]].groupby(["layer", "sign"]):
        index = group.index.to_numpy()
        pairing = derangement(len(index), np.random.default_rng([seed, int(layer), int(sign) + 1]))
        out.loc[index, "partner"] = group["memory"].to_numpy()[pairing]
    paired = out.loc[out["partner"] >= 0, KEYS + ["partner", "top_token"]]
    partner_top1 = top1.rename(columns={"memory": "partner", "trigger_next_token": "baseline_next_token"})
    out = out.merge(partner_top1, on=["layer", "partner", "sign"], how="left")
    out["baseline_next_token"] = out["baseline_next_token"].fillna(-1).astype("int64")
    out["baseline_agrees"] = out["counted"] & (out["baseline_next_token"] == out["top_token"])
    theirs = trig.rename(columns={"memory": "partner"}).merge(paired, on=["layer", "partner", "sign"], how="inner")
    theirs["hit"] = theirs["next_token"] == theirs["top_token"]
    base_counts = theirs.groupby(KEYS)["hit"].sum().rename("baseline_n_agreeing").reset_index()
    out = out.merge(base_counts, on=KEYS, how="left")
    out["baseline_n_agreeing"] = out["baseline_n_agreeing"].fillna(0).astype("int64")
    return out.sort_values(KEYS).reset_index(drop=True)


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation without fixed points (for n >= 2): each memory is paired with another one."""
    if n < 2:
        return np.arange(n)
    order = rng.permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner


def agreement_by_layer(per_memory: pd.DataFrame, vocab_size: int, n_layers: int) -> pd.DataFrame:
    """Fig. 4 per (sign, layer): agreement rate against the empirical and the random (1/|V|) baselines.

    Also: how many memories had a trigger / an end-of-sentence top trigger, the share of memories with at
    least one agreeing trigger among the top-n, the mean agreeing share of those triggers, and (when the
    projection had targets) the median rank of the top-1 trigger's next token.
    """
    require_columns(per_memory, KEYS + ["counted", "agrees", "baseline_agrees", "n_agreeing"], "per_memory")
    rows = []
    for (sign, layer), g in per_memory.groupby(["sign", "layer"]):
        c = g[g["counted"]]
        row = {"sign": int(sign), "layer": int(layer), "relative_depth": float(relative_depth(layer, n_layers)),
               "memories": len(g), "with_trigger": int(g["has_trigger"].sum()),
               "end_of_sentence": int(g["end_of_sentence"].sum()), "counted": len(c),
               "agreeing": int(c["agrees"].sum()),
               "agreement": float(c["agrees"].mean()) if len(c) else np.nan,
               "empirical_baseline": float(c["baseline_agrees"].mean()) if len(c) else np.nan,
               "random_baseline": 1.0 / vocab_size,
               "any_agreeing_trigger": float((c["n_agreeing"] > 0).mean()) if len(c) else np.nan,
               "any_agreeing_trigger_baseline": float((c["baseline_n_agreeing"] > 0).mean()) if len(c) else np.nan,
               "agreeing_share": float(c["agreeing_share"].mean()) if len(c) else np.nan}
        if "target_rank" in g.columns:
            ranks = g.loc[g["has_trigger"] & (g["target_rank"] >= 0), "target_rank"]
            row["median_target_rank"] = float(ranks.median()) if len(ranks) else np.nan
            row["median_target_rank_share"] = row["median_target_rank"] / vocab_size
        rows.append(row)
    return pd.DataFrame(rows)


def agreement_by_depth(by_layer: pd.DataFrame, split: float = PAPER_UPPER_FROM) -> pd.DataFrame:
    """Agreement pooled over the lower (relative depth <= split) and upper layers, per sign.

    The default split is the paper's: its upper layers 11-16 of 16 lie above relative depth 10/16.
    """
    rows = []
    for sign, g in by_layer.groupby("sign"):
        for part, sel in (("lower", g["relative_depth"] <= split), ("upper", g["relative_depth"] > split)):
            p = g[sel]
            counted = p["counted"].sum()
            rows.append({"sign": int(sign), "part": part, "layers": len(p), "counted": int(counted),
                         "agreement": float(p["agreeing"].sum() / counted) if counted else np.nan,
                         "max_layer_agreement": float(p["agreement"].max()) if len(p) else np.nan,
                         "empirical_baseline": float((p["empirical_baseline"] * p["counted"]).sum() / counted)
                         if counted else np.nan})
    return pd.DataFrame(rows)


def agreement_by_confidence(per_memory: pd.DataFrame, bins: int = 10, binning: str = "quantile") -> pd.DataFrame:
    """Fig. 6: agreement rate as a function of the value's maximal probability, per sign.

    binning: ``"quantile"`` (equal-count bins; default, since our max probabilities crowd near 0) or
    ``"uniform"`` (equal-width bins from 0 to the largest max probability). Only counted memories.
    """
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ParameterError(f"bins must be a positive int, got {bins!r}.")
    if binning not in BINNINGS:
        raise ParameterError(f"binning must be one of {BINNINGS}, got {binning!r}.")
    rows = []
    for sign, g in per_memory[per_memory["counted"]].groupby("sign"):
        prob = g["max_prob"].astype("float64")
        if binning == "quantile":
            edges = np.unique(np.quantile(prob, np.linspace(0, 1, bins + 1)))
        else:
            edges = np.linspace(0.0, float(prob.max()), bins + 1)
        which = np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, len(edges) - 2)
        for b in range(len(edges) - 1):
            sel = g[which == b]
            rows.append({"sign": int(sign), "bin": b, "low": float(edges[b]), "high": float(edges[b + 1]),
                         "memories": len(sel), "agreement": float(sel["agrees"].mean()) if len(sel) else np.nan,
                         "any_agreeing_trigger": float((sel["n_agreeing"] > 0).mean()) if len(sel) else np.nan,
                         "median_max_prob": float(sel["max_prob"].median()) if len(sel) else np.nan})
    return pd.DataFrame(rows)


def confident_values(per_memory: pd.DataFrame, n: int = 100, sign: int = 1) -> pd.DataFrame:
    """Table 2: the ``n`` values (of one sign) with the largest maximal probability, most confident first.

    Only memories with a trigger are eligible (the agreement needs one).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ParameterError(f"n must be a positive int, got {n!r}.")
    g = per_memory[(per_memory["sign"] == sign) & per_memory["has_trigger"]]
    return g.sort_values(["max_prob", "layer", "memory"], ascending=[False, True, True]).head(n).reset_index(drop=True)


def confident_summary(confident: pd.DataFrame, n_layers: int, split: float = PAPER_UPPER_FROM) -> dict:
    """Where the most confident values sit and how many have an agreeing trigger among the top-n."""
    depth = relative_depth(confident["layer"].to_numpy(), n_layers)
    upper_layers = [layer for layer in range(n_layers) if relative_depth(layer, n_layers) > split]
    return {"n": len(confident), "in_upper_layers": int((depth > split).sum()),
            "upper_layers": upper_layers, "with_agreeing_trigger": int((confident["n_agreeing"] > 0).sum()),
            "with_agreeing_trigger_baseline": int((confident["baseline_n_agreeing"] > 0).sum()),
            "top1_agrees": int(confident["agrees"].sum()),
            "by_layer": {int(k): int(v) for k, v in confident["layer"].value_counts().sort_index().items()}}


def confident_examples(confident: pd.DataFrame, triggers: pd.DataFrame, sentences: pd.DataFrame, tokenizer,
                       n_triggers: int = 50, rows: int = 20, max_chars: int = 70) -> pd.DataFrame:
    """A readable table of the most confident values: layer, memory, the value's top token, its probability,
    the share of the key's top-n triggers that it agrees with, and an example trigger prefix (the best-ranked
    agreeing one if any, else the top-1 trigger) with its next token. Tokens are shown quoted (``repr``) so that
    leading spaces and whitespace tokens are visible."""
    require_columns(sentences, ["sentence_id", "token_ids"], "sentences")
    token_ids = dict(zip(sentences["sentence_id"].to_numpy(), sentences["token_ids"]))
    trig = triggers[triggers["rank"] < n_triggers]
    out = []
    for _, r in confident.head(rows).iterrows():
        mine = trig[(trig["layer"] == r["layer"]) & (trig["memory"] == r["memory"]) & (trig["sign"] == r["sign"])]
        agreeing = mine[mine["next_token"] == r["top_token"]].sort_values("rank")
        example = (agreeing if len(agreeing) else mine.sort_values("rank")).head(1)
        prefix, nxt = "", ""
        if len(example):
            e = example.iloc[0]
            ids = list(token_ids.get(e["sentence_id"], []))
            prefix = tokenizer.decode(ids[: int(e["position"]) + 1], skip_special_tokens=True)
            prefix = prefix if len(prefix) <= max_chars else "…" + prefix[-max_chars:]
            nxt = repr(tokenizer.decode([int(e["next_token"])])) if e["next_token"] >= 0 else "(end of sentence)"
        out.append({"layer": int(r["layer"]), "memory": int(r["memory"]),
                    "top_token": repr(tokenizer.decode([int(r["top_token"])])), "max_prob": float(r["max_prob"]),
                    "agreeing_share": float(r["agreeing_share"]) if pd.notna(r["agreeing_share"]) else np.nan,
                    "example_prefix": prefix, "next_token": nxt,
                    "example_agrees": bool(len(agreeing))})
    return pd.DataFrame(out)
