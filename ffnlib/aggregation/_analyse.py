"""Section 5's computation: the examples, one forward pass per batch, and the per-example table.

The choices are described in :mod:`ffnlib.aggregation`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..batching import plan_shortest_first, prefix_inputs
from ..capture import capture, forward_until_stop, stop_after
from ..corpus import load_corpus
from ..errors import CorpusError, ParameterError
from ..progress import tqdm
from ..stats import share
from ..storage import cache_dir, fingerprint, load_result, save_result
from ._measures import agreement_breakdown, layer_summary

__all__ = ["ACTIVE_RULES", "classify", "memory_counts", "active_mask", "memory_predictions", "agreeing_memories",
           "sample_examples", "memory_top_tokens", "stop_word_flags", "project_tops", "analyse_batch",
           "AggregationResult", "check_examples", "resolve_examples", "check_settings", "aggregation_request",
           "load_cached_aggregation", "analyse_aggregation"]

ACTIVE_RULES = ("auto", "relative", "positive")
_CAPTURED = ("coefficients", "ffn_output", "residual_before", "residual_after")
_PROJECTION_ELEMENTS = 1 << 26  # logits computed at once: rows x vocab (256 MB of float32)
_VERSION = 3  # bump when the computation of a column changes

# ---- pure pieces (tested on hand-built inputs) ---------------------------------------------------------
def classify(residual_top, ffn_top, output_top) -> np.ndarray:
    """The Fig. 11 case of each example, from three arrays of top-token ids of the same shape.

    ``agreement``: residual top == FFN top == output top; ``residual``: output top == residual top
    != FFN top; ``ffn``: output top == FFN top != residual top; ``composition``: the output's top token
    is neither the residual's nor the FFN's. The four cases partition all examples.
    """
    residual, ffn, output = (np.asarray(x) for x in (residual_top, ffn_top, output_top))
    if not residual.shape == ffn.shape == output.shape:
        raise ParameterError(f"classify needs arrays of one shape; got {residual.shape}, {ffn.shape}, "
                             f"{output.shape}.")
    keep_residual, keep_ffn = output == residual, output == ffn
    case = np.full(residual.shape, "composition", dtype=object)
    case[keep_residual & ~keep_ffn] = "residual"
    case[keep_ffn & ~keep_residual] = "ffn"
    case[keep_residual & keep_ffn] = "agreement"
    return case


@torch.no_grad()
def memory_counts(coefficients: torch.Tensor, value_norms: torch.Tensor, active_threshold: float = 0.1,
                  norm_share: float = 0.9) -> dict[str, torch.Tensor]:
    """Per example (rows of ``coefficients``, shape (..., d_ff)), how many memories take part.

    - ``n_positive``: memories with ``m_i > 0``;
    - ``n_relative``: memories with ``|m_i| > active_threshold · max_j |m_j|``;
    - ``n_norm``: the smallest ``k`` such that the ``k`` largest sub-update sizes ``|m_i|·||v_i||``
      add up to at least ``norm_share`` of their sum (0 when every coefficient is 0);
    - ``max_abs``: ``max_j |m_j|``.
    """
    magnitude = coefficients.abs()
    max_abs = magnitude.amax(dim=-1)
    sizes = (magnitude.double() * value_norms.double()).sort(dim=-1, descending=True).values.cumsum(dim=-1)
    total = sizes[..., -1:]
    n_norm = (sizes < norm_share * total).sum(dim=-1) + 1
    n_norm = torch.where(total[..., 0] > 0, n_norm, torch.zeros_like(n_norm))
    return {"n_positive": (coefficients > 0).sum(dim=-1),
            "n_relative": (magnitude > active_threshold * max_abs.unsqueeze(-1)).sum(dim=-1),
            "n_norm": n_norm, "max_abs": max_abs}


def active_mask(coefficients: torch.Tensor, rule: str, active_threshold: float) -> torch.Tensor:
    """Which memories are active (same shape as ``coefficients``) under ``rule`` (``relative``/``positive``)."""
    if rule == "positive":
        return coefficients > 0
    if rule == "relative":
        magnitude = coefficients.abs()
        return magnitude > active_threshold * magnitude.amax(dim=-1, keepdim=True)
    raise ParameterError(f"active_rule must be 'relative' or 'positive' here, got {rule!r}.")


def memory_predictions(coefficients: torch.Tensor, top_positive: torch.Tensor,
                       top_negative: torch.Tensor | None) -> torch.Tensor:
    """Each memory's top token for these coefficients: that of ``v_i`` if ``m_i > 0``, else of ``-v_i``."""
    if top_negative is None:
        return top_positive.expand_as(coefficients)
    return torch.where(coefficients > 0, top_positive, top_negative)


def agreeing_memories(predictions: torch.Tensor, active: torch.Tensor, layer_top: torch.Tensor) -> torch.Tensor:
    """How many active memories predict the layer's top token (0: zero agreement), per example."""
    return ((predictions == layer_top.unsqueeze(-1)) & active).sum(dim=-1)


# ---- examples -------------------------------------------------------------------------------------------
def sample_examples(loaded, n_examples: int, seed: int = 0, corpus="wiki") -> pd.DataFrame:
    """``n_examples`` held-out sentences (``load_corpus(split="heldout")``), one random position each.

    Columns: ``example`` (0..n-1), ``sentence_id``, ``title``, ``text``, ``token_ids`` (as
    ``loaded.encode`` gives, BOS included), ``position`` (index of the prefix's last token; never a
    BOS position, always followed by a token), ``prefix_len`` (prefix tokens without BOS) and
    ``next_token`` (the target, ``token_ids[position + 1]``). A sentence too short for such a prefix, or longer
    than the model reads (``loaded.max_positions``), is skipped: there may be fewer than ``n_examples`` rows.
    """
    n_examples = check_examples(n_examples)
    table = load_corpus(corpus, split="heldout", seed=seed, max_sentences=n_examples)
    if len(table) < n_examples:
        raise ParameterError(f"n_examples={n_examples} but the corpus has only {len(table)} held-out sentences; "
                             f"ask for at most {len(table)}.")
    bos = list(loaded.bos)
    encoded = loaded.tokenizer(table["text"].tolist(), add_special_tokens=False)["input_ids"]
    limit = getattr(loaded, "max_positions", None)
    rows = []
    for row, ids in zip(table.itertuples(index=False), encoded):
        ids = bos + list(ids)
        low, high = len(bos), len(ids) - 2  # a prefix ends on a real token and has a next token
        if high < low or (limit and len(ids) > limit):  # too short, or longer than the model reads
            continue
        position = int(np.random.default_rng([seed, int(row.sentence_id)]).integers(low, high + 1))
        rows.append((int(row.sentence_id), row.title, row.text, ids, position, position + 1 - len(bos),
                     ids[position + 1]))
    if not rows:
        raise CorpusError("No held-out sentence is long enough for a prefix with a next token.")
    frame = pd.DataFrame(rows, columns=["sentence_id", "title", "text", "token_ids", "position", "prefix_len",
                                        "next_token"])
    frame.insert(0, "example", np.arange(len(frame), dtype=np.int64))
    return frame


# ---- the memories' own predictions ---------------------------------------------------------------------
def memory_top_tokens(loaded, negative: bool, cache: str | Path | None = None, progress: bool = True,
                      projections: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top token of every value (n_layers, d_ff), and of every negated value when ``negative``.

    Reuses a finished projection of every value in ``projections`` (notebook 02's, in the run's folder:
    ``ffnlib.values.cached_projection_tops``) when there is one; otherwise uses
    ``ffnlib.values.value_top_tokens``. The result is cached (Parquet + manifest, keyed by the
    model's weights) in ``cache`` or the user cache folder, since it costs a full vocabulary projection
    of every value (about a minute for SmolLM2 on 2 cores).
    """
    from ..values import cached_projection_tops, value_top_tokens

    adapter = loaded.adapter
    folder = Path(cache) if cache is not None else cache_dir() / "value-top-tokens"
    request = {"model": loaded.key, "weights": loaded.file_hash, "negative": bool(negative),
               "layers": adapter.n_layers, "d_ff": adapter.d_ff, "version": _VERSION}
    name = f"value-tops-{fingerprint(request)}"
    frame = load_result(folder, name, request)
    projected = None
    if frame is None and projections is not None:
        projected = cached_projection_tops(loaded, projections, (1, -1) if negative else (1,))
    if frame is None and projected is not None:
        if progress:
            print(f"[ffnlib] the values' top tokens come from the cached projection in {projections}")
        wide = projected.pivot_table(index=["layer", "memory"], columns="sign", values="top_token").astype("int64")
        wide = wide.reset_index().sort_values(["layer", "memory"])
        frame = pd.DataFrame({"layer": wide["layer"].to_numpy(np.int32), "memory": wide["memory"].to_numpy(np.int32),
                              "top_positive": wide[1].to_numpy(np.int64),
                              "top_negative": wide[-1].to_numpy(np.int64) if negative
                              else np.full(len(wide), -1, dtype=np.int64)})
        save_result(folder, name, frame, request)
    if frame is None:
        columns = {"layer": [], "memory": [], "top_positive": [], "top_negative": []}
        for layer in tqdm(range(adapter.n_layers), desc="value top tokens", disable=not progress, leave=False):
            columns["layer"].append(np.full(adapter.d_ff, layer, dtype=np.int32))
            columns["memory"].append(np.arange(adapter.d_ff, dtype=np.int32))
            columns["top_positive"].append(value_top_tokens(adapter, layer, 1).cpu().numpy())
            columns["top_negative"].append(value_top_tokens(adapter, layer, -1).cpu().numpy() if negative
                                           else np.full(adapter.d_ff, -1, dtype=np.int64))
        frame = pd.DataFrame({key: np.concatenate(parts) for key, parts in columns.items()})
        save_result(folder, name, frame, request)
    shape = (adapter.n_layers, adapter.d_ff)
    top_positive = torch.tensor(frame["top_positive"].to_numpy(np.int64).reshape(shape), device=loaded.device)
    top_negative = (torch.tensor(frame["top_negative"].to_numpy(np.int64).reshape(shape), device=loaded.device)
                    if negative else None)
    return top_positive, top_negative


def stop_word_flags(tokenizer, token_ids) -> np.ndarray:
    """Whether each token, decoded on its own, stripped and lowercased, is a spaCy English stop word."""
    from spacy.lang.en.stop_words import STOP_WORDS

    token_ids = np.asarray(token_ids, dtype=np.int64)
    unique, inverse = np.unique(token_ids, return_inverse=True)
    flags = np.array([tokenizer.decode([int(t)]).strip().lower() in STOP_WORDS for t in unique], dtype=bool)
    return flags[inverse].reshape(token_ids.shape)


# ---- one batch ------------------------------------------------------------------------------------------
@torch.no_grad()
def project_tops(adapter, vectors: torch.Tensor, final_top: torch.Tensor | None = None,
                 max_elements: int = _PROJECTION_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top token of ``logits_from_residual`` for each row of ``vectors`` (..., n, d_model), in chunks.

    With ``final_top`` (n,) also the probability each row gives that example's token (``final_top``
    is broadcast over the leading dimensions: the last one indexes examples).
    """
    shape = vectors.shape[:-1]
    flat = vectors.reshape(-1, vectors.shape[-1])
    targets = final_top.expand(shape).reshape(-1) if final_top is not None else None
    vocab = int(adapter.head.weight.shape[0])
    rows = max(1, max_elements // vocab)
    tops, probs = [], []
    for start in range(0, flat.shape[0], rows):
        logits = adapter.logits_from_residual(flat[start: start + rows]).float()
        tops.append(logits.argmax(dim=-1))
        if targets is not None:
            chosen = logits.gather(1, targets[start: start + rows, None])[:, 0]
            probs.append(torch.exp(chosen - torch.logsumexp(logits, dim=-1)))
    top = torch.cat(tops).reshape(shape)
    return top, (torch.cat(probs).reshape(shape) if targets is not None else None)


@torch.no_grad()
def analyse_batch(loaded, examples: pd.DataFrame, batch: np.ndarray, settings: dict,
                  top_positive: torch.Tensor, top_negative: torch.Tensor | None,
                  value_norms: torch.Tensor) -> pd.DataFrame:
    """The rows (one per example x layer) of one batch, from one forward pass."""
    adapter = loaded.adapter
    n_layers, last_layer = adapter.n_layers, adapter.n_layers - 1
    pad_id = loaded.pad_id
    ids, mask, last = prefix_inputs(examples, batch, pad_id, loaded.device)
    rows = torch.arange(len(batch), device=loaded.device)
    # stop after the last block: the final norm and head run on the few rows we keep, not on all tokens
    with capture(loaded, what=_CAPTURED) as acts, stop_after(loaded, last_layer):  # after capture's hook
        forward_until_stop(loaded.model, input_ids=ids, attention_mask=mask, use_cache=False)
        pick = {name: torch.stack([getattr(acts, name)[layer][rows, last] for layer in range(n_layers)])
                for name in _CAPTURED}  # (layers, batch, dim)
    coefficients = pick["coefficients"].float()
    final_top, _ = project_tops(adapter, pick["residual_after"][last_layer])
    stacked = torch.stack([pick["residual_before"], pick["ffn_output"], pick["residual_after"]])
    tops, probs = project_tops(adapter, stacked, final_top, settings["max_elements"])
    residual_top, ffn_top, output_top = tops
    residual_prob, _, output_prob = probs

    counts = memory_counts(coefficients, value_norms[:, None, :], settings["active_threshold"],
                           settings["norm_share"])
    active = active_mask(coefficients, settings["active_rule"], settings["active_threshold"])
    predictions = memory_predictions(coefficients, top_positive[:, None, :],
                                     None if top_negative is None else top_negative[:, None, :])
    agree_ffn = agreeing_memories(predictions, active, ffn_top)
    agree_output = agreeing_memories(predictions, active, output_top)
    positive = coefficients > 0  # the paper's rule, kept next to the chosen one
    agree_ffn_positive = agreeing_memories(predictions, positive, ffn_top)
    agree_output_positive = agreeing_memories(predictions, positive, output_top)

    def flat(t: torch.Tensor, dtype) -> np.ndarray:  # (layers, batch) -> example-major order
        return t.T.reshape(-1).cpu().numpy().astype(dtype)

    chosen = examples.iloc[batch]
    repeat = lambda col, dtype: np.repeat(chosen[col].to_numpy(dtype), n_layers)  # noqa: E731
    frame = pd.DataFrame({
        "example": repeat("example", np.int64),
        "layer": np.tile(np.arange(n_layers, dtype=np.int32), len(batch)),
        "sentence_id": repeat("sentence_id", np.int64),
        "position": repeat("position", np.int32),
        "prefix_len": repeat("prefix_len", np.int32),
        "next_token": repeat("next_token", np.int64),
        "final_top": np.repeat(final_top.cpu().numpy().astype(np.int64), n_layers),
        "n_positive": flat(counts["n_positive"], np.int32),
        "n_relative": flat(counts["n_relative"], np.int32),
        "n_active": flat(active.sum(dim=-1), np.int32),
        "n_norm": flat(counts["n_norm"], np.int32),
        "max_abs_coefficient": flat(counts["max_abs"], np.float32),
        "residual_top": flat(residual_top, np.int64),
        "ffn_top": flat(ffn_top, np.int64),
        "output_top": flat(output_top, np.int64),
        "residual_prob_final": flat(residual_prob, np.float32),
        "output_prob_final": flat(output_prob, np.float32),
        "agree_ffn": flat(agree_ffn, np.int32),
        "agree_output": flat(agree_output, np.int32),
        "agree_ffn_positive": flat(agree_ffn_positive, np.int32),
        "agree_output_positive": flat(agree_output_positive, np.int32),
    })
    frame["case"] = classify(frame["residual_top"], frame["ffn_top"], frame["output_top"]).astype(str)
    frame["ffn_top_stop"] = stop_word_flags(loaded.tokenizer, frame["ffn_top"])
    frame["output_top_stop"] = stop_word_flags(loaded.tokenizer, frame["output_top"])
    return frame


# ---- the whole analysis ---------------------------------------------------------------------------------
@dataclass
class AggregationResult:
    """Section 5 results: ``frame`` has one row per (example, layer); ``examples`` one per example."""

    frame: pd.DataFrame
    examples: pd.DataFrame
    manifest: dict
    cached: bool = False
    info: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.manifest["layers"])

    @property
    def d_ff(self) -> int:
        return int(self.manifest["d_ff"])

    def summary(self) -> pd.DataFrame:
        return layer_summary(self.frame, self.d_ff, self.n_layers)

    def breakdown(self, against: str = "output") -> dict:
        return agreement_breakdown(self.frame, against)


def check_examples(n_examples) -> int:
    if isinstance(n_examples, bool) or not isinstance(n_examples, (int, np.integer)) or n_examples <= 0:
        raise ParameterError(f"n_examples must be a positive int, got {n_examples!r} "
                             "(the paper used 4,000; None in a notebook means the scale's value).")
    return int(n_examples)


def resolve_examples(n_examples, scale, control: bool = False) -> int:
    """A notebook's ``n_examples`` parameter: ``None`` means the scale's ``aggregation_examples`` (for the
    random-weights control, ``control=True``: the scale's ``control_aggregation_examples``, fewer at the
    default scale to keep the suite's time within budget); a number given by the user is used for both."""
    if n_examples is None:
        return scale.control_aggregation_examples if control else scale.aggregation_examples
    return check_examples(n_examples)


def check_settings(loaded, active_threshold, active_rule, norm_share, batch_tokens) -> dict:
    for name, value in (("active_threshold", active_threshold), ("norm_share", norm_share)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ParameterError(f"{name} must be a number, got {value!r}.")
    if not 0 <= active_threshold < 1:
        raise ParameterError(f"active_threshold must be in [0, 1) (a share of the largest |m|), got "
                             f"{active_threshold}.")
    if not 0 < norm_share <= 1:
        raise ParameterError(f"norm_share must be in (0, 1], got {norm_share}.")
    if active_rule not in ACTIVE_RULES:
        raise ParameterError(f"active_rule must be one of {ACTIVE_RULES}, got {active_rule!r}.")
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, (int, np.integer)) or batch_tokens < 1:
        raise ParameterError(f"batch_tokens must be a positive int, got {batch_tokens!r}.")
    rule = active_rule if active_rule != "auto" else ("relative" if loaded.adapter.gated else "positive")
    return {"active_threshold": float(active_threshold), "active_rule": rule, "norm_share": float(norm_share),
            "batch_tokens": int(batch_tokens), "max_elements": _PROJECTION_ELEMENTS}


def aggregation_request(loaded, n_examples: int, seed: int, corpus, settings: dict
                        ) -> tuple[pd.DataFrame, dict, str]:
    """The examples, the manifest and the result's name of one Section 5 request (one process or a cluster)."""
    examples = sample_examples(loaded, n_examples, seed, corpus)
    adapter = loaded.adapter
    manifest = {"analysis": "section5-aggregation", "version": _VERSION, "model": loaded.key,
                "weights": loaded.file_hash, "corpus": corpus if isinstance(corpus, str) else "custom",
                "split": "heldout", "seed": int(seed), "n_examples": int(n_examples),
                "examples": fingerprint(examples[["sentence_id", "position"]].to_numpy().tolist()),
                "layers": adapter.n_layers, "d_ff": adapter.d_ff, "gated": adapter.gated,
                **{k: v for k, v in settings.items() if k != "max_elements"}}
    return examples, manifest, f"aggregation-{fingerprint(manifest)}"


def load_cached_aggregation(out_dir, name: str, manifest: dict, examples: pd.DataFrame,
                            progress: bool = True) -> AggregationResult | None:
    """The saved result of the same request in ``out_dir``, or ``None`` (then it is computed)."""
    if out_dir is None:
        return None
    cached = load_result(out_dir, name, manifest)
    if cached is None:
        return None
    if progress:
        print(f"[ffnlib] reusing cached Section 5 result {Path(out_dir) / name}.parquet "
              f"({len(examples)} examples; same request)")
    return AggregationResult(cached, examples, manifest, cached=True)


def analyse_aggregation(loaded, n_examples: int = 4000, seed: int = 0, active_threshold: float = 0.1,
                        active_rule: str = "auto", norm_share: float = 0.9, batch_tokens: int = 2048,
                        out_dir: str | Path | None = None, corpus="wiki", progress: bool = True,
                        value_cache: str | Path | None = None) -> AggregationResult:
    """Run Section 5 on ``n_examples`` held-out prefixes; one row per (example, layer).

    ``out_dir``: where batches are checkpointed and the finished result is saved (and reused when the
    same request comes again). ``value_cache``: where the values' top tokens are cached (default: the
    user cache folder). See the module docstring for every definition.
    """
    settings = check_settings(loaded, active_threshold, active_rule, norm_share, batch_tokens)
    examples, manifest, name = aggregation_request(loaded, n_examples, seed, corpus, settings)
    adapter = loaded.adapter
    cached = load_cached_aggregation(out_dir, name, manifest, examples, progress)
    if cached is not None:
        return cached

    top_positive, top_negative = memory_top_tokens(
        loaded, negative=adapter.gated or settings["active_rule"] == "relative", cache=value_cache,
        progress=progress, projections=out_dir)
    value_norms = torch.stack([adapter.written_value_norms(layer) for layer in range(adapter.n_layers)])
    batches = plan_shortest_first(examples["position"].to_numpy() + 1, settings["batch_tokens"])
    partial = Path(out_dir) / f"{name}.partial" if out_dir is not None else None
    parts, resumed = [], 0
    for index, batch in enumerate(tqdm(batches, desc="Section 5 batches", disable=not progress)):
        # each finished batch is a checkpoint with its own checksummed manifest; a damaged one is
        # reported by name (load_result warns) and recomputed, never used
        checkpoint = {**manifest, "batch": index, "batch_examples": [int(i) for i in batch]}
        if partial is not None:
            part = load_result(partial, f"batch-{index:05d}", checkpoint)
            if part is not None:
                parts.append(part)
                resumed += 1
                continue
        part = analyse_batch(loaded, examples, batch, settings, top_positive, top_negative, value_norms)
        if partial is not None:
            save_result(partial, f"batch-{index:05d}", part, checkpoint)
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True).sort_values(["example", "layer"], kind="stable")
    frame = frame.reset_index(drop=True)
    if out_dir is not None:
        save_result(out_dir, name, frame, manifest)
        shutil.rmtree(partial, ignore_errors=True)
        if progress and resumed:
            print(f"[ffnlib] resumed: {resumed} of {len(batches)} batches came from checkpoints in {partial}")
    return AggregationResult(frame, examples, manifest, info={"batches": len(batches), "resumed": resumed})
