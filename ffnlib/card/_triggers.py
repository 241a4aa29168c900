"""One layer's mined trigger examples (notebook 01's cached mining) and its corpus-size snapshots, read back.

The trigger table of a whole model is large (layers x memories x k x signs rows), so only the layer's rows are
read (a filtered Parquet read of the checksummed result), and the snapshots' top-k states only the layer's slice
(memory-mapped). Nothing is mined here: a run without notebook 01's cached mining has no trigger examples.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from ..keys import TriggerExamples, snapshot_request, snapshot_sizes
from ..storage import read_json

__all__ = ["trigger_manifest", "layer_triggers", "snapshot_keys"]


def trigger_manifest(run, control: bool = False) -> tuple[str, dict] | None:
    """(result name, request) of the mining the run's notebooks used (as their summaries record it; else the
    largest mining of all layers in the folder), or None."""
    for notebook in ("01_keys", "02_values", "10_corpus_size", "06_knowledge_neurons"):
        summary = run.control_summary(notebook) if control else run.summary(notebook)
        request = ((summary or {}).get("manifests") or {}).get("trigger_examples")
        if request:
            names = [n for n in run.find(request, control=control) if not n.endswith("-sentences")]
            if names:
                return names[0], request
    found = [(name, request) for name, request in run.manifests(control).items()
             if request.get("analysis") == "trigger_examples" and not name.endswith("-sentences")
             and (control or request.get("model") in (run.model, *run.model_keys))]
    if not found:
        return None
    return max(found, key=lambda item: (len(item[1].get("layers", [])), item[1].get("sentences", 0)))


def layer_triggers(run, layer: int, control: bool = False) -> TriggerExamples | None:
    """The trigger examples of every memory of ``layer`` (both signs where mined), with the mined sentences;
    None when the run (or its control) has no cached mining of that layer."""
    def read():
        found = trigger_manifest(run, control)
        if found is None or layer not in found[1].get("layers", []):
            return None
        name, request = found
        preloaded = None if control else run.triggers
        if preloaded is not None and _normal(getattr(preloaded, "manifest", None)) == _normal(request):
            rows, sentences = preloaded.triggers[preloaded.triggers["layer"] == int(layer)], preloaded.sentences
        else:
            rows = run.load(name, control=control, filters=[("layer", "==", int(layer))])
            sentences = _sentences(run, name, control)
        if rows is None or sentences is None:
            return None
        rows = rows.sort_values(["sign", "memory", "rank"], ascending=[False, True, True]).reset_index(drop=True)
        return TriggerExamples(rows, sentences, request, {"result": name})

    return run.memo(("layer_triggers", control), read, layer=layer)


def _normal(request) -> str:
    return json.dumps(request, sort_keys=True, default=str)


def _sentences(run, name: str, control: bool) -> pd.DataFrame | None:
    def read():
        sentences = run.load(f"{name}-sentences", control=control)
        if sentences is None:
            return None
        sentences = sentences.copy()
        sentences["token_ids"] = [np.asarray(t).tolist() for t in sentences["token_ids"]]
        return sentences

    return run.memo(("sentences", control, name), read)


def snapshot_keys(run, examples: TriggerExamples, layer: int, control: bool = False) -> dict[int, np.ndarray]:
    """Sentences -> the layer's top-k keys (signs, memories, k; ``sentence_id << 20 | position``, as
    ``ffnlib.mining`` packs them) after each corpus-size snapshot of the mining that gave ``examples``, the
    whole corpus included. A snapshot is its saved top-k state (``ffnlib.keys.save_snapshot_state``) whose request
    is the snapshot's (``ffnlib.keys.snapshot_request``); only the layer's slice is read, memory-mapped (its
    checksum is verified by the notebooks that load whole snapshots, not here: hashing them would cost more than
    the card). Snapshots not saved are left out."""
    manifest = examples.manifest
    layers = [int(x) for x in manifest["layers"]]
    index = layers.index(int(layer))
    one_layer = TriggerExamples(examples.triggers, examples.sentences, {**manifest, "layers": [int(layer)]})
    out = {int(manifest["sentences"]): one_layer.state().keys[:, 0].numpy()}
    folder = run.control_folder if control else run.folder
    for size in snapshot_sizes(examples)[:-1]:
        request, name = snapshot_request(manifest, examples.sentences, size)
        meta_path, path = folder / f"{name}.state.json", folder / f"{name}.state.pt"
        if not meta_path.exists() or not path.exists():
            continue
        meta = read_json(meta_path)
        if json.dumps(meta.get("request"), sort_keys=True) != json.dumps(request, sort_keys=True, default=str):
            continue
        tensors = torch.load(path, mmap=True, weights_only=True)
        keys = tensors["keys"]
        if keys.shape[1] != len(layers):
            continue
        out[size] = keys[:, index].clone().numpy()
    return dict(sorted(out.items()))
