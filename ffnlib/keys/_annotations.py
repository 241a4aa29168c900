"""Human annotations of the keys' patterns (written with ``ffnlib.widgets.annotation``): read and summarised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CorpusError

__all__ = ["ANNOTATION_COLUMNS", "PATTERN_KINDS", "read_annotations", "covered_ranks", "summarise_annotations"]

ANNOTATION_COLUMNS = ["model", "layer", "memory", "sign", "pattern_id", "pattern", "kind", "covered",
                      "n_triggers", "annotator", "saved_at"]
PATTERN_KINDS = ("shallow", "semantic")


def read_annotations(path) -> pd.DataFrame:
    """All annotation rows in a CSV file, or in every CSV file of a folder (empty frame if none)."""
    path = Path(path)
    files = sorted(path.glob("*.csv")) if path.is_dir() else ([path] if path.exists() else [])
    frames = [pd.read_csv(f, keep_default_na=False, dtype={"covered": str, "pattern": str}) for f in files]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=ANNOTATION_COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    missing = [c for c in ANNOTATION_COLUMNS if c not in frame]
    if missing:
        raise CorpusError(f"Annotation file(s) {[str(f) for f in files]} lack the columns {missing}.")
    return frame


def covered_ranks(text) -> set[int]:
    return {int(x) for x in str(text).split(";") if x.strip() != ""}


def summarise_annotations(annotations: pd.DataFrame, n_layers: int | None = None) -> dict:
    """Patterns per key and share of prefixes covered by at least one pattern, overall and per layer.

    A key annotated with no pattern (a row with ``kind == "none"``) counts with 0 patterns. If a key was
    annotated more than once (same model, layer, memory, sign, annotator), the last save counts.
    """
    if annotations.empty:
        return {"keys": 0}
    a = annotations.copy()
    a["saved_at"] = a["saved_at"].astype(str)
    key = ["model", "layer", "memory", "sign", "annotator"]
    latest = a.groupby(key)["saved_at"].transform("max")
    a = a[a["saved_at"] == latest]
    rows = []
    for (model, layer, memory, sign, annotator), g in a.groupby(key):
        patterns = g[g["kind"].isin(PATTERN_KINDS)]
        covered = set().union(*[covered_ranks(c) for c in patterns["covered"]]) if len(patterns) else set()
        n = int(g["n_triggers"].iloc[0])
        rows.append({"model": model, "layer": int(layer), "memory": int(memory), "sign": int(sign),
                     "annotator": annotator, "patterns": len(patterns),
                     "shallow": int((patterns["kind"] == "shallow").sum()),
                     "semantic": int((patterns["kind"] == "semantic").sum()),
                     "coverage": len(covered) / n if n else np.nan})
    per_key = pd.DataFrame(rows)
    per_layer = per_key.groupby("layer").agg(keys=("patterns", "size"), patterns_per_key=("patterns", "mean"),
                                             coverage=("coverage", "mean"), shallow=("shallow", "sum"),
                                             semantic=("semantic", "sum")).reset_index()
    if n_layers:
        per_layer["relative_depth"] = (per_layer["layer"] + 1) / n_layers
    return {"keys": len(per_key), "patterns_per_key": float(per_key["patterns"].mean()),
            "coverage": float(per_key["coverage"].mean()), "per_key": per_key, "per_layer": per_layer}
