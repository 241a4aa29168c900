"""Partitions of a layer's memories into equal experts: a seeded random permutation (the control, drawn several
times: its draws' names and seeds), balanced k-means on the key rows (an exact balanced assignment step), and the
authors' co-activation graph cut by METIS and then equalised as their ``trans_gp.py``. Each returns labels (d_ff,)
that :func:`check_partition` accepts; :func:`ffnlib.related.moefication.make_splits` runs them over layers and
caches the result."""

from __future__ import annotations

import numpy as np

from ...errors import FFNLibError, ParameterError
from ._choices import check_expert_size

__all__ = ["check_partition", "random_split", "RANDOM_SEED_STEP", "random_split_names", "split_draw", "split_kind",
           "random_split_seed", "balanced_assignment", "balanced_kmeans", "coactivation_graph", "equalise",
           "metis_split"]


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
        * points.shape[1] < 2**26 else _squared_distances(points, centroids)
    rows, cols = linear_sum_assignment(np.repeat(dist, size, axis=1))
    labels = np.empty(points.shape[0], dtype=np.int64)
    labels[rows] = cols // size
    return labels


def _squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
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
