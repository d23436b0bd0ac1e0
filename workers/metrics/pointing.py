"""Pointing game (EBP protocol as implemented by TorchRay) and energy pointing game (Score-CAM).

Both work on the map in original-image pixels and GT boxes of the explained class in the
same frame, ``(x0, y0, x1, y1)`` with continuous pixel-edge coordinates (x1, y1 exclusive):
a pixel belongs to a box when its centre lies inside it, so an integer box covers columns
x0 .. x1-1 (VOC 1-based inclusive boxes become ``(xmin - 1, ymin - 1, xmax, ymax)``, which
gives the same pixels TorchRay fills). The GT region is the union of the class's boxes,
clipped to the image, difficult ones included; a pointing trial whose boxes are all flagged
difficult (VOC) is skipped, as in TorchRay's ``PointingGameBenchmark``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Box = Sequence[float]


def box_pixels(box: Box, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Inclusive pixel index range ``(c0, r0, c1, r1)`` of a box, clipped; None if empty."""
    x0, y0, x1, y1 = (float(v) for v in box)
    c0, r0 = max(math.ceil(x0 - 0.5), 0), max(math.ceil(y0 - 0.5), 0)
    c1, r1 = min(math.ceil(x1 - 0.5) - 1, width - 1), min(math.ceil(y1 - 0.5) - 1, height - 1)
    if c1 < c0 or r1 < r0:
        return None
    return c0, r0, c1, r1


def boxes_mask(boxes: Sequence[Box], height: int, width: int) -> np.ndarray:
    """Boolean ``[height, width]`` union of the boxes."""
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        px = box_pixels(box, height, width)
        if px is not None:
            c0, r0, c1, r1 = px
            mask[r0:r1 + 1, c0:c1 + 1] = True
    return mask


def argmax_point(saliency: np.ndarray) -> tuple[int, int]:
    """(column, row) of the map's maximum; the first in raster order on ties (TorchRay);
    NaN never wins."""
    flat = np.nan_to_num(np.asarray(saliency, dtype=np.float64).ravel(), nan=-np.inf)
    row, col = divmod(int(np.argmax(flat)), saliency.shape[1])
    return col, row


def pointing_hit(saliency: np.ndarray, boxes: Sequence[Box] | None,
                 tolerance: float = 15.0, difficult: Sequence[bool] | None = None) -> bool | None:
    """True when some GT pixel lies strictly within ``tolerance`` px of the map's argmax
    (TorchRay tests du^2 + dv^2 < tau^2); None (no trial) without boxes or when ``difficult``
    (one flag per box) flags every box."""
    if difficult is not None:
        if len(difficult) != len(boxes or []):
            raise ValueError(f"difficult needs one flag per box, got {len(difficult)} flags "
                             f"for {len(boxes or [])} boxes")
        if all(bool(d) for d in difficult):
            return None
    h, w = saliency.shape
    ranges = [px for px in (box_pixels(b, h, w) for b in boxes or []) if px is not None]
    if not ranges:
        return None
    u, v = argmax_point(saliency)
    for c0, r0, c1, r1 in ranges:
        du = max(c0 - u, 0, u - c1)
        dv = max(r0 - v, 0, v - r1)
        if du * du + dv * dv < tolerance * tolerance:
            return True
    return False


def energy_pointing(saliency: np.ndarray, boxes: Sequence[Box] | None,
                    sign: str = "relu") -> float | None:
    """Share of the non-negative map's energy inside the union of the boxes (each pixel
    counted once). None without boxes or when the map has no energy."""
    if not boxes:
        return None
    m = np.nan_to_num(np.asarray(saliency, dtype=np.float64), nan=0.0)
    if sign == "relu":
        m = np.maximum(m, 0.0)
    elif sign == "abs":
        m = np.abs(m)
    else:
        raise ValueError(f"energy_sign must be 'relu' or 'abs', got {sign!r}")
    total = float(m.sum())
    if total <= 0:
        return None
    mask = boxes_mask(boxes, *m.shape)
    return float(m[mask].sum() / total)
