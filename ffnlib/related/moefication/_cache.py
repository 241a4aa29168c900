"""What every cached MoEfication result is keyed on: the analysis, the cache version, the model and the layers.
Splits, thresholds, routers and evaluations each add their own parameters to this request (``ffnlib.storage``
saves a result with it as its manifest, and a changed request is a cache miss)."""

from __future__ import annotations

__all__ = ["CACHE_VERSION", "base_request"]

CACHE_VERSION = 1  # bump when what is computed changes (invalidates cached results)


def base_request(loaded, layers, kind: str) -> dict:
    """The part of a cached result's request that every MoEfication step shares (``kind``: splits, thresholds,
    routers, evaluation)."""
    return {"analysis": f"moefication_{kind}", "version": CACHE_VERSION, "model": loaded.key,
            "file_hash": loaded.file_hash, "layers": list(layers)}
