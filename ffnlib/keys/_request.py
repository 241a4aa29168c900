"""The request that names a mining result: checked arguments, the tokenized sentences, the snapshots' prefixes."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..config import check_int
from ..errors import ParameterError
from ..batching import BATCH_COST, doubling_sizes
from ..mining import PER_SENTENCE, corpus_fingerprint, prepare_sentences
from ..storage import fingerprint

__all__ = ["RESULT_VERSION", "MINING_PLAN", "SNAPSHOT_FLOOR", "TriggerRequest", "auto_snapshot_floor",
           "check_snapshot_floor", "trigger_request", "prefix_order", "snapshot_request"]

RESULT_VERSION = 1  # bump when what the miner computes changes
# the miner's batch plan (batching.plan_prefix_batches): part of a checkpoint's identity, since a checkpoint
# counts the batches done
MINING_PLAN = f"least padding + {BATCH_COST} tokens per batch, per prefix segment"
SNAPSHOT_FLOOR = 250  # the first snapshot's sentences ("auto": fewer on a small corpus, never fewer than k)


@dataclass(frozen=True)
class TriggerRequest:
    """A checked mining request: the sentence table (tokenized), the layers and signs, and the manifest
    (``request``) that names the cached result (``name``). Both mining paths (this process, and
    ``ffnlib.distributed``) build it with :func:`trigger_request`, so they cache and reuse each other's results."""

    table: pd.DataFrame
    layers: list[int]
    signs: list[int]
    k: int
    per_sentence: str
    batch_tokens: int
    request: dict
    name: str


def auto_snapshot_floor(n: int, k: int) -> int:
    """The first snapshot's size when ``snapshot_floor="auto"``: 250 sentences, or a quarter of a smaller
    corpus, never fewer than k (each key needs k sentences)."""
    return max(int(k), min(SNAPSHOT_FLOOR, int(n) // 4))


def check_snapshot_floor(snapshot_floor, n: int, k: int) -> int | None:
    if snapshot_floor == "auto":
        return auto_snapshot_floor(n, k)
    if snapshot_floor is None:
        return None
    floor = check_int("snapshot_floor", snapshot_floor)
    if floor < k:
        raise ParameterError(f"snapshot_floor={floor} is smaller than k={k}: a snapshot of fewer than k sentences "
                             f"cannot give every key k trigger examples. Use snapshot_floor >= {k}, \"auto\", or "
                             "None (no snapshots).")
    return floor


def trigger_request(loaded, sentences: pd.DataFrame, k: int = 50, per_sentence: str = "max",
                    negative: bool | None = None, layers=None, batch_tokens: int = 2048,
                    checkpoint_every: int = 1000, snapshot_floor="auto") -> TriggerRequest:
    """Check the arguments of :func:`mine_trigger_examples` (clear errors), tokenize the sentences and build
    the request that identifies the result."""
    adapter = loaded.adapter
    if per_sentence not in PER_SENTENCE:
        raise ParameterError(f"per_sentence must be one of {PER_SENTENCE}, got {per_sentence!r}.")
    negative = adapter.gated if negative is None else negative
    if not isinstance(negative, bool):
        raise ParameterError(f"negative must be True, False or None, got {negative!r}.")
    if isinstance(layers, (list, tuple)) and not layers:
        raise ParameterError("layers is empty: give layer indices, or None for all layers.")
    layer_list = adapter.check_layers(layers)
    k = check_int("k", k)
    batch_tokens = check_int("batch_tokens", batch_tokens)
    check_int("checkpoint_every", checkpoint_every)
    table = prepare_sentences(loaded, sentences)
    if k > len(table):
        raise ParameterError(f"k={k} is larger than the number of sentences ({len(table)}): each key can have at "
                             f"most one trigger per sentence. Use k <= {len(table)} or more sentences.")
    floor = check_snapshot_floor(snapshot_floor, len(table), k)
    request = {"analysis": "trigger_examples", "version": RESULT_VERSION, "model": loaded.key,
               "file_hash": loaded.file_hash, "corpus": corpus_fingerprint(table), "sentences": len(table),
               "k": k, "per_sentence": per_sentence, "negative": negative, "layers": layer_list,
               "n_bos": len(loaded.bos), "snapshot_floor": floor, "order": prefix_order(table, floor)}
    return TriggerRequest(table, layer_list, [1, -1] if negative else [1], k, per_sentence, batch_tokens, request,
                          f"triggers-{fingerprint(request)}")


def prefix_order(table: pd.DataFrame, floor: int | None) -> str | None:
    """The row order's fingerprint where it matters: with snapshots, each is a prefix of the corpus in row order
    (the corpus fingerprint ignores the order, so two orders of the same sentences must be told apart)."""
    if len(doubling_sizes(len(table), floor)) == 1:
        return None
    return fingerprint(table["sentence_id"].astype("int64").tolist())


def snapshot_request(request: dict, table: pd.DataFrame, size: int) -> tuple[dict, str]:
    """The request (and result name) of a run on the first ``size`` sentences of ``table`` with the same
    parameters, ``snapshot_floor`` included (the integer in the request, which ``"auto"`` resolved): what the
    snapshot at ``size`` is saved as, and equals."""
    prefix_table = table.iloc[:size]
    prefix = {**request, "corpus": corpus_fingerprint(prefix_table), "sentences": int(size),
              "order": prefix_order(prefix_table, request["snapshot_floor"])}
    return prefix, f"triggers-{fingerprint(prefix)}"
