"""Pseudo boxes and masks from a saliency map (CAM / Grad-CAM thresholding, wsolevaluation).

Foreground = relu(map) > threshold * max (CAM's 0.2 by default; Grad-CAM uses 0.15), or
> the Otsu threshold of relu(map) with ``threshold="otsu"``; then, by default, the largest
8-connected component (by pixel count; wsolevaluation uses the contour area, which can
differ by the boundary pixels). The box is that component's bounding box in continuous
pixel-edge coordinates ``(x0, y0, x1, y1)``, x1/y1 exclusive (= wsolevaluation's inclusive
box plus one), so box IoU needs no +1 terms.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image
from skimage.filters import threshold_otsu
from skimage.measure import label


def foreground(saliency: np.ndarray, threshold: float | str = 0.2,
               largest_component: bool = True) -> np.ndarray:
    """Boolean foreground mask of the map (all False when the map has no positive value)."""
    m = np.maximum(np.nan_to_num(np.asarray(saliency, dtype=np.float64), nan=0.0), 0.0)
    top = m.max() if m.size else 0.0
    if top <= 0:
        return np.zeros(m.shape, dtype=bool)
    if threshold == "otsu":
        t = threshold_otsu(m) if m.min() < top else 0.0
    else:
        try:
            frac = float(threshold)
        except (TypeError, ValueError):
            frac = -1.0
        if not 0 <= frac < 1:
            raise ValueError(
                f"pseudo_threshold must be a fraction in [0, 1) or 'otsu', got {threshold!r}")
        t = frac * top
    fg = m > t
    if largest_component and fg.any():
        labels = label(fg, connectivity=2)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        fg = labels == int(np.argmax(sizes))
    return fg


def mask_box(mask: np.ndarray) -> dict[str, float] | None:
    """Bounding box of a boolean mask as ``{x0, y0, x1, y1}`` (exclusive ends); None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return {"x0": float(cols[0]), "y0": float(rows[0]),
            "x1": float(cols[-1] + 1), "y1": float(rows[-1] + 1)}


def mask_png(mask: np.ndarray) -> bytes:
    """A boolean mask as a 1-bit PNG of the same size."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes (continuous coordinates); 0 if the union is empty."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


def best_iou(box: dict[str, float] | None, gt_boxes: Sequence[Sequence[float]] | None) -> float | None:
    """IoU of the pseudo box with the best-matching GT box; None without GT boxes,
    0 when there is no pseudo box."""
    if not gt_boxes:
        return None
    if box is None:
        return 0.0
    b = (box["x0"], box["y0"], box["x1"], box["y1"])
    return max(box_iou(b, g) for g in gt_boxes)


def box_score(saliency: np.ndarray, box: dict[str, float] | None) -> float | None:
    """The mean of ``relu(map) / max`` inside the box (in [0, 1]): how strongly the map
    supports the box, the confidence a detector trained on it may use."""
    if box is None:
        return None
    m = np.maximum(np.nan_to_num(np.asarray(saliency, dtype=np.float64), nan=0.0), 0.0)
    top = m.max() if m.size else 0.0
    if top <= 0:
        return 0.0
    y0, y1 = int(np.floor(box["y0"])), int(np.ceil(box["y1"]))
    x0, x1 = int(np.floor(box["x0"])), int(np.ceil(box["x1"]))
    region = m[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)]
    return float(region.mean() / top) if region.size else 0.0
