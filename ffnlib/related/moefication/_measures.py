"""The measures of notebook 07's findings (:func:`measures`, judged by ``ffnlib.findings``), each with a 95% interval
and its own control (random experts, random memories, or random experts' pairs of memories), and the Table 2
comparisons (:data:`COMPARISONS`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...stats import Estimate, bootstrap, percentile_interval, two_level
from ._configs import Config
from ._evaluate import Evaluation
from ._paper import PAPER, table2_retained
from ._tables import bootstrap_metrics, per_sentence, random_draws

__all__ = ["COMPARISONS", "measures"]


def _row(quality: pd.DataFrame, method: str, share: float, split: str = "", router: str = "") -> pd.Series | None:
    q = quality[(quality["method"] == method) & np.isclose(quality["share"].astype(float), share)]
    if method == "experts" and not q.empty:
        q = q[(q["split"] == split) & (q["router"] == router)]
    return None if q.empty else q.iloc[0]


def _quality_estimate(row: pd.Series, column: str, sentences: int, minus: float = 0.0) -> Estimate:
    """A quality table's number and its bootstrap interval (over held-out sentences; random experts: over the
    random splits and the sentences) as an Estimate."""
    draws = int(row.get("draws", 1)) if pd.notna(row.get("draws", 1)) else 1
    unit, method = ("sentences", "bootstrap") if row["split"] != "random" else (
        f"sentences x {draws} random splits", "two-level bootstrap")
    return Estimate(float(row[column]) - minus, float(row[f"{column}_low"]) - minus,
                    float(row[f"{column}_high"]) - minus, sentences, unit, method)


def _gap_to_random(evaluation: Evaluation, ours: str, draws: list[Config], n_boot: int, seed: int) -> Estimate:
    """Agreement of configuration ``ours`` minus random experts' (the mean over the random split's ``draws``),
    paired over sentences, with a two-level interval: draws, then sentences (the same for both sides)."""
    a = per_sentence(evaluation, ours, ("agree", "tokens"))
    cells = np.stack([np.concatenate([a, per_sentence(evaluation, c.name, ("agree", "tokens"))], 1) for c in draws])
    return two_level(cells, lambda s: s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3],
                     f"sentences x {len(draws)} random splits", n_boot, seed)


def _paired_gap(boot: dict, ours: str, control: str, sentences: int) -> Estimate:
    """Agreement of configuration ``ours`` minus ``control``, paired: the same bootstrap resamples of sentences."""
    point = boot[ours]["point_agreement"] - boot[control]["point_agreement"]
    gaps = boot[ours]["agreement"] - boot[control]["agreement"]
    low, high = percentile_interval(gaps)
    return Estimate(point, min(low, point), max(high, point), sentences, "sentences", "bootstrap (paired)")


def _draws_note(row: pd.Series | None) -> str:
    """The note " (the mean of N random splits)" for a row of random experts pooled over draws; else ""."""
    if row is None or "draws" not in row or pd.isna(row["draws"]) or row.get("split") != "random":
        return ""
    return f" (the mean of {int(row['draws'])} random splits)"


COMPARISONS = {  # measure key: (configuration, its control) at the share nearest 20%; Table 2's settings
    "kmeans_beats_random": (("kmeans", "mlp"), ("random", "mlp"), "kmeans+mlp", "random+mlp"),
    "coactivation_beats_random": (("coactivation", "mlp"), ("random", "mlp"), "coactivation+mlp", "random+mlp"),
    "mlp_beats_similarity": (("coactivation", "mlp"), ("coactivation", "similarity"), "coactivation+mlp",
                             "coactivation+similarity"),
}


def measures(quality: pd.DataFrame, evaluation: Evaluation | None = None, coherence: pd.DataFrame | None = None,
             n_boot: int = 1000, seed: int = 0) -> tuple[dict[str, Estimate], dict[str, str]]:
    """The measures of notebook 07's findings (``ffnlib.findings``, notebook ``07_moefication``), each with a
    95% interval, and each measure's own control under ``"<key>/baseline"``: random experts with the same
    router, random memories at the same share, or random experts' pairs of memories. Random experts are the
    mean over the random split's draws; their intervals, and those of the gaps to them, resample the draws as
    well as the sentences (or experts). These findings compare methods on the trained model; a random-weights
    model has nothing to keep, so the baselines are their controls.

    ``quality``: :func:`quality_table`; ``evaluation``: :func:`evaluate`'s result (the per-sentence sparsity
    and the paired bootstrap of the Table 2 comparisons); ``coherence``: :func:`expert_coherence`. Missing
    parts are skipped (their findings are "not measured").
    """
    out: dict[str, Estimate] = {}
    details: dict[str, str] = {}
    sentences = int(quality.attrs.get("sentences", 0))
    shares = sorted(float(s) for s in quality.loc[quality["method"] == "experts", "share"].unique())

    # Activation sparsity: the share of (token, layer) pairs whose top 3% of memories carry >= 90% of the mass
    if evaluation is not None and len(evaluation.sparsity):
        by_sentence = evaluation.sparsity.groupby("sentence_id")[["concentrated", "tokens"]].sum()
        out["sparse_activation"] = bootstrap(by_sentence.to_numpy(np.float64), lambda t: t[..., 0] / t[..., 1],
                                             "sentences", n_boot, seed)
        top3 = evaluation.sparsity["top_0.03"].sum() / evaluation.sparsity["tokens"].sum()
        details["sparse_activation"] = (f"{int(by_sentence['tokens'].sum()):,} (token, layer) pairs of "
                                        f"{len(by_sentence)} held-out sentences; on average the top 3% carry "
                                        f"{top3:.1%} of the mass (a random 3%: 3%)")

    # 10-30% of the FFN keeps over 95%: the best realistic configuration at <= 30%, against random experts
    best = None
    for share in [s for s in shares if s <= 0.30 + 1e-9]:
        for split in ("kmeans", "coactivation"):
            for router in ("mlp", "similarity"):
                row = _row(quality, "experts", share, split, router)
                if row is not None and (best is None or row["agreement_low"] > best[0]["agreement_low"]):
                    best = (row, share, split, router)
    if best is not None:
        row, share, split, router = best
        out["keep_95"] = _quality_estimate(row, "agreement", sentences)
        control = _row(quality, "experts", share, "random", router)
        if control is not None:
            out["keep_95/baseline"] = _quality_estimate(control, "agreement", sentences)
        details["keep_95"] = (f"the best of k-means / co-activation experts with the MLP or similarity router at "
                              f"<= 30% (chosen by the interval's lower end: {split} + {router} at {share:.0%}, "
                              f"perplexity x{row['perplexity_ratio']:.2f}); baseline: random experts, same router"
                              + _draws_note(control))

    # Table 2's comparisons, at the share nearest 20%: paired differences of agreement
    boot = bootstrap_metrics(evaluation, n_boot, seed) if evaluation is not None and shares else None
    if boot is not None:
        at = min(shares, key=lambda s: abs(s - 0.2))
        for key, (ours, theirs, paper_ours, paper_theirs) in COMPARISONS.items():
            a, b = _row(quality, "experts", at, *ours), _row(quality, "experts", at, *theirs)
            if a is None or b is None:
                continue
            draws = random_draws(evaluation.configs).get((theirs[1], round(float(at), 9))) \
                if theirs[0] == "random" else None
            if draws:
                out[key] = _gap_to_random(evaluation, a["config"], draws, n_boot, seed)
            else:
                out[key] = _paired_gap(boot, a["config"], b["config"], sentences)
            mean = f" (mean of {len(draws)} random splits)" if draws else ""
            details[key] = (f"at {at:.0%}: {'+'.join(ours)} {a['agreement']:.1%} vs {'+'.join(theirs)} "
                            f"{b['agreement']:.1%}{mean} top-1 agreement with the dense model; the paper's gap "
                            f"{100 * (table2_retained(paper_ours) - table2_retained(paper_theirs)):+.1f} points is "
                            "of retained task score")

    # CATS and TEAL at 50% of the memories: perplexity cost, against random memories at the same share
    for method in ("cats", "teal"):
        share = PAPER[method]["keep" if method == "cats" else "share"]
        row, control = _row(quality, method, share), _row(quality, "experts", share, "random", "random")
        if row is None:
            continue
        out[method] = _quality_estimate(row, "perplexity_ratio", sentences, minus=1.0)
        if control is not None:
            out[f"{method}/baseline"] = _quality_estimate(control, "perplexity_ratio", sentences, minus=1.0)
        details[method] = (f"{method.upper()} at {share:.0%} reads {row['ffn_share']:.0%} of the FFN weights; "
                           f"agreement {row['agreement']:.1%}; baseline: random memories at {share:.0%}"
                           + _draws_note(control))

    # The key-value view: an expert's memories share trigger topics / value tokens, against random experts
    if coherence is not None and len(coherence):
        for view, name in (("trigger_topic", "trigger_topics"), ("value_tokens", "value_tokens")):
            part = coherence[coherence["view"] == view].set_index("split")
            for split in ("kmeans", "coactivation"):
                if split not in part.index or pd.isna(part.loc[split, "share"]):
                    continue
                for which, key in ((split, f"{name}_{split}"), ("random", f"{name}_{split}/baseline")):
                    if which in part.index and not pd.isna(part.loc[which, "share"]):
                        r = part.loc[which]
                        draws = int(r["draws"]) if "draws" in r and pd.notna(r["draws"]) else 1
                        unit, method = ("experts", "bootstrap") if which != "random" else (
                            f"experts of {draws} random splits", "two-level bootstrap")
                        out[key] = Estimate(float(r["share"]), float(r["share_low"]), float(r["share_high"]),
                                            int(r["experts"]), unit, method)
                draws = (f" (the mean of {int(part.loc['random', 'draws'])} random splits)"
                         if "random" in part.index and "draws" in part.columns else "")
                details[f"{name}_{split}"] = (f"share of the pairs of memories of one expert; "
                                              f"{int(part.loc[split, 'experts'])} experts; baseline: random "
                                              f"experts{draws}")
    return out, details
