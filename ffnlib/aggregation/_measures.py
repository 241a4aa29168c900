"""Section 5's measures: per-layer summaries, the findings' estimates, and the paper's curves beside ours."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import ParameterError
from ..reference import PAPER_LAYERS, paper_reference, relative_depth
from ..stats import N_BOOT, Estimate, bootstrap, share, spearman_with_depth

if TYPE_CHECKING:
    from ._analyse import AggregationResult

__all__ = ["CASES", "AGAINST", "SHORT_PREFIX", "layer_summary", "agreement_breakdown", "composition_examples",
           "paper_curves", "section5_measures", "curves", "side_by_side"]

CASES = ("residual", "ffn", "agreement", "composition")
AGAINST = ("output", "ffn")
SHORT_PREFIX = 5  # the paper: "prefixes shorter than 5 tokens"

# ---- aggregates (computed from the per-example table) --------------------------------------------------
def layer_summary(frame: pd.DataFrame, d_ff: int, n_layers: int) -> pd.DataFrame:
    """Per layer: memory counts and shares (Fig. 7), zero agreement (Fig. 8), residual vs final
    (Fig. 9), the residual's probability of the final token (Fig. 10) and the Fig. 11 case shares."""
    if frame.empty:
        raise ParameterError("The result table is empty: nothing to summarise.")
    g = frame.groupby("layer", sort=True)
    out = pd.DataFrame({
        "examples": g.size(),
        "n_positive": g["n_positive"].mean(), "n_relative": g["n_relative"].mean(),
        "n_active": g["n_active"].mean(), "n_norm": g["n_norm"].mean(),
        "n_norm_median": g["n_norm"].median(),
    })
    for column in ("n_positive", "n_relative", "n_active", "n_norm"):
        out[f"share_{column[2:]}"] = out[column] / d_ff
    out["zero_agreement_ffn"] = g["agree_ffn"].apply(lambda s: float((s == 0).mean()))
    out["zero_agreement_output"] = g["agree_output"].apply(lambda s: float((s == 0).mean()))
    out["zero_agreement_ffn_positive"] = g["agree_ffn_positive"].apply(lambda s: float((s == 0).mean()))
    out["zero_agreement_output_positive"] = g["agree_output_positive"].apply(lambda s: float((s == 0).mean()))
    frame = frame.assign(_res_final=frame["residual_top"] == frame["final_top"],
                         _out_final=frame["output_top"] == frame["final_top"])
    g = frame.groupby("layer", sort=True)
    out["residual_is_final"] = g["_res_final"].mean()
    out["output_is_final"] = g["_out_final"].mean()
    out["residual_prob_final"] = g["residual_prob_final"].mean()
    out["residual_prob_final_median"] = g["residual_prob_final"].median()
    shares = pd.crosstab(frame["layer"], frame["case"], normalize="index")
    for case in CASES:
        out[f"case_{case}"] = shares[case] if case in shares else 0.0
    out = out.reset_index()
    out.insert(1, "relative_depth", relative_depth(out["layer"].to_numpy(), n_layers))
    return out


def agreement_breakdown(frame: pd.DataFrame, against: str = "output") -> dict:
    """Among (example, layer) pairs where some active memory agrees with the layer's prediction
    (``against``: ``"output"`` = residual + FFN, the authors' code; ``"ffn"`` = the FFN output, the
    paper's text): the share whose target (the layer's top token) is a stop word, and the share with a
    prefix shorter than 5 tokens, each next to its base rate over all pairs."""
    if against not in AGAINST:
        raise ParameterError(f"against must be one of {AGAINST}, got {against!r}.")
    agree = frame[f"agree_{against}"] > 0
    stop = frame[f"{against}_top_stop"]
    short = frame["prefix_len"] < SHORT_PREFIX
    some = int(agree.sum())
    return {"against": against, "pairs": int(len(frame)), "agreeing_pairs": some,
            "agreeing_share": float(agree.mean()) if len(frame) else float("nan"),
            "stop_word_share": float(stop[agree].mean()) if some else float("nan"),
            "short_prefix_share": float(short[agree].mean()) if some else float("nan"),
            "stop_word_base_rate": float(stop.mean()), "short_prefix_base_rate": float(short.mean())}


def composition_examples(result: AggregationResult, tokenizer, layer: int | None = None, n: int = 10,
                         seed: int = 0, max_chars: int = 70) -> pd.DataFrame:
    """Random composition cases (output top is neither the residual's nor the FFN's): prefix and tokens.

    ``layer``: one layer (default: the last). Prefixes longer than ``max_chars`` keep their end.
    """
    n_layers = result.n_layers
    layer = n_layers - 1 if layer is None else layer
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -n_layers <= layer < n_layers:
        raise ParameterError(f"layer must be an int in 0..{n_layers - 1}, got {layer!r}.")
    layer = int(layer) % n_layers
    rows = result.frame[(result.frame["layer"] == layer) & (result.frame["case"] == "composition")]
    rows = rows.sample(min(n, len(rows)), random_state=seed).sort_values("example") if len(rows) else rows
    examples = result.examples.set_index("example")
    bos = int(examples["position"].iloc[0] + 1 - examples["prefix_len"].iloc[0]) if len(examples) else 0
    decode = lambda t: tokenizer.decode([int(t)])  # noqa: E731
    out = []
    for row in rows.itertuples(index=False):
        ex = examples.loc[row.example]
        prefix = tokenizer.decode(ex["token_ids"][bos: row.position + 1])
        prefix = prefix if len(prefix) <= max_chars else "…" + prefix[-max_chars + 1:]
        out.append({"example": row.example, "layer": layer, "prefix": prefix,
                    "before (residual)": decode(row.residual_top), "FFN": decode(row.ffn_top),
                    "after (output)": decode(row.output_top), "final": decode(row.final_top),
                    "next token": decode(row.next_token)})
    return pd.DataFrame(out, columns=["example", "layer", "prefix", "before (residual)", "FFN",
                                      "after (output)", "final", "next token"])


# ---- the paper, side by side ----------------------------------------------------------------------------
def paper_curves() -> pd.DataFrame:
    """The paper's per-layer numbers (Fig. 8 and Fig. 9) as shares, on the relative depth axis."""
    ref = paper_reference("section5")
    layers = np.arange(PAPER_LAYERS)
    return pd.DataFrame({"layer": layers, "relative_depth": relative_depth(layers, PAPER_LAYERS),
                         "zero_agreement": np.asarray(ref["zero_agreement"]["value"]) / 100,
                         "residual_is_final": np.asarray(ref["residual_matches_final"]["value"]) / 100})


def section5_measures(result: "AggregationResult", n_boot: int = N_BOOT,
                      seed: int = 0) -> tuple[dict[str, Estimate], dict[str, str]]:
    """The measures of Section 5's findings (``ffnlib.findings``, notebook ``03_aggregation``), each with a
    95% interval from a seeded bootstrap over the held-out examples (an example contributes all its layers),
    and a line of detail per measure for the report."""
    frame = result.frame.sort_values(["example", "layer"], kind="stable")
    n_layers, d_ff = result.n_layers, result.d_ff
    n_examples = len(frame) // n_layers
    if n_examples == 0 or n_examples * n_layers != len(frame):
        raise ParameterError(f"The result table has {len(frame)} rows, not {n_layers} per example.")

    def grid(values) -> np.ndarray:  # (examples, layers)
        return np.asarray(values, dtype=np.float64).reshape(n_examples, n_layers)

    unit = "examples"
    out: dict[str, Estimate] = {}
    details: dict[str, str] = {}
    per_example = lambda values: grid(values).mean(1)  # noqa: E731
    out["active_share"] = share(per_example(frame["n_active"] / d_ff), unit, n_boot, seed)
    details["active_share"] = (f"with m>0: {(frame['n_positive'] / d_ff).mean():.0%}; 90% of the sub-update sizes in "
                               f"{(frame['n_norm'] / d_ff).mean():.0%} of the memories")
    for against in AGAINST:
        zero = frame[f"agree_{against}"] == 0
        out[f"zero_agreement_{against}"] = share(per_example(zero), unit, n_boot, seed)
        by_layer = grid(zero).mean(0)
        details[f"zero_agreement_{against}"] = (f"by layer {by_layer.min():.0%}-{by_layer.max():.0%} (lowest at layer "
                                                f"{int(by_layer.argmin())}); with the paper's rule (m>0 active) "
                                                f"{(frame[f'agree_{against}_positive'] == 0).mean():.0%}")
        agree = grid(frame[f"agree_{against}"] > 0)
        for name, flags in (("stop_words", grid(frame[f"{against}_top_stop"])),
                            ("short_prefix", grid(frame["prefix_len"] < SHORT_PREFIX))):
            columns = np.stack([(agree * flags).sum(1), agree.sum(1), flags.sum(1),
                                np.full(n_examples, n_layers)], 1)
            out[f"{name}_{against}"] = bootstrap(columns, lambda s: s[..., 0] / s[..., 1], unit, n_boot, seed)
            out[f"{name}_{against}/baseline"] = bootstrap(columns, lambda s: s[..., 2] / s[..., 3], unit, n_boot,
                                                          seed)
            details[f"{name}_{against}"] = f"{int(agree.sum()):,} agreeing (example, layer) pairs of {agree.size:,}"
    spearman = lambda s: spearman_with_depth(s)  # noqa: E731  (a curve's trend does not depend on its scale)
    residual_final = grid(frame["residual_top"] == frame["final_top"])
    out["residual_final_trend"] = bootstrap(residual_final, spearman, unit, n_boot, seed)
    curve = residual_final.mean(0)
    details["residual_final_trend"] = f"{curve[0]:.0%} (first layer) to {curve[-1]:.0%} (last)"
    confidence = grid(frame["residual_prob_final"])
    out["residual_prob_trend"] = bootstrap(confidence, spearman, unit, n_boot, seed)
    curve = confidence.mean(0)
    details["residual_prob_trend"] = f"mean {curve[0]:.2f} (first layer) to {curve[-1]:.2f} (last)"
    case = {name: grid(frame["case"] == name) for name in CASES}
    out["residual_dominates"] = share((case["residual"] - case["ffn"]).mean(1), unit, n_boot, seed)
    details["residual_dominates"] = (f"residual case {case['residual'].mean():.0%} vs FFN case "
                                     f"{case['ffn'].mean():.0%} (mean over layers)")
    out["ffn_rarely_overrides"] = share(case["ffn"].mean(1), unit, n_boot, seed)
    details["ffn_rarely_overrides"] = (f"largest {case['ffn'].mean(0).max():.0%} at layer "
                                       f"{int(case['ffn'].mean(0).argmax())}")
    out["composition"] = share(case["composition"].mean(1), unit, n_boot, seed)
    details["composition"] = f"last layer {case['composition'][:, -1].mean():.0%}"
    return out, details


def curves(summary: pd.DataFrame) -> dict:
    """Per-layer series for the cross-model notebook (paper values where the paper gave them)."""
    ref = paper_reference("section5")
    paper_zero = [v / 100 for v in ref["zero_agreement"]["value"]]
    paper_final = [v / 100 for v in ref["residual_matches_final"]["value"]]
    series = {
        "active_share": ("Sec 5 Fig 7: share of memories active (chosen rule)", "share_active", None),
        "positive_share": ("Sec 5 Fig 7: share of memories with m > 0", "share_positive", None),
        "zero_agreement": ("Sec 5 Fig 8: zero agreement vs layer output", "zero_agreement_output", paper_zero),
        "zero_agreement_ffn": ("Sec 5 Fig 8: zero agreement vs FFN output", "zero_agreement_ffn", paper_zero),
        "residual_is_final": ("Sec 5 Fig 9: residual top == final prediction", "residual_is_final", paper_final),
        "residual_prob_final": ("Sec 5 Fig 10: residual's probability of the final token", "residual_prob_final",
                                None),
        "case_residual": ("Sec 5 Fig 11: residual case share", "case_residual", None),
        "case_ffn": ("Sec 5 Fig 11: ffn case share", "case_ffn", None),
        "case_composition": ("Sec 5 Fig 11: composition case share", "case_composition", None),
    }
    return {name: {"label": label, "values": [float(v) for v in summary[column]], "paper": paper}
            for name, (label, column, paper) in series.items()}


def side_by_side(summary: pd.DataFrame) -> pd.DataFrame:
    """Our per-layer Fig. 8 / Fig. 9 numbers next to the paper's at the same relative depth (the paper's
    16 points linearly interpolated), in percent."""
    paper = paper_curves()
    depth = summary["relative_depth"].to_numpy()
    return pd.DataFrame({
        "layer": summary["layer"], "relative_depth": depth.round(3),
        "zero agreement, ours (output) %": (100 * summary["zero_agreement_output"]).round(1),
        "zero agreement, ours (FFN) %": (100 * summary["zero_agreement_ffn"]).round(1),
        "zero agreement, paper %": (100 * np.interp(depth, paper["relative_depth"], paper["zero_agreement"])).round(1),
        "residual == final, ours %": (100 * summary["residual_is_final"]).round(1),
        "residual == final, paper %": (100 * np.interp(depth, paper["relative_depth"],
                                                       paper["residual_is_final"])).round(1),
    })
