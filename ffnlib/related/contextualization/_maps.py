"""The contribution maps of many sentences: batched by length, checkpointed batch by batch, cached whole."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ...batching import plan_shortest_first
from ...config import check_int
from ...errors import ParameterError
from ...progress import tqdm
from ...storage import fingerprint, load_result, save_result
from ._decompose import CHUNK_ELEMENTS, MAX_TOKENS, Decomposition, adapter_and_model, decompose, token_lists
from ._layout import STAGES, layout_of, stages_of
from ._sentences import token_table

__all__ = ["MapsResult", "sentence_maps"]

_VERSION = 1  # part of every manifest: a new version computes the maps again


@dataclass
class MapsResult:
    """Contribution maps of many sentences.

    ``maps``: one row per (sentence, layer, i, j ≤ i) with one float32 column per stage (the raw norms
    ``‖y_{i←j}‖``; NaN where the layer has no such stage). ``tokens``: :func:`token_table` of the sentences.
    ``sentences``: ``sentence``, ``sentence_id``, ``text``, ``n_tokens``. ``checks``: per (layer, stage), the
    largest relative completeness error over all sentences. ``manifest``: what produced it, with the stages of
    every layer (``manifest["stages"]``).
    """

    maps: pd.DataFrame
    tokens: pd.DataFrame
    sentences: pd.DataFrame
    checks: pd.DataFrame
    manifest: dict
    cached: bool = False
    info: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return [int(layer) for layer in self.manifest["layers"]]

    def stages(self, layer: int) -> tuple[str, ...]:
        return tuple(self.manifest["stages"][str(layer)])


def _batch_frame(decomposition: Decomposition, sentences: Sequence[int]) -> pd.DataFrame:
    """The decomposition's maps as rows (sentence, layer, i, j ≤ i, one column per stage)."""
    lengths = decomposition.lengths
    parts = []
    for row, sentence in enumerate(sentences):
        i, j = np.tril_indices(lengths[row])
        for layer in decomposition.layers:
            columns = {"sentence": np.full(len(i), sentence, dtype=np.int32),
                       "layer": np.full(len(i), layer, dtype=np.int16),
                       "i": i.astype(np.int16), "j": j.astype(np.int16)}
            for stage in STAGES:
                if stage in decomposition.maps[layer]:
                    columns[stage] = decomposition.maps[layer][stage][row, i, j].cpu().numpy().astype(np.float32)
                else:
                    columns[stage] = np.full(len(i), np.nan, dtype=np.float32)
            parts.append(pd.DataFrame(columns))
    return pd.concat(parts, ignore_index=True)


def sentence_maps(loaded, sentences, layers: Iterable[int] | int | None = None, batch_tokens: int = 512,
                  max_tokens: int = MAX_TOKENS, check: bool = True, out_dir: str | Path | None = None,
                  progress: bool = True, chunk_elements: int = CHUNK_ELEMENTS) -> MapsResult:
    """The contribution maps of every stage, layer and sentence (see :class:`MapsResult`).

    ``sentences``: a table with a ``text`` column (as :func:`sample_sentences` returns) or a list of texts.
    Sentences are batched by length (at most ``batch_tokens`` padded tokens per batch). ``out_dir``: each
    finished batch is checkpointed there (an interrupted run resumes with identical results) and the finished
    result is saved with a manifest and reused when the same request comes again (the function says so).
    """
    adapter, _ = adapter_and_model(loaded)
    layout_of(adapter)
    layer_list = adapter.check_layers(layers)
    batch_tokens = check_int("batch_tokens", batch_tokens)
    max_tokens = check_int("max_tokens", max_tokens)
    if isinstance(sentences, pd.DataFrame):
        if "text" not in sentences.columns:
            raise ParameterError(f"The sentence table needs a 'text' column; it has {list(sentences.columns)}.")
        table = sentences.reset_index(drop=True)
    else:
        table = pd.DataFrame({"text": list(sentences)})
    if table.empty:
        raise ParameterError("No sentences given.")
    if "sentence_id" not in table.columns:
        table = table.assign(sentence_id=np.arange(len(table)))
    texts = table["text"].tolist()
    token_ids = token_lists(loaded, texts, max_tokens)
    sentence_table = pd.DataFrame({"sentence": np.arange(len(texts)), "sentence_id": table["sentence_id"].to_numpy(),
                                   "text": texts, "n_tokens": [len(ids) for ids in token_ids]})
    tokens = token_table(loaded, texts)
    manifest = {"analysis": "kobayashi2024-contribution-maps", "version": _VERSION, "model": loaded.key,
                "weights": loaded.file_hash, "layers": layer_list, "check": bool(check),
                "texts": fingerprint(texts), "n_sentences": len(texts),
                "stages": {str(layer): list(stages_of(adapter, layer)) for layer in layer_list}}
    name = f"contribution-maps-{fingerprint(manifest)}"
    if out_dir is not None:
        cached = load_result(out_dir, name, manifest)
        checks = load_result(out_dir, f"{name}-checks", manifest)
        if cached is not None and checks is not None:
            if progress:
                print(f"[ffnlib] reusing cached contribution maps {Path(out_dir) / name}.parquet "
                      f"({len(texts)} sentences; same request)")
            return MapsResult(cached, tokens, sentence_table, checks, manifest, cached=True)
    batches = [rows.tolist() for rows in plan_shortest_first([len(ids) for ids in token_ids], batch_tokens)]
    partial = Path(out_dir) / f"{name}.partial" if out_dir is not None else None
    parts, check_parts, resumed = [], [], 0
    for index, batch in enumerate(tqdm(batches, desc="contribution maps", disable=not progress)):
        # each finished batch is a checkpoint with its own checksummed manifest
        checkpoint = {**manifest, "batch": index, "batch_sentences": batch}
        if partial is not None:
            part = load_result(partial, f"batch-{index:05d}", checkpoint)
            part_checks = load_result(partial, f"checks-{index:05d}", checkpoint)
            if part is not None and part_checks is not None:
                parts.append(part)
                check_parts.append(part_checks)
                resumed += 1
                continue
        decomposition = decompose(loaded, [token_ids[k] for k in batch], layer_list, check=check,
                                  max_tokens=max_tokens, chunk_elements=chunk_elements)
        part = _batch_frame(decomposition, batch)
        part_checks = decomposition.checks if check else pd.DataFrame(
            columns=["layer", "stage", "max_abs_error", "scale", "relative_error"])
        if partial is not None:
            save_result(partial, f"checks-{index:05d}", part_checks, checkpoint)
            save_result(partial, f"batch-{index:05d}", part, checkpoint)
        parts.append(part)
        check_parts.append(part_checks)
    frame = pd.concat(parts, ignore_index=True).sort_values(["sentence", "layer", "i", "j"], kind="stable")
    frame = frame.reset_index(drop=True)
    checks = pd.concat(check_parts, ignore_index=True)
    if len(checks):
        checks = (checks.groupby(["layer", "stage"], sort=True)
                  .agg(max_abs_error=("max_abs_error", "max"), scale=("scale", "max"),
                       relative_error=("relative_error", "max")).reset_index())
    if out_dir is not None:
        save_result(out_dir, f"{name}-checks", checks, manifest)
        save_result(out_dir, name, frame, manifest)
        shutil.rmtree(partial, ignore_errors=True)
        if progress and resumed:
            print(f"[ffnlib] resumed: {resumed} of {len(batches)} batches came from checkpoints in {partial}")
    return MapsResult(frame, tokens, sentence_table, checks, manifest, info={"batches": len(batches),
                                                                              "resumed": resumed})
