"""Between original-image pixels and the model input (resize, then crop).

``transform`` = ``{"orig_h", "orig_w", "resized_h", "resized_w", "crop_top", "crop_left",
"crop_h", "crop_w"}``: the original image was resized (bilinear) to ``resized_h x resized_w``,
then cropped at ``(crop_top, crop_left)`` to ``crop_h x crop_w``, the model input.

Coordinates are continuous pixel edges: pixel (i, j) covers [j, j+1) x [i, i+1), boxes are
``(x0, y0, x1, y1)`` with x1, y1 exclusive, so a resize by s maps x to s * x exactly
(consistent with bilinear interpolation with align_corners=False).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

KEYS = ("orig_h", "orig_w", "resized_h", "resized_w", "crop_top", "crop_left", "crop_h", "crop_w")


def _check(transform: dict[str, Any]) -> dict[str, int]:
    missing = [k for k in KEYS if k not in transform]
    if missing:
        raise ValueError(f"transform lacks {', '.join(missing)} (needs {', '.join(KEYS)})")
    t = {k: int(transform[k]) for k in KEYS}
    for k in ("orig_h", "orig_w", "resized_h", "resized_w", "crop_h", "crop_w"):
        if t[k] < 1:
            raise ValueError(f"transform[{k!r}] must be >= 1, got {t[k]}")
    return t


def _resize(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[h, w]`` (align_corners=False; antialiased when shrinking)."""
    if tuple(a.shape) == tuple(size):
        return a
    shrink = size[0] < a.shape[0] or size[1] < a.shape[1]
    out = F.interpolate(a[None, None], size=size, mode="bilinear", align_corners=False,
                        antialias=shrink)
    return out[0, 0]


def _as_map(saliency: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A 2-D map as a float32 CPU tensor."""
    m = torch.as_tensor(np.asarray(saliency, dtype=np.float32) if not isinstance(
        saliency, torch.Tensor) else saliency.detach().float().cpu())
    if m.dim() != 2:
        raise ValueError(f"saliency must be [h, w], got shape {tuple(m.shape)}")
    return m


def map_to_original(saliency: np.ndarray | torch.Tensor, transform: dict[str, Any]) -> np.ndarray:
    """A map over the model input (any resolution) -> ``float32 [orig_h, orig_w]``.

    Upsample to the crop size, paste into the resized frame (0 outside the crop), resize
    that frame to the original size. Values keep their scale (no normalisation).
    """
    t = _check(transform)
    m = _as_map(saliency)
    crop = _resize(m, (t["crop_h"], t["crop_w"]))
    frame = torch.zeros(t["resized_h"], t["resized_w"], dtype=torch.float32)
    top, left = t["crop_top"], t["crop_left"]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + t["crop_h"], t["resized_h"]), min(left + t["crop_w"], t["resized_w"])
    if y0 < y1 and x0 < x1:
        frame[y0:y1, x0:x1] = crop[y0 - top:y1 - top, x0 - left:x1 - left]
    return _resize(frame, (t["orig_h"], t["orig_w"])).numpy().astype(np.float32)


def map_to_input(saliency: np.ndarray | torch.Tensor, transform: dict[str, Any]) -> np.ndarray:
    """A map over the model input (any resolution) -> ``float32 [crop_h, crop_w]``: the map at
    the model input's resolution (bilinear, align_corners=False), the frame in which the
    model metrics rank pixels and in which map-only statistics (Gini) are computed."""
    t = _check(transform)
    m = _as_map(saliency)
    return _resize(m, (t["crop_h"], t["crop_w"])).numpy().astype(np.float32)


def box_to_input(box: Sequence[float], transform: dict[str, Any]) -> list[float]:
    """Original-pixel box -> model-input box, clipped to the crop (may become empty)."""
    t = _check(transform)
    sx, sy = t["resized_w"] / t["orig_w"], t["resized_h"] / t["orig_h"]
    x0, y0, x1, y1 = (float(v) for v in box)
    out = [x0 * sx - t["crop_left"], y0 * sy - t["crop_top"],
           x1 * sx - t["crop_left"], y1 * sy - t["crop_top"]]
    w, h = t["crop_w"], t["crop_h"]
    return [min(max(out[0], 0.0), w), min(max(out[1], 0.0), h),
            min(max(out[2], 0.0), w), min(max(out[3], 0.0), h)]


def box_to_original(box: Sequence[float], transform: dict[str, Any]) -> list[float]:
    """Model-input box -> original-pixel box (the inverse of :func:`box_to_input`)."""
    t = _check(transform)
    sx, sy = t["orig_w"] / t["resized_w"], t["orig_h"] / t["resized_h"]
    x0, y0, x1, y1 = (float(v) for v in box)
    return [(x0 + t["crop_left"]) * sx, (y0 + t["crop_top"]) * sy,
            (x1 + t["crop_left"]) * sx, (y1 + t["crop_top"]) * sy]


def maps_to_original(maps: np.ndarray | torch.Tensor, transform: dict[str, Any],
                     size: tuple[int, int] | None = None) -> torch.Tensor:
    """:func:`map_to_original` of ``[B, h, w]`` maps that share one transform, in one pass:
    ``float32 [B, orig_h, orig_w]`` (the same values, each map resampled on its own). ``size``:
    the original frame at another ``(height, width)`` instead (a preview)."""
    t = _check(transform)
    return maps_to_sizes(maps, t, [size or (t["orig_h"], t["orig_w"])])[0]


def maps_to_sizes(maps: np.ndarray | torch.Tensor, transform: dict[str, Any],
                  sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """:func:`maps_to_original` at each of ``sizes``: the maps are laid on the resized frame
    once and that frame resampled to every size."""
    t = _check(transform)
    m = torch.as_tensor(maps).float()
    if m.dim() != 3:
        raise ValueError(f"maps must be [B, h, w], got shape {tuple(m.shape)}")
    crop = _resize_batch(m, (t["crop_h"], t["crop_w"]))
    frame = torch.zeros(m.shape[0], t["resized_h"], t["resized_w"], dtype=torch.float32)
    top, left = t["crop_top"], t["crop_left"]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + t["crop_h"], t["resized_h"]), min(left + t["crop_w"], t["resized_w"])
    if y0 < y1 and x0 < x1:
        frame[:, y0:y1, x0:x1] = crop[:, y0 - top:y1 - top, x0 - left:x1 - left]
    return [_resize_batch(frame, size) for size in sizes]


def _resize_batch(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`_resize` of every ``[h, w]`` map of ``[B, h, w]``."""
    if tuple(a.shape[1:]) == tuple(size):
        return a
    shrink = size[0] < a.shape[1] or size[1] < a.shape[2]
    out = F.interpolate(a[:, None], size=size, mode="bilinear", align_corners=False,
                        antialias=shrink)
    return out[:, 0]
