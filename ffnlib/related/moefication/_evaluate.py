"""Evaluation (:func:`evaluate`): held-out sentences through the dense model and every configuration. Per
configuration and sentence: tokens predicted, summed negative log-likelihood and top-1 agreement with the dense
model (``ffnlib.evaluate.heldout_predictions``, with the configuration applied around each batch); per configuration
and layer: the :class:`Record`'s shares; per trained-router configuration, how often each memory was kept (its
expert picked); from the dense pass, the memories' sparsity. Every finished configuration is saved, so a run
resumes."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ...capture import capture
from ...evaluate import MAX_PADDING, heldout_predictions, sentence_batches
from ...mining import corpus_fingerprint, prepare_sentences
from ...progress import say, tqdm
from ...storage import ensure_dir, fingerprint, load_result, save_result
from ._cache import base_request
from ._choices import SPARSITY_TOPS
from ._configs import Config
from ._ffn import memory_sizes
from ._passes import real_tokens
from ._plan import Plan
from ._sparsify import Record

__all__ = ["Evaluation", "evaluate", "records_picks"]


@dataclass
class Evaluation:
    """Per configuration and held-out sentence: tokens predicted, summed negative log-likelihood, top-1
    agreements with the dense model (``sentences``); per configuration and layer: the Record's shares
    (``layers``); from the dense pass, per sentence and layer, the |m|·||v|| mass in the top k% of
    memories (``sparsity``); per configuration with the trained (mlp) router, layer and memory, the share of
    held-out tokens at which the memory's expert was picked (``picks``)."""

    sentences: pd.DataFrame
    layers: pd.DataFrame
    sparsity: pd.DataFrame
    manifest: dict
    configs: list[Config] = field(default_factory=list)
    picks: pd.DataFrame = field(default_factory=pd.DataFrame)


def records_picks(config: Config) -> bool:
    """Whether the evaluation keeps each memory's kept rate for ``config``: the trained router's choices."""
    return config.method == "experts" and config.router == "mlp"


def _sparsity_rows(acts, real: torch.Tensor, norms: dict[int, torch.Tensor], sentence_ids: np.ndarray,
                   tops: Sequence[float], concentrated: tuple[float, float]) -> list[dict]:
    rows = []
    for layer, m in acts.coefficients.items():
        sizes = memory_sizes(m, norms[layer])  # (rows, T, d_ff)
        d_ff = sizes.shape[-1]
        ordered = sizes.sort(dim=-1, descending=True).values.cumsum(-1)
        total = ordered[..., -1:].clamp_min(1e-30)
        picks = torch.tensor([max(1, int(round(t * d_ff))) - 1 for t in tops])
        shares = ordered[..., picks] / total  # (rows, T, len(tops))
        top_c = max(1, int(round(concentrated[0] * d_ff))) - 1
        conc = (ordered[..., top_c] / total[..., 0] >= concentrated[1]).float()
        for r, sid in enumerate(sentence_ids):
            keep = real[r]
            n = int(keep.sum())
            if n == 0:
                continue
            row = {"sentence_id": int(sid), "layer": int(layer), "tokens": n,
                   "concentrated": float(conc[r][keep].sum())}
            sums = shares[r][keep].sum(0)
            row.update({f"top_{t:g}": float(s) for t, s in zip(tops, sums)})
            rows.append(row)
    return rows


def _load_config(folder: Path, config: Config, request: dict):
    """A finished configuration's saved parts (None when any is missing or stale)."""
    names = [config.name, f"{config.name}-layers"]
    if records_picks(config):
        names.append(f"{config.name}-picks")
    if config.method == "dense":
        names += ["dense-sparsity", "dense-top1"]
    parts = [load_result(folder, name, request) for name in names]
    return None if any(p is None for p in parts) else parts


def evaluate(plan: Plan, heldout: pd.DataFrame, configs: Sequence[Config], batch_tokens: int = 1024,
             tops: Sequence[float] = SPARSITY_TOPS, concentrated: tuple[float, float] = (0.03, 0.9),
             out_dir=None, progress: bool = True) -> Evaluation:
    """Run ``heldout`` through the dense model and every configuration; see :class:`Evaluation`.

    The dense pass comes first (its top-1 predictions are the reference of agreement) and also measures
    the memories' sparsity on every layer. With ``out_dir`` every finished configuration is saved, so an
    interrupted run resumes where it stopped.
    """
    loaded = plan.loaded
    adapter = loaded.adapter
    configs = [Config("dense")] + [c for c in dict.fromkeys(configs) if c.method != "dense"]
    table = prepare_sentences(loaded, heldout)
    table = table[table["token_ids"].map(len) >= 2].reset_index(drop=True)  # a one-token sentence predicts nothing
    plan_id = {"splits": fingerprint(plan.splits.manifest),
               "routers": None if plan.routers is None else fingerprint(plan.routers.manifest),
               "thresholds": None if plan.thresholds is None else fingerprint(plan.thresholds.to_dict("list")),
               "seed": plan.seed, "cluster_rows": plan.cluster_rows}
    request = {**base_request(loaded, plan.layers, "evaluation"), "plan": plan_id,
               "corpus": corpus_fingerprint(table), "sentences": len(table), "batch_tokens": int(batch_tokens),
               "max_padding": MAX_PADDING, "tops": [float(t) for t in tops], "concentrated": list(concentrated)}
    folder = ensure_dir(Path(out_dir) / f"moe-eval-{fingerprint(request)}") if out_dir is not None else None
    norms_all = {layer: adapter.written_value_norms(layer) for layer in range(adapter.n_layers)}
    record_norms = {layer: norms_all[layer] for layer in plan.layers}
    planned = sentence_batches(loaded, table["token_ids"].tolist(), batch_tokens, MAX_PADDING)
    sentence_ids = table["sentence_id"].to_numpy(np.int64)
    dense_top: dict[int, np.ndarray] = {}
    per_sentence, per_layer, picks, sparsity, reused = [], [], [], None, 0
    bar = tqdm(total=len(configs) * len(planned), desc="Evaluating sparsified models", unit="batch",
               disable=not progress)
    try:
        for config in configs:
            creq = {**request, "config": config.as_dict(), "split_seeds": plan.split_seeds(config)}
            saved = _load_config(folder, config, creq) if folder is not None else None
            if saved is not None:
                per_sentence.append(saved[0])
                per_layer.append(saved[1])
                if records_picks(config):
                    picks.append(saved[2])
                if config.method == "dense":
                    sparsity = saved[2]
                    dense_top = {int(s): np.asarray(t) for s, t in zip(saved[3]["sentence_id"], saved[3]["top1"])}
                reused += 1
                bar.update(len(planned))
                continue
            dense = config.method == "dense"
            record = Record(record_norms, per_memory=records_picks(config))
            sparsity_rows = []

            @contextmanager
            def applied(batch, config=config, record=record, dense=dense, sparsity_rows=sparsity_rows):
                """The configuration around one batch's pass; the dense pass also reads the memories' sparsity."""
                real = real_tokens(batch.lengths, batch.ids.shape[1], len(loaded.bos), batch.ids.device)
                record.real = real.reshape(-1)
                with plan.applied(config, record):
                    with capture(loaded, None, what=("coefficients",)) if dense else nullcontext() as acts:
                        yield
                if dense:
                    sparsity_rows += _sparsity_rows(acts, real, norms_all, sentence_ids[batch.rows], tops,
                                                    concentrated)
                bar.update(1)

            with torch.inference_mode():
                predicted = heldout_predictions(loaded, planned, under=applied)
            rows, top_rows = [], []
            for index, tokens, nll, top in zip(predicted["sentence"], predicted["tokens"], predicted["nll"],
                                               predicted["top1"]):
                sid = int(sentence_ids[index])
                if dense:
                    dense_top[sid] = top
                    top_rows.append({"sentence_id": sid, "top1": top})
                rows.append({"sentence_id": sid, "tokens": int(tokens), "nll": float(nll),
                             "agree": int((top == dense_top[sid]).sum())})
            sent = pd.DataFrame(rows).assign(**config.as_dict())
            lay = record.frame().assign(**config.as_dict())
            per_sentence.append(sent)
            per_layer.append(lay)
            if records_picks(config):
                picks.append(record.memories().assign(**config.as_dict()))
            if dense:
                sparsity = pd.DataFrame(sparsity_rows)
            if folder is not None:
                if dense:
                    save_result(folder, "dense-sparsity", sparsity, creq)
                    save_result(folder, "dense-top1", pd.DataFrame(top_rows), creq)
                save_result(folder, f"{config.name}-layers", lay, creq)
                if records_picks(config):
                    save_result(folder, f"{config.name}-picks", picks[-1], creq)
                save_result(folder, config.name, sent, creq)
    finally:
        bar.close()
    if reused:
        say(f"Reused {reused} of {len(configs)} evaluated configurations from {folder} (same model, plan, "
             f"sentences and settings); computed the other {len(configs) - reused}.", progress)
    return Evaluation(pd.concat(per_sentence, ignore_index=True), pd.concat(per_layer, ignore_index=True),
                      sparsity, request, configs, pd.concat(picks, ignore_index=True) if picks else pd.DataFrame())
