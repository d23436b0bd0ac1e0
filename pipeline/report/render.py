"""Gallery pictures with Pillow: a photo thumbnail and each map overlaid on it, as data URIs.

Maps come from ``saliency_png`` (8-bit at the original image size; ``saliency_min`` and
``saliency_max`` turn it back into values), so the overlay needs no model geometry: both
images are resized to the same thumbnail.

Maps without negative values are drawn on a perceptually uniform sequential colormap
(:data:`SEQUENTIAL`, viridis: equal steps in value look like equal steps in colour, unlike
jet's bright bands), from their minimum to a robust maximum, the :data:`ROBUST_PERCENTILE`
percentile of the map (brighter pixels saturate), so a few extreme pixels do not leave the
rest of the map dark. Signed maps (Integrated Gradients, Gradient x Input, ...) are drawn
either on a diverging scale centred at zero (:data:`DIVERGING`: blue negative, red positive,
more opaque where the evidence is stronger, so the photo shows through where the map is near
zero) or as their absolute value on the sequential scale; either way the scale ends at that
percentile of ``|value|``. A map whose percentile is zero (almost every pixel zero) uses its
maximum.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SEQUENTIAL = "viridis"  # perceptually uniform, also in grey and for colour-blind readers
DIVERGING = "RdBu_r"  # blue < 0 < red, white at zero
ROBUST_PERCENTILE = 99.0  # the scale's end: the top 1% of pixels saturate
THUMB_SIDE = 320  # px, a thumbnail's longest side (the page scales it to its column)
SIGNED_MODES = ("diverging", "abs")
PSEUDO_BOX_COLOR = (255, 255, 255)
TRUTH_BOX_COLOR = (0, 230, 60)
CROP_BOX_COLOR = (200, 200, 200)


@lru_cache(maxsize=8)
def colormap_lut(name: str) -> np.ndarray:
    """A matplotlib colormap as a ``uint8 [256, 3]`` lookup table."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def thumb_size(orig_w: int, orig_h: int, side: int) -> tuple[int, int]:
    """The thumbnail size keeping the aspect ratio, longest side ``side`` (never upscaled past 2x)."""
    scale = min(side / max(orig_w, orig_h), 2.0)
    return max(1, round(orig_w * scale)), max(1, round(orig_h * scale))


def data_uri(img: Image.Image, fmt: str = "JPEG") -> str:
    """An image as a ``data:`` URI (JPEG for photos and overlays, PNG for charts)."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=85)
    else:
        img.save(buf, format=fmt, optimize=False)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def png_uri(png: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(png).decode('ascii')}"


def _scaled(box: Any, sx: float, sy: float) -> list[float] | None:
    if box is None:
        return None
    if isinstance(box, dict):
        box = [box.get("x0"), box.get("y0"), box.get("x1"), box.get("y1")]
    if any(v is None for v in box):
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0 * sx, y0 * sy, x1 * sx, y1 * sy]


def _rect(draw: ImageDraw.ImageDraw, box: list[float], color: tuple[int, int, int]) -> None:
    """A 2 px box with a dark outline, visible on both bright and dark maps."""
    x0, y0, x1, y1 = box
    draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=(0, 0, 0), width=4)
    draw.rectangle([x0, y0, x1, y1], outline=color, width=2)


def _dashed(draw: ImageDraw.ImageDraw, box: list[float], color: tuple[int, int, int],
            dash: int = 4) -> None:
    x0, y0, x1, y1 = (round(v) for v in box)
    for x in range(x0, x1, 2 * dash):
        draw.line([(x, y0), (min(x + dash, x1), y0)], fill=color)
        draw.line([(x, y1), (min(x + dash, x1), y1)], fill=color)
    for y in range(y0, y1, 2 * dash):
        draw.line([(x0, y), (x0, min(y + dash, y1))], fill=color)
        draw.line([(x1, y), (x1, min(y + dash, y1))], fill=color)


def photo_thumbnail(photo: Image.Image | None, orig_w: int, orig_h: int, side: int,
                    truth_boxes: Sequence[Sequence[float]] | None = None) -> Image.Image | None:
    """The photo at thumbnail size with its ground-truth boxes for the explained class."""
    if photo is None:
        return None
    size = thumb_size(orig_w, orig_h, side)
    img = photo.convert("RGB").resize(size, Image.BILINEAR)
    if truth_boxes:
        draw = ImageDraw.Draw(img)
        sx, sy = size[0] / orig_w, size[1] / orig_h
        for b in truth_boxes:
            scaled = _scaled(b, sx, sy)
            if scaled:
                _rect(draw, scaled, TRUTH_BOX_COLOR)
    return img


def map_values(gray: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    """8-bit PNG levels back to map values (``value = level / 255 * (hi - lo) + lo``)."""
    g = np.asarray(gray, dtype=np.float32) / 255.0
    if lo is None or hi is None or not np.isfinite(lo) or not np.isfinite(hi):
        return g
    return g * (float(hi) - float(lo)) + float(lo)


def robust_top(values: np.ndarray) -> float:
    """The :data:`ROBUST_PERCENTILE` percentile of ``values`` (>= 0), or their maximum where
    that percentile is zero; 1.0 for an all-zero map."""
    v = np.asarray(values, dtype=np.float32)
    top = float(np.percentile(v, ROBUST_PERCENTILE)) if v.size else 0.0
    return top if top > 0 else (float(v.max()) if v.size and v.max() > 0 else 1.0)


def colorize(gray: np.ndarray, lo: float | None = None, hi: float | None = None,
             signed: str | None = None, cmap: str = SEQUENTIAL,
             alpha: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """RGB ``uint8 [h, w, 3]`` and per-pixel opacity ``[h, w]`` of a map's PNG levels.

    ``signed``: None draws the levels from the minimum to the robust top (:func:`robust_top`)
    on ``cmap``; ``"diverging"`` centres zero on :data:`DIVERGING` with opacity growing with
    ``|value|`` up to the robust top of ``|value|``; ``"abs"`` draws ``|value|`` on ``cmap``
    up to that top.
    """
    gray = np.asarray(gray)
    if signed not in SIGNED_MODES:
        g = gray.astype(np.float32) - float(gray.min()) if gray.size else gray.astype(np.float32)
        idx = np.round(np.clip(g / robust_top(g), 0.0, 1.0) * 255.0).astype(np.uint8)
        return colormap_lut(cmap)[idx], np.full(gray.shape, alpha, np.float32)
    v = map_values(gray, lo, hi)
    # zero is stored between levels 127 and 128 (half a step either side): both are zero
    half = 0.51 * abs(float(hi) - float(lo)) / 255.0 if lo is not None and hi is not None else 0.0
    v = np.where(np.abs(v) <= half, 0.0, v)
    m = robust_top(np.abs(v))
    t = np.clip(v / m, -1.0, 1.0)
    if signed == "diverging":
        idx = np.round((t + 1.0) * 127.5).astype(np.uint8)
        return colormap_lut(DIVERGING)[idx], (np.abs(t) * min(1.0, alpha * 1.7)).astype(np.float32)
    idx = np.round(np.abs(t) * 255.0).astype(np.uint8)
    return colormap_lut(cmap)[idx], np.full(gray.shape, alpha, np.float32)


def overlay(saliency_png: bytes, orig_w: int, orig_h: int, side: int,
            photo: Image.Image | None = None, pseudo_box: Any = None, crop_box: Any = None,
            cmap: str = SEQUENTIAL, alpha: float = 0.5,
            value_range: tuple[float, float] | None = None,
            signed: str | None = None) -> Image.Image:
    """The colour-mapped map blended over the photo (the map alone when there is no photo),
    with the pseudo box (solid) and the model's input crop (dashed) drawn on top.

    ``value_range``: the row's ``(saliency_min, saliency_max)``; ``signed``: how a map with
    negative values is drawn (see :func:`colorize`; None: as stored, min-max).
    """
    size = thumb_size(orig_w, orig_h, side)
    gray = Image.open(io.BytesIO(saliency_png)).convert("L").resize(size, Image.BILINEAR)
    lo, hi = value_range if value_range is not None else (None, None)
    colored, a = colorize(np.asarray(gray), lo, hi, signed, cmap, alpha)
    if photo is not None:
        base = np.asarray(photo.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32)
        a = a[..., None]
        colored = (base * (1.0 - a) + colored.astype(np.float32) * a + 0.5).astype(np.uint8)
    elif signed == "diverging":  # no photo: the scale on white
        a = a[..., None]
        colored = (255.0 * (1.0 - a) + colored.astype(np.float32) * a + 0.5).astype(np.uint8)
    img = Image.fromarray(colored, mode="RGB")
    draw = ImageDraw.Draw(img)
    sx, sy = size[0] / orig_w, size[1] / orig_h
    crop = _scaled(crop_box, sx, sy)
    if crop and (crop[0] > 1 or crop[1] > 1 or crop[2] < size[0] - 1 or crop[3] < size[1] - 1):
        _dashed(draw, crop, CROP_BOX_COLOR)
    pseudo = _scaled(pseudo_box, sx, sy)
    if pseudo:
        _rect(draw, pseudo, PSEUDO_BOX_COLOR)
    return img


def colorbar(cmap: str, width: int = 240, height: int = 12) -> Image.Image:
    """A horizontal colour bar (low to high) for the gallery legend."""
    row = colormap_lut(cmap)[np.linspace(0, 255, width).astype(np.uint8)]
    return Image.fromarray(np.repeat(row[None], height, axis=0), mode="RGB")
