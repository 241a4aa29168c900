"""The corpus-size side of a card (notebook 10): how much of the key's top-k trigger set, mined on each doubling
prefix of the corpus (the snapshots one mining pass saves, ``ffnlib.keys.trigger_snapshot``), is still in its
top-k set on the whole corpus. A key whose triggers survive has found its pattern early; one whose set turns over
is still being filled by the corpus."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._part import Part
from ._percentiles import Measure
from ._triggers import layer_triggers, snapshot_keys

__all__ = ["survival", "layer_survival", "corpus_part"]


def survival(snapshot: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """The share of each key's top-k (last axis) of ``snapshot`` that is in its top-k of ``whole``."""
    return (snapshot[..., :, None] == whole[..., None, :]).any(-1).mean(-1)


def _snapshots(run, layer: int, control: bool):
    """(sentences -> the layer's top-k keys (signs, memories, k), signs, tokens per size), or None."""
    def read():
        examples = layer_triggers(run, layer, control=control)
        if examples is None:
            return None
        signs = [1, -1] if examples.manifest.get("negative") else [1]
        tokens = examples.sentences["token_ids"].map(len).cumsum().to_numpy()
        return snapshot_keys(run, examples, layer, control=control), signs, tokens

    return run.memo(("snapshots", control), read, layer=layer)


def _first_survival(run, layer: int, control: bool) -> tuple[int, np.ndarray] | None:
    """(size, survival of every key (signs, memories)) of the layer's smallest snapshot, or None."""
    def compute():
        found = _snapshots(run, layer, control)
        if found is None or len(found[0]) < 2:
            return None
        snaps = found[0]
        return min(snaps), survival(snaps[min(snaps)], snaps[max(snaps)])

    return run.memo(("first_survival", control), compute, layer=layer)


def layer_survival(run, layer: int) -> pd.DataFrame | None:
    """Every key of ``layer`` (sign, memory): ``first_kept_share``, the share of its top-k after the smallest
    corpus-size snapshot still in its top-k on the whole corpus, and ``mean_kept_share``, the mean over every
    snapshot before the whole corpus (``attrs["sizes"]``: the snapshots' sentences); None without two snapshots."""
    def compute():
        found = _snapshots(run, layer, control=False)
        if found is None or len(found[0]) < 2:
            return None
        snaps, signs, _ = found
        whole = snaps[max(snaps)]
        kept = np.stack([survival(snaps[size], whole) for size in sorted(snaps)[:-1]])  # (sizes, signs, memories)
        frame = pd.DataFrame({"sign": np.repeat(signs, kept.shape[2]), "memory": np.tile(np.arange(kept.shape[2]),
                                                                                          len(signs)),
                              "first_kept_share": kept[0].reshape(-1), "mean_kept_share": kept.mean(0).reshape(-1)})
        frame.attrs["sizes"] = sorted(snaps)
        return frame

    return run.memo(("layer_survival",), compute, layer=layer)


def corpus_part(run, layer: int, memory: int) -> Part:
    """The card's ``corpus_size``, from the snapshots of the mining that notebooks 01 and 10 share."""
    part = Part()
    found = _snapshots(run, layer, control=False)
    if found is None:
        part.lack("corpus_size", f"no cached trigger examples of layer {layer} (mined by notebooks 01 and 10)")
        return part
    snaps, signs, tokens = found
    if len(snaps) < 2:
        part.lack("corpus_size", "the mining saved no corpus-size snapshots (snapshot_floor=None, or a corpus "
                                 "smaller than two snapshots)")
        return part
    whole = snaps[max(snaps)][:, memory]
    part.fields["corpus_size"] = pd.DataFrame(
        [{"sign": sign, "sentences": size, "tokens": int(tokens[size - 1]), "kept_share": float(kept[i])}
         for size, keys in snaps.items() for kept in [survival(keys[:, memory], whole)]
         for i, sign in enumerate(signs)]).sort_values(["sign", "sentences"], ascending=[False, True]
                                                       ).reset_index(drop=True)
    smallest, shares = _first_survival(run, layer, control=False)
    theirs = _first_survival(run, layer, control=True)
    other = theirs[1] if theirs is not None and theirs[0] == smallest else None
    for i, sign in enumerate(signs):
        part.measures.append(Measure(
            "corpus_size", f"share of the top-k after {smallest} sentences kept on the whole corpus", sign,
            float(shares[i, memory]), shares[i], None if other is None else other[i], "10_corpus_size",
            None if other is not None else
            "run notebook 10_corpus_size with control='random-init': the control's snapshots are not in the results"))
    part.notes["corpus_size"] = (f"snapshots of notebook 01's mining at {sorted(snaps)} sentences; kept_share: of "
                                 "the top-k at that size, the share still in the top-k of the whole corpus")
    return part
