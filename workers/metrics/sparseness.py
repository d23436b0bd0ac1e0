"""Sparseness as the Gini index of a map (Quantus ``Sparseness``; Chalasani et al. 2020).

a = |map| / max|map| + eps, sorted ascending; Gini = sum_i (2i - n - 1) a_i / (n sum_i a_i).
0 for a constant map, (n-1)/n for a one-hot map without eps (eps = 1e-7 caps it slightly);
higher = more concentrated. Scale- and permutation-invariant. The value depends on the map's
resolution (an upsampled 7x7 CAM is smoother than a pixel-level gradient) and on any padding
(zeros count as concentration): the post stage computes it on the map over the model input,
upsampled bilinearly to the input's resolution (:func:`salmap.workers.metrics.geometry.map_to_input`),
so every method is compared at one resolution and the photo's margin outside the centre crop,
which the model never saw, does not count.
"""

from __future__ import annotations

import numpy as np


def gini(saliency: np.ndarray, eps: float = 1e-7) -> float:
    """Gini index of ``|saliency|`` (any shape; NaN counts as 0)."""
    a = np.abs(np.nan_to_num(np.asarray(saliency, dtype=np.float64), nan=0.0)).ravel()
    n = a.size
    if n == 0:
        return float("nan")
    top = a.max()
    if top > 0:
        a = a / top
    a = np.sort(a + eps)
    weights = 2.0 * np.arange(1, n + 1) - n - 1
    return float((weights * a).sum() / (n * a.sum()))
