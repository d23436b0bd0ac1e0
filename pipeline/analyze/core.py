"""The numeric core of ``salmap analyze``: SpRAy-style strategy clusters of one class's maps.

Spectral Relevance Analysis (Lapuschkin et al. 2019): downsample and normalise each map,
build a k-nearest-neighbour graph, embed it with the eigenvectors of its normalised
Laplacian, pick the number of clusters (the graph's connected components when it falls
apart, else the largest eigengap), cluster the embedding with
k-means, and merge clusters whose centroids are nearly the same map (:func:`merge_similar`). numpy only: the eigendecomposition is dense (``numpy.linalg.eigh``), which is why a
class is capped at a few thousand maps (:data:`DEFAULT_CAP`; the rest are assigned to the
nearest cluster centroid by :func:`assign`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SIDE = 32  # maps are compared at SIDE x SIDE
DEFAULT_CAP = 2000  # maps per class embedded at most (a dense N x N eigendecomposition)
MAX_CLUSTERS = 8  # the eigengap is searched among 1..MAX_CLUSTERS clusters
MERGE_COSINE = 0.8  # clusters whose centroids are this similar are one strategy (merged)
BORDER = 1 / 8  # the image border band: the outer eighth of each side


def downsample(maps: np.ndarray, side: int = SIDE) -> np.ndarray:
    """``[N, h, w]`` -> ``[N, side, side]`` float32, the non-negative part of each map
    (relevance *for* the target, as energy pointing counts it), NaN as 0. Area-averaging
    when shrinking (each output cell the mean of the input pixels it covers), bilinear when
    growing."""
    m = np.maximum(np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0), 0.0)
    if m.ndim != 3:
        raise ValueError(f"maps must be [N, h, w], got shape {m.shape}")
    n, h, w = m.shape
    if (h, w) == (side, side):
        return m
    if h >= side and w >= side:
        rows = (np.arange(side) * h) // side
        cols = (np.arange(side) * w) // side
        s = np.add.reduceat(np.add.reduceat(m, rows, axis=1), cols, axis=2)
        counts = np.diff(np.append(rows, h))[:, None] * np.diff(np.append(cols, w))[None, :]
        return (s / counts).astype(np.float32)
    from skimage.transform import resize

    return resize(m, (n, side, side), order=1, mode="edge", anti_aliasing=False,
                  preserve_range=True).astype(np.float32)


def normalise(small: np.ndarray) -> np.ndarray:
    """Each map as a relevance distribution: divided by its sum (a map without positive
    relevance becomes uniform), so shares of it (inside a box, on the border) are fractions."""
    flat = small.reshape(len(small), -1).astype(np.float64)
    total = flat.sum(axis=1, keepdims=True)
    uniform = np.full_like(flat, 1.0 / max(flat.shape[1], 1))
    out = np.where(total > 0, flat / np.where(total > 0, total, 1.0), uniform)
    return out.reshape(small.shape).astype(np.float32)


def features(dist: np.ndarray) -> np.ndarray:
    """The vectors the graph compares: each distribution scaled to unit L2 norm, so the
    Euclidean distance between two maps depends on where their relevance lies, not on how
    peaked they are overall."""
    flat = dist.reshape(len(dist), -1).astype(np.float64)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def neighbours(n: int) -> int:
    """k of the kNN graph: about sqrt(n)/2, at least 5, at most n - 1 (the stated rule)."""
    return int(max(1, min(n - 1, max(5, round(np.sqrt(n) / 2)))))


def sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[len(a), len(b)]``, clipped at 0."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def knn_affinity(x: np.ndarray, k: int | None = None) -> np.ndarray:
    """The symmetric kNN affinity matrix ``[N, N]``: each point joined to its k nearest with
    the self-tuning Gaussian weight ``exp(-d^2 / (s_i s_j))`` (Zelnik-Manor & Perona 2004;
    ``s_i`` the distance to the k-th neighbour), symmetrised with max."""
    n = len(x)
    if n < 2:
        return np.zeros((n, n))
    k = neighbours(n) if k is None else int(min(max(k, 1), n - 1))
    d2 = sq_distances(x, x)
    np.fill_diagonal(d2, np.inf)
    idx = np.argpartition(d2, k - 1, axis=1)[:, :k]
    dk = np.take_along_axis(d2, idx, axis=1)
    scale = np.sqrt(np.maximum(dk.max(axis=1), 1e-12))
    w = np.exp(-dk / (scale[:, None] * scale[idx]))
    a = np.zeros((n, n))
    np.put_along_axis(a, idx, w, axis=1)
    return np.maximum(a, a.T)


@dataclass
class Spectrum:
    """Eigenvalues (ascending) and eigenvectors of the normalised Laplacian, and the number
    of clusters the eigengap picks."""

    values: np.ndarray
    vectors: np.ndarray
    clusters: int


def spectrum(a: np.ndarray, max_clusters: int = MAX_CLUSTERS) -> Spectrum:
    """The eigendecomposition of ``L = I - D^-1/2 A D^-1/2`` and the number of clusters: the
    number of zero eigenvalues (< 1e-8: the graph's connected components) when there are
    several, else the largest eigengap ``argmax_{1 <= c <= max_clusters} (lambda_c -
    lambda_{c-1})`` (eigenvalues from 0); at most ``max_clusters`` either way. Counting
    components first matters: inside each component the spectrum keeps rising, and a later
    gap can beat the one after the last zero."""
    n = len(a)
    deg = a.sum(axis=1)
    inv = 1.0 / np.sqrt(np.maximum(deg, 1e-12))
    lap = np.eye(n) - inv[:, None] * a * inv[None, :]
    values, vectors = np.linalg.eigh((lap + lap.T) / 2)
    top = int(min(max_clusters, n - 1))
    if top < 1:
        return Spectrum(values, vectors, 1)
    parts = int((values < 1e-8).sum())
    if parts >= 2:
        return Spectrum(values, vectors, min(parts, top))
    gaps = np.diff(values[: top + 1])
    return Spectrum(values, vectors, int(np.argmax(gaps)) + 1)


def embedding(spec: Spectrum, dims: int | None = None) -> np.ndarray:
    """Rows of the first ``dims`` eigenvectors scaled to unit length (Ng, Jordan & Weiss)."""
    dims = spec.clusters if dims is None else dims
    u = spec.vectors[:, :dims]
    return u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)


def kmeans(x: np.ndarray, k: int, seed: int = 0, restarts: int = 8,
           iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """k-means (k-means++ seeding, ``restarts`` seeded runs, lowest inertia kept): ``(labels,
    centres)``. Deterministic for a given seed."""
    n = len(x)
    k = int(min(max(k, 1), n))
    rng = np.random.default_rng(seed)
    best = (np.inf, np.zeros(n, dtype=np.int64), x[:k].copy())
    for _ in range(restarts):
        centres = [x[rng.integers(n)]]
        for _ in range(1, k):
            d = sq_distances(x, np.asarray(centres)).min(axis=1)
            p = d / d.sum() if d.sum() > 0 else None
            centres.append(x[rng.choice(n, p=p)])
        c = np.asarray(centres)
        for _ in range(iters):
            labels = sq_distances(x, c).argmin(axis=1)
            new = np.asarray([x[labels == j].mean(axis=0) if (labels == j).any() else c[j]
                              for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        labels = sq_distances(x, c).argmin(axis=1)
        inertia = float(((x - c[labels]) ** 2).sum())
        if inertia < best[0] - 1e-12:
            best = (inertia, labels, c)
    return best[1], best[2]


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Cluster ids renumbered 0, 1, ... by decreasing size (ties: first appearance)."""
    ids, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = ids[np.lexsort((first, -counts))]
    remap = {int(old): new for new, old in enumerate(order)}
    return np.asarray([remap[int(v)] for v in labels], dtype=np.int64)


def layout(spec: Spectrum, clusters: np.ndarray) -> np.ndarray:
    """2-D coordinates ``[N, 2]``: the first two principal components of the spectral
    embedding (at least 3 eigenvectors, so one cluster still spreads), scaled to [-1, 1]."""
    dims = int(min(max(spec.clusters, 3), spec.vectors.shape[1]))
    e = embedding(spec, dims)
    e = e - e.mean(axis=0)
    if len(e) < 2:
        return np.zeros((len(e), 2))
    _, _, vt = np.linalg.svd(e, full_matrices=False)
    xy = e @ vt[:2].T
    if xy.shape[1] < 2:
        xy = np.hstack([xy, np.zeros((len(xy), 2 - xy.shape[1]))])
    span = np.abs(xy).max(axis=0)
    return xy / np.where(span > 0, span, 1.0)


@dataclass
class Clustering:
    """One class's clustering: a cluster id and 2-D point per embedded map, the centroids
    in feature space (for :func:`assign`) and the eigengap evidence."""

    labels: np.ndarray
    xy: np.ndarray
    centroids: np.ndarray
    eigenvalues: np.ndarray
    k_neighbours: int


def merge_similar(x: np.ndarray, labels: np.ndarray, cosine: float = MERGE_COSINE) -> np.ndarray:
    """Clusters whose centroids (of the unit-norm features) have cosine similarity at least
    ``cosine`` joined, transitively. The eigengap of a kNN graph also separates maps that look
    at the same place but differ in detail (a tight group splits into near-identical
    parts); one strategy is one place, so those parts are merged back."""
    k = int(labels.max()) + 1 if len(labels) else 0
    if k < 2:
        return labels
    cent = np.asarray([x[labels == j].mean(axis=0) for j in range(k)])
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    sim = cent @ cent.T
    parent = list(range(k))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(k):
        for j in range(i + 1, k):
            if sim[i, j] >= cosine:
                parent[root(j)] = root(i)
    return np.asarray([root(int(v)) for v in labels], dtype=np.int64)


def focus_area(dist: np.ndarray) -> np.ndarray:
    """Per map, the share of the image that holds half its relevance (0.5 for a uniform map,
    small for a focused one)."""
    flat = dist.reshape(len(dist), -1)
    s = -np.sort(-flat, axis=1)
    cum = np.cumsum(s, axis=1)
    total = cum[:, -1:]
    n = (cum < 0.5 * np.where(total > 0, total, 1.0)).sum(axis=1) + 1
    return n / flat.shape[1]


def cluster_maps(dist: np.ndarray, max_clusters: int = MAX_CLUSTERS, seed: int = 0,
                 merge_cosine: float = MERGE_COSINE) -> Clustering:
    """SpRAy on one class's normalised maps ``[N, side, side]`` (see the module doc), then
    :func:`merge_similar`."""
    x = features(dist)
    n = len(x)
    if n < 3:  # too few maps for a graph: one cluster
        return Clustering(np.zeros(n, dtype=np.int64), np.zeros((n, 2)),
                          x.mean(axis=0, keepdims=True) if n else np.zeros((1, x.shape[1])),
                          np.zeros(n), 0)
    k = neighbours(n)
    spec = spectrum(knn_affinity(x, k), max_clusters)
    raw, _ = kmeans(embedding(spec), spec.clusters, seed=seed)
    labels = relabel_by_size(merge_similar(x, raw, merge_cosine))
    centroids = np.asarray([x[labels == c].mean(axis=0) for c in range(labels.max() + 1)])
    return Clustering(labels, layout(spec, labels), centroids,
                      spec.values[: max_clusters + 1].copy(), k)


def assign(dist: np.ndarray, centroids: np.ndarray, sample_x: np.ndarray,
           sample_xy: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Maps left out of the embedding: the nearest cluster centroid in feature space, and as
    2-D point the mean of the ``k`` nearest embedded maps' points."""
    x = features(dist)
    labels = sq_distances(x, centroids).argmin(axis=1)
    d = sq_distances(x, sample_x)
    k = int(min(k, len(sample_x)))
    idx = np.argpartition(d, k - 1, axis=1)[:, :k]
    return labels.astype(np.int64), sample_xy[idx].mean(axis=1)


def sample_hash(sample_id: str) -> int:
    """A stable 64-bit hash of a sample id (blake2b), for the per-class sample: the same
    run gives the same sample on every machine and every analysis."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "big")


def border_mask(side: int = SIDE, band: float = BORDER) -> np.ndarray:
    """The cells of the outer ``band`` of each side."""
    b = max(1, int(round(side * band)))
    m = np.ones((side, side), dtype=bool)
    m[b:-b, b:-b] = False
    return m


def box_mask(box: dict | None, crop: dict | None, side: int = SIDE) -> np.ndarray | None:
    """A box in original-image pixels (the ``pseudo_box`` column) as cells of the
    ``side x side`` map, which covers the model's input region ``crop`` (``crop_box``);
    cells whose centre lies in the box."""
    if box is None or crop is None:
        return None
    cw, ch = crop["x1"] - crop["x0"], crop["y1"] - crop["y0"]
    if cw <= 0 or ch <= 0:
        return None
    centres = (np.arange(side) + 0.5) / side
    xs, ys = crop["x0"] + centres * cw, crop["y0"] + centres * ch
    cols = (xs >= box["x0"]) & (xs < box["x1"])
    rows = (ys >= box["y0"]) & (ys < box["y1"])
    return rows[:, None] & cols[None, :]


def region(mean_map: np.ndarray, mass: float = 0.5) -> np.ndarray:
    """The smallest set of cells holding ``mass`` of a distribution (its hottest cells)."""
    flat = mean_map.ravel()
    order = np.argsort(-flat, kind="stable")
    cum = np.cumsum(flat[order])
    n = int(np.searchsorted(cum, mass * cum[-1]) + 1) if cum[-1] > 0 else flat.size
    m = np.zeros(flat.size, dtype=bool)
    m[order[:n]] = True
    return m.reshape(mean_map.shape)
