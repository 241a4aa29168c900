"""Tables with intervals from an :class:`Evaluation`: perplexity and top-1 agreement per configuration
(:func:`quality_table`; random experts pooled over the random split's draws with a two-level interval,
:func:`random_draws_table` each draw alone) and the memories' sparsity per layer (:func:`sparsity_table`). The
resamples are seeded and the same for every configuration (:func:`bootstrap_metrics`), so differences are paired."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import pandas as pd

from ...stats import percentile_interval, resample_indices, two_level
from ._choices import experts_kept
from ._configs import Config
from ._evaluate import Evaluation
from ._partitions import split_draw, split_kind
from ._plan import Plan

__all__ = ["bootstrap_metrics", "random_draws", "per_sentence", "quality_table", "random_draws_table",
           "sparsity_table", "router_picks"]


def bootstrap_metrics(evaluation: Evaluation, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Per configuration, seeded bootstrap resamples over held-out sentences (the same resamples for every
    configuration, so differences are paired): {"perplexity": (n_boot,), "agreement": (n_boot,)}."""
    frame = evaluation.sentences
    ids = np.sort(frame["sentence_id"].unique())
    idx = resample_indices(len(ids), n_boot, seed)
    out = {}
    for name, rows in frame.groupby("config", sort=False):
        rows = rows.set_index("sentence_id").loc[ids]
        tokens, nll, agree = (rows[c].to_numpy(np.float64) for c in ("tokens", "nll", "agree"))
        t = tokens[idx].sum(1)
        out[name] = {"perplexity": np.exp(nll[idx].sum(1) / t), "agreement": agree[idx].sum(1) / t,
                     "point_perplexity": float(np.exp(nll.sum() / tokens.sum())),
                     "point_agreement": float(agree.sum() / tokens.sum())}
    return out


def random_draws(configs: Sequence[Config]) -> dict[tuple[str, float], list[Config]]:
    """The configurations of random experts grouped by (router, share): one per draw of the random split."""
    out: dict[tuple[str, float], list[Config]] = {}
    for c in configs:
        if c.method == "experts" and split_kind(c.split) == "random":
            out.setdefault((c.router, round(float(c.share), 9)), []).append(c)
    return out


def per_sentence(evaluation: Evaluation, config: str,
                 columns: Sequence[str] = ("nll", "agree", "tokens")) -> np.ndarray:
    """(sentences, columns) numbers of one configuration, rows in the order of the dense pass's sentence ids."""
    frame = evaluation.sentences
    ids = np.sort(frame.loc[frame["config"] == "dense", "sentence_id"].unique())
    rows = frame[frame["config"] == config].set_index("sentence_id").loc[ids]
    return rows[list(columns)].to_numpy(np.float64)


_STATISTICS = {  # of sums of (nll, agree, tokens, dense nll) over sentences
    "perplexity": lambda s: np.exp(s[..., 0] / s[..., 2]),
    "agreement": lambda s: s[..., 1] / s[..., 2],
    "perplexity_ratio": lambda s: np.exp((s[..., 0] - s[..., 3]) / s[..., 2]),
}


def _random_row(evaluation: Evaluation, draws: list[Config], n_boot: int, seed: int) -> dict:
    """Random experts' perplexity, agreement and perplexity ratio: the mean over the random split's draws, with
    a two-level interval (draws, then sentences; every draw runs the same sentences, so they are crossed)."""
    dense = per_sentence(evaluation, "dense", ("nll",))
    cells = np.stack([np.concatenate([per_sentence(evaluation, c.name), dense], 1) for c in draws])
    unit = f"sentences x {len(draws)} random splits"
    out = {"draws": len(draws)}
    for name, statistic in _STATISTICS.items():
        e = two_level(cells, statistic, unit, n_boot, seed)
        out.update({name: e.value, f"{name}_low": e.low, f"{name}_high": e.high})
    return out


def quality_table(plan: Plan, evaluation: Evaluation, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per configuration: the FFN share read, memories / inputs / size kept (mean over layers), perplexity
    and top-1 agreement with the dense model, each with a bootstrap 95% interval, and the perplexity ratio
    to the dense model (paired interval). Random experts get one row per router and share (``split`` =
    ``random``): the mean over the random split's ``draws``, with an interval over draws and sentences
    (:func:`random_draws_table` has each draw)."""
    boot = bootstrap_metrics(evaluation, n_boot, seed)
    dense = boot["dense"]
    by_layer = evaluation.layers.groupby("config", sort=False)[["kept_memories", "kept_inputs", "size_kept"]].mean()
    groups, done = random_draws(evaluation.configs), set()
    rows = []
    for config in evaluation.configs:
        if config.method == "experts" and split_kind(config.split) == "random":
            key = (config.router, round(float(config.share), 9))
            if key in done:
                continue
            done.add(key)
            draws = groups[key]
            kept = by_layer.loc[[c.name for c in draws if c.name in by_layer.index]].mean()
            pooled = replace(config, split="random")
            rows.append({**pooled.as_dict(), "ffn_share": plan.ffn_share(pooled, kept["kept_memories"],
                                                                         kept["kept_inputs"]),
                         "kept_memories": float(kept["kept_memories"]), "kept_inputs": float(kept["kept_inputs"]),
                         "size_kept": float(kept["size_kept"]), **_random_row(evaluation, draws, n_boot, seed)})
            continue
        b = boot[config.name]
        kept = by_layer.loc[config.name] if config.name in by_layer.index else pd.Series(
            {"kept_memories": 1.0, "kept_inputs": 1.0, "size_kept": 1.0})
        ratio = b["perplexity"] / dense["perplexity"]
        share = plan.ffn_share(config, kept["kept_memories"], kept["kept_inputs"])
        rows.append({**config.as_dict(), "ffn_share": share,
                     "kept_memories": float(kept["kept_memories"]), "kept_inputs": float(kept["kept_inputs"]),
                     "size_kept": float(kept["size_kept"]),
                     "perplexity": b["point_perplexity"], **_named_interval("perplexity", b["perplexity"]),
                     "agreement": b["point_agreement"], **_named_interval("agreement", b["agreement"]),
                     "perplexity_ratio": b["point_perplexity"] / dense["point_perplexity"],
                     **_named_interval("perplexity_ratio", ratio), "draws": 1})
    frame = pd.DataFrame(rows)
    frame.attrs["tokens"] = int(evaluation.sentences.query("config == 'dense'")["tokens"].sum())
    frame.attrs["sentences"] = int((evaluation.sentences["config"] == "dense").sum())
    return frame


def random_draws_table(evaluation: Evaluation) -> pd.DataFrame:
    """Each draw of the random split on its own (router, share, split, draw, perplexity, agreement, perplexity
    ratio; point values): how much random experts vary from one split to the next."""
    dense = per_sentence(evaluation, "dense", ("nll", "tokens")).sum(0)
    rows = []
    for (router, share), draws in random_draws(evaluation.configs).items():
        for c in draws:
            nll, agree, tokens = per_sentence(evaluation, c.name).sum(0)
            rows.append({"router": router, "share": share, "split": c.split, "draw": split_draw(c.split),
                         "perplexity": float(np.exp(nll / tokens)), "agreement": float(agree / tokens),
                         "perplexity_ratio": float(np.exp((nll - dense[0]) / tokens))})
    return pd.DataFrame(rows, columns=["router", "share", "split", "draw", "perplexity", "agreement",
                                       "perplexity_ratio"])


def _named_interval(name: str, values: np.ndarray) -> dict:
    """``<name>_low`` and ``<name>_high``: the percentile interval of bootstrap ``values``."""
    low, high = percentile_interval(values)
    return {f"{name}_low": low, f"{name}_high": high}


def sparsity_table(evaluation: Evaluation, n_layers: int, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per layer: the mean share of the ``|m_i|·||v_i||`` mass carried by the top k% of memories (columns
    ``top_<k>``, with bootstrap intervals over sentences), and ``concentrated``: the share of tokens whose
    top 3% of memories carry at least 90% of it. A random k% of memories carries k% of it on average."""
    frame = evaluation.sparsity
    tops = [c for c in frame.columns if c.startswith("top_")]
    ids = np.sort(frame["sentence_id"].unique())
    idx = resample_indices(len(ids), n_boot, seed)
    rows = []
    for layer, part in frame.groupby("layer"):
        part = part.set_index("sentence_id").reindex(ids).fillna(0)
        tokens = part["tokens"].to_numpy(np.float64)
        row = {"layer": int(layer), "relative_depth": (int(layer) + 1) / n_layers, "tokens": int(tokens.sum())}
        for column in tops + ["concentrated"]:
            values = part[column].to_numpy(np.float64)
            row[column] = float(values.sum() / tokens.sum())
            low, high = percentile_interval(values[idx].sum(1) / tokens[idx].sum(1))
            row[f"{column}_low"], row[f"{column}_high"] = low, high
        rows.append(row)
    return pd.DataFrame(rows)


def router_picks(evaluation: Evaluation, splits) -> pd.DataFrame:
    """How often the trained (mlp) router picks each expert on held-out tokens: per split, share, layer and expert,
    ``picked_rate`` (the share of tokens at which it was among the ``experts_kept``), beside ``uniform_rate``
    = experts_kept / n_experts, the rate of a router that picks every expert equally often (the base rate)."""
    columns = ["split", "share", "layer", "expert", "picked_rate", "experts_kept", "n_experts", "uniform_rate"]
    picks = evaluation.picks
    if picks is None or picks.empty:
        return pd.DataFrame(columns=columns)
    labels = splits.frame[["split", "layer", "memory", "expert"]]
    merged = picks.astype({"layer": np.int64, "memory": np.int64}).merge(
        labels.astype({"layer": np.int64, "memory": np.int64}), on=["split", "layer", "memory"], how="left")
    table = merged.groupby(["split", "share", "layer", "expert"], sort=True)["kept_rate"].mean().rename("picked_rate")
    table = table.reset_index()
    table["n_experts"] = splits.n_experts
    table["experts_kept"] = [experts_kept(float(share), splits.n_experts) for share in table["share"]]
    table["uniform_rate"] = table["experts_kept"] / table["n_experts"]
    return table[columns]
