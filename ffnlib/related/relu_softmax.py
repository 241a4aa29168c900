"""ReLU vs softmax memories (Shen, Guo, Tan, Tang, Wang & Bian, "A Study on ReLU and Softmax in Transformer",
arXiv 2302.06461), on small LMs trained here (:mod:`ffnlib.training`): notebook 08.

Shen et al. ask whether an FFN, ``ReLU(x·Kᵀ)·V``, is a key-value memory, whose classic form is
``softmax(x·Kᵀ)·V``. On IWSLT14 De-En they report BLEU 34.22 (ReLU), 33.08 (softmax) and 34.21 (softmax with a
LayerNorm on its output); ReLU stays ahead as the slots grow (32 to 4,096); under softmax the top 0.2% of the slots
carry over 85% of the mass, and its output's variance is small next to the residual's.

**The sweep** (:func:`run_sweep`): every variant of :data:`ffnlib.training.VARIANTS` at every slot count of the
scale, for every seed, at a fixed width, depth and token budget. One trained model per cell, cached.

**Measures**, on held-out blocks of the embedded corpus (the same blocks for every model):

- held-out loss per block (log-perplexity), from training;
- :func:`memory_measures`, per model and block, averaged over the block's tokens and the layers:
  ``variance_ratio`` = ‖FFN output‖² / ‖residual the FFN is added to‖²; ``variance_ratio_upper``, the same over
  the layers after the first only (the first FFN is added to the embeddings plus the first attention output,
  small in these models with tied embeddings: its ratio reaches the hundreds or thousands in most variants at 256
  slots or more, and then the mean over layers is that layer's); ``top_mass`` = the share of Σ|m_i| in the
  top 0.2% of the slots (at least one slot); ``active_share`` = the share of slots with m_i > 0 (ReLU's sparsity;
  every slot is positive under softmax).
- :func:`measures`: the findings' numbers (registry entries ``08_relu_vs_softmax.*``), each with a 95% interval
  from a seeded bootstrap over held-out blocks, paired (the same blocks for the models compared). The interval
  covers the sampling of held-out text, not the training seed: the per-seed values are reported beside each
  number, and a verdict that one seed contradicts should be read as not settled.

What a corpus of about a million words can and cannot show: small models trained for minutes, evaluated by
perplexity on Wikipedia sentences, not Shen et al.'s translation models and BLEU; differences between variants at
one size are reliable to the interval shown, but "ReLU's lead grows with the slots" rests on four slot counts of
one width and depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from ..config import SCALES, Scale, get_scale
from ..errors import ParameterError
from ..stats import N_BOOT, Estimate, bootstrap
from ..progress import say
from ..training import VARIANTS, TrainSpec, blocks, train_lm

__all__ = ["TOP_SHARE", "SweepSizes", "SIZES", "sweep_sizes", "sweep_specs", "run_sweep", "top_mass",
           "memory_measures", "measure_sweep", "summary_table", "measures", "pretrained_top_mass"]

TOP_SHARE = 0.002  # Shen et al.: the top 0.2% of the slots


@dataclass(frozen=True)
class SweepSizes:
    """A scale's sweep: slot counts, seeds, and the spec every cell shares."""

    slots: tuple[int, ...]
    seeds: tuple[int, ...]
    base: TrainSpec
    measure_blocks: int  # held-out blocks for the memory measures
    variants: tuple[str, ...] = VARIANTS
    notes: dict = field(default_factory=dict)

    @classmethod
    def of_scale(cls, scale: Scale) -> "SweepSizes":
        """The sweep of ``scale`` (its ``sweep_*`` sizes): 2-layer, 4-head LMs, batch 16, learning rate 2e-3."""
        base = TrainSpec(d_model=scale.sweep_d_model, n_layers=2, n_heads=4, context=scale.sweep_context,
                         vocab_size=scale.sweep_vocab_size, tokens=scale.sweep_tokens, batch=16, lr=2e-3,
                         max_sentences=scale.sweep_max_sentences, heldout_sentences=scale.sweep_heldout_sentences)
        return cls(slots=tuple(scale.sweep_slots), seeds=tuple(scale.sweep_seeds), base=base,
                   measure_blocks=scale.sweep_measure_blocks)


SIZES: dict[str, SweepSizes] = {name: SweepSizes.of_scale(scale) for name, scale in SCALES.items()}  # a view of
# ffnlib.config.SCALES


def sweep_sizes(scale: str) -> SweepSizes:
    """The sweep of ``scale``, or a clear error."""
    return SweepSizes.of_scale(get_scale(scale))


def sweep_specs(sizes: SweepSizes, seed: int = 0) -> list[TrainSpec]:
    """One spec per (variant, slots, seed); ``seed`` offsets the sizes' seeds (a notebook's ``seed``)."""
    return [replace(sizes.base, variant=v, slots=s, seed=seed + r)
            for r in sizes.seeds for s in sizes.slots for v in sizes.variants]


def run_sweep(sizes: SweepSizes, out_dir, seed: int = 0, progress: bool = True,
              precision: str = "float32") -> tuple[pd.DataFrame, dict]:
    """Train (or load) every cell of the sweep. ``precision``: the run's; the models train under bf16 autocast only
    where the CPU does bf16 natively (:func:`ffnlib.precision.training_precision`). Returns one row per model
    (variant, slots, seed, heldout_loss, perplexity, seconds, tokens_per_second, folder) and the
    per-block held-out losses by folder."""
    from ..precision import training_precision

    trained_in = training_precision(precision)
    if trained_in.name != precision and precision != "auto":
        say(f"Training in {trained_in.name}: {trained_in.reason}.", progress)
    rows, losses = [], {}
    for spec in sweep_specs(sizes, seed):
        result = train_lm(spec, out_dir, progress=progress, precision=trained_in.name)
        rows.append({"variant": spec.variant, "slots": spec.slots, "seed": spec.seed,
                     "heldout_loss": result.heldout_loss, "perplexity": result.heldout_perplexity,
                     "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                     "folder": str(result.folder)})
        losses[str(result.folder)] = result.heldout_block_losses
    return pd.DataFrame(rows), losses


# ---- inside the trained memories -------------------------------------------------------------------------
def top_mass(m: torch.Tensor, share: float = TOP_SHARE) -> torch.Tensor:
    """Per token: the share of Σ|m_i| in the top ``share`` of the slots (at least one slot); NaN for a token
    whose coefficients are all zero (a ReLU layer can switch every memory off), which has no mass to share."""
    mass = m.abs().float()
    k = max(1, int(round(share * mass.shape[-1])))
    total = mass.sum(-1)
    return torch.where(total > 0, mass.topk(k, dim=-1).values.sum(-1) / total.clamp_min(1e-30),
                       torch.full_like(total, float("nan")))


@torch.no_grad()
def memory_measures(folder, n_blocks: int, heldout_sentences: int = 2000, corpus: str = "wiki") -> pd.DataFrame:
    """Per held-out block of the model in ``folder``: variance_ratio, top_mass and active_share, each averaged
    over the block's tokens and the model's layers, and variance_ratio_upper over the layers after the first (NaN
    for a one-layer model; see the module docstring)."""
    from ..capture import capture
    from ..corpus import load_corpus
    from ..models import load_model

    loaded = load_model(str(folder))
    adapter = loaded.adapter
    texts = load_corpus(corpus, split="heldout", seed=0, max_sentences=heldout_sentences)["text"].astype(str).tolist()
    context = int(getattr(loaded.model.config, "n_positions", None) or loaded.model.config.max_position_embeddings)
    data = blocks(loaded.tokenizer, texts, context)[:n_blocks]
    rows = []
    layers = range(adapter.n_layers)
    for b, ids in enumerate(data):
        with capture(loaded, None, what=("coefficients", "ffn_output", "residual_before")) as acts:
            loaded.model(ids[None], attention_mask=torch.ones_like(ids[None]))
        ratios = [float((acts.ffn_output[l].pow(2).sum(-1) / acts.residual_before[l].pow(2).sum(-1)).mean())
                  for l in layers]
        top = np.nanmean([float(top_mass(acts.coefficients[l][0]).nanmean()) for l in layers])
        active = np.mean([float((acts.coefficients[l][0] > 0).float().mean()) for l in layers])
        rows.append({"block": b, "variance_ratio": float(np.mean(ratios)),
                     "variance_ratio_upper": float(np.mean(ratios[1:])) if len(ratios) > 1 else float("nan"),
                     "top_mass": top, "active_share": active})
    return pd.DataFrame(rows)


def measure_sweep(table: pd.DataFrame, sizes: SweepSizes) -> pd.DataFrame:
    """:func:`memory_measures` of every model of the sweep, one row per (model, block)."""
    parts = []
    for row in table.itertuples():
        frame = memory_measures(row.folder, sizes.measure_blocks, sizes.base.heldout_sentences, sizes.base.corpus)
        parts.append(frame.assign(variant=row.variant, slots=row.slots, seed=row.seed))
    return pd.concat(parts, ignore_index=True)


# ---- the findings ------------------------------------------------------------------------------------------
def _per_block(table: pd.DataFrame, losses: dict, variant: str) -> np.ndarray:
    """(n_slots, n_blocks): the variant's held-out block losses at each slot count, mean over seeds."""
    rows = table[table["variant"] == variant]
    return np.stack([np.mean([losses[f] for f in rows.loc[rows["slots"] == s, "folder"]], axis=0)
                     for s in sorted(table["slots"].unique())])


def summary_table(table: pd.DataFrame, memory: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (variant, slots): held-out perplexity (mean over seeds, and its min-max across seeds) and, with
    ``memory``, the mean memory measures."""
    out = table.groupby(["variant", "slots"]).agg(perplexity=("perplexity", "mean"),
                                                 ppl_min=("perplexity", "min"), ppl_max=("perplexity", "max"),
                                                 seeds=("seed", "size")).reset_index()
    if memory is not None:
        columns = [c for c in ("variance_ratio", "variance_ratio_upper", "top_mass", "active_share") if c in memory]
        means = memory.groupby(["variant", "slots"])[columns].mean()
        out = out.merge(means.reset_index(), on=["variant", "slots"], how="left")
    order = {v: i for i, v in enumerate(VARIANTS)}
    return out.sort_values(["variant", "slots"], key=lambda c: c.map(order) if c.name == "variant" else c
                           ).reset_index(drop=True)


def measures(table: pd.DataFrame, losses: dict, memory: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0
             ) -> tuple[dict[str, Estimate], dict[str, str]]:
    """The numbers of the ``08_relu_vs_softmax`` findings (bootstrap over held-out blocks, paired)."""
    unit = "held-out blocks"
    slots = np.array(sorted(table["slots"].unique()), dtype=float)
    relu, soft, soft_ln = (_per_block(table, losses, v) for v in ("relu", "softmax", "softmax_ln"))
    gap, gap_ln = soft - relu, soft_ln - relu  # (n_slots, n_blocks), nats per token
    ours: dict[str, Estimate] = {}
    details: dict[str, str] = {}
    ours["softmax_worse"] = bootstrap(gap.mean(0), lambda s: s[..., 0] / gap.shape[1], unit, n_boot, seed)
    ours["ln_matches_relu"] = bootstrap(gap_ln.mean(0), lambda s: s[..., 0] / gap_ln.shape[1], unit, n_boot, seed)
    if len(slots) >= 2:
        x = np.log2(slots) - np.log2(slots).mean()
        slope = (x[:, None] * gap).sum(0) / (x ** 2).sum()  # per block: the lead's slope per doubling
        ours["relu_lead_grows"] = bootstrap(slope, lambda s: s[..., 0] / len(slope), unit, n_boot, seed)
    else:
        ours["relu_lead_grows"] = Estimate.missing(unit)
    largest = int(slots.max())
    at = memory[memory["slots"] == largest].groupby(["variant", "block"])["top_mass"].mean().unstack("variant")
    ours["softmax_concentrated"] = bootstrap(at["softmax"].to_numpy(), lambda s: s[..., 0] / len(at), unit,
                                             n_boot, seed)
    ours["softmax_concentrated/baseline"] = bootstrap(at["relu"].to_numpy(), lambda s: s[..., 0] / len(at), unit,
                                                      n_boot, seed)
    by_seed = table.pivot_table(index=["slots", "seed"], columns="variant", values="heldout_loss")
    lead = (by_seed["softmax"] - by_seed["relu"]).groupby(level="slots")
    details["softmax_worse"] = "; ".join(f"{int(s)} slots: {g.mean():+.3f} nats (seeds {g.min():+.3f}..{g.max():+.3f})"
                                         for s, g in lead)
    per_seed = (by_seed["softmax_ln"] - by_seed["relu"]).groupby(level="seed").mean()
    details["ln_matches_relu"] = "per seed: " + ", ".join(f"{v:+.3f}" for v in per_seed)
    if gap.mean() > 0:  # the share of the softmax-ReLU gap the LayerNorm closes (defined when there is a gap)
        details["ln_matches_relu"] += f"; closes {1 - gap_ln.mean() / gap.mean():.0%} of the softmax-ReLU gap"
    k = max(1, int(round(TOP_SHARE * largest)))
    details["softmax_concentrated"] = (f"at {largest} slots the top {k} slot(s); ReLU's |m| as the baseline; "
                                       f"softmax+LN {at['softmax_ln'].mean():.1%}")
    return ours, details


def pretrained_top_mass(loaded, texts: list[str], max_tokens: int = 64) -> float:
    """The same top-0.2% mass share of |m| on a pretrained model (e.g. the default SmolLM2), for comparison."""
    from ..capture import capture

    values = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([loaded.encode(text)[:max_tokens]], device=loaded.device)
            with capture(loaded, None, what=("coefficients",)) as acts:
                loaded.model(ids)
            values += [float(top_mass(m[0]).nanmean()) for m in acts.coefficients.values()]
    return float(np.nanmean(values))

