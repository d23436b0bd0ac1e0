"""Gallery pictures with Pillow: a photo thumbnail and each map overlaid on it, as data URIs.

Maps come from ``saliency_png`` (8-bit, min-max scaled per map, at the original image size),
so the overlay needs no model geometry: both images are resized to the same thumbnail.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

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


def overlay(saliency_png: bytes, orig_w: int, orig_h: int, side: int,
            photo: Image.Image | None = None, pseudo_box: Any = None, crop_box: Any = None,
            cmap: str = "jet", alpha: float = 0.5) -> Image.Image:
    """The colour-mapped map blended over the photo (the map alone when there is no photo),
    with the pseudo box (solid) and the model's input crop (dashed) drawn on top."""
    size = thumb_size(orig_w, orig_h, side)
    gray = Image.open(io.BytesIO(saliency_png)).convert("L").resize(size, Image.BILINEAR)
    colored = colormap_lut(cmap)[np.asarray(gray)]
    if photo is not None:
        base = np.asarray(photo.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32)
        colored = (base * (1.0 - alpha) + colored.astype(np.float32) * alpha + 0.5).astype(np.uint8)
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
