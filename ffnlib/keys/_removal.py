"""The removal experiment (Fig. 3): remove one token of each trigger prefix and measure the key's coefficient again."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..config import check_int
from ..errors import ParameterError
from ..mining import Checkpoint, read_coefficients
from ..progress import say
from ..storage import ensure_dir, fingerprint, load_result, save_result
from ._examples import TriggerExamples
from ._request import RESULT_VERSION

__all__ = ["REMOVAL_VARIANTS", "removal_experiment", "removal_plan", "random_removals", "removal_summary"]


REMOVAL_VARIANTS = ("first", "last", "random")


def removal_experiment(loaded, examples: TriggerExamples, n_keys: int = 100, top: int = 50, layers=None,
                       variants: Sequence[str] = REMOVAL_VARIANTS, sign: int = 1, seed: int = 0,
                       batch_tokens: int = 2048, out_dir=None, progress: bool = True) -> pd.DataFrame:
    """Fig. 3: for ``n_keys`` random keys per layer and each key's top-``top`` trigger prefixes, remove the
    first, the last or a random token of the prefix (never the BOS token) and recompute that key's
    coefficient at the new last position.

    Returns one row per (key, trigger, variant): layer, memory, rank, sentence_id, position, variant,
    removed (index of the removed token), coefficient (original), new_coefficient, relative_change
    ``(new - original) / |original|``. Prefixes with a single real token cannot lose one and are left out.

    Every modified prefix is a prefix of "the sentence without token r", so one forward pass per
    (sentence, r) serves all keys and triggers that share it (for "last": the original sentence). The
    random token of each prefix is uniform over its real tokens (first and last included); to share
    forward passes, the prefixes of one sentence draw it from one stream of random positions (each takes
    the first draw inside it), so prefixes of one sentence often lose the same token.
    """
    for v in variants:
        if v not in REMOVAL_VARIANTS:
            raise ParameterError(f"Unknown removal variant {v!r}: choose from {REMOVAL_VARIANTS}.")
    if not variants:
        raise ParameterError("variants is empty.")
    n_keys, top = check_int("n_keys", n_keys), check_int("top", top)
    if sign not in (1, -1):
        raise ParameterError(f"sign must be 1 or -1, got {sign!r}.")
    mined = examples.layers
    layer_list = mined if layers is None else sorted({loaded.adapter.check_layer(l) for l in
                                                      ([layers] if isinstance(layers, int) else layers)})
    missing = sorted(set(layer_list) - set(mined))
    if missing:
        raise ParameterError(f"Layers {missing} were not mined; mined layers: {mined}.")
    d_ff = loaded.adapter.d_ff
    if n_keys > d_ff:
        raise ParameterError(f"n_keys={n_keys} is larger than the number of memories per layer ({d_ff}).")
    k = int(examples.manifest["k"])
    if top > k:
        raise ParameterError(f"top={top} is larger than the k={k} trigger examples mined per key.")
    request = {"analysis": "removal", "version": RESULT_VERSION, "triggers": fingerprint(examples.manifest),
               "n_keys": n_keys, "top": top, "layers": layer_list, "variants": list(variants), "sign": sign,
               "seed": seed}
    name = f"removal-{fingerprint(request)}"
    if out_dir is not None:
        cached = load_result(out_dir, name, request)
        if cached is not None:
            say(f"Loaded the cached removal experiment from {Path(out_dir) / name}.parquet; not recomputing.",
                 progress)
            return cached

    reads, sequences = removal_plan(examples, d_ff, layer_list, n_keys, top, variants, sign, seed)
    say(f"Removal experiment: {len(reads):,} modified prefixes, read from {len(sequences):,} shared sequences "
         f"({sum(map(len, sequences)):,} tokens to run).", progress)
    checkpoint = Checkpoint(ensure_dir(out_dir), name, request) if out_dir is not None else None
    values = read_coefficients(loaded, sequences, reads[["sequence", "layer", "memory"]].assign(
        position=reads["read_at"]), batch_tokens=batch_tokens, progress=progress, desc="Removal experiment",
        checkpoint=checkpoint)
    reads["new_coefficient"] = values
    reads["relative_change"] = (reads["new_coefficient"] - reads["coefficient"]) / reads["coefficient"].abs()
    result = reads[["layer", "memory", "rank", "sentence_id", "position", "variant", "removed", "coefficient",
                    "new_coefficient", "relative_change"]].copy()
    result["variant"] = result["variant"].astype(str)
    if out_dir is not None:
        save_result(out_dir, name, result, request)
        checkpoint.remove()
    return result


def removal_plan(examples: TriggerExamples, d_ff: int, layers: Sequence[int], n_keys: int, top: int,
                 variants: Sequence[str] = REMOVAL_VARIANTS, sign: int = 1, seed: int = 0
                 ) -> tuple[pd.DataFrame, list[list[int]]]:
    """The reads (one row per key, trigger and variant, with the shared sequence it is read from and the
    position ``read_at``) and the token sequences of :func:`removal_experiment`, without running the model.
    ``sum(map(len, sequences))`` is the number of tokens its forward passes will cost."""
    layer_list = list(layers)
    rng = np.random.default_rng(seed)
    chosen = {layer: np.sort(rng.choice(d_ff, size=n_keys, replace=False)) for layer in layer_list}
    t = examples.triggers
    t = t[(t["sign"] == sign) & (t["rank"] < top) & t["layer"].isin(layer_list)]
    keep = np.zeros(len(t), dtype=bool)
    for layer, memories in chosen.items():
        keep |= ((t["layer"] == layer) & t["memory"].isin(memories)).to_numpy()
    t = t[keep].sort_values(["layer", "memory", "rank"]).reset_index(drop=True)
    nb = examples.n_bos
    t = t[t["position"] - nb >= 1].reset_index(drop=True)  # at least two real tokens
    index = examples.token_index()
    frames, sequence_ids, sequences = [], {}, []
    for variant in variants:
        position = t["position"].to_numpy(np.int64)
        if variant == "first":
            removed = np.full(len(t), nb)
        elif variant == "last":
            removed = position.copy()
        else:
            removed = random_removals(t["sentence_id"].to_numpy(np.int64), position, index, nb, rng)
        frame = t[["layer", "memory", "rank", "sentence_id", "position", "coefficient"]].copy()
        frame["variant"], frame["removed"] = variant, removed
        # the shared sequence: the sentence without token `removed` ("last": the sentence itself)
        seq = []
        for sid, r, p in zip(frame["sentence_id"].tolist(), removed.tolist(), position.tolist()):
            key = (sid, -1 if r == p else r)
            if key not in sequence_ids:
                sequence_ids[key] = len(sequences)
                ids = index[sid]
                sequences.append(list(ids) if r == p else list(ids[:r]) + list(ids[r + 1:]))
            seq.append(sequence_ids[key])
        frame["sequence"] = seq
        frames.append(frame)
    reads = pd.concat(frames, ignore_index=True)
    reads["read_at"] = reads["position"] - 1  # the prefix lost one token: its last token moved back by one
    # truncate each shared sequence after the last position read from it (every sequence is read)
    last_read = reads.groupby("sequence")["read_at"].max()
    sequences = [seq[: int(last_read[i]) + 1] for i, seq in enumerate(sequences)]
    return reads, sequences


def random_removals(sentence_ids: np.ndarray, positions: np.ndarray, index: dict, n_bos: int,
                     rng: np.random.Generator) -> np.ndarray:
    """A uniformly random real token of each prefix (sentence_id, last position), by rejection sampling
    from one stream of uniform positions per sentence: a prefix takes the first draw that falls inside
    it, which is uniform over its tokens, and prefixes of a sentence mostly share a few draws."""
    removed = np.empty(len(positions), dtype=np.int64)
    order = np.argsort(sentence_ids, kind="stable")
    cuts = np.flatnonzero(np.diff(sentence_ids[order])) + 1
    for part in np.split(order, cuts):
        if len(part) == 0:
            continue
        length = len(index[int(sentence_ids[part[0]])])
        todo = part
        while len(todo):
            r = int(rng.integers(n_bos, length))
            inside = positions[todo] >= r
            removed[todo[inside]] = r
            todo = todo[~inside]
    return removed


def removal_summary(removal: pd.DataFrame, n_layers: int | None = None) -> pd.DataFrame:
    """Per layer and variant: mean and median relative change (in %), and the number of prefixes."""
    g = removal.groupby(["layer", "variant"])["relative_change"]
    out = pd.DataFrame({"mean_change_pct": g.mean() * 100, "median_change_pct": g.median() * 100,
                        "prefixes": g.size()}).reset_index()
    if n_layers:
        out["relative_depth"] = (out["layer"] + 1) / n_layers
    return out
