"""MoEfication (Zhang et al., Findings of ACL 2022) on gated FFNs: memories grouped into experts.

Zhang, Lin, Liu, Li, Sun & Zhou, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts"
(arXiv 2110.01786; code thunlp/MoEfication) split each FFN's memories into equal-size *experts* and
route every token to a few of them. On ReLU T5 they keep over 95% of the performance with 10-30% of the
FFN. Our models are gated (SwiGLU, GeGLU), where the authors say the method does not apply; this module
measures how far it does, against the training-free activation-sparsity methods made for gated FFNs.

**Experts** (:func:`make_splits`; equal sizes, ``expert_size`` memories each, 32 by default as the
authors' T5 and BERT settings):

- ``random``: a seeded random permutation cut into blocks (the control). The authors' "random split" is
  the identity order cut into blocks, which is random with respect to function in the same way. One random
  split is one draw, and draws differ (at 25% kept, one draw's perplexity can be twice another's), so
  ``random_splits`` draws are made (5 at ``default`` and ``full``, 2 at ``ci``; named ``random``,
  ``random.1``, ...): every number of random experts is the mean over the draws, with an interval that
  resamples the draws and then the sentences (:func:`ffnlib.stats.two_level`).
- ``kmeans``: balanced k-means on the L2-normalised key rows, as the authors' code (which used
  ``k_means_constrained`` with size_min = size_max). Here: scikit-learn ``KMeans`` (k-means++, seeded)
  for the start, then balanced Lloyd steps whose assignment step is an exact minimum-cost balanced
  assignment (``scipy.optimize.linear_sum_assignment`` on the distance matrix with every centroid
  repeated ``expert_size`` times), until the assignment stops changing or ``kmeans_iter`` steps.
  ``cluster_rows`` says which rows are clustered in a gated FFN: ``"gate"`` (default: the gate decides
  whether a memory is active, as W_in does behind the ReLU in T5), ``"up"``, or ``"both"`` (each row the
  concatenation of the normalised gate and up rows, divided by sqrt 2). A plain FFN has one key matrix.
- ``coactivation``: a co-activation graph partitioned with METIS (``pymetis``), as the authors' code.
  A memory is *active* for a token when its size ``|m_i|·||v_i||`` is in the token's top
  ``active_share`` (10%) of its layer (gated memories are never exactly zero, so "ReLU output > 0"
  needs a replacement); the edge weight of two memories is the number of training tokens where both are
  active (the authors count co-activations per batch of 8 tokens, clamped at 1 per batch; we count per
  token). Edges are kept and weighted as in the authors' ``adj.py`` (the first non-zero 10%-step
  percentile is the unit; weights are whole multiples of it), and METIS's parts are made equal as in
  their ``trans_gp.py``: members of oversized parts, drawn at random, move to undersized ones.

**Routers** (which experts a token uses, for a share of the FFN kept):

- ``ground_truth``: the experts with the largest ``Σ_i |m_i|·||v_i||`` over their memories (the
  authors' oracle, with the magnitude a gated memory writes); an upper bound, since it needs the whole FFN;
- ``similarity``: the experts whose centroid key is nearest (L2) to the normalised FFN input;
- ``mlp``: the authors' router, ``Linear(d, E, no bias) -> Tanh -> Linear(E, E, no bias)`` initialised
  with the centroids and the identity, trained with BCE on the expert sizes divided by the batch maximum
  (Adam, lr 0.01, batches of 512, 90/10 split, the epoch with the best held-out mass kept at 20%);
- ``random``: random experts (with the random split: random memories, the control).

**Training-free baselines for gated FFNs**, thresholds calibrated per layer on a few hundred sentences:

- ``cats`` (Lee et al. 2024): zero memory i when ``|act(gate_i·x)| < t``; ``share`` is the share of
  memories kept. CATS computes the whole gate, so it reads ``1/3 + 2/3·share`` of the FFN weights;
- ``teal`` (Liu et al., ICLR 2025): zero the FFN input's entries with ``|x_j| < t_in`` (the input of
  gate and up) and the coefficients with ``|m_i| < t_m`` (the input of down), one share for both
  (TEAL's uniform setting), so it reads ``share`` of the FFN weights.

**Measures**: :func:`evaluate` runs held-out sentences through the model with every layer in ``layers``
sparsified (per configuration: per-sentence negative log-likelihood and top-1 agreement with the dense
model; per layer: memories kept and the share of ``Σ|m_i|·||v_i||`` kept); :func:`quality_table` gives
perplexity and agreement with seeded bootstrap 95% intervals over sentences (random experts: over
the random splits and the sentences, the mean over the splits); :func:`router_picks` how often the trained
router picks each expert, against a uniform router's rate; :func:`sparsity_table` the
share of the ``|m_i|·||v_i||`` mass carried by the top k% of memories; :func:`expert_coherence` the
key-value view (do an expert's memories share trigger topics or value tokens, against random experts);
:func:`measures` the numbers the findings registry
(``ffnlib.findings``) judges. :class:`ExpertFFN` is the expert-sparse FFN forward (it gathers only the
selected experts' rows of gate, up and down). Splits, thresholds, routers and every evaluated
configuration are cached with manifests and resume after an interruption.

Gated coefficients ``m_i = act(gate_i·x)·(up_i·x)`` can be negative; every size here uses ``|m_i|``.

One concept per module (each private; this package re-exports their public names):

- ``_choices``: the splits, routers and methods by name, expert sizes and shares kept, with their checks;
- ``_sizes``: the notebook's sizes per scale, a view of :data:`ffnlib.config.SCALES` (:func:`get_sizes`);
- ``_paper``: the papers' reference numbers (:data:`PAPER`);
- ``_cache``: the request every cached result shares (its version);
- ``_ffn``: the FFN's coefficients, the dense FFN, the key rows and the memories' sizes, through the adapter;
- ``_passes``: batches of sentences, their real tokens and captured activations (``ffnlib.evaluate``'s batching,
  ``ffnlib.capture``'s hooks and early stop); the co-activation counts;
- ``_partitions``: the random, balanced k-means and co-activation (METIS) partitions; ``_splits``: :func:`make_splits`;
- ``_thresholds``: CATS and TEAL thresholds; ``_routers``: centroid keys and the MLP routers;
- ``_configs``: :class:`Config`; ``_sparsify``: the rules and :func:`sparsify` (coefficients edited through
  :func:`ffnlib.capture.hook_coefficients`); ``_plan``: :class:`Plan`;
- ``_evaluate``: :func:`evaluate` (each configuration through ``ffnlib.evaluate``'s held-out evaluation);
  ``_tables``: quality, sparsity and random-draw tables (intervals from ``ffnlib.stats``); ``_coherence``: the
  key-value view; ``_measures``: the findings' measures;
- ``_expert_ffn``: :class:`ExpertFFN`, the expert-sparse forward.
"""


from __future__ import annotations

from ._cache import CACHE_VERSION
from ._choices import (CLUSTER_ROWS, METHODS, ROUTERS, SPARSITY_TOPS, SPLITS, check_expert_size, check_share,
                       default_expert_size, experts_kept)
from ._coherence import expert_coherence, memory_topics
from ._configs import Config, default_configs, replace_share
from ._evaluate import Evaluation, evaluate
from ._expert_ffn import ExpertFFN, route_random
from ._ffn import dense_ffn, ffn_coefficients, key_features, membership, memory_sizes, top_share_mask
from ._measures import COMPARISONS, measures
from ._paper import PAPER, table2_retained
from ._partitions import (RANDOM_SEED_STEP, balanced_assignment, balanced_kmeans, check_partition, coactivation_graph,
                          equalise, metis_split, random_split, random_split_names, random_split_seed, split_draw,
                          split_kind)
from ._passes import coactivation_counts
from ._plan import Plan
from ._routers import MLPRouter, Routers, centroid_keys, router_data, train_router, train_routers
from ._sizes import SIZES, Sizes, get_sizes, spread_layers
from ._sparsify import CatsRule, ExpertRule, Record, Rule, TealRule, sparsify
from ._splits import ExpertSplits, labels_frame, make_splits
from ._tables import (bootstrap_metrics, per_sentence, quality_table, random_draws, random_draws_table,
                      router_picks, sparsity_table)
from ._thresholds import THRESHOLD_WHAT, calibrate_thresholds

# the old module's public names; CACHE_VERSION, the rules (Rule, ExpertRule, CatsRule, TealRule) and labels_frame
# are importable from here too, for tests and extensions, without being part of the documented API (the per-token
# predictions are ffnlib.evaluate's)
__all__ = ["SPLITS", "ROUTERS", "METHODS", "CLUSTER_ROWS", "SPARSITY_TOPS", "PAPER", "table2_retained", "Sizes",
           "SIZES", "get_sizes", "spread_layers", "default_expert_size", "check_expert_size", "check_share",
           "experts_kept", "ffn_coefficients", "dense_ffn", "key_features", "membership",
           "check_partition", "random_split", "RANDOM_SEED_STEP", "random_split_names", "split_draw", "split_kind",
           "random_split_seed", "balanced_assignment", "balanced_kmeans", "coactivation_graph", "equalise",
           "metis_split", "ExpertSplits", "make_splits", "memory_sizes", "top_share_mask", "coactivation_counts",
           "THRESHOLD_WHAT", "calibrate_thresholds", "centroid_keys", "MLPRouter", "train_router", "Routers",
           "router_data", "train_routers", "Config", "default_configs", "Record", "sparsify", "Plan", "Evaluation",
           "evaluate", "bootstrap_metrics", "random_draws", "per_sentence", "quality_table", "random_draws_table",
           "sparsity_table", "router_picks", "memory_topics", "expert_coherence", "COMPARISONS", "measures",
           "ExpertFFN", "route_random", "replace_share"]
