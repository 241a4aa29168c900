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
the random splits and the sentences, the mean over the splits); :func:`sparsity_table` the
share of the ``|m_i|·||v_i||`` mass carried by the top k% of memories; :func:`expert_coherence` the
key-value view (do an expert's memories share trigger topics or value tokens, against random experts);
:func:`measures` the numbers the findings registry
(``ffnlib.findings``) judges. :class:`ExpertFFN` is the expert-sparse FFN forward (it gathers only the
selected experts' rows of gate, up and down). Splits, thresholds, routers and every evaluated
configuration are cached with manifests and resume after an interruption.

Gated coefficients ``m_i = act(gate_i·x)·(up_i·x)`` can be negative; every size here uses ``|m_i|``.
"""

from __future__ import annotations

import math
import shutil
from abc import ABC, abstractmethod
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import Adapter, submodule
from ..capture import capture
from ..errors import FFNLibError, ParameterError, UnsupportedModelError
from ..mining import corpus_fingerprint, plan_batches, prepare_sentences
from ..progress import tqdm
from ..stats import Estimate, bootstrap, two_level
from ..storage import ensure_dir, fingerprint, load_result, save_result

__all__ = ["SPLITS", "ROUTERS", "METHODS", "CLUSTER_ROWS", "SPARSITY_TOPS", "PAPER", "table2_retained", "Sizes",
           "SIZES", "get_sizes", "spread_layers", "default_expert_size", "check_expert_size", "check_share",
           "experts_kept", "ffn_coefficients", "dense_ffn", "key_features", "membership",
           "check_partition", "random_split", "RANDOM_SEED_STEP", "random_split_names", "split_draw", "split_kind",
           "random_split_seed", "balanced_assignment", "balanced_kmeans", "coactivation_graph", "equalise",
           "metis_split", "ExpertSplits", "make_splits", "memory_sizes", "top_share_mask", "coactivation_counts",
           "THRESHOLD_WHAT", "calibrate_thresholds", "centroid_keys", "MLPRouter", "train_router", "Routers",
           "router_data", "train_routers", "Config", "default_configs", "Record", "sparsify", "Plan", "Evaluation",
           "evaluate", "bootstrap_metrics", "random_draws", "per_sentence", "quality_table", "random_draws_table",
           "sparsity_table", "memory_topics", "expert_coherence", "COMPARISONS", "measures", "ExpertFFN",
           "route_random", "replace_share"]

SPLITS = ("random", "kmeans", "coactivation")
ROUTERS = ("ground_truth", "similarity", "mlp", "random")
METHODS = ("dense", "experts", "cats", "teal")
CLUSTER_ROWS = ("gate", "up", "both")
SPARSITY_TOPS = (0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)  # shares of memories for the mass measure
_VERSION = 1  # bump when what is computed changes (invalidates cached results)

# Reference numbers (the papers' own tables; [3p]: a third-party reading of a table)
PAPER = {
    "keep_95": {"value": 0.95, "shares": (0.10, 0.30), "source": "abstract: 10-30% of FFN parameters keep over "
                "95% of the performance (ReLU T5)"},
    "speedup_25": {"value": 2.0, "share": 0.25, "source": "abstract: 2x speed-up with 25% of FFN parameters (FLOPs)"},
    "sparse_inputs": {"value": 0.80, "neurons": 0.03, "source": "[3p] 80% of inputs activate less than 3% of the "
                      "neurons in T5-XLarge (ReLU)"},
    # Table 2, T5-Large, 20% of neurons [3p-table]: mean over SST-2 / MNLI / RACE of score / dense score
    "table2": {"dense": (96.2, 89.5, 81.3), "random+mlp": (94.1, 84.1, 75.0), "kmeans+mlp": (95.9, 87.5, 78.7),
               "coactivation+similarity": (92.2, 81.4, 71.0), "coactivation+mlp": (95.4, 87.5, 79.0),
               "source": "[3p-table] Table 2, T5-Large, 20% of neurons (SST-2 / MNLI / RACE)"},
    "cats": {"value": 0.02, "keep": 0.5, "source": "CATS abstract: within 1-2% of the base model at 50% MLP "
             "sparsity, no fine-tuning (Llama2-7B, Mistral-7B; downstream accuracy)"},
    "teal": {"ppl": {0.25: 5.94 / 5.87, 0.4: 6.21 / 5.87, 0.5: 6.67 / 5.87}, "share": 0.5,
             "source": "[3p-table] TEAL Table 1, WikiText perplexity of Llama-3-8B, 5.87 dense -> 5.94 / 6.21 / "
                       "6.67 at 25 / 40 / 50% model-wide sparsity"},
}


def table2_retained(name: str) -> float:
    """Mean over the three tasks of Table 2 of a setting's score divided by the dense score."""
    dense = PAPER["table2"]["dense"]
    return float(np.mean([s / d for s, d in zip(PAPER["table2"][name], dense)]))


# =====================================================================================================
# Sizes per scale
# =====================================================================================================
@dataclass(frozen=True)
class Sizes:
    """How much data each step of notebook 07 uses at one ``scale``."""

    train_sentences: int  # co-activation graph (the authors used up to 200k tokens per FFN)
    router_sentences: int  # MLP router training data (their tokens, 90/10 split)
    calibration_sentences: int  # CATS / TEAL thresholds ("a few hundred")
    heldout_sentences: int  # quality evaluation
    shares: tuple[float, ...]  # shares of the FFN kept (experts, TEAL) or of memories kept (CATS)
    n_layers: int | None  # None: every layer is MoEfied; n: n layers spread over the depth
    kmeans_iter: int  # balanced Lloyd steps after the k-means start
    router_epochs: int  # the authors: 30
    n_boot: int = 1000
    random_splits: int = 5  # seeded random splits (the control's draws); random experts are their mean. ci: 2
    # (5 added 14 s, +37%, to notebook 07's 39 s on 2 quiet cores; 2 add 4-6 s and exercise the same machinery)


SIZES: dict[str, Sizes] = {
    "ci": Sizes(train_sentences=24, router_sentences=24, calibration_sentences=16, heldout_sentences=8,
                shares=(0.25,), n_layers=3, kmeans_iter=1, router_epochs=3, n_boot=200, random_splits=2),
    "default": Sizes(train_sentences=600, router_sentences=200, calibration_sentences=256, heldout_sentences=150,
                     shares=(0.1, 0.2, 0.3, 0.5, 0.75), n_layers=None, kmeans_iter=10, router_epochs=30),
    "full": Sizes(train_sentences=4000, router_sentences=1000, calibration_sentences=512, heldout_sentences=1000,
                  shares=(0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75), n_layers=None, kmeans_iter=30, router_epochs=30),
}


def get_sizes(scale: str) -> Sizes:
    if scale not in SIZES:
        raise ParameterError(f"Unknown scale {scale!r}: choose one of {list(SIZES)}.")
    return SIZES[scale]


def spread_layers(n_layers: int, n: int | None) -> list[int]:
    """``n`` layers spread evenly over the depth (first and last included); all when ``n`` is None."""
    if n is None or n >= n_layers:
        return list(range(n_layers))
    return sorted({int(round(i)) for i in np.linspace(0, n_layers - 1, n)})


# =====================================================================================================
# Checks
# =====================================================================================================
def default_expert_size(d_ff: int, preferred: int = 32) -> int:
    """The authors' 32 memories per expert where it divides ``d_ff``, else the divisor of ``d_ff`` nearest to it
    (the smaller on a tie) that leaves at least two experts: a model of any width gets equal-size experts."""
    if d_ff % preferred == 0 and d_ff > preferred:
        return preferred
    divisors = [d for d in range(1, d_ff // 2 + 1) if d_ff % d == 0]
    if not divisors:
        raise ParameterError(f"A layer of {d_ff} memories cannot be split into equal experts.")
    return min(divisors, key=lambda d: (abs(d - preferred), d))


def check_expert_size(d_ff: int, expert_size) -> int:
    """The number of experts, ``d_ff / expert_size``; a clear error when it does not divide."""
    if isinstance(expert_size, bool) or not isinstance(expert_size, (int, np.integer)) or expert_size < 1:
        raise ParameterError(f"expert_size must be a positive int (memories per expert), got {expert_size!r}.")
    if d_ff % expert_size:
        divisors = [d for d in range(2, min(d_ff, 512) + 1) if d_ff % d == 0]
        near = sorted(divisors, key=lambda d: abs(d - expert_size))[:6]
        raise ParameterError(f"expert_size={expert_size} does not divide this model's {d_ff} memories per layer, "
                             f"so the experts cannot all have the same size. Choose a divisor of {d_ff}, e.g. "
                             f"{sorted(near)}.")
    if expert_size == d_ff:
        raise ParameterError(f"expert_size={expert_size} makes one expert of the whole layer; choose a smaller "
                             "divisor of d_ff (32 by default).")
    return d_ff // int(expert_size)


def check_share(share, what: str = "share") -> float:
    """A share kept must be a number in (0, 1]."""
    if isinstance(share, bool) or not isinstance(share, (int, float, np.floating, np.integer)):
        raise ParameterError(f"{what} must be a number in (0, 1], got {share!r}.")
    share = float(share)
    if not (0.0 < share <= 1.0) or math.isnan(share):
        raise ParameterError(f"{what}={share} is outside (0, 1]: it is the share of the FFN kept (1 keeps "
                             "everything, 0.25 a quarter).")
    return share


def experts_kept(share: float, n_experts: int) -> int:
    """How many of ``n_experts`` a share keeps (rounded to the nearest; at least one)."""
    share = check_share(share)
    k = int(math.floor(share * n_experts + 0.5))
    if k < 1:
        raise ParameterError(f"share={share} keeps no expert out of {n_experts}: the smallest share is "
                             f"1/{n_experts} = {1 / n_experts:.4f}.")
    return k


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ParameterError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


# =====================================================================================================
# The FFN pieces, read through the adapter
# =====================================================================================================
@torch.no_grad()
def ffn_coefficients(adapter: Adapter, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The coefficients m of the FFN input ``x`` (..., d_model), computed with the layer's own modules."""
    act = adapter.activation(layer)
    if adapter.gated:
        return act(adapter.gate(layer)(x)) * adapter.up(layer)(x)
    return act(adapter.up(layer)(x))


@torch.no_grad()
def dense_ffn(adapter: Adapter, layer: int, x: torch.Tensor, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The FFN (before any post-FFN norm) with the layer's own modules; ``memory_mask`` (..., d_ff) zeroes
    coefficients: the dense FFN restricted to the kept memories, the reference for :class:`ExpertFFN`."""
    m = ffn_coefficients(adapter, layer, x)
    if memory_mask is not None:
        m = m * memory_mask
    return adapter.down(layer)(m)


@torch.no_grad()
def key_features(adapter: Adapter, layer: int, cluster_rows: str = "gate") -> np.ndarray:
    """The rows clustered by k-means, L2-normalised (d_ff, d_model), or (d_ff, 2·d_model) for ``"both"``."""
    _check_choice("cluster_rows", cluster_rows, CLUSTER_ROWS)
    up = F.normalize(adapter.keys(layer).float(), dim=-1)
    if not adapter.gated:
        return up.cpu().numpy()
    gate = F.normalize(adapter.gates(layer).float(), dim=-1)
    rows = {"gate": gate, "up": up, "both": torch.cat([gate, up], dim=-1) / math.sqrt(2)}[cluster_rows]
    return rows.cpu().numpy()


def membership(labels, n_experts: int) -> torch.Tensor:
    """One-hot (d_ff, n_experts) float matrix of a split's labels."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return F.one_hot(labels, n_experts).float()


# =====================================================================================================
# Splits
# =====================================================================================================
def check_partition(labels, n_experts: int, expert_size: int) -> np.ndarray:
    """Labels (d_ff,) that put exactly ``expert_size`` memories in each of ``n_experts`` experts."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=n_experts) if labels.size and labels.min() >= 0 else None
    if (labels.ndim != 1 or labels.size != n_experts * expert_size or counts is None or len(counts) != n_experts
            or not (counts == expert_size).all()):
        raise FFNLibError(f"Not a partition into {n_experts} experts of {expert_size} memories (sizes "
                          f"{None if counts is None else sorted(set(counts.tolist()))}).")
    return labels.astype(np.int64)


def random_split(d_ff: int, expert_size: int, seed: int = 0) -> np.ndarray:
    """A seeded random permutation of the memories cut into equal experts."""
    n_experts = check_expert_size(d_ff, expert_size)
    labels = np.empty(d_ff, dtype=np.int64)
    labels[np.random.default_rng(seed).permutation(d_ff)] = np.arange(d_ff) // expert_size
    return check_partition(labels, n_experts, expert_size)


RANDOM_SEED_STEP = 104_729  # a prime: draw d of layer l uses seed + 7919·l + 104729·d, distinct for every (l, d)


def random_split_names(n: int) -> list[str]:
    """The names of ``n`` draws of the random split: ``random`` (draw 0), ``random.1``, ..., ``random.<n-1>``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ParameterError(f"random_splits must be a positive int (seeded random splits to draw), got {n!r}.")
    return ["random"] + [f"random.{d}" for d in range(1, int(n))]


def split_draw(name: str) -> int:
    """The draw of a random split's name (``random``: 0, ``random.3``: 3); 0 for the other splits."""
    head, _, tail = str(name).partition(".")
    return int(tail) if head == "random" and tail.isdigit() and int(tail) > 0 and tail == str(int(tail)) else 0


def split_kind(name: str) -> str:
    """``random`` for every draw of the random split, else the name itself."""
    return "random" if name == "random" or split_draw(name) > 0 else name


def random_split_seed(seed: int, layer: int, draw: int = 0) -> int:
    """The seed of draw ``draw`` of the random split of ``layer`` (draw 0: the seed the project always used)."""
    return int(seed) + 7919 * int(layer) + RANDOM_SEED_STEP * int(draw)


def balanced_assignment(points: np.ndarray, centroids: np.ndarray, size: int) -> np.ndarray:
    """The exact minimum total squared distance assignment of points to centroids, ``size`` points each."""
    from scipy.optimize import linear_sum_assignment

    dist = ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(-1) if points.shape[0] * centroids.shape[0] \
        * points.shape[1] < 2**26 else _sq_dist(points, centroids)
    rows, cols = linear_sum_assignment(np.repeat(dist, size, axis=1))
    labels = np.empty(points.shape[0], dtype=np.int64)
    labels[rows] = cols // size
    return labels


def _sq_dist(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.maximum((points**2).sum(1)[:, None] - 2 * points @ centroids.T + (centroids**2).sum(1)[None, :], 0)


def balanced_kmeans(features: np.ndarray, n_experts: int, seed: int = 0, max_iter: int = 10) -> np.ndarray:
    """Balanced k-means: scikit-learn's KMeans (k-means++, seeded) for the start, then Lloyd steps whose
    assignment is :func:`balanced_assignment` (equal sizes), until it stops changing or ``max_iter`` steps."""
    from sklearn.cluster import KMeans

    features = np.ascontiguousarray(features, dtype=np.float64)
    n = features.shape[0]
    if n % n_experts:
        raise ParameterError(f"{n} rows cannot be cut into {n_experts} equal experts.")
    size = n // n_experts
    centroids = KMeans(n_clusters=n_experts, n_init=1, random_state=seed).fit(features).cluster_centers_
    labels = balanced_assignment(features, centroids, size)
    for _ in range(max(0, int(max_iter) - 1)):
        centroids = np.stack([features[labels == e].mean(0) for e in range(n_experts)])
        new = balanced_assignment(features, centroids, size)
        if np.array_equal(new, labels):
            break
        labels = new
    return check_partition(labels, n_experts, size)


def coactivation_graph(counts: np.ndarray):
    """The authors' graph (``adj.py``) from co-activation counts (d_ff, d_ff): the unit is the first
    non-zero percentile among 10, 20, ..., 100 (times 0.99); an edge i != j is kept when its count is at
    least one unit, with weight ``floor(count / unit)``. Returns a scipy CSR matrix of integer weights."""
    import scipy.sparse as sp

    counts = np.asarray(counts, dtype=np.float64)
    unit = 0.0
    for pos in range(10, 101, 10):
        unit = float(np.percentile(counts, pos))
        if unit > 0:
            break
    if unit <= 0:
        raise ParameterError("The co-activation counts are all zero: give more training sentences.")
    weights = np.floor(counts / (unit * 0.99))
    np.fill_diagonal(weights, 0)
    graph = sp.csr_matrix(weights.astype(np.int64))
    if graph.nnz == 0:
        raise ParameterError("The co-activation graph has no edge: give more training sentences.")
    return graph


def equalise(labels: np.ndarray, n_experts: int, seed: int = 0) -> np.ndarray:
    """Make parts equal as the authors' ``trans_gp.py``: each oversized part keeps a random ``size`` of its
    members; the others, shuffled, fill the undersized parts in order."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64).copy()
    size = len(labels) // n_experts
    members = {e: list(np.flatnonzero(labels == e)) for e in range(n_experts)}
    moving = []
    for e in range(n_experts):
        if len(members[e]) > size:
            order = rng.permutation(len(members[e]))
            kept = [members[e][i] for i in order]
            moving += kept[size:]
            members[e] = kept[:size]
    moving = [moving[i] for i in rng.permutation(len(moving))]
    for e in range(n_experts):
        need = size - len(members[e])
        if need > 0:
            members[e] += moving[:need]
            moving = moving[need:]
    for e, rows in members.items():
        labels[np.asarray(rows, dtype=np.int64)] = e
    return check_partition(labels, n_experts, size)


def metis_split(counts: np.ndarray, n_experts: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Partition the co-activation graph of ``counts`` with METIS, then :func:`equalise`. Returns the labels
    and what happened (edges, METIS's edge cut, how many memories were moved to equalise)."""
    try:
        import pymetis
    except ImportError as exc:  # pragma: no cover - pinned dependency
        raise FFNLibError("The co-activation split needs pymetis (pip install pymetis==2025.2.2), a wheel with "
                          "METIS inside; choose splits=('random', 'kmeans') to go without it.") from exc
    graph = coactivation_graph(counts)
    options = pymetis.Options(seed=int(seed))
    cut, parts = pymetis.part_graph(int(n_experts), adjacency=pymetis.CSRAdjacency(graph.indptr, graph.indices),
                                    eweights=graph.data.astype(np.int64), options=options)
    parts = np.asarray(parts, dtype=np.int64)
    size = len(parts) // n_experts
    moved = int(np.maximum(np.bincount(parts, minlength=n_experts) - size, 0).sum())
    return equalise(parts, n_experts, seed), {"edges": int(graph.nnz // 2), "edge_cut": int(cut), "moved": moved}


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


def _labels_frame(split: str, layer: int, labels: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"split": split, "layer": np.int16(layer), "memory": np.arange(len(labels), dtype=np.int32),
                         "expert": labels.astype(np.int32)})


def _base_request(loaded, layers, kind: str) -> dict:
    return {"analysis": f"moefication_{kind}", "version": _VERSION, "model": loaded.name,
            "file_hash": loaded.file_hash, "layers": list(layers)}


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message)


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
        _check_choice("split", split, SPLITS)
    _check_choice("cluster_rows", cluster_rows, CLUSTER_ROWS)
    active_share = check_share(active_share, "active_share")
    request = {**_base_request(loaded, layers, "splits"), "expert_size": int(expert_size), "splits": list(splits),
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
            _say(f"Reusing the cached expert splits {folder / name}.parquet (same model, layers, sizes and "
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
        _say(f"Resuming the expert splits: {len(parts)} of {len(parts) + len(todo)} (split, layer) parts were "
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
        frame = _labels_frame(split, layer, labels)
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


# =====================================================================================================
# Passes over sentences
# =====================================================================================================
class _Stop(Exception):
    """Raised after the last layer needed: the rest of the model is skipped."""


def _stop(module, args, output):
    raise _Stop


def _pad_id(loaded) -> int:
    return loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0


def _batches(loaded, table: pd.DataFrame, batch_tokens: int, max_padding: float = 0.15):
    """(rows, ids (rows, T) right-padded, lengths) per batch, longest first (``keys.plan_batches``)."""
    lengths = np.array([len(t) for t in table["token_ids"]], dtype=np.int64)
    pad = _pad_id(loaded)
    for rows in plan_batches(lengths, batch_tokens, max_padding):
        width = int(lengths[rows].max())
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : lengths[r]] = torch.as_tensor(table["token_ids"].iloc[r], dtype=torch.long)
        yield rows, ids.to(loaded.device), lengths[rows]


def _real(lengths: np.ndarray, width: int, n_bos: int, device) -> torch.Tensor:
    """(rows, width) True at real tokens after the BOS tokens (BOS activations are outliers: left out)."""
    steps = torch.arange(width, device=device)[None, :]
    return (steps < torch.as_tensor(lengths, device=device)[:, None]) & (steps >= n_bos)


def _forward(loaded, ids: torch.Tensor, last_layer: int | None = None) -> None:
    """Right-padded ids need no attention mask: with causal attention, real tokens never see the padding."""
    handle = None if last_layer is None else loaded.adapter.layer(last_layer).register_forward_hook(_stop)
    try:
        loaded.model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        if handle is not None:
            handle.remove()


def _captured(loaded, table: pd.DataFrame, layers: list[int], what, batch_tokens: int, desc: str, progress: bool):
    """Run ``table`` through the model, capturing ``what`` at ``layers``; yields (rows, real mask, acts)."""
    total = int(sum(len(t) for t in table["token_ids"]))
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not progress)
    try:
        with torch.inference_mode():
            for rows, ids, lengths in _batches(loaded, table, batch_tokens):
                with capture(loaded, layers, what=what) as acts:
                    _forward(loaded, ids, max(layers))
                yield rows, _real(lengths, ids.shape[1], len(loaded.bos), ids.device), acts
                bar.update(int(lengths.sum()))
    finally:
        bar.close()


def memory_sizes(m: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|m_i|·||v_i||`` (the size of what each memory writes), float32."""
    return m.float().abs() * norms


def top_share_mask(sizes: torch.Tensor, share: float) -> torch.Tensor:
    """Per row, True at the ``share`` of entries with the largest sizes (ties: by index)."""
    k = max(1, int(round(share * sizes.shape[-1])))
    top = sizes.topk(k, dim=-1).indices
    return torch.zeros_like(sizes, dtype=torch.bool).scatter_(-1, top, True)


def coactivation_counts(loaded, table: pd.DataFrame, layers: list[int], active_share: float = 0.1,
                        batch_tokens: int = 1024, progress: bool = True) -> dict[int, torch.Tensor]:
    """Per layer, (d_ff, d_ff) counts of training tokens where two memories are both active (in the token's
    top ``active_share`` by ``|m_i|·||v_i||``)."""
    adapter = loaded.adapter
    norms = {layer: adapter.written_value_norms(layer) for layer in layers}
    counts = {layer: torch.zeros(adapter.d_ff, adapter.d_ff) for layer in layers}
    for _, real, acts in _captured(loaded, table, layers, ("coefficients",), batch_tokens,
                                   "Co-activation graph", progress):
        flat = real.reshape(-1)
        for layer in layers:
            m = acts.coefficients[layer].reshape(-1, adapter.d_ff)[flat]
            active = top_share_mask(memory_sizes(m, norms[layer]), active_share).float()
            counts[layer] += active.T @ active
    return counts


# =====================================================================================================
# CATS and TEAL thresholds
# =====================================================================================================
class _Sampler:
    """A seeded uniform sample of at most ``budget`` values out of ``total`` offered in chunks."""

    def __init__(self, budget: int, total: int, generator: torch.Generator):
        self.rate = min(1.0, budget / max(total, 1))
        self.generator = generator
        self.parts: list[torch.Tensor] = []

    def offer(self, values: torch.Tensor) -> None:
        values = values.reshape(-1).float()
        if self.rate < 1.0:
            keep = torch.rand(values.numel(), generator=self.generator) < self.rate
            values = values[keep.to(values.device)]
        self.parts.append(values.cpu())

    def quantiles(self, qs: Sequence[float]) -> np.ndarray:
        values = torch.cat(self.parts).numpy()
        return np.quantile(values, qs) if values.size else np.full(len(qs), np.nan)


THRESHOLD_WHAT = {"cats": ("gate_activation",), "teal": ("input", "coefficient")}


def calibrate_thresholds(loaded, sentences: pd.DataFrame, layers, keeps: Sequence[float], sample: int = 1 << 20,
                         seed: int = 0, batch_tokens: int = 1024, out_dir=None, progress: bool = True) -> pd.DataFrame:
    """Per layer and share kept, the magnitude thresholds of CATS and TEAL, calibrated on ``sentences``.

    Columns: method (cats/teal), what (gate_activation, input, coefficient), layer, keep, threshold: keep an
    entry when its magnitude is >= threshold, so that a share ``keep`` of the calibration entries is kept.
    ``gate_activation`` is ``|act(gate_i·x)|`` (for a plain FFN, ``|m_i|``), ``input`` is ``|x_j|``, and
    ``coefficient`` is ``|m_i|``. Each quantile is taken over a seeded sample of at most ``sample`` entries.
    """
    adapter = loaded.adapter
    layers = adapter.check_layers(layers)
    keeps = sorted({check_share(k, "keep") for k in keeps})
    table = prepare_sentences(loaded, sentences)
    request = {**_base_request(loaded, layers, "thresholds"), "keeps": keeps, "sample": int(sample), "seed": int(seed),
               "corpus": corpus_fingerprint(table), "sentences": len(table)}
    name = f"moe-thresholds-{fingerprint(request)}"
    if out_dir is not None:
        cached = load_result(out_dir, name, request)
        if cached is not None:
            _say(f"Reusing the cached CATS/TEAL thresholds {Path(out_dir) / name}.parquet.", progress)
            return cached
    tokens = int(sum(len(t) - len(loaded.bos) for t in table["token_ids"]))
    gen = torch.Generator().manual_seed(seed)
    widths = {"gate_activation": adapter.d_ff, "input": adapter.d_model, "coefficient": adapter.d_ff}
    samplers = {(what, layer): _Sampler(sample, tokens * widths[what], gen) for what in widths for layer in layers}
    acts_fn = {layer: adapter.activation(layer) for layer in layers}
    for _, real, acts in _captured(loaded, table, layers, ("coefficients", "ffn_input"), batch_tokens,
                                   "Calibrating CATS and TEAL", progress):
        flat = real.reshape(-1)
        for layer in layers:
            x = acts.ffn_input[layer].reshape(-1, adapter.d_model)[flat]
            m = acts.coefficients[layer].reshape(-1, adapter.d_ff)[flat]
            gate_act = acts_fn[layer](adapter.gate(layer)(x)) if adapter.gated else m
            samplers[("gate_activation", layer)].offer(gate_act.abs())
            samplers[("input", layer)].offer(x.abs())
            samplers[("coefficient", layer)].offer(m.abs())
    rows = []
    for (what, layer), sampler in samplers.items():
        qs = sampler.quantiles([1.0 - k for k in keeps])
        method = "cats" if what == "gate_activation" else "teal"
        for keep, q in zip(keeps, qs):
            rows.append({"method": method, "what": what, "layer": layer, "keep": keep,
                         "threshold": 0.0 if keep >= 1.0 else float(q)})
    frame = pd.DataFrame(rows).sort_values(["method", "what", "layer", "keep"]).reset_index(drop=True)
    if out_dir is not None:
        save_result(out_dir, name, frame, request)
    return frame


# =====================================================================================================
# Routers
# =====================================================================================================
@torch.no_grad()
def centroid_keys(adapter: Adapter, layer: int, labels: np.ndarray, n_experts: int,
                  cluster_rows: str = "gate") -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's centroid key, as the authors: the mean of its normalised rows.

    Returns ``(w, c2)``: ``w`` (E, d_model) is the centroid's dot product with an input as a linear map
    (for ``"both"`` the input is duplicated, so the gate and up halves add up, over sqrt 2), and ``c2``
    (E,) the centroid's squared norm, so that ``-||x̂ - c||² = 2·x̂·w - c2 - 1`` for a unit input x̂.
    """
    features = torch.as_tensor(key_features(adapter, layer, cluster_rows))
    centres = membership(labels, n_experts).T @ features / (len(labels) // n_experts)
    c2 = (centres**2).sum(-1)
    d = adapter.d_model
    w = centres if centres.shape[1] == d else (centres[:, :d] + centres[:, d:]) / math.sqrt(2)
    return w.contiguous(), c2


class MLPRouter(nn.Module):
    """The authors' router: ``Linear(d, E, no bias) -> Tanh -> Linear(E, E, no bias)``."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        self.first = nn.Linear(d_model, n_experts, bias=False)
        self.second = nn.Linear(n_experts, n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def _captured_mass(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Mean over tokens of the share of the expert sizes in the ``k`` experts with the top ``scores``."""
    chosen = targets.gather(1, scores.topk(k, dim=-1).indices).sum(-1)
    total = targets.sum(-1)
    ok = total > 0
    return float((chosen[ok] / total[ok]).mean()) if ok.any() else float("nan")


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block. A router's products are tiny: on a shared 2-core machine two
    threads made training 15-30 times slower (each small operation waits for the other thread), and one thread
    makes the result independent of the machine's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_router(inputs: torch.Tensor, targets: torch.Tensor, w_init: torch.Tensor, epochs: int = 30,
                 seed: int = 0, batch: int = 512, lr: float = 0.01, val_share: float = 0.2) -> dict:
    """Train one :class:`MLPRouter` as the authors (see the module docstring) on normalised inputs (N, d) and
    expert sizes (N, E), on one thread. Returns its weights, the best epoch, and the held-out mass kept at
    ``val_share`` of the experts by the router and by the ground truth (the upper bound)."""
    with _one_thread():
        return _train_router(inputs, targets, w_init, epochs, seed, batch, lr, val_share)


def _train_router(inputs, targets, w_init, epochs, seed, batch, lr, val_share) -> dict:
    n, d = inputs.shape
    n_experts = targets.shape[1]
    if n < 20:
        raise ParameterError(f"Only {n} tokens to train a router on: give more router sentences.")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    n_train = n // 10 * 9
    train, val = order[:n_train], order[n_train:]
    router = MLPRouter(d, n_experts)
    with torch.no_grad():
        router.first.weight.copy_(w_init)
        router.second.weight.copy_(torch.eye(n_experts))
    optim = torch.optim.Adam(router.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    k = max(1, int(n_experts * val_share))
    x_val, t_val = inputs[val].float(), targets[val]
    best = {"val_mass": -1.0, "epoch": -1, "state": None}
    for epoch in range(int(epochs)):
        router.train()
        shuffled = train[torch.randperm(n_train, generator=gen)]
        for start in range(0, n_train, batch):
            idx = shuffled[start: start + batch]
            target = targets[idx]
            target = target / target.max().clamp_min(1e-30)
            optim.zero_grad()
            loss = loss_fn(router(inputs[idx].float()).reshape(-1), target.reshape(-1))
            loss.backward()
            optim.step()
        router.eval()
        with torch.no_grad():
            mass = _captured_mass(router(x_val), t_val, k)
        if mass > best["val_mass"]:
            best = {"val_mass": mass, "epoch": epoch,
                    "state": {k_: v.detach().clone() for k_, v in router.state_dict().items()}}
    with torch.no_grad():
        upper = _captured_mass(t_val, t_val, k)
    return {"first": best["state"]["first.weight"], "second": best["state"]["second.weight"],
            "epoch": best["epoch"], "val_mass": best["val_mass"], "val_mass_ground_truth": upper,
            "train_tokens": n_train, "val_tokens": n - n_train}


@dataclass
class Routers:
    """Trained MLP routers: ``frame`` has split, layer, first (E·d floats), second (E·E floats), epoch,
    val_mass, val_mass_ground_truth, train_tokens, val_tokens."""

    frame: pd.DataFrame
    manifest: dict

    def router(self, split: str, layer: int) -> MLPRouter:
        rows = self.frame[(self.frame["split"] == split) & (self.frame["layer"] == layer)]
        if rows.empty:
            raise ParameterError(f"No trained router for split {split!r}, layer {layer}.")
        row = rows.iloc[0]
        n_experts = int(round(math.sqrt(len(row["second"]))))
        d = len(row["first"]) // n_experts
        router = MLPRouter(d, n_experts)
        with torch.no_grad():
            router.first.weight.copy_(torch.as_tensor(np.asarray(row["first"], dtype=np.float32)).view(n_experts, d))
            router.second.weight.copy_(torch.as_tensor(np.asarray(row["second"], dtype=np.float32))
                                       .view(n_experts, n_experts))
        return router.eval().requires_grad_(False)


def router_data(loaded, table: pd.DataFrame, splits: ExpertSplits, batch_tokens: int = 1024,
                progress: bool = True) -> dict[int, dict]:
    """Per layer: the normalised FFN inputs (float16, N x d) of the real tokens of ``table`` and, per split,
    their expert sizes ``Σ_i |m_i|·||v_i||`` (float32, N x E)."""
    adapter = loaded.adapter
    layers = splits.layers
    norms = {layer: adapter.written_value_norms(layer) for layer in layers}
    members = {(s, layer): membership(splits.labels(s, layer), splits.n_experts) for s in splits.splits
               for layer in layers}
    data = {layer: {"x": [], **{s: [] for s in splits.splits}} for layer in layers}
    for _, real, acts in _captured(loaded, table, layers, ("coefficients", "ffn_input"), batch_tokens,
                                   "Router training data", progress):
        flat = real.reshape(-1)
        for layer in layers:
            x = acts.ffn_input[layer].reshape(-1, adapter.d_model)[flat].float()
            sizes = memory_sizes(acts.coefficients[layer].reshape(-1, adapter.d_ff)[flat], norms[layer])
            data[layer]["x"].append(F.normalize(x, dim=-1).half().cpu())
            for s in splits.splits:
                data[layer][s].append((sizes @ members[(s, layer)]).cpu())
    return {layer: {key: torch.cat(parts) for key, parts in d.items()} for layer, d in data.items()}


def train_routers(loaded, sentences: pd.DataFrame, splits: ExpertSplits, epochs: int = 30, seed: int = 0,
                  cluster_rows: str | None = None, batch_tokens: int = 1024, out_dir=None,
                  progress: bool = True) -> Routers:
    """Train one MLP router per split and layer on the tokens of ``sentences`` (training split).

    Each router is seeded on its own (seed, split, layer), so a resumed run gives the same routers. With
    ``out_dir`` each split's routers are checkpointed and the result is cached by its manifest.
    """
    adapter = loaded.adapter
    cluster_rows = cluster_rows or splits.manifest.get("cluster_rows", "gate")
    if cluster_rows == "keys":
        cluster_rows = "gate"
    table = prepare_sentences(loaded, sentences)
    request = {**_base_request(loaded, splits.layers, "routers"), "splits": fingerprint(splits.manifest),
               "split_names": splits.splits, "epochs": int(epochs), "seed": int(seed), "cluster_rows": cluster_rows,
               "corpus": corpus_fingerprint(table), "sentences": len(table), "lr": 0.01, "batch": 512}
    name = f"moe-routers-{fingerprint(request)}"
    partial = None
    if out_dir is not None:
        cached = load_result(out_dir, name, request)
        if cached is not None:
            _say(f"Reusing the cached MLP routers {Path(out_dir) / name}.parquet.", progress)
            return Routers(cached, request)
        partial = Path(out_dir) / f"{name}.partial"
    parts, todo = {}, []
    for split in splits.splits:
        found = None if partial is None else load_result(partial, split, {**request, "split": split})
        if found is None:
            todo.append(split)
        else:
            parts[split] = found
    if parts and todo:
        _say(f"Resuming the routers: {len(parts)} of {len(splits.splits)} splits read from {partial}.", progress)
    if todo:
        data = router_data(loaded, table, splits, batch_tokens, progress)
        bar = tqdm(total=len(todo) * len(splits.layers), desc="Training MLP routers", unit="router",
                   disable=not progress)
        for split in todo:
            rows = []
            for layer in splits.layers:
                w, _ = centroid_keys(adapter, layer, splits.labels(split, layer), splits.n_experts, cluster_rows)
                out = train_router(data[layer]["x"], data[layer][split], w, epochs,
                                   seed=seed * 1_000_003 + 7919 * layer + SPLITS.index(split_kind(split))
                                   + RANDOM_SEED_STEP * split_draw(split))
                rows.append({"split": split, "layer": layer,
                             "first": out["first"].reshape(-1).numpy().astype(np.float32),
                             "second": out["second"].reshape(-1).numpy().astype(np.float32),
                             **{k: out[k] for k in ("epoch", "val_mass", "val_mass_ground_truth", "train_tokens",
                                                    "val_tokens")}})
                bar.update(1)
            parts[split] = pd.DataFrame(rows)
            if partial is not None:
                save_result(partial, split, parts[split], {**request, "split": split})
        bar.close()
    frame = pd.concat([parts[s] for s in splits.splits], ignore_index=True)
    if out_dir is not None:
        save_result(out_dir, name, frame, request)
        shutil.rmtree(partial, ignore_errors=True)
    return Routers(frame, request)


# =====================================================================================================
# Applying a configuration: hooks that sparsify the FFNs
# =====================================================================================================
@dataclass(frozen=True)
class Config:
    """One sparsified model: ``method`` dense / experts (a split and a router) / cats / teal, and ``share``:
    the share of experts kept (experts), of memories kept (cats), of entries kept (teal). ``split`` may name
    a draw of the random split (``random.2``)."""

    method: str
    split: str = ""
    router: str = ""
    share: float = 1.0

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        check_share(self.share)
        if self.method == "experts":
            _check_choice("split", split_kind(self.split), SPLITS)
            _check_choice("router", self.router, ROUTERS)

    @property
    def name(self) -> str:
        if self.method == "dense":
            return "dense"
        parts = [self.method] + ([self.split, self.router] if self.method == "experts" else [])
        return "-".join(parts + [f"{self.share:.4f}".rstrip("0").rstrip(".")])

    def as_dict(self) -> dict:
        return {"config": self.name, "method": self.method, "split": self.split, "router": self.router,
                "share": self.share}


def default_configs(shares: Sequence[float], splits: Sequence[str] = SPLITS,
                    routers: Sequence[str] = ("ground_truth", "similarity", "mlp")) -> list[Config]:
    """Dense; every split x router; random experts of the random split (the control); CATS; TEAL. ``splits``
    may list the random split's draws (``ExpertSplits.splits``): each draw gets every router."""
    shares = [check_share(s) for s in shares if s < 1.0]
    out = [Config("dense")]
    out += [Config("experts", s, r, share) for s in splits for r in routers for share in shares]
    out += [Config("experts", s, "random", share) for s in splits if split_kind(s) == "random" for share in shares]
    out += [Config("cats", share=share) for share in shares]
    out += [Config("teal", share=share) for share in shares]
    return out


class _Rule(ABC):
    """How one method sparsifies a layer: which FFN inputs it keeps (``inputs``; None: all) and which memories
    (``mask`` of the coefficients ``m``, given the input ``x`` and, where ``needs_gate``, the gate's output ``z``)."""

    needs_gate = False

    def inputs(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    @abstractmethod
    def mask(self, x: torch.Tensor, m: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor | None:
        """True at the memories kept (None: all)."""


class _ExpertRule(_Rule):
    def __init__(self, labels: np.ndarray, n_experts: int, k: int, router: str, norms: torch.Tensor,
                 w: torch.Tensor | None = None, c2: torch.Tensor | None = None, mlp: MLPRouter | None = None,
                 generator: torch.Generator | None = None):
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.members = membership(labels, n_experts)
        self.n_experts, self.k, self.router, self.norms = n_experts, k, router, norms
        self.w, self.c2, self.mlp, self.generator = w, c2, mlp, generator

    def scores(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if self.router == "ground_truth":
            return memory_sizes(m, self.norms.to(m.device)) @ self.members.to(m.device)
        if self.router == "random":
            return torch.rand(m.shape[0], self.n_experts, generator=self.generator).to(m.device)
        xn = F.normalize(x.float(), dim=-1)
        if self.router == "similarity":
            return 2 * xn @ self.w.to(xn.device).T - self.c2.to(xn.device)
        return self.mlp.to(xn.device)(xn)

    def mask(self, x, m, z):
        top = self.scores(x, m).topk(self.k, dim=-1).indices
        chosen = torch.zeros(m.shape[0], self.n_experts, dtype=torch.bool, device=m.device).scatter_(1, top, True)
        return chosen[:, self.labels.to(m.device)]


class _CatsRule(_Rule):
    def __init__(self, threshold: float, act: Callable | None):
        self.threshold, self.act = threshold, act
        self.needs_gate = act is not None

    def mask(self, x, m, z):
        gate_act = self.act(z) if self.act is not None else m
        return gate_act.abs() >= self.threshold


class _TealRule(_Rule):
    def __init__(self, threshold_input: float, threshold_coefficient: float):
        self.threshold_input, self.threshold_coefficient = threshold_input, threshold_coefficient

    def inputs(self, x):
        return x * (x.abs() >= self.threshold_input)

    def mask(self, x, m, z):
        return m.abs() >= self.threshold_coefficient


class Record:
    """Per-layer sums over the real tokens of a sparsified run: memories kept, inputs kept, size kept."""

    def __init__(self, norms: dict[int, torch.Tensor]):
        self.norms = norms
        self.real: torch.Tensor | None = None  # flattened (rows·tokens,) bool, set before each forward
        self.sums: dict[int, np.ndarray] = {}  # layer -> [tokens, kept_memories, kept_inputs, size_kept]

    def _flat_real(self, n: int, device) -> torch.Tensor:
        if self.real is None or self.real.numel() != n:
            return torch.ones(n, dtype=torch.bool, device=device)
        return self.real.to(device)

    def add(self, layer: int, x: torch.Tensor, x_new: torch.Tensor | None, m: torch.Tensor,
            mask: torch.Tensor | None) -> None:
        real = self._flat_real(m.shape[0], m.device)
        sizes = memory_sizes(m[real], self.norms[layer].to(m.device))
        kept = mask[real].float() if mask is not None else torch.ones_like(sizes)
        total = sizes.sum(-1)
        share = torch.where(total > 0, (sizes * kept).sum(-1) / total.clamp_min(1e-30), torch.ones_like(total))
        inputs = (x_new[real] != 0).float().mean(-1).sum() if x_new is not None else real.sum()
        add = np.array([int(real.sum()), float(kept.mean(-1).sum()), float(inputs), float(share.sum())])
        self.sums[layer] = self.sums.get(layer, np.zeros(4)) + add

    def frame(self) -> pd.DataFrame:
        rows = [{"layer": layer, "tokens": int(s[0]), "kept_memories": s[1] / max(s[0], 1),
                 "kept_inputs": s[2] / max(s[0], 1), "size_kept": s[3] / max(s[0], 1)}
                for layer, s in sorted(self.sums.items())]
        return pd.DataFrame(rows, columns=["layer", "tokens", "kept_memories", "kept_inputs", "size_kept"])


@contextmanager
def sparsify(adapter: Adapter, rules: dict[int, _Rule], record: Record | None = None) -> Iterator[None]:
    """Apply ``rules`` (layer -> rule) to the FFNs inside every forward pass; hooks removed on exit."""
    inputs: dict[int, torch.Tensor] = {}
    sparse_inputs: dict[int, torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    handles = []

    def input_hook(layer: int, rule: _Rule):
        def hook(module, args):
            x = args[0]
            inputs[layer] = x
            new = rule.inputs(x)
            if new is None:
                return None
            sparse_inputs[layer] = new
            return (new, *args[1:])
        return hook

    def gate_hook(layer: int):
        def hook(module, args, output):
            gates[layer] = output
        return hook

    def down_hook(layer: int, rule: _Rule):
        def hook(module, args):
            m = args[0]
            flat = m.reshape(-1, m.shape[-1])
            x = inputs.pop(layer)
            x = x.reshape(flat.shape[0], -1)
            z = gates.pop(layer, None)
            z = None if z is None else z.reshape(flat.shape)
            x_new = sparse_inputs.pop(layer, None)
            mask = rule.mask(x, flat, z)
            if record is not None:
                record.add(layer, x, None if x_new is None else x_new.reshape(flat.shape[0], -1), flat, mask)
            if mask is None:
                return None
            return ((flat * mask).reshape(m.shape), *args[1:])
        return hook

    try:
        for layer, rule in rules.items():
            handles.append(adapter.up(layer).register_forward_pre_hook(input_hook(layer, rule)))
            if adapter.gated:
                handles.append(adapter.gate(layer).register_forward_pre_hook(input_hook(layer, rule)))
                if rule.needs_gate:
                    handles.append(adapter.gate(layer).register_forward_hook(gate_hook(layer)))
            handles.append(adapter.down(layer).register_forward_pre_hook(down_hook(layer, rule)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Plan:
    """Everything needed to sparsify the model by a :class:`Config`: splits, routers, thresholds."""

    loaded: object
    splits: ExpertSplits
    routers: Routers | None = None
    thresholds: pd.DataFrame | None = None
    seed: int = 0
    cluster_rows: str = "gate"

    @property
    def layers(self) -> list[int]:
        return self.splits.layers

    def norms(self) -> dict[int, torch.Tensor]:
        return {layer: self.loaded.adapter.written_value_norms(layer) for layer in self.layers}

    def _threshold(self, method: str, what: str, layer: int, keep: float) -> float:
        if self.thresholds is None:
            raise ParameterError(f"{method} needs calibrated thresholds: pass thresholds=calibrate_thresholds(...).")
        t = self.thresholds
        rows = t[(t["method"] == method) & (t["what"] == what) & (t["layer"] == layer) & np.isclose(t["keep"], keep)]
        if rows.empty:
            raise ParameterError(f"No {method} threshold for layer {layer} at keep={keep}: calibrated keeps are "
                                 f"{sorted(t['keep'].unique().tolist())}.")
        return float(rows["threshold"].iloc[0])

    def rules(self, config: Config) -> dict[int, _Rule]:
        adapter = self.loaded.adapter
        if config.method == "dense":
            return {}
        rules: dict[int, _Rule] = {}
        for layer in self.layers:
            if config.method == "cats":
                rules[layer] = _CatsRule(self._threshold("cats", "gate_activation", layer, config.share),
                                         adapter.activation(layer) if adapter.gated else None)
            elif config.method == "teal":
                rules[layer] = _TealRule(self._threshold("teal", "input", layer, config.share),
                                         self._threshold("teal", "coefficient", layer, config.share))
            else:
                labels = self.splits.labels(config.split, layer)
                n_experts = self.splits.n_experts
                k = experts_kept(config.share, n_experts)
                w = c2 = mlp = gen = None
                if config.router == "similarity":
                    w, c2 = centroid_keys(adapter, layer, labels, n_experts, self.cluster_rows)
                elif config.router == "mlp":
                    if self.routers is None:
                        raise ParameterError("The mlp router needs trained routers: pass routers=train_routers(...).")
                    mlp = self.routers.router(config.split, layer)
                elif config.router == "random":
                    gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * layer + 17
                                                        + RANDOM_SEED_STEP * split_draw(config.split))
                rules[layer] = _ExpertRule(labels, n_experts, k, config.router, adapter.written_value_norms(layer),
                                           w, c2, mlp, gen)
        return rules

    def split_seeds(self, config: Config) -> list[int] | None:
        """Per layer, the seed of a random split's draw (None for the other configurations): part of the
        evaluation cache's key."""
        if config.method != "experts" or split_kind(config.split) != "random":
            return None
        seed = int(self.splits.manifest.get("seed", 0))
        return [random_split_seed(seed, layer, split_draw(config.split)) for layer in self.layers]

    @contextmanager
    def applied(self, config: Config, record: Record | None = None) -> Iterator[None]:
        """Run the model sparsified by ``config`` inside the block (hooks removed on exit)."""
        with sparsify(self.loaded.adapter, self.rules(config), record):
            yield

    def ffn_share(self, config: Config, kept_memories: float, kept_inputs: float) -> float:
        """The share of the FFN's weights a configuration reads per token (routers' own cost left out)."""
        gated = self.loaded.adapter.gated
        n = 3 if gated else 2
        if config.method == "dense":
            return 1.0
        if config.method == "experts":
            return experts_kept(config.share, self.splits.n_experts) / self.splits.n_experts
        if config.method == "cats":  # the whole gate (or, plain, the whole key matrix) is computed
            return (1 + (n - 1) * kept_memories) / n
        return ((n - 1) * kept_inputs + kept_memories) / n  # teal


# =====================================================================================================
# Evaluation
# =====================================================================================================
@dataclass
class Evaluation:
    """Per configuration and held-out sentence: tokens predicted, summed negative log-likelihood, top-1
    agreements with the dense model (``sentences``); per configuration and layer: the Record's shares
    (``layers``); from the dense pass, per sentence and layer, the |m|·||v|| mass in the top k% of
    memories (``sparsity``)."""

    sentences: pd.DataFrame
    layers: pd.DataFrame
    sparsity: pd.DataFrame
    manifest: dict
    configs: list[Config] = field(default_factory=list)


_MAX_LOGIT_ELEMENTS = 1 << 24


@torch.no_grad()
def _predictions(adapter: Adapter, residual: torch.Tensor, ids: torch.Tensor, lengths: np.ndarray):
    """Per row: (nll of each next token, top-1 at each position), positions 0..length-2."""
    rows_idx, pos_idx = [], []
    for r, n in enumerate(lengths):
        rows_idx += [r] * (int(n) - 1)
        pos_idx += list(range(int(n) - 1))
    rows_t, pos_t = torch.tensor(rows_idx, dtype=torch.long), torch.tensor(pos_idx, dtype=torch.long)
    hidden = residual[rows_t, pos_t]
    targets = ids[rows_t, pos_t + 1]
    chunk = max(1, _MAX_LOGIT_ELEMENTS // int(adapter.head.weight.shape[0]))
    nll, top = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = adapter.logits_from_residual(hidden[start: start + chunk]).float()
        top.append(logits.argmax(-1))
        nll.append(torch.logsumexp(logits, -1) - logits.gather(1, targets[start: start + chunk, None])[:, 0])
    nll = torch.cat(nll).cpu().numpy() if nll else np.zeros(0)
    top = torch.cat(top).cpu().numpy() if top else np.zeros(0, dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(np.maximum(lengths - 1, 0))])
    return [(nll[a:b], top[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _sparsity_rows(acts, real: torch.Tensor, norms: dict[int, torch.Tensor], sentence_ids: np.ndarray,
                   tops: Sequence[float], concentrated: tuple[float, float]) -> list[dict]:
    rows = []
    for layer, m in acts.coefficients.items():
        sizes = memory_sizes(m, norms[layer])  # (rows, T, d_ff)
        d_ff = sizes.shape[-1]
        ordered = sizes.sort(dim=-1, descending=True).values.cumsum(-1)
        total = ordered[..., -1:].clamp_min(1e-30)
        picks = torch.tensor([max(1, int(round(t * d_ff))) - 1 for t in tops])
        shares = ordered[..., picks] / total  # (rows, T, len(tops))
        top_c = max(1, int(round(concentrated[0] * d_ff))) - 1
        conc = (ordered[..., top_c] / total[..., 0] >= concentrated[1]).float()
        for r, sid in enumerate(sentence_ids):
            keep = real[r]
            n = int(keep.sum())
            if n == 0:
                continue
            row = {"sentence_id": int(sid), "layer": int(layer), "tokens": n,
                   "concentrated": float(conc[r][keep].sum())}
            sums = shares[r][keep].sum(0)
            row.update({f"top_{t:g}": float(s) for t, s in zip(tops, sums)})
            rows.append(row)
    return rows


def _load_config(folder: Path, config: Config, request: dict):
    """A finished configuration's saved parts (None when any is missing or stale)."""
    names = [config.name, f"{config.name}-layers"]
    if config.method == "dense":
        names += ["dense-sparsity", "dense-top1"]
    parts = [load_result(folder, name, request) for name in names]
    return None if any(p is None for p in parts) else parts


def evaluate(plan: Plan, heldout: pd.DataFrame, configs: Sequence[Config], batch_tokens: int = 1024,
             tops: Sequence[float] = SPARSITY_TOPS, concentrated: tuple[float, float] = (0.03, 0.9),
             out_dir=None, progress: bool = True) -> Evaluation:
    """Run ``heldout`` through the dense model and every configuration; see :class:`Evaluation`.

    The dense pass comes first (its top-1 predictions are the reference of agreement) and also measures
    the memories' sparsity on every layer. With ``out_dir`` every finished configuration is saved, so an
    interrupted run resumes where it stopped.
    """
    loaded = plan.loaded
    adapter = loaded.adapter
    configs = [Config("dense")] + [c for c in dict.fromkeys(configs) if c.method != "dense"]
    table = prepare_sentences(loaded, heldout)
    table = table[table["token_ids"].map(len) >= 2].reset_index(drop=True)  # a one-token sentence predicts nothing
    plan_id = {"splits": fingerprint(plan.splits.manifest),
               "routers": None if plan.routers is None else fingerprint(plan.routers.manifest),
               "thresholds": None if plan.thresholds is None else fingerprint(plan.thresholds.to_dict("list")),
               "seed": plan.seed, "cluster_rows": plan.cluster_rows}
    request = {**_base_request(loaded, plan.layers, "evaluation"), "plan": plan_id,
               "corpus": corpus_fingerprint(table), "sentences": len(table), "batch_tokens": int(batch_tokens),
               "max_padding": 0.15, "tops": [float(t) for t in tops], "concentrated": list(concentrated)}
    folder = ensure_dir(Path(out_dir) / f"moe-eval-{fingerprint(request)}") if out_dir is not None else None
    norms_all = {layer: adapter.written_value_norms(layer) for layer in range(adapter.n_layers)}
    record_norms = {layer: norms_all[layer] for layer in plan.layers}
    batches = list(_batches(loaded, table, batch_tokens))
    last = adapter.n_layers - 1
    sentence_ids = table["sentence_id"].to_numpy(np.int64)
    dense_top: dict[int, np.ndarray] = {}
    per_sentence, per_layer, sparsity, reused = [], [], None, 0
    bar = tqdm(total=len(configs) * len(batches), desc="Evaluating sparsified models", unit="batch",
               disable=not progress)
    try:
        for config in configs:
            creq = {**request, "config": config.as_dict(), "split_seeds": plan.split_seeds(config)}
            saved = _load_config(folder, config, creq) if folder is not None else None
            if saved is not None:
                per_sentence.append(saved[0])
                per_layer.append(saved[1])
                if config.method == "dense":
                    sparsity = saved[2]
                    dense_top = {int(s): np.asarray(t) for s, t in zip(saved[3]["sentence_id"], saved[3]["top1"])}
                reused += 1
                bar.update(len(batches))
                continue
            dense = config.method == "dense"
            record = Record(record_norms)
            rows, sparsity_rows, top_rows = [], [], []
            with torch.inference_mode():
                for rows_idx, ids, lengths in batches:
                    real = _real(lengths, ids.shape[1], len(loaded.bos), ids.device)
                    record.real = real.reshape(-1)
                    with ExitStack() as stack:
                        stack.enter_context(plan.applied(config, record))
                        final = stack.enter_context(capture(loaded, last, what=("residual_after",)))
                        acts = stack.enter_context(capture(loaded, None, what=("coefficients",))) if dense else None
                        _forward(loaded, ids, last)
                    sids = sentence_ids[rows_idx]
                    for sid, (nll, top) in zip(sids, _predictions(adapter, final.residual_after[last], ids, lengths)):
                        if dense:
                            dense_top[int(sid)] = top
                            top_rows.append({"sentence_id": int(sid), "top1": top.astype(np.int64)})
                        rows.append({"sentence_id": int(sid), "tokens": len(nll), "nll": float(nll.sum()),
                                     "agree": int((top == dense_top[int(sid)]).sum())})
                    if dense:
                        sparsity_rows += _sparsity_rows(acts, real, norms_all, sids, tops, concentrated)
                    bar.update(1)
            sent = pd.DataFrame(rows).assign(**config.as_dict())
            lay = record.frame().assign(**config.as_dict())
            per_sentence.append(sent)
            per_layer.append(lay)
            if dense:
                sparsity = pd.DataFrame(sparsity_rows)
            if folder is not None:
                if dense:
                    save_result(folder, "dense-sparsity", sparsity, creq)
                    save_result(folder, "dense-top1", pd.DataFrame(top_rows), creq)
                save_result(folder, f"{config.name}-layers", lay, creq)
                save_result(folder, config.name, sent, creq)
    finally:
        bar.close()
    if reused:
        _say(f"Reused {reused} of {len(configs)} evaluated configurations from {folder} (same model, plan, "
             f"sentences and settings); computed the other {len(configs) - reused}.", progress)
    return Evaluation(pd.concat(per_sentence, ignore_index=True), pd.concat(per_layer, ignore_index=True),
                      sparsity, request, configs)


# ---- summaries with intervals -----------------------------------------------------------------------
def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_metrics(evaluation: Evaluation, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Per configuration, seeded bootstrap resamples over held-out sentences (the same resamples for every
    configuration, so differences are paired): {"perplexity": (n_boot,), "agreement": (n_boot,)}."""
    frame = evaluation.sentences
    ids = np.sort(frame["sentence_id"].unique())
    idx = _resamples(len(ids), n_boot, seed)
    out = {}
    for name, rows in frame.groupby("config", sort=False):
        rows = rows.set_index("sentence_id").loc[ids]
        tokens, nll, agree = (rows[c].to_numpy(np.float64) for c in ("tokens", "nll", "agree"))
        t = tokens[idx].sum(1)
        out[name] = {"perplexity": np.exp(nll[idx].sum(1) / t), "agreement": agree[idx].sum(1) / t,
                     "point_perplexity": float(np.exp(nll.sum() / tokens.sum())),
                     "point_agreement": float(agree.sum() / tokens.sum())}
    return out


def _ci(values: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def random_draws(configs: Sequence[Config]) -> dict[tuple[str, float], list[Config]]:
    """The configurations of random experts grouped by (router, share): one per draw of the random split."""
    out: dict[tuple[str, float], list[Config]] = {}
    for c in configs:
        if c.method == "experts" and split_kind(c.split) == "random":
            out.setdefault((c.router, round(float(c.share), 9)), []).append(c)
    return out


def per_sentence(evaluation: Evaluation, config: str,
                 columns: Sequence[str] = ("nll", "agree", "tokens")) -> np.ndarray:
    """(sentences, columns) numbers of one configuration, rows in the order of the dense pass's sentence ids."""
    frame = evaluation.sentences
    ids = np.sort(frame.loc[frame["config"] == "dense", "sentence_id"].unique())
    rows = frame[frame["config"] == config].set_index("sentence_id").loc[ids]
    return rows[list(columns)].to_numpy(np.float64)


_STATISTICS = {  # of sums of (nll, agree, tokens, dense nll) over sentences
    "perplexity": lambda s: np.exp(s[..., 0] / s[..., 2]),
    "agreement": lambda s: s[..., 1] / s[..., 2],
    "perplexity_ratio": lambda s: np.exp((s[..., 0] - s[..., 3]) / s[..., 2]),
}


def _random_row(evaluation: Evaluation, draws: list[Config], n_boot: int, seed: int) -> dict:
    """Random experts' perplexity, agreement and perplexity ratio: the mean over the random split's draws, with
    a two-level interval (draws, then sentences; every draw runs the same sentences, so they are crossed)."""
    dense = per_sentence(evaluation, "dense", ("nll",))
    cells = np.stack([np.concatenate([per_sentence(evaluation, c.name), dense], 1) for c in draws])
    unit = f"sentences x {len(draws)} random splits"
    out = {"draws": len(draws)}
    for name, statistic in _STATISTICS.items():
        e = two_level(cells, statistic, unit, n_boot, seed)
        out.update({name: e.value, f"{name}_low": e.low, f"{name}_high": e.high})
    return out


def quality_table(plan: Plan, evaluation: Evaluation, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per configuration: the FFN share read, memories / inputs / size kept (mean over layers), perplexity
    and top-1 agreement with the dense model, each with a bootstrap 95% interval, and the perplexity ratio
    to the dense model (paired interval). Random experts get one row per router and share (``split`` =
    ``random``): the mean over the random split's ``draws``, with an interval over draws and sentences
    (:func:`random_draws_table` has each draw)."""
    boot = bootstrap_metrics(evaluation, n_boot, seed)
    dense = boot["dense"]
    by_layer = evaluation.layers.groupby("config", sort=False)[["kept_memories", "kept_inputs", "size_kept"]].mean()
    groups, done = random_draws(evaluation.configs), set()
    rows = []
    for config in evaluation.configs:
        if config.method == "experts" and split_kind(config.split) == "random":
            key = (config.router, round(float(config.share), 9))
            if key in done:
                continue
            done.add(key)
            draws = groups[key]
            kept = by_layer.loc[[c.name for c in draws if c.name in by_layer.index]].mean()
            pooled = replace(config, split="random")
            rows.append({**pooled.as_dict(), "ffn_share": plan.ffn_share(pooled, kept["kept_memories"],
                                                                         kept["kept_inputs"]),
                         "kept_memories": float(kept["kept_memories"]), "kept_inputs": float(kept["kept_inputs"]),
                         "size_kept": float(kept["size_kept"]), **_random_row(evaluation, draws, n_boot, seed)})
            continue
        b = boot[config.name]
        kept = by_layer.loc[config.name] if config.name in by_layer.index else pd.Series(
            {"kept_memories": 1.0, "kept_inputs": 1.0, "size_kept": 1.0})
        ratio = b["perplexity"] / dense["perplexity"]
        share = plan.ffn_share(config, kept["kept_memories"], kept["kept_inputs"])
        rows.append({**config.as_dict(), "ffn_share": share,
                     "kept_memories": float(kept["kept_memories"]), "kept_inputs": float(kept["kept_inputs"]),
                     "size_kept": float(kept["size_kept"]),
                     "perplexity": b["point_perplexity"], **_named_ci("perplexity", b["perplexity"]),
                     "agreement": b["point_agreement"], **_named_ci("agreement", b["agreement"]),
                     "perplexity_ratio": b["point_perplexity"] / dense["point_perplexity"],
                     **_named_ci("perplexity_ratio", ratio), "draws": 1})
    frame = pd.DataFrame(rows)
    frame.attrs["tokens"] = int(evaluation.sentences.query("config == 'dense'")["tokens"].sum())
    frame.attrs["sentences"] = int((evaluation.sentences["config"] == "dense").sum())
    return frame


def random_draws_table(evaluation: Evaluation) -> pd.DataFrame:
    """Each draw of the random split on its own (router, share, split, draw, perplexity, agreement, perplexity
    ratio; point values): how much random experts vary from one split to the next."""
    dense = per_sentence(evaluation, "dense", ("nll", "tokens")).sum(0)
    rows = []
    for (router, share), draws in random_draws(evaluation.configs).items():
        for c in draws:
            nll, agree, tokens = per_sentence(evaluation, c.name).sum(0)
            rows.append({"router": router, "share": share, "split": c.split, "draw": split_draw(c.split),
                         "perplexity": float(np.exp(nll / tokens)), "agreement": float(agree / tokens),
                         "perplexity_ratio": float(np.exp((nll - dense[0]) / tokens))})
    return pd.DataFrame(rows, columns=["router", "share", "split", "draw", "perplexity", "agreement",
                                       "perplexity_ratio"])


def _named_ci(name: str, values: np.ndarray) -> dict:
    low, high = _ci(values)
    return {f"{name}_low": low, f"{name}_high": high}


def sparsity_table(evaluation: Evaluation, n_layers: int, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per layer: the mean share of the ``|m_i|·||v_i||`` mass carried by the top k% of memories (columns
    ``top_<k>``, with bootstrap intervals over sentences), and ``concentrated``: the share of tokens whose
    top 3% of memories carry at least 90% of it. A random k% of memories carries k% of it on average."""
    frame = evaluation.sparsity
    tops = [c for c in frame.columns if c.startswith("top_")]
    ids = np.sort(frame["sentence_id"].unique())
    idx = _resamples(len(ids), n_boot, seed)
    rows = []
    for layer, part in frame.groupby("layer"):
        part = part.set_index("sentence_id").reindex(ids).fillna(0)
        tokens = part["tokens"].to_numpy(np.float64)
        row = {"layer": int(layer), "relative_depth": (int(layer) + 1) / n_layers, "tokens": int(tokens.sum())}
        for column in tops + ["concentrated"]:
            values = part[column].to_numpy(np.float64)
            row[column] = float(values.sum() / tokens.sum())
            low, high = _ci(values[idx].sum(1) / tokens[idx].sum(1))
            row[f"{column}_low"], row[f"{column}_high"] = low, high
        rows.append(row)
    return pd.DataFrame(rows)


# =====================================================================================================
# The key-value view: are an expert's memories alike?
# =====================================================================================================
def memory_topics(examples, layers: Sequence[int], top: int = 25, min_labelled: int = 5,
                  exclude_topics: Sequence[str] = ("Uncategorized",)) -> pd.DataFrame:
    """Each memory's dominant trigger topic (sign +1, top-``top`` triggers; notebook 01's mining): the most
    common topic among its triggers whose sentence has one (ties: first by name); memories with fewer than
    ``min_labelled`` labelled triggers are left out. Columns: layer, memory, topic."""
    t = examples.triggers
    t = t[(t["sign"] == 1) & (t["rank"] < top) & t["layer"].isin(list(layers))]
    topics = examples.sentences.set_index("sentence_id")["topic"]
    t = t.assign(topic=topics.reindex(t["sentence_id"].to_numpy()).to_numpy())
    t = t[t["topic"].notna() & ~t["topic"].isin(list(exclude_topics))]
    counts = t.groupby(["layer", "memory", "topic"]).size().rename("n").reset_index()
    labelled = counts.groupby(["layer", "memory"])["n"].transform("sum")
    counts = counts[labelled >= min_labelled]
    best = counts.sort_values(["layer", "memory", "n", "topic"], ascending=[True, True, False, True])
    return best.drop_duplicates(["layer", "memory"])[["layer", "memory", "topic"]].reset_index(drop=True)


def _pair_share_topics(topics: np.ndarray) -> tuple[int, int]:
    """(pairs with the same topic, pairs) among the labelled members of one expert."""
    n = len(topics)
    if n < 2:
        return 0, 0
    _, counts = np.unique(topics, return_counts=True)
    return int((counts * (counts - 1) // 2).sum()), n * (n - 1) // 2


def _pair_share_tokens(tokens: np.ndarray) -> tuple[int, int]:
    """(pairs sharing at least one top token, pairs) among the members of one expert; tokens (n, k)."""
    n = len(tokens)
    if n < 2:
        return 0, 0
    shared = (tokens[:, None, :, None] == tokens[None, :, None, :]).any(axis=(2, 3))
    return int(np.triu(shared, 1).sum()), n * (n - 1) // 2


def expert_coherence(splits: ExpertSplits, examples=None, projection=None, top_triggers: int = 25,
                     top_tokens: int = 10, min_labelled: int = 5, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Do an expert's memories share trigger topics (``examples``: notebook 01's mining) or value tokens
    (``projection``: notebook 02's value projection)? Per view and split: the share of pairs of memories
    of one expert that share their dominant trigger topic / at least one of their top-``top_tokens`` value
    tokens (sign +1), pooled over experts, with a bootstrap 95% interval over experts. The ``random`` split
    is the control (its share is the base rate of two memories of the layer): one row, the mean over its
    ``draws``, with an interval over the draws and their experts."""
    views = {}
    if examples is not None:
        topics = memory_topics(examples, splits.layers, top_triggers, min_labelled)
        views["trigger_topic"] = {(int(l), int(m)): t for l, m, t in topics.itertuples(index=False)}
    if projection is not None:
        tok = projection.tokens
        tok = tok[(tok["sign"] == 1) & (tok["rank"] < top_tokens) & tok["layer"].isin(splits.layers)]
        tok = tok.sort_values(["layer", "memory", "rank"])
        views["value_tokens"] = {(int(l), int(m)): g["token"].to_numpy(np.int64)
                                 for (l, m), g in tok.groupby(["layer", "memory"])}
    rows = []
    for view, per_memory in views.items():
        units = {}  # split -> (experts with a pair, 2): pairs sharing, pairs
        for split in splits.splits:
            same, pairs = [], []
            for layer in splits.layers:
                labels = splits.labels(split, layer)
                for e in range(splits.n_experts):
                    members = [m for m in np.flatnonzero(labels == e) if (layer, int(m)) in per_memory]
                    if view == "trigger_topic":
                        s, p = _pair_share_topics(np.array([per_memory[(layer, int(m))] for m in members]))
                    else:
                        s, p = _pair_share_tokens(np.stack([per_memory[(layer, int(m))] for m in members])
                                                  if members else np.zeros((0, top_tokens), dtype=np.int64))
                    if p:
                        same.append(s)
                        pairs.append(p)
            units[split] = np.asarray([same, pairs], dtype=np.float64).T.reshape(-1, 2)
        for split in splits.splits:
            if split_kind(split) == "random":
                if split_draw(split) == 0:  # one row for every draw: their mean, over draws and experts
                    rows.append(_random_coherence(view, [units[s] for s in splits.random_splits], n_boot, seed))
                continue
            same, pairs = units[split][:, 0], units[split][:, 1]
            row = {"view": view, "split": split, "experts": len(pairs), "pairs": int(pairs.sum()), "draws": 1}
            if len(pairs):
                idx = _resamples(len(pairs), n_boot, seed)
                row["share"] = float(same.sum() / pairs.sum())
                row["share_low"], row["share_high"] = _ci(same[idx].sum(1) / pairs[idx].sum(1))
            else:
                row.update(share=np.nan, share_low=np.nan, share_high=np.nan)
            rows.append(row)
    return pd.DataFrame(rows, columns=["view", "split", "experts", "pairs", "share", "share_low", "share_high",
                                       "draws"])


def _random_coherence(view: str, draws: list[np.ndarray], n_boot: int, seed: int) -> dict:
    """The random split's coherence row: the mean over draws of each draw's share of pairs, with a two-level
    interval (draws, then each draw's own experts)."""
    draws = [d for d in draws if len(d)]
    row = {"view": view, "split": "random", "experts": int(sum(len(d) for d in draws)),
           "pairs": int(sum(d[:, 1].sum() for d in draws)), "draws": len(draws)}
    e = two_level(draws, lambda t: t[..., 0] / t[..., 1], "experts", n_boot, seed, crossed=False)
    return {**row, "share": e.value, "share_low": e.low, "share_high": e.high}


# =====================================================================================================
# Verdicts
# =====================================================================================================
def _row(quality: pd.DataFrame, method: str, share: float, split: str = "", router: str = "") -> pd.Series | None:
    q = quality[(quality["method"] == method) & np.isclose(quality["share"].astype(float), share)]
    if method == "experts" and not q.empty:
        q = q[(q["split"] == split) & (q["router"] == router)]
    return None if q.empty else q.iloc[0]


def _quality_estimate(row: pd.Series, column: str, sentences: int, minus: float = 0.0) -> Estimate:
    """A quality table's number and its bootstrap interval (over held-out sentences; random experts: over the
    random splits and the sentences) as an Estimate."""
    draws = int(row.get("draws", 1)) if pd.notna(row.get("draws", 1)) else 1
    unit, method = ("sentences", "bootstrap") if row["split"] != "random" else (
        f"sentences x {draws} random splits", "two-level bootstrap")
    return Estimate(float(row[column]) - minus, float(row[f"{column}_low"]) - minus,
                    float(row[f"{column}_high"]) - minus, sentences, unit, method)


def _gap_to_random(evaluation: Evaluation, ours: str, draws: list[Config], n_boot: int, seed: int) -> Estimate:
    """Agreement of configuration ``ours`` minus random experts' (the mean over the random split's ``draws``),
    paired over sentences, with a two-level interval: draws, then sentences (the same for both sides)."""
    a = per_sentence(evaluation, ours, ("agree", "tokens"))
    cells = np.stack([np.concatenate([a, per_sentence(evaluation, c.name, ("agree", "tokens"))], 1) for c in draws])
    return two_level(cells, lambda s: s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3],
                     f"sentences x {len(draws)} random splits", n_boot, seed)


def _paired_gap(boot: dict, ours: str, control: str, sentences: int) -> Estimate:
    """Agreement of configuration ``ours`` minus ``control``, paired: the same bootstrap resamples of sentences."""
    point = boot[ours]["point_agreement"] - boot[control]["point_agreement"]
    gaps = boot[ours]["agreement"] - boot[control]["agreement"]
    low, high = _ci(gaps)
    return Estimate(point, min(low, point), max(high, point), sentences, "sentences", "bootstrap (paired)")


def _draws_note(row: pd.Series | None) -> str:
    """The note " (the mean of N random splits)" for a row of random experts pooled over draws; else ""."""
    if row is None or "draws" not in row or pd.isna(row["draws"]) or row.get("split") != "random":
        return ""
    return f" (the mean of {int(row['draws'])} random splits)"


COMPARISONS = {  # measure key: (configuration, its control) at the share nearest 20%; Table 2's settings
    "kmeans_beats_random": (("kmeans", "mlp"), ("random", "mlp"), "kmeans+mlp", "random+mlp"),
    "coactivation_beats_random": (("coactivation", "mlp"), ("random", "mlp"), "coactivation+mlp", "random+mlp"),
    "mlp_beats_similarity": (("coactivation", "mlp"), ("coactivation", "similarity"), "coactivation+mlp",
                             "coactivation+similarity"),
}


def measures(quality: pd.DataFrame, evaluation: Evaluation | None = None, coherence: pd.DataFrame | None = None,
             n_boot: int = 1000, seed: int = 0) -> tuple[dict[str, Estimate], dict[str, str]]:
    """The measures of notebook 07's findings (``ffnlib.findings``, notebook ``07_moefication``), each with a
    95% interval, and each measure's own control under ``"<key>/baseline"``: random experts with the same
    router, random memories at the same share, or random experts' pairs of memories. Random experts are the
    mean over the random split's draws; their intervals, and those of the gaps to them, resample the draws as
    well as the sentences (or experts). These findings compare methods on the trained model; a random-weights
    model has nothing to keep, so the baselines are their controls.

    ``quality``: :func:`quality_table`; ``evaluation``: :func:`evaluate`'s result (the per-sentence sparsity
    and the paired bootstrap of the Table 2 comparisons); ``coherence``: :func:`expert_coherence`. Missing
    parts are skipped (their findings are "not measured").
    """
    out: dict[str, Estimate] = {}
    details: dict[str, str] = {}
    sentences = int(quality.attrs.get("sentences", 0))
    shares = sorted(float(s) for s in quality.loc[quality["method"] == "experts", "share"].unique())

    # Activation sparsity: the share of (token, layer) pairs whose top 3% of memories carry >= 90% of the mass
    if evaluation is not None and len(evaluation.sparsity):
        per_sentence = evaluation.sparsity.groupby("sentence_id")[["concentrated", "tokens"]].sum()
        out["sparse_activation"] = bootstrap(per_sentence.to_numpy(np.float64), lambda t: t[..., 0] / t[..., 1],
                                             "sentences", n_boot, seed)
        top3 = evaluation.sparsity["top_0.03"].sum() / evaluation.sparsity["tokens"].sum()
        details["sparse_activation"] = (f"{int(per_sentence['tokens'].sum()):,} (token, layer) pairs of "
                                        f"{len(per_sentence)} held-out sentences; on average the top 3% carry "
                                        f"{top3:.1%} of the mass (a random 3%: 3%)")

    # 10-30% of the FFN keeps over 95%: the best realistic configuration at <= 30%, against random experts
    best = None
    for share in [s for s in shares if s <= 0.30 + 1e-9]:
        for split in ("kmeans", "coactivation"):
            for router in ("mlp", "similarity"):
                row = _row(quality, "experts", share, split, router)
                if row is not None and (best is None or row["agreement_low"] > best[0]["agreement_low"]):
                    best = (row, share, split, router)
    if best is not None:
        row, share, split, router = best
        out["keep_95"] = _quality_estimate(row, "agreement", sentences)
        control = _row(quality, "experts", share, "random", router)
        if control is not None:
            out["keep_95/baseline"] = _quality_estimate(control, "agreement", sentences)
        details["keep_95"] = (f"the best of k-means / co-activation experts with the MLP or similarity router at "
                              f"<= 30% (chosen by the interval's lower end: {split} + {router} at {share:.0%}, "
                              f"perplexity x{row['perplexity_ratio']:.2f}); baseline: random experts, same router"
                              + _draws_note(control))

    # Table 2's comparisons, at the share nearest 20%: paired differences of agreement
    boot = bootstrap_metrics(evaluation, n_boot, seed) if evaluation is not None and shares else None
    if boot is not None:
        at = min(shares, key=lambda s: abs(s - 0.2))
        for key, (ours, theirs, paper_ours, paper_theirs) in COMPARISONS.items():
            a, b = _row(quality, "experts", at, *ours), _row(quality, "experts", at, *theirs)
            if a is None or b is None:
                continue
            draws = random_draws(evaluation.configs).get((theirs[1], round(float(at), 9))) \
                if theirs[0] == "random" else None
            if draws:
                out[key] = _gap_to_random(evaluation, a["config"], draws, n_boot, seed)
            else:
                out[key] = _paired_gap(boot, a["config"], b["config"], sentences)
            mean = f" (mean of {len(draws)} random splits)" if draws else ""
            details[key] = (f"at {at:.0%}: {'+'.join(ours)} {a['agreement']:.1%} vs {'+'.join(theirs)} "
                            f"{b['agreement']:.1%}{mean} top-1 agreement with the dense model; the paper's gap "
                            f"{100 * (table2_retained(paper_ours) - table2_retained(paper_theirs)):+.1f} points is "
                            "of retained task score")

    # CATS and TEAL at 50% of the memories: perplexity cost, against random memories at the same share
    for method in ("cats", "teal"):
        share = PAPER[method]["keep" if method == "cats" else "share"]
        row, control = _row(quality, method, share), _row(quality, "experts", share, "random", "random")
        if row is None:
            continue
        out[method] = _quality_estimate(row, "perplexity_ratio", sentences, minus=1.0)
        if control is not None:
            out[f"{method}/baseline"] = _quality_estimate(control, "perplexity_ratio", sentences, minus=1.0)
        details[method] = (f"{method.upper()} at {share:.0%} reads {row['ffn_share']:.0%} of the FFN weights; "
                           f"agreement {row['agreement']:.1%}; baseline: random memories at {share:.0%}"
                           + _draws_note(control))

    # The key-value view: an expert's memories share trigger topics / value tokens, against random experts
    if coherence is not None and len(coherence):
        for view, name in (("trigger_topic", "trigger_topics"), ("value_tokens", "value_tokens")):
            part = coherence[coherence["view"] == view].set_index("split")
            for split in ("kmeans", "coactivation"):
                if split not in part.index or pd.isna(part.loc[split, "share"]):
                    continue
                for which, key in ((split, f"{name}_{split}"), ("random", f"{name}_{split}/baseline")):
                    if which in part.index and not pd.isna(part.loc[which, "share"]):
                        r = part.loc[which]
                        draws = int(r["draws"]) if "draws" in r and pd.notna(r["draws"]) else 1
                        unit, method = ("experts", "bootstrap") if which != "random" else (
                            f"experts of {draws} random splits", "two-level bootstrap")
                        out[key] = Estimate(float(r["share"]), float(r["share_low"]), float(r["share_high"]),
                                            int(r["experts"]), unit, method)
                draws = (f" (the mean of {int(part.loc['random', 'draws'])} random splits)"
                         if "random" in part.index and "draws" in part.columns else "")
                details[f"{name}_{split}"] = (f"share of the pairs of memories of one expert; "
                                              f"{int(part.loc[split, 'experts'])} experts; baseline: random "
                                              f"experts{draws}")
    return out, details


# =====================================================================================================
# The expert-sparse FFN forward (speed)
# =====================================================================================================
@dataclass
class ExpertFFN:
    """One FFN layer with its memories regrouped by expert (each expert's rows one contiguous block), for a
    forward pass that reads only the selected experts' rows of gate, up and down.

    ``gate_up`` is (E, 2·size, d) for a gated FFN (each expert's gate rows, then its up rows) or (E, size, d)
    for a plain one; ``down`` is (E, size, d) (the experts' value rows).
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    members: torch.Tensor  # (E, size): memory index of each row
    gated: bool

    @property
    def n_experts(self) -> int:
        return self.down.shape[0]

    @property
    def size(self) -> int:
        return self.down.shape[1]

    @classmethod
    @torch.no_grad()
    def from_layer(cls, adapter: Adapter, layer: int, labels) -> "ExpertFFN":
        labels = np.asarray(labels)
        n_experts = int(labels.max()) + 1
        size = len(labels) // n_experts
        check_partition(labels, n_experts, size)
        members = torch.as_tensor(np.argsort(labels, kind="stable").reshape(n_experts, size), dtype=torch.long)
        flat = members.reshape(-1)
        up = adapter.keys(layer)[flat].reshape(n_experts, size, -1)
        gate_up = torch.cat([adapter.gates(layer)[flat].reshape(n_experts, size, -1), up], 1) if adapter.gated else up
        bias = getattr(adapter.up(layer), "bias", None)
        if adapter.gated and (bias is not None or getattr(adapter.gate(layer), "bias", None) is not None):
            raise UnsupportedModelError("ExpertFFN handles gated FFNs without biases in gate and up (Llama, Gemma, "
                                        "...); this model has them.")
        return cls(gate_up.contiguous(), adapter.values(layer)[flat].reshape(n_experts, size, -1).contiguous(),
                   None if bias is None else bias.detach()[flat].reshape(n_experts, size),
                   adapter.value_bias(layer), adapter.activation(layer), members, adapter.gated)

    def memory_mask(self, experts: torch.Tensor) -> torch.Tensor:
        """(n, d_ff) True at the memories of each token's selected experts (n, k)."""
        n = experts.shape[0]
        mask = torch.zeros(n, self.members.numel(), dtype=torch.bool)
        rows = self.members[experts].reshape(n, -1)
        return mask.scatter_(1, rows, True)

    def _hidden(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """The coefficients (n, size) of one expert's memories for inputs x (n, d)."""
        h = F.linear(x, self.gate_up[expert])
        if self.gated:
            return self.act(h[:, : self.size]) * h[:, self.size:]
        if self.up_bias is not None:
            h = h + self.up_bias[expert]
        return self.act(h)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The FFN output for inputs ``x`` (n, d) where token t uses the experts ``experts[t]`` (n, k).

        Only the selected experts' rows of gate, up and down are read, and no weight is copied. One token
        (decoding): a small product with each selected expert's block of gate and up rows, then one weighted sum of
        their value rows (``embedding_bag``). Several tokens: the (token, expert) pairs are sorted by expert once
        and each expert runs once on its rows.
        """
        if x.dim() != 2 or experts.dim() != 2 or experts.shape[0] != x.shape[0]:
            raise ParameterError(f"x must be (n, d) and experts (n, k); got {tuple(x.shape)} and "
                                 f"{tuple(experts.shape)}.")
        if x.shape[0] == 1:  # decoding: k small products on the experts' gate/up blocks, then one weighted
            chosen = experts[0]  # sum of their value rows (embedding_bag reads only those rows)
            h = torch.cat([F.linear(x, self.gate_up[e]) for e in chosen.tolist()], 1).view(len(chosen), -1, self.size)
            if self.gated:
                h = self.act(h[:, 0]) * h[:, 1]
            else:
                h = self.act(h[:, 0] if self.up_bias is None else h[:, 0] + self.up_bias[chosen])
            rows = (chosen[:, None] * self.size + torch.arange(self.size, device=x.device)).reshape(1, -1)
            out = F.embedding_bag(rows, self.down.reshape(-1, self.down.shape[-1]), per_sample_weights=h.reshape(1, -1),
                                  mode="sum")
        else:  # several tokens: sort the (token, expert) pairs by expert once, run each expert on its rows
            n, k = experts.shape
            flat = experts.reshape(-1)
            order = torch.argsort(flat, stable=True)
            tokens = torch.arange(n, device=x.device).repeat_interleave(k)[order]
            counts = torch.bincount(flat, minlength=self.n_experts).tolist()
            grouped = x.index_select(0, tokens)
            written = torch.empty(len(tokens), self.down.shape[-1], dtype=x.dtype, device=x.device)
            start = 0
            for e, count in enumerate(counts):
                if count:
                    rows = slice(start, start + count)
                    torch.mm(self._hidden(grouped[rows], e), self.down[e], out=written[rows])
                    start += count
            out = torch.zeros(n, self.down.shape[-1], dtype=x.dtype, device=x.device).index_add_(0, tokens, written)
        if self.down_bias is not None:
            out = out + self.down_bias
        return out


def route_random(n_tokens: int, n_experts: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, k) distinct random experts per token (for the speed benchmark)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_tokens, n_experts, generator=gen).topk(k, dim=-1).indices


def replace_share(config: Config, share: float) -> Config:
    return replace(config, share=check_share(share))
