"""Expert splits of several layers (:func:`make_splits`): each split's partition (``_partitions``) of every layer,
checkpointed layer by layer so that an interrupted run resumes, and cached by its request. :class:`ExpertSplits`
holds the labels as one frame (split, layer, memory, expert)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ...errors import ParameterError
from ...mining import corpus_fingerprint, prepare_sentences
from ...progress import say, tqdm
from ...storage import ensure_dir, fingerprint, load_result, save_result
from ._cache import base_request
from ._choices import CLUSTER_ROWS, SPLITS, check_choice, check_expert_size, check_share
from ._ffn import key_features
from ._partitions import (balanced_kmeans, metis_split, random_split, random_split_names, random_split_seed,
                          split_draw, split_kind)
from ._passes import coactivation_counts

__all__ = ["ExpertSplits", "labels_frame", "make_splits"]


@dataclass
class ExpertSplits:
    """Expert labels per split and layer: ``frame`` has split, layer, memory, expert."""

    frame: pd.DataFrame
    expert_size: int
    n_experts: int
    manifest: dict
    info: pd.DataFrame = field(default_factory=pd.DataFrame)  # per split and layer: seconds, edges, moved
    _labels: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(self.frame["split"]))

    @property
    def layers(self) -> list[int]:
        return sorted(int(x) for x in self.frame["layer"].unique())

    @property
    def random_splits(self) -> list[str]:
        """The names of the random split's draws (``random``, ``random.1``, ...)."""
        return [s for s in self.splits if split_kind(s) == "random"]

    def labels(self, split: str, layer: int) -> np.ndarray:
        """The expert of each memory (d_ff,) of one split and layer."""
        if not self._labels:
            for (s, l), rows in self.frame.groupby(["split", "layer"], sort=False):
                self._labels[(s, int(l))] = rows.sort_values("memory")["expert"].to_numpy(np.int64)
        if (split, layer) not in self._labels:
            raise ParameterError(f"No split {split!r} for layer {layer}: splits {self.splits}, layers {self.layers}.")
        return self._labels[(split, layer)].copy()


def labels_frame(split: str, layer: int, labels: np.ndarray) -> pd.DataFrame:
    """The rows of :attr:`ExpertSplits.frame` for one split and layer."""
    return pd.DataFrame({"split": split, "layer": np.int16(layer), "memory": np.arange(len(labels), dtype=np.int32),
                         "expert": labels.astype(np.int32)})


def make_splits(loaded, sentences: pd.DataFrame | None = None, layers=None, expert_size: int = 32,
                splits: Sequence[str] = SPLITS, cluster_rows: str = "gate", active_share: float = 0.1,
                kmeans_iter: int = 10, seed: int = 0, batch_tokens: int = 1024, out_dir=None,
                progress: bool = True, random_splits: int = 5) -> ExpertSplits:
    """Split the memories of ``layers`` (all by default) into equal experts, one labelling per split.

    ``random`` is drawn ``random_splits`` times (:func:`random_split_names`, seeds :func:`random_split_seed`):
    one draw is not the control, the spread between draws is part of it. ``sentences`` (training split) are
    needed for ``coactivation``. With ``out_dir``, each finished layer is checkpointed (an interrupted run
    resumes) and the result is cached by its manifest.
    """
    adapter = loaded.adapter
    layers = adapter.check_layers(layers)
    n_experts = check_expert_size(adapter.d_ff, expert_size)
    splits = tuple(splits)
    if not splits:
        raise ParameterError(f"splits is empty: choose from {list(SPLITS)}.")
    for split in splits:
        check_choice("split", split, SPLITS)
    check_choice("cluster_rows", cluster_rows, CLUSTER_ROWS)
    active_share = check_share(active_share, "active_share")
    request = {**base_request(loaded, layers, "splits"), "expert_size": int(expert_size), "splits": list(splits),
               "seed": int(seed)}
    names = [name for split in splits for name in (random_split_names(random_splits) if split == "random" else [split])]
    if "random" in splits:
        request["random_splits"] = int(random_splits)
    if "kmeans" in splits:
        request.update(cluster_rows=cluster_rows if adapter.gated else "keys", kmeans_iter=int(kmeans_iter))
    table = None
    if "coactivation" in splits:
        if sentences is None:
            raise ParameterError("The co-activation split needs training sentences: pass sentences=load_corpus(...).")
        table = prepare_sentences(loaded, sentences)
        request.update(active_share=active_share, corpus=corpus_fingerprint(table), sentences=len(table))
    name = f"moe-splits-{fingerprint(request)}"
    folder = partial = None
    if out_dir is not None:
        folder = ensure_dir(out_dir)
        cached = load_result(folder, name, request)
        info = load_result(folder, f"{name}-info", request)
        if cached is not None and info is not None:
            say(f"Reusing the cached expert splits {folder / name}.parquet (same model, layers, sizes and "
                 "parameters).", progress)
            return ExpertSplits(cached, int(expert_size), n_experts, request, info)
        partial = folder / f"{name}.partial"

    parts: dict[tuple[str, int], tuple[pd.DataFrame, pd.DataFrame]] = {}
    todo = []
    for split in names:
        for layer in layers:
            part_request = {**request, "split": split, "layer": layer}
            found = None
            if partial is not None:
                frame = load_result(partial, f"{split}-{layer:03d}", part_request)
                info = load_result(partial, f"{split}-{layer:03d}-info", part_request)
                found = None if frame is None or info is None else (frame, info)
            if found is None:
                todo.append((split, layer))
            else:
                parts[(split, layer)] = found
    if parts and todo:
        say(f"Resuming the expert splits: {len(parts)} of {len(parts) + len(todo)} (split, layer) parts were "
             f"read from checkpoints in {partial}.", progress)
    counts = None
    if any(split == "coactivation" for split, _ in todo):
        counts = coactivation_counts(loaded, table, sorted({layer for s, layer in todo if s == "coactivation"}),
                                     active_share, batch_tokens=batch_tokens, progress=progress)
    for split, layer in tqdm(todo, desc="Expert splits", unit="layer", disable=not progress or not todo):
        started = time.perf_counter()
        extra = {}
        split_seed = seed
        if split_kind(split) == "random":
            split_seed = random_split_seed(seed, layer, split_draw(split))
            labels = random_split(adapter.d_ff, int(expert_size), split_seed)
        elif split == "kmeans":
            labels = balanced_kmeans(key_features(adapter, layer, cluster_rows), n_experts, seed, kmeans_iter)
        else:
            labels, extra = metis_split(counts.pop(layer).numpy(), n_experts, seed)
        info = pd.DataFrame([{"split": split, "layer": layer, "seed": split_seed,
                              "seconds": time.perf_counter() - started,
                              "edges": extra.get("edges", -1), "edge_cut": extra.get("edge_cut", -1),
                              "moved": extra.get("moved", -1)}])
        frame = labels_frame(split, layer, labels)
        parts[(split, layer)] = (frame, info)
        if partial is not None:
            part_request = {**request, "split": split, "layer": layer}
            save_result(partial, f"{split}-{layer:03d}", frame, part_request)
            save_result(partial, f"{split}-{layer:03d}-info", info, part_request)
    keys = [(s, layer) for s in names for layer in layers]
    frame = pd.concat([parts[k][0] for k in keys], ignore_index=True)
    info = pd.concat([parts[k][1] for k in keys], ignore_index=True)
    if folder is not None:
        save_result(folder, name, frame, request)
        save_result(folder, f"{name}-info", info, request)
        shutil.rmtree(partial, ignore_errors=True)
    return ExpertSplits(frame, int(expert_size), n_experts, request, info)
