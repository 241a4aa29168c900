"""Every value projected to the vocabulary as the model reads it: top tokens, maximal probability, target ranks."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..adapters import Adapter
from ..errors import ParameterError
from ..progress import tqdm
from ..storage import fingerprint, load_result, read_json, save_result, sha256_bytes

__all__ = ["KEYS", "value_logits", "value_top_tokens", "ValueProjection", "projection_chunk_rows",
           "top_trigger_targets", "project_values", "cached_projection_tops", "require_columns", "project_layer",
           "target_ranks", "ranks_in_rows"]

KEYS = ["layer", "memory", "sign"]
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
    require_columns(triggers, KEYS + ["rank", "next_token"], "triggers")
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
        request.update(model=loaded.key, file_hash=loaded.file_hash)
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
            parts = project_layer(adapter, layer, top_k, signs, layer_targets, chunk, scratch)
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
                or request.get("model") != loaded.key or request.get("file_hash") != loaded.file_hash
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


def require_columns(frame, columns, what: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise ParameterError(f"{what} must be a DataFrame, got {type(frame).__name__}.")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ParameterError(f"{what} lacks the column(s) {missing}; it has {list(frame.columns)}.")


def _check_targets(targets, adapter: Adapter, layers, signs, vocab) -> tuple[dict, str | None]:
    """targets -> {layer: {sign: LongTensor (d_ff,)}} (-1 = no target) and a hash of their content."""
    if targets is None:
        return {}, None
    require_columns(targets, KEYS + ["token"], "targets")
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
def project_layer(adapter: Adapter, layer: int, top_k: int, signs, targets: dict | None,
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
    require_columns(targets, KEYS + ["token"], "targets")
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
            ranks[here] = ranks_in_rows(logits, pairs[0], pairs[1], buf)[inverse.reshape(-1)]
            del logits
    out["target_rank"] = ranks
    return out


def ranks_in_rows(logits: torch.Tensor, rows: np.ndarray, tokens: np.ndarray, buf: torch.Tensor) -> np.ndarray:
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
