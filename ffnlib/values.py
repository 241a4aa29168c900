"""Section 4: values represent distributions over the output vocabulary.

A value v_i, read as the model reads its residual stream at the end, is the distribution
``p_i = softmax(head(g ⊙ v_i))`` (g: the final norm's gain; see ``Adapter.logits_from_values``).
For gated FFNs a negative coefficient writes ``-v_i``, so the negative side is projected too.

**Projection** (:func:`project_values`). Every value of every layer goes through the model's own head,
in chunks of rows whose working memory (the chunk's logits plus one work buffer of the same size) stays
under ``memory_limit_mb``: Gemma 3's 262,144-token vocabulary times 2,048 values is 2 GiB per layer and
is never held at once. Per value (and sign) we keep the top-k tokens with their probabilities
(``torch.softmax`` of the value's logits, bit for bit), the maximal probability, and optionally, in the same
pass, the rank of one given target token (rank 0 = the top token; the rank is the number of tokens with a
strictly larger logit). Each finished layer is checkpointed atomically, so a killed run resumes; the
finished result is cached by its manifest.
For a gated model the ``-v_i`` logits are the exact negation of the ``v_i`` logits (the head is linear
without bias), so both sides come from one matrix product.

**Agreement** (:func:`value_agreement`, Fig. 4). A memory *agrees* when its value's top token equals
the token that follows the prefix of its key's top-1 trigger example (``next_token`` of the trigger with
``rank == 0``: the token at ``position + 1``, the authors' corrected offset). The negative side
(``sign=-1``: ``-v_i`` against the most negative coefficients' triggers) is kept apart.

- A trigger whose prefix is the whole sentence has no next token (``next_token == -1``). With
  ``end_of_sentence="disagree"`` (default, as the authors' code, which used ``<s>`` as the target, which a
  value's top token practically never is) such a memory stays in the denominator and counts as not agreeing; with ``"exclude"``
  it is left out of the rate (and its end-of-sentence triggers out of the top-50 shares).
- Memories without any trigger example are left out (they are counted in ``with_trigger``).
- Baselines: the random one, ``1/|V|``; and an empirical one that pairs each value with *another* key's
  triggers of the same layer and sign (a seeded random derangement of the memories): the same measures
  computed on the partner's triggers say how often a value's top token follows an unrelated prefix (frequent
  tokens such as "," or " the" do so often; 1/|V| ignores that).
- Also per memory: how many of the key's top-``n_triggers`` triggers are followed by the value's top token
  (the authors' code counted the same for Table 2 / "46 of the top 100").

**Confidence** (:func:`agreement_by_confidence`, :func:`confident_values`; Fig. 6, Table 2): agreement as a
function of the value's maximal probability, and the most confident values.

**The measures** (:func:`section4_measures`): each finding's number with its 95% interval (a seeded bootstrap
over memories), layers matched by relative depth; ``ffnlib.findings`` judges them against the same measures
on a random-weights control.

The probabilities are those of ``head(g ⊙ v_i)``: the norm's 1/RMS scale is left out, as the paper's
model (no final norm) had no such scale. Rankings and top tokens do not depend on it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .adapters import Adapter
from .errors import ParameterError, ResultsError
from .progress import tqdm
from .reference import PAPER_LAYERS, relative_depth
from .stats import LEVEL, N_BOOT, Estimate, binomial, bootstrap, bootstrap_samples, share, shift
from .storage import fingerprint, load_result, read_json, save_result, sha256_bytes

__all__ = ["KEYS", "END_OF_SENTENCE", "BINNINGS", "PAPER_UPPER_FROM", "value_logits", "value_top_tokens",
           "ValueProjection", "projection_chunk_rows", "top_trigger_targets", "project_values",
           "cached_projection_tops", "target_ranks", "check_next_tokens", "value_agreement", "agreement_by_layer",
           "agreement_by_depth", "agreement_by_confidence", "confident_values", "confident_summary",
           "confident_examples", "section4_measures"]

KEYS = ["layer", "memory", "sign"]
END_OF_SENTENCE = ("disagree", "exclude")
BINNINGS = ("quantile", "uniform")
PAPER_UPPER_FROM = 10 / PAPER_LAYERS  # the paper's upper layers 11-16 of 16: relative depth > 10/16
_WORK_BUFFERS = 2  # float32 (rows, vocab) tensors alive at once: the chunk's logits and one work buffer
_VERSION = 2  # bump when a column's computation changes (invalidates cached projections)


@torch.no_grad()
def value_logits(adapter: Adapter, layer: int, memories=None, sign: int = 1) -> torch.Tensor:
    """Logits (n_memories, vocab) of ``sign * v_i`` for the given memories of one layer (all by default),
    read as the model reads them (``Adapter.written_values``: through Gemma's post-FFN norm gain)."""
    values = adapter.written_values(layer)
    if memories is not None:
        values = values[memories]
    return adapter.logits_from_values(sign * values)


@torch.no_grad()
def value_top_tokens(adapter: Adapter, layer: int, sign: int = 1, chunk: int = 512) -> torch.Tensor:
    """The top token of every value of one layer, as a LongTensor (d_ff,), computed in chunks."""
    out = []
    for start in range(0, adapter.d_ff, chunk):
        out.append(value_logits(adapter, layer, slice(start, start + chunk), sign).argmax(-1))
    return torch.cat(out)


# ---- the projection -----------------------------------------------------------------------------------
@dataclass
class ValueProjection:
    """Every value's distribution over the vocabulary, summarised.

    ``memories``: one row per (layer, memory, sign) with ``top_token``, ``max_prob`` and, when targets were
    given, ``target`` and ``target_rank`` (-1: no target). ``tokens``: the top-k tokens of each value,
    one row per (layer, memory, sign, rank) with ``token`` and ``prob`` (rank 0 = top token).
    """

    memories: pd.DataFrame
    tokens: pd.DataFrame
    manifest: dict

    def of(self, layer: int, memory: int, sign: int = 1) -> pd.DataFrame:
        """The top-k tokens of one value (``sign * v_memory`` of ``layer``), by rank."""
        t = self.tokens
        rows = t[(t["layer"] == layer) & (t["memory"] == memory) & (t["sign"] == sign)]
        if rows.empty:
            raise ParameterError(f"No projected value for layer {layer}, memory {memory}, sign {sign}: "
                                 f"projected layers {sorted(t['layer'].unique().tolist())}, "
                                 f"signs {sorted(t['sign'].unique().tolist())}.")
        return rows.sort_values("rank").reset_index(drop=True)


def projection_chunk_rows(vocab_size: int, d_model: int, memory_limit_mb: float, softcap: bool = False) -> int:
    """How many values to project at once so that the working memory stays under ``memory_limit_mb``.

    The working memory of one chunk is its logits and one work buffer, both (rows, vocab) float32
    (two more transient ones inside the head when it soft-caps its logits), plus the (rows, d_model)
    input. So ``rows * vocab * 4 * buffers <= bound``, in particular ``rows * vocab * 4 <= bound``.
    """
    if isinstance(memory_limit_mb, bool) or not isinstance(memory_limit_mb, (int, float)) or memory_limit_mb <= 0:
        raise ParameterError(f"memory_limit_mb must be a positive number (megabytes), got {memory_limit_mb!r}.")
    buffers = _WORK_BUFFERS + (2 if softcap else 0)
    bytes_per_row = 4 * (vocab_size * buffers + d_model)
    rows = int(memory_limit_mb * 2**20) // bytes_per_row
    if rows < 1:
        raise ParameterError(f"memory_limit_mb={memory_limit_mb} is below what projecting a single value needs "
                             f"({bytes_per_row / 2**20:.2f} MB for a {vocab_size}-token vocabulary); raise it.")
    return rows


def top_trigger_targets(triggers: pd.DataFrame) -> pd.DataFrame:
    """Targets for :func:`project_values`: the next token of each key's top-1 trigger (layer, memory, sign, token).

    End-of-sentence triggers (``next_token == -1``) are kept with token -1 (no rank is computed for them).
    """
    _require_columns(triggers, KEYS + ["rank", "next_token"], "triggers")
    top = triggers[triggers["rank"] == 0]
    return (top[KEYS + ["next_token"]].rename(columns={"next_token": "token"})
            .astype({"layer": "int64", "memory": "int64", "sign": "int8", "token": "int64"})
            .sort_values(KEYS).reset_index(drop=True))


def project_values(model, layers=None, top_k: int = 10, signs=None, targets: pd.DataFrame | None = None,
                   memory_limit_mb: float = 512, out_dir=None, progress: bool = True) -> ValueProjection:
    """Project every value of ``layers`` (all by default) to the vocabulary as the model reads it.

    model: a ``LoadedModel`` (needed with ``out_dir``: its name and file hash identify the result) or an
    ``Adapter``. signs: ``(1, -1)`` for gated models, ``(1,)`` otherwise, by default. targets: a DataFrame
    (layer, memory, sign, token), at most one row per memory and sign (see :func:`top_trigger_targets`);
    the rank of each target token in its value's distribution is computed in the same pass.
    memory_limit_mb: bound on the working memory (see :func:`projection_chunk_rows`).
    out_dir: where to checkpoint each finished layer and cache the result (``None``: nothing is written).
    """
    loaded = None if isinstance(model, Adapter) else model
    adapter: Adapter = model if isinstance(model, Adapter) else getattr(model, "adapter", None)
    if adapter is None:
        raise ParameterError(f"model must be a LoadedModel (ffnlib.models.load_model) or an Adapter, "
                             f"got {type(model).__name__}.")
    vocab = int(adapter.head.weight.shape[0])
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= vocab:
        raise ParameterError(f"top_k must be an int from 1 to the vocabulary size ({vocab}), got {top_k!r}.")
    top_k = int(top_k)
    layers = adapter.check_layers(layers)
    signs = _check_signs(signs, adapter)
    target_tensors, target_hash = _check_targets(targets, adapter, layers, signs, vocab)
    chunk = projection_chunk_rows(vocab, adapter.d_model, memory_limit_mb, softcap=bool(adapter.softcap))

    request = {"kind": "value_projection", "version": _VERSION, "layers": layers, "top_k": top_k,
               "signs": list(signs), "targets": target_hash, "vocab": vocab,
               "dtype": str(adapter.head.weight.dtype)}
    if out_dir is not None:
        if loaded is None or not hasattr(loaded, "file_hash"):
            raise ParameterError("Caching (out_dir) needs a LoadedModel, whose name and file hash identify the "
                                 "result; pass loaded (not loaded.adapter), or out_dir=None.")
        request.update(model=loaded.name, file_hash=loaded.file_hash)
        name = f"values-{fingerprint(request)}"
        out_dir = Path(out_dir)
        cached = _load_parts(out_dir, name, request)
        if cached is not None:
            print(f"Reusing the cached value projection {out_dir / name}.parquet (same model, layers, top_k, "
                  "signs and targets).")
            return ValueProjection(cached[0], cached[1], request)
        partial = out_dir / f"{name}.partial"

    memories, tokens = [], []
    done = 0
    scratch: dict = {}  # the work buffer, reused from layer to layer
    for layer in tqdm(layers, desc="Projecting values", unit="layer", disable=not progress):
        parts = None
        if out_dir is not None:
            parts = _load_parts(partial, f"layer-{layer:03d}", {**request, "layer": layer})
            done += parts is not None
        if parts is None:
            layer_targets = None if targets is None else target_tensors.get(layer, {})
            parts = _project_layer(adapter, layer, top_k, signs, layer_targets, chunk, scratch)
            if out_dir is not None:
                _save_parts(partial, f"layer-{layer:03d}", {**request, "layer": layer}, parts)
        memories.append(parts[0])
        tokens.append(parts[1])
    if done:
        print(f"Resumed: {done} of {len(layers)} layers were read from checkpoints in {partial}.")
    memories = pd.concat(memories, ignore_index=True)
    tokens = pd.concat(tokens, ignore_index=True)
    if out_dir is not None:
        _save_parts(out_dir, name, request, (memories, tokens))
        shutil.rmtree(partial, ignore_errors=True)
    return ValueProjection(memories, tokens, request)


def cached_projection_tops(loaded, folder, signs) -> pd.DataFrame | None:
    """The top token of every value of ``loaded`` for ``signs``, read from a finished projection of all its
    layers cached in ``folder`` (whatever its top_k and targets; checksums verified), or None. Lets
    Section 5 reuse notebook 02's projection instead of projecting every value again."""
    folder = Path(folder)
    layers = list(range(loaded.adapter.n_layers))
    for manifest in sorted(folder.glob("values-*.manifest.json")):
        name = manifest.name[: -len(".manifest.json")]
        if name.endswith(".tokens"):
            continue
        try:
            request = read_json(manifest).get("request") or {}
        except (OSError, ValueError):
            continue
        if (request.get("kind") != "value_projection" or request.get("version") != _VERSION
                or request.get("model") != loaded.name or request.get("file_hash") != loaded.file_hash
                or request.get("layers") != layers or not set(signs) <= set(request.get("signs", []))):
            continue
        memories = load_result(folder, name, request)
        if memories is not None:
            return memories[KEYS + ["top_token"]]
    return None


def _check_signs(signs, adapter: Adapter) -> tuple[int, ...]:
    if signs is None:
        return (1, -1) if adapter.gated else (1,)
    signs = (signs,) if isinstance(signs, (int, np.integer)) else tuple(signs)
    if not signs or any(isinstance(s, bool) or s not in (1, -1) for s in signs) or len(set(signs)) != len(signs):
        raise ParameterError(f"signs must be a non-empty selection of 1 and -1 without repeats, got {signs!r}.")
    return tuple(int(s) for s in signs)


def _require_columns(frame, columns, what: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise ParameterError(f"{what} must be a DataFrame, got {type(frame).__name__}.")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ParameterError(f"{what} lacks the column(s) {missing}; it has {list(frame.columns)}.")


def _check_targets(targets, adapter: Adapter, layers, signs, vocab) -> tuple[dict, str | None]:
    """targets -> {layer: {sign: LongTensor (d_ff,)}} (-1 = no target) and a hash of their content."""
    if targets is None:
        return {}, None
    _require_columns(targets, KEYS + ["token"], "targets")
    t = targets[KEYS + ["token"]].astype("int64")
    t = t[t["layer"].isin(layers) & t["sign"].isin(signs)]
    if t.duplicated(KEYS).any():
        raise ParameterError("targets has several rows for one (layer, memory, sign); give at most one target "
                             "token per value (e.g. top_trigger_targets(triggers)).")
    bad = t[(t["memory"] < 0) | (t["memory"] >= adapter.d_ff) | (t["token"] < -1) | (t["token"] >= vocab)]
    if not bad.empty:
        raise ParameterError(f"targets has {len(bad)} row(s) out of range (memory in 0..{adapter.d_ff - 1}, token "
                             f"in -1..{vocab - 1}); first: {bad.iloc[0].to_dict()}.")
    t = t.sort_values(KEYS).reset_index(drop=True)
    out: dict[int, dict[int, torch.Tensor]] = {}
    for (layer, sign), group in t.groupby(["layer", "sign"]):
        tok = torch.full((adapter.d_ff,), -1, dtype=torch.long)
        tok[torch.tensor(group["memory"].to_numpy())] = torch.tensor(group["token"].to_numpy())
        out.setdefault(int(layer), {})[int(sign)] = tok
    return out, sha256_bytes(np.ascontiguousarray(t.to_numpy()).tobytes())[:16]


@torch.no_grad()
def _project_layer(adapter: Adapter, layer: int, top_k: int, signs, targets: dict | None,
                   chunk: int, scratch: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Top-k tokens, probabilities and target ranks of every value of one layer, chunk by chunk.

    The layer's values are split into equal chunks of at most ``chunk`` rows; every matrix product has
    exactly ``rows`` rows (the last chunk is zero-padded by a few rows), so a value's logits do not depend
    on where it falls in a chunk (BLAS kernels for very few rows round differently).
    """
    values = adapter.written_values(layer)
    d_ff, d_model = values.shape
    n_chunks = -(-d_ff // chunk)
    rows = -(-d_ff // n_chunks)
    head_bias = getattr(adapter.head, "bias", None)
    negate_exactly = head_bias is None and not adapter.softcap  # then logits(-v) == -logits(v) bit for bit
    inp = torch.zeros(rows, d_model, dtype=values.dtype, device=values.device)
    scratch = {} if scratch is None else scratch
    found = {s: (torch.empty(d_ff, top_k, dtype=torch.long), torch.empty(d_ff, top_k),
                 torch.full((d_ff,), -1, dtype=torch.long)) for s in signs}
    for start in range(0, d_ff, rows):
        n = min(rows, d_ff - start)
        if n < rows:
            inp[n:].zero_()
        inp[:n].copy_(values[start:start + n])
        logits = adapter.logits_from_values(inp if signs[0] == 1 else -inp)
        work = scratch.get("work")
        if work is None or work.shape != logits.shape or work.device != logits.device:
            work = scratch["work"] = torch.empty_like(logits)
        for i, sign in enumerate(signs):
            if i > 0:
                if negate_exactly:
                    logits.neg_()
                else:
                    del logits  # free it before the next product: the bound counts two buffers
                    logits = adapter.logits_from_values(sign * inp)
            target = None if targets is None else targets.get(sign)
            target = None if target is None else target[start:start + n]
            tokens, probs, ranks = found[sign]
            tokens[start:start + n], probs[start:start + n], ranks[start:start + n] = _summarise(
                logits[:n], work[:n], top_k, target)
        del logits
    return _layer_frames(layer, d_ff, top_k, signs, found, targets)


@torch.no_grad()
def target_ranks(model, targets: pd.DataFrame, memory_limit_mb: float = 512, progress: bool = False) -> pd.DataFrame:
    """The rank of given tokens in given values' distributions, several per value (e.g. the top trigger's next
    token of every corpus-size snapshot), in one pass over the values.

    ``targets``: columns layer, memory, sign, token (-1: none) and any others (kept; a value may appear in
    several rows). Returns ``targets`` with ``target_rank``: the number of tokens with a strictly larger logit
    (-1 where token is -1), equal bit for bit to what :func:`project_values` gives for one target per value
    (the values are projected in the same chunks).
    """
    adapter: Adapter = model if isinstance(model, Adapter) else getattr(model, "adapter", None)
    if adapter is None:
        raise ParameterError(f"model must be a LoadedModel (ffnlib.models.load_model) or an Adapter, "
                             f"got {type(model).__name__}.")
    _require_columns(targets, KEYS + ["token"], "targets")
    vocab = int(adapter.head.weight.shape[0])
    out = targets.reset_index(drop=True).copy()
    layer_of, memory_of = out["layer"].to_numpy(np.int64), out["memory"].to_numpy(np.int64)
    sign_of, token_of = out["sign"].to_numpy(np.int64), out["token"].to_numpy(np.int64)
    if (np.any((memory_of < 0) | (memory_of >= adapter.d_ff)) or np.any(token_of >= vocab) or np.any(token_of < -1)
            or not set(np.unique(sign_of).tolist()) <= {1, -1}):
        raise ParameterError(f"targets has rows out of range (memory in 0..{adapter.d_ff - 1}, sign 1 or -1, token "
                             f"in -1..{vocab - 1}).")
    adapter.check_layers(sorted(set(layer_of.tolist())))
    ranks = np.full(len(out), -1, dtype=np.int64)
    chunk = projection_chunk_rows(vocab, adapter.d_model, memory_limit_mb, softcap=bool(adapter.softcap))
    groups = out.groupby(["layer", "sign"]).indices
    buf = None
    for (layer, sign), index in tqdm(sorted(groups.items()), desc="Target ranks", unit="layer", disable=not progress):
        values = adapter.written_values(int(layer))
        d_ff, d_model = values.shape
        n_chunks = -(-d_ff // chunk)
        rows = -(-d_ff // n_chunks)  # the chunks of project_values, so the logits are the same bit for bit
        inp = torch.zeros(rows, d_model, dtype=values.dtype, device=values.device)
        order = index[np.argsort(memory_of[index], kind="stable")]
        mems = memory_of[order]
        for start in range(0, d_ff, rows):
            n = min(rows, d_ff - start)
            lo, hi = np.searchsorted(mems, [start, start + n])
            here = order[lo:hi]
            here = here[token_of[here] >= 0]
            if len(here) == 0:
                continue
            if n < rows:
                inp[n:].zero_()
            inp[:n].copy_(values[start:start + n])
            logits = adapter.logits_from_values(inp if sign == 1 else -inp)
            if buf is None or buf.shape != logits.shape:
                buf = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
            # a value's target is often the same token in several snapshots: rank each (memory, token) pair once
            pairs, inverse = np.unique(np.stack([memory_of[here] - start, token_of[here]]), axis=1,
                                       return_inverse=True)
            ranks[here] = _ranks_in_rows(logits, pairs[0], pairs[1], buf)[inverse.reshape(-1)]
            del logits
    out["target_rank"] = ranks
    return out


def _ranks_in_rows(logits: torch.Tensor, rows: np.ndarray, tokens: np.ndarray, buf: torch.Tensor) -> np.ndarray:
    """The rank of ``tokens[j]`` in row ``rows[j]`` of ``logits`` (the number of larger logits), for pairs
    sorted by row with no pair twice, counted in ``buf`` (the logits' shape, float32: sums of ones are exact
    below 2**24). Each pass compares every row with one of its targets (+inf for rows with fewer): as many
    passes as the most targets of one row. Where that would compare far more rows than there are pairs (few
    rows with targets), the pairs' rows are compared instead, as many at a time as ``buf`` holds."""
    index = torch.as_tensor(rows, device=logits.device)
    target_logit = logits[index, torch.as_tensor(tokens, device=logits.device)]
    slot = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")  # a row's first, second, ... target
    ranks = np.empty(len(rows), dtype=np.int64)
    passes = int(slot.max(initial=-1)) + 1
    if passes * logits.shape[0] > 2 * len(rows):
        for start in range(0, len(rows), logits.shape[0]):
            part = slice(start, start + logits.shape[0])
            picked = logits[index[part]]
            n = picked.shape[0]
            ranks[part] = torch.gt(picked, target_logit[part, None], out=buf[:n]).sum(-1).long().cpu().numpy()
        return ranks
    for s in range(passes):
        chosen = np.flatnonzero(slot == s)
        at = torch.as_tensor(rows[chosen], device=logits.device)
        threshold = torch.full((logits.shape[0], 1), float("inf"), dtype=logits.dtype, device=logits.device)
        threshold[at, 0] = target_logit[torch.as_tensor(chosen, device=logits.device)]
        ranks[chosen] = torch.gt(logits, threshold, out=buf).sum(-1)[at].long().cpu().numpy()
    return ranks


def _summarise(logits: torch.Tensor, buf: torch.Tensor, top_k: int, target: torch.Tensor | None):
    """Top-k tokens and probabilities of each row of ``logits``, and the rank of each row's target token
    (-1 where none). ``buf`` is a work buffer of the same shape (no other full-size tensor is allocated).

    The probabilities are ``torch.softmax`` of the logits (written into ``buf``), so they equal a direct
    softmax bit for bit; the top-k is taken on them.
    """
    ranks = torch.full((logits.shape[0],), -1, dtype=torch.long)
    if target is not None:
        tok = target.to(logits.device)
        has = tok >= 0
        if bool(has.any()):
            target_logit = logits.gather(1, tok.clamp(min=0)[:, None])
            # the number of tokens with a strictly larger logit; float32 sums of ones are exact below 2**24
            above = torch.gt(logits, target_logit, out=buf).sum(-1).long()
            ranks = torch.where(has, above, -1).cpu()
    top = torch.softmax(logits, dim=-1, out=buf).topk(top_k, dim=-1)
    return top.indices.cpu(), top.values.float().cpu(), ranks


def _layer_frames(layer, d_ff, top_k, signs, found, targets) -> tuple[pd.DataFrame, pd.DataFrame]:
    memories, tokens = [], []
    memory = np.arange(d_ff, dtype=np.int64)
    for sign in signs:
        tok, prob, rank = (x.numpy() for x in found[sign])
        frame = pd.DataFrame({"layer": np.full(d_ff, layer, dtype=np.int64), "memory": memory,
                              "sign": np.full(d_ff, sign, dtype=np.int8), "top_token": tok[:, 0].astype(np.int64),
                              "max_prob": prob[:, 0].astype(np.float32)})
        if targets is not None:
            target = targets.get(sign)
            frame["target"] = (target.numpy() if target is not None else np.full(d_ff, -1)).astype(np.int64)
            frame["target_rank"] = rank.astype(np.int64)
        memories.append(frame)
        tokens.append(pd.DataFrame({"layer": np.full(d_ff * top_k, layer, dtype=np.int64),
                                    "memory": np.repeat(memory, top_k),
                                    "sign": np.full(d_ff * top_k, sign, dtype=np.int8),
                                    "rank": np.tile(np.arange(top_k, dtype=np.int64), d_ff),
                                    "token": tok.reshape(-1).astype(np.int64),
                                    "prob": prob.reshape(-1).astype(np.float32)}))
    return pd.concat(memories, ignore_index=True), pd.concat(tokens, ignore_index=True)


def _save_parts(folder: Path, name: str, request: dict, parts) -> None:
    save_result(folder, f"{name}.tokens", parts[1], request)
    save_result(folder, name, parts[0], request)  # written last: its manifest marks the pair as finished


def _load_parts(folder: Path, name: str, request: dict):
    memories = load_result(folder, name, request)
    if memories is None:
        return None
    tokens = load_result(folder, f"{name}.tokens", request)
    return None if tokens is None else (memories, tokens)


# ---- agreement between keys and values ----------------------------------------------------------------
def check_next_tokens(triggers: pd.DataFrame, sentences: pd.DataFrame) -> int:
    """Check that every trigger's ``next_token`` is the token after its prefix: ``token_ids[position + 1]``,
    or -1 when the prefix is the whole sentence. Returns the number of triggers checked.

    Raises ResultsError naming the first mismatch (an off-by-one in the miner would show here).
    """
    _require_columns(triggers, ["sentence_id", "position", "next_token"], "triggers")
    _require_columns(sentences, ["sentence_id", "token_ids"], "sentences")
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
    See the module docstring for the choices.
    """
    memories = projection.memories if isinstance(projection, ValueProjection) else projection
    _require_columns(memories, KEYS + ["top_token", "max_prob"], "the projection's memories")
    _require_columns(triggers, KEYS + ["rank", "next_token"], "triggers")
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
        pairing = _derangement(len(index), np.random.default_rng([seed, int(layer), int(sign) + 1]))
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


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
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
    _require_columns(per_memory, KEYS + ["counted", "agrees", "baseline_agrees", "n_agreeing"], "per_memory")
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
    _require_columns(sentences, ["sentence_id", "token_ids"], "sentences")
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


# ---- the measures of Section 4's findings (judged by ffnlib.findings) ----------------------------------
def _two_groups(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Per-unit columns [value if in the first group, 1 if in the first group, value if in the second, 1 if in
    the second]: their weighted sums give both groups' means in one bootstrap."""
    values = np.asarray(values, dtype=np.float64)
    first = np.asarray(first, dtype=bool)
    return np.stack([values * first, first, values * ~first, ~first], 1).astype(np.float64)


def _difference_of_means(s: np.ndarray) -> np.ndarray:
    return s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3]


def _median_difference(a: np.ndarray, b: np.ndarray, unit: str, n_boot: int, seed: int) -> Estimate:
    """median(a) - median(b), each group resampled on its own (a stratified bootstrap)."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if len(a) == 0 or len(b) == 0:
        return Estimate.missing(unit)

    def medians(values: np.ndarray, stream: int) -> np.ndarray:
        def of(weights):
            cum = np.cumsum(weights, axis=1)
            return values[np.argmax(cum >= cum[:, -1:] / 2, axis=1)]
        return bootstrap_samples(of, len(values), n_boot, seed * 2 + stream)

    samples = medians(a, 0) - medians(b, 1)
    value = float(np.median(a) - np.median(b))
    low, high = np.quantile(samples, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return Estimate(value, float(min(low, value)), float(max(high, value)), len(a) + len(b), unit, "bootstrap")


def section4_measures(per_memory: pd.DataFrame, vocab_size: int, n_layers: int, sign: int = 1,
                      n_confident: int = 100, bins: int = 10, n_boot: int = N_BOOT,
                      seed: int = 0) -> tuple[dict[str, Estimate], dict[str, str]]:
    """The measures of Section 4's findings (``ffnlib.findings``, notebook ``02_values``), each with a 95%
    interval from a seeded bootstrap over memories (exact binomial intervals for the 100 most confident
    values), and a line of detail per measure for the report. Layers are matched by relative depth: the
    paper's layers 11-16 of 16 are our layers above relative depth 10/16.
    """
    g = per_memory[per_memory["sign"] == sign]
    counted = g[g["counted"]]
    depth = relative_depth(counted["layer"].to_numpy(), n_layers)
    upper = depth > PAPER_UPPER_FROM
    agrees = counted["agrees"].to_numpy(np.float64)
    base = counted["baseline_agrees"].to_numpy(np.float64)
    unit = "memories"
    out: dict[str, Estimate] = {}
    details: dict[str, str] = {}
    pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731

    lower_excess = (agrees - base)[~upper]
    out["agreement_lower"] = share(lower_excess, unit, n_boot, seed)
    details["agreement_lower"] = (f"lower layers {pct(agrees[~upper].mean() if (~upper).any() else np.nan)} of "
                                  f"{int((~upper).sum()):,} memories, empirical baseline "
                                  f"{pct(base[~upper].mean() if (~upper).any() else np.nan)}")
    out["agreement_rise"] = bootstrap(_two_groups(agrees, upper), _difference_of_means, unit, n_boot, seed)
    details["agreement_rise"] = (f"upper {pct(agrees[upper].mean() if upper.any() else np.nan)} of "
                                 f"{int(upper.sum()):,} vs lower {pct(agrees[~upper].mean() if (~upper).any() else np.nan)}")

    # the best upper layer, found in every resample
    layers = counted["layer"].to_numpy()
    upper_layers = sorted(set(layers[upper].tolist()))
    if upper_layers:
        onehot = (layers[:, None] == np.asarray(upper_layers)[None, :]).astype(np.float64)
        columns = np.concatenate([onehot * agrees[:, None], onehot], 1)
        k = len(upper_layers)
        peak = lambda s: (s[..., :k] / s[..., k:]).max(-1)  # noqa: E731
        out["agreement_upper_peak"] = bootstrap(columns, peak, unit, n_boot, seed)
        rates = columns.sum(0)
        best = int(np.argmax(rates[:k] / rates[k:]))
        in_best = layers == upper_layers[best]
        out["agreement_upper_peak/baseline"] = share(base[in_best], unit, n_boot, seed + 1)
        details["agreement_upper_peak"] = (f"layer {upper_layers[best]} of {n_layers} ({int(in_best.sum()):,} "
                                           f"memories); random baseline 1/|V| = {100 / vocab_size:.5f}%")
    else:
        out["agreement_upper_peak"] = Estimate.missing(unit)

    if "target_rank" in g.columns:
        ranked = g[g["has_trigger"] & (g["target_rank"] >= 0)]
        rdepth = relative_depth(ranked["layer"].to_numpy(), n_layers)
        low = ranked.loc[rdepth <= 7 / PAPER_LAYERS, "target_rank"].to_numpy() / vocab_size
        high = ranked.loc[rdepth > 13 / PAPER_LAYERS, "target_rank"].to_numpy() / vocab_size
        out["target_rank_fall"] = _median_difference(low, high, unit, n_boot, seed)
        if len(low) and len(high):
            details["target_rank_fall"] = (f"median rank {np.median(low) * vocab_size:,.0f} ({pct(np.median(low))} of "
                                           f"{vocab_size:,}) in the first 7/16 of depth, "
                                           f"{np.median(high) * vocab_size:,.0f} ({pct(np.median(high))}) in the "
                                           "last 3/16")

    binned = counted.assign(_bin=pd.qcut(counted["max_prob"].rank(method="first"), bins, labels=False)
                            if len(counted) >= bins else 0)
    top_bin, bottom_bin = binned["_bin"] == binned["_bin"].max(), binned["_bin"] == binned["_bin"].min()
    both = (top_bin | bottom_bin).to_numpy()
    out["confidence_rise"] = bootstrap(_two_groups(agrees[both], top_bin.to_numpy()[both]), _difference_of_means,
                                       unit, n_boot, seed)
    details["confidence_rise"] = (f"most confident tenth {pct(agrees[top_bin.to_numpy()].mean())} vs least "
                                  f"confident tenth {pct(agrees[bottom_bin.to_numpy()].mean())}")

    confident = confident_values(g, n=n_confident, sign=sign)
    summary = confident_summary(confident, n_layers)
    n = summary["n"]
    chance = len(summary["upper_layers"]) / n_layers
    out["confident_upper"] = shift(binomial(summary["in_upper_layers"], n, "values"), chance)
    details["confident_upper"] = (f"{summary['in_upper_layers']} of {n} in layers {summary['upper_layers'][0]}-"
                                  f"{n_layers - 1} (chance {chance * n:.1f})" if summary["upper_layers"] else
                                  "no upper layers")
    out["confident_agreeing"] = binomial(summary["with_agreeing_trigger"], n, "values")
    out["confident_agreeing/baseline"] = binomial(summary["with_agreeing_trigger_baseline"], n, "values")
    details["confident_agreeing"] = (f"{summary['with_agreeing_trigger']} of {n} (with other keys' triggers: "
                                     f"{summary['with_agreeing_trigger_baseline']})")
    return out, details
