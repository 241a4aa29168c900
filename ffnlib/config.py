"""The parameters every notebook takes, and the sizes behind each ``scale``.

Every notebook has a cell tagged ``parameters`` with at least ``model``, ``scale``, ``seed``,
``results_dir`` and ``device``, so ``papermill NB OUT -p scale ci`` always works. ``scale`` picks the
sizes below: ``"ci"`` is small and fast (tests), ``"default"`` is the main job (hours on a 2-core CPU
for the whole suite the first time; benchmarks/README.md has the measured times), ``"full"`` uses the whole of the larger corpus ``"wiki+"``: the embedded
text plus BIG-bench's English Wikipedia paragraphs (a 358 MB download the first time, ``ffnlib.corpus``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import ParameterError

__all__ = ["Scale", "SCALES", "CORE_PARAMETERS", "get_scale", "check_parameters", "check_int"]


@dataclass(frozen=True)
class Scale:
    name: str
    mining_sentences: int | None  # None: the whole training split
    top_k: int  # trigger examples kept per memory (the authors' code kept 50)
    removal_keys: int  # keys per layer in the removal experiment (paper: 100)
    aggregation_examples: int  # held-out prefixes for Section 5 (paper: 4,000)
    checkpoint_every: int  # sentences between mining checkpoints
    control_removal_keys: int  # keys per layer in the random-weights control's removal experiment
    control_aggregation_examples: int  # held-out prefixes for the control's Section 5
    corpus: str = "wiki"  # the embedded corpus: "wiki", or "wiki+" (plus BIG-bench's Wikipedia paragraphs, a download)
    control_draws: int = 3  # random initialisations of the control (seeds seed, seed + 1, ...): its interval covers
    # them and the units (ffnlib.stats.over_draws). ci: 1, for the tests' time
    n_boot: int = 1000  # bootstrap resamples of every 95% interval (ffnlib.stats). ci: 200, for the tests' time
    # notebook 09 (contribution maps, ffnlib.related.contextualization.notebook_sizes)
    maps_sentences: int = 300  # held-out sentences decomposed
    maps_max_tokens: int = 40  # their largest token count
    maps_bigram_sentences: int = 20000  # training sentences counted for the frequent bigrams
    maps_control_sentences: int = 150  # the first sentences the random-weights control decomposes
    # notebook 07 (MoEfication, ffnlib.related.moefication.get_sizes)
    moe_train_sentences: int = 600  # co-activation graph (the authors used up to 200k tokens per FFN)
    moe_router_sentences: int = 200  # MLP router training data (their tokens, 90/10 split)
    moe_calibration_sentences: int = 256  # CATS / TEAL thresholds ("a few hundred")
    moe_heldout_sentences: int = 150  # quality evaluation
    moe_shares: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.75)  # shares of the FFN kept (experts, TEAL) or of
    # memories kept (CATS)
    moe_layers: int | None = None  # None: every layer is MoEfied; n: n layers spread over the depth
    moe_kmeans_iter: int = 10  # balanced Lloyd steps after the k-means start
    moe_router_epochs: int = 30  # the authors: 30
    moe_random_splits: int = 5  # seeded random splits (the control's draws); random experts are their mean. ci: 2
    # (5 added 14 s, +37%, to notebook 07's 39 s on 2 quiet cores; 2 add 4-6 s and exercise the same machinery)
    # notebook 06 (knowledge neurons, ffnlib.related.knowledge_neurons.kn_scale)
    kn_relations: tuple[str, ...] | None = None  # None: every relation with templates
    kn_screened_facts: int | None = None  # facts per relation whose accuracy is measured (seeded; None: all)
    kn_facts_per_relation: int = 4  # facts analysed per relation, among those right in >= 1 template
    kn_templates: int | None = None  # templates per relation (the first ones; None: all)
    kn_top_layers: int | None = None  # attribute only the top layers (None: every layer, as Dai)
    kn_heldout_sentences: int = 24  # held-out sentences for perplexity
    kn_lambda2_sweep: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)  # the fact update's lambda2 values (trade-off sweep)
    # notebook 08 (the ReLU / softmax sweep, ffnlib.related.relu_softmax.sweep_sizes); every cell is a 2-layer LM
    sweep_slots: tuple[int, ...] = (64, 256, 1024, 4096)  # memories per layer
    sweep_seeds: tuple[int, ...] = (0, 1)  # training seeds per cell (offset by the notebook's seed)
    sweep_measure_blocks: int = 64  # held-out blocks for the memory measures
    sweep_d_model: int = 128
    sweep_context: int = 128
    sweep_vocab_size: int = 4096  # the sweep's own BPE tokenizer
    sweep_tokens: int = 1_000_000  # training tokens per model
    sweep_max_sentences: int | None = None  # training sentences (None: the whole training split)
    sweep_heldout_sentences: int = 2000  # held-out sentences for perplexity
    # notebook 05 (the explorer's static atlas, ffnlib.widgets.atlas.export_atlas)
    atlas_layers: int | None = None  # None: every layer; n: n layers spread over the depth (each page has a card)

    def as_dict(self) -> dict:
        return asdict(self)


SCALES: dict[str, Scale] = {
    "ci": Scale("ci", mining_sentences=160, top_k=50, removal_keys=10, aggregation_examples=64,
                checkpoint_every=64, control_removal_keys=10, control_aggregation_examples=64,
                maps_sentences=4, maps_max_tokens=20, maps_bigram_sentences=2000, maps_control_sentences=4,
                moe_train_sentences=24, moe_router_sentences=24, moe_calibration_sentences=16, moe_heldout_sentences=8,
                moe_shares=(0.25,), moe_layers=3, moe_kmeans_iter=1, moe_router_epochs=3, n_boot=200,
                moe_random_splits=2, atlas_layers=3, control_draws=1,
                kn_relations=("capital", "official_language"), kn_screened_facts=8, kn_facts_per_relation=2,
                kn_templates=3, kn_top_layers=4, kn_heldout_sentences=4, kn_lambda2_sweep=(1.0, 8.0),
                sweep_slots=(32, 128), sweep_seeds=(0,), sweep_measure_blocks=8, sweep_d_model=64, sweep_context=64,
                sweep_vocab_size=1024, sweep_tokens=24_576, sweep_max_sentences=3000, sweep_heldout_sentences=300),
    "default": Scale("default", mining_sentences=8000, top_k=50, removal_keys=100, aggregation_examples=4000,
                     checkpoint_every=1000, control_removal_keys=10, control_aggregation_examples=1000,
                     maps_sentences=300, maps_max_tokens=40, maps_bigram_sentences=20000, maps_control_sentences=150,
                     moe_train_sentences=600, moe_router_sentences=200, moe_calibration_sentences=256,
                     moe_heldout_sentences=150, moe_shares=(0.1, 0.2, 0.3, 0.5, 0.75), moe_layers=None,
                     moe_kmeans_iter=10, moe_router_epochs=30, moe_random_splits=5),
    "full": Scale("full", mining_sentences=None, top_k=50, removal_keys=100, aggregation_examples=4000,
                  checkpoint_every=2000, control_removal_keys=100, control_aggregation_examples=4000, corpus="wiki+",
                  maps_sentences=1000, maps_max_tokens=40, maps_bigram_sentences=40000, maps_control_sentences=300,
                  moe_train_sentences=4000, moe_router_sentences=1000, moe_calibration_sentences=512,
                  moe_heldout_sentences=1000, moe_shares=(0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75), moe_layers=None,
                  moe_kmeans_iter=30, moe_router_epochs=30, moe_random_splits=5,
                  kn_facts_per_relation=30, kn_heldout_sentences=200,
                  # the sweep trains on "wiki" at every scale: BIG-bench's canary asks that its data not train models
                  sweep_seeds=(0, 1, 2), sweep_measure_blocks=128, sweep_tokens=4_000_000),
}

CORE_PARAMETERS = {"model": str, "scale": str, "seed": int, "results_dir": str, "device": str,
                   "precision": str}


def get_scale(scale: str) -> Scale:
    if scale not in SCALES:
        raise ParameterError(f"Unknown scale {scale!r}: choose one of {list(SCALES)} "
                             "('ci' small and fast, 'default' for the main job, 'full' for the whole corpus).")
    return SCALES[scale]


def check_parameters(params: dict, types: dict[str, type] | None = None) -> None:
    """Check notebook parameters' types (``types`` adds a notebook's own), with a clear error."""
    expected = {**CORE_PARAMETERS, **(types or {})}
    for name, value in params.items():
        want = expected.get(name)
        if want is None or (value is None and name not in CORE_PARAMETERS):  # None: a notebook's "automatic"
            continue
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ParameterError(f"Parameter {name}={value!r} has type {type(value).__name__}; it must be "
                                 f"{want.__name__} (e.g. papermill ... -p {name} <{want.__name__}>).")
    get_scale(params.get("scale", "default"))


def check_int(name: str, value, low: int = 1) -> int:
    """``value`` as an int, or a clear error when it is not an int or is below ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"{name} must be an int, got {value!r}.")
    if value < low:
        raise ParameterError(f"{name} must be a positive int, got {value}." if low == 1 else
                             f"{name} must be >= {low}, got {value}.")
    return int(value)
