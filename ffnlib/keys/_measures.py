"""The measures of Section 3's findings, each with a bootstrap interval over keys."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..stats import N_BOOT, Estimate, bootstrap, share

__all__ = ["section3_measures"]


def section3_measures(removal: pd.DataFrame | None, key_patterns: pd.DataFrame, n_layers: int, split: float = 9 / 16,
                      n_boot: int = N_BOOT, seed: int = 0) -> tuple[dict[str, Estimate], dict[str, str]]:
    """The measures of Section 3's findings (``ffnlib.findings``, notebook ``01_keys``), each with a 95%
    interval from a seeded bootstrap over keys (the sampled unit: the removal experiment's random keys, and
    every mined key for the patterns), and a line of detail per measure for the report.

    ``removal``: :func:`removal_experiment`'s rows (None: only the pattern measures); ``key_patterns``:
    :func:`key_pattern_table`. Lower
    layers: relative depth <= ``split`` (the paper's layers 1-9 of 16).
    """
    out: dict[str, Estimate] = {}
    details: dict[str, str] = {}
    if removal is None:  # the pattern measures alone (e.g. on every corpus-size snapshot)
        per_key = pd.DataFrame()
    else:
        finite = removal[np.isfinite(removal["relative_change"])]
        per_key = finite.pivot_table(index=["layer", "memory"], columns="variant", values="relative_change",
                                     aggfunc="mean")
    if {"last", "first", "random"} <= set(per_key.columns):
        per_key = per_key.dropna(subset=["last", "first", "random"])
        lower = ((per_key.index.get_level_values("layer").to_numpy() + 1) / n_layers) <= split
        last = per_key["last"].to_numpy()
        margin = last - per_key[["first", "random"]].min(axis=1).to_numpy()
        out["last_hurts_most"] = share(margin, "keys", n_boot, seed)
        details["last_hurts_most"] = (f"mean change: last {100 * last.mean():.0f}%, first "
                                      f"{100 * per_key['first'].mean():.0f}%, random {100 * per_key['random'].mean():.0f}%"
                                      f" ({len(per_key):,} keys)")
        columns = np.stack([last * lower, lower, last * ~lower, ~lower], 1).astype(np.float64)
        out["last_hurts_more_in_lower"] = bootstrap(columns, lambda s: s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3],
                                                    "keys", n_boot, seed)
        details["last_hurts_more_in_lower"] = (f"last token: {100 * last[lower].mean():.0f}% (lower layers) vs "
                                               f"{100 * last[~lower].mean():.0f}% (upper layers)"
                                               if lower.any() and (~lower).any() else "")
    keys_lower = ((key_patterns["layer"].to_numpy() + 1) / n_layers) <= split
    shallow = key_patterns["shallow_token"].to_numpy(np.float64)
    out["shallow_lower"] = bootstrap(np.stack([shallow * keys_lower, keys_lower, shallow * ~keys_lower,
                                               ~keys_lower], 1).astype(np.float64),
                                     lambda s: s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3], "keys", n_boot, seed)
    details["shallow_lower"] = (f"shared-last-token share {shallow[keys_lower].mean():.2f} (lower) vs "
                                f"{shallow[~keys_lower].mean():.2f} (upper)" if keys_lower.any() and (~keys_lower).any()
                                else "")
    topical = key_patterns["topic_concentration"].notna().to_numpy()
    topic = key_patterns["topic_concentration"].fillna(0).to_numpy(np.float64)
    up, low = topical & ~keys_lower, topical & keys_lower
    out["semantic_upper"] = bootstrap(np.stack([topic * up, up, topic * low, low], 1).astype(np.float64),
                                      lambda s: s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3], "keys", n_boot, seed)
    details["semantic_upper"] = (f"topic concentration {topic[up].mean():.3f} (upper) vs {topic[low].mean():.3f} "
                                 f"(lower), {int(topical.sum()):,} keys with >= 5 labelled prefixes"
                                 if up.any() and low.any() else "")
    return out, details
