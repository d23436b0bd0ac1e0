"""Dataset-level aggregates of per-row metric values: bootstrap intervals, class-mean pointing
accuracy (TorchRay), Win % of average drop (Grad-CAM++)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def _as_float(values: Iterable[Any]) -> np.ndarray:
    """Values (possibly with None / bool) -> float64 array, None -> NaN (numpy's own cast)."""
    return np.asarray(values).astype(np.float64).ravel()


def summarize(values: Iterable[Any], n_boot: int = 1000, seed: int = 0) -> dict[str, float | int]:
    """Mean and 95% percentile-bootstrap interval of the finite values.

    Returns ``{"mean", "ci_low", "ci_high", "n", "n_nan"}``: ``n`` finite values used,
    ``n_nan`` values left out (NaN / None / inf), reported, never hidden.
    """
    v = _as_float(values)
    finite = np.isfinite(v)
    v = v[finite]
    n = int(v.size)
    out: dict[str, float | int] = {"mean": float("nan"), "ci_low": float("nan"),
                                   "ci_high": float("nan"), "n": n, "n_nan": int((~finite).sum())}
    if n == 0:
        return out
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_boot))
    chunk = max(1, 4_000_000 // n)  # bound the index matrix to a few million entries
    for start in range(0, int(n_boot), chunk):
        k = min(chunk, int(n_boot) - start)
        means[start:start + k] = v[rng.integers(0, n, size=(k, n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5]) if n_boot > 0 else (np.nan, np.nan)
    out.update(mean=float(v.mean()), ci_low=float(lo), ci_high=float(hi))
    return out


def pointing_accuracy_per_class(hits: Iterable[bool | None], classes: Iterable[Any]) -> float:
    """TorchRay pointing accuracy in %: the mean over classes of each class's hit rate.
    Trials with ``None`` (no GT box, skipped) count for nothing; NaN without any trial."""
    per_class: dict[Any, list[int]] = {}
    for hit, cls in zip(hits, classes):
        if hit is None or (isinstance(hit, float) and np.isnan(hit)):
            continue
        counts = per_class.setdefault(cls, [0, 0])
        counts[0] += int(bool(hit))
        counts[1] += 1
    if not per_class:
        return float("nan")
    return float(100.0 * np.mean([h / t for h, t in per_class.values()]))


def win_percent(drops: Mapping[str, Iterable[Any]]) -> dict[str, Any]:
    """Win % of average drop (lower drop wins; Grad-CAM++ defines it for a pair of methods).

    ``drops``: method -> per-image drop on the same images (same order). Returns
    ``pairwise[a][b]`` = % of images where a's drop < b's (strict), ``ties[a][b]`` = % equal
    (so pairwise[a][b] + pairwise[b][a] + ties[a][b] = 100), computed on images where both
    are finite; ``best[a]`` = % of images where a alone has the lowest drop, ``best["tie"]``
    = % where the lowest drop is shared, over images finite for every method; ``n``.
    """
    names = list(drops)
    arrs = {k: _as_float(v) for k, v in drops.items()}
    sizes = {a.size for a in arrs.values()}
    if len(sizes) > 1:
        raise ValueError(f"every method needs one drop per image; got lengths {sorted(sizes)}")
    pairwise: dict[str, dict[str, float]] = {a: {} for a in names}
    ties: dict[str, dict[str, float]] = {a: {} for a in names}
    for a in names:
        for b in names:
            if a == b:
                continue
            ok = np.isfinite(arrs[a]) & np.isfinite(arrs[b])
            m = max(int(ok.sum()), 1)
            pairwise[a][b] = float(100.0 * (arrs[a][ok] < arrs[b][ok]).sum() / m)
            ties[a][b] = float(100.0 * (arrs[a][ok] == arrs[b][ok]).sum() / m)
    best: dict[str, float] = {}
    n = 0
    if names:
        table = np.stack([arrs[a] for a in names])
        table = table[:, np.isfinite(table).all(axis=0)]
        n = int(table.shape[1])
        low = table.min(axis=0)
        is_low = table == low
        shared = is_low.sum(axis=0) > 1
        denom = max(n, 1)
        for i, a in enumerate(names):
            best[a] = float(100.0 * (is_low[i] & ~shared).sum() / denom)
        best["tie"] = float(100.0 * shared.sum() / denom)
    return {"pairwise": pairwise, "ties": ties, "best": best, "n": n}
