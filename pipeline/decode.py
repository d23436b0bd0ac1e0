"""Raw WebDataset bytes -> model-ready uint8 crops, plus the transform back to original pixels.

Runs as CPU tasks before the model actors. A sample that cannot be decoded becomes an error
row with a reason a user can act on; it never fails the batch.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from salmap.workers.columns import DECODE_COLUMNS, DECODE_KINDS, SHARD_END, numpy_column

__all__ = ["DECODE_COLUMNS", "DECODE_KINDS", "SHARD_END", "DecodeError", "DecodeSpec",
           "decode_batch", "decode_row", "marker_row", "shard_name", "suffix_name", "suffix_value",
           "to_rgb", "unpack"]
_DECODE_KINDS = DECODE_KINDS  # the name tests knew it by


class DecodeError(ValueError):
    """A sample's image or annotations cannot be used (the message is shown to the user)."""


@dataclass(frozen=True)
class DecodeSpec:
    """What the decode stage needs to know: keys to look for and the model's geometry."""

    image_keys: tuple[str, ...]
    label_key: str
    boxes_key: str
    crop: int
    resize: int
    max_pixels: int
    mask_key: str = ""  # ground-truth label mask (e.g. "seg.png"), passed on as bytes
    keep_image: bool = False  # pass the image's bytes on (dense-CRF refinement of label maps)


def shard_name(url: str) -> str:
    """The shard's file name without its ``.tar`` suffix: the first part of a sample id."""
    base = os.path.basename(str(url).rstrip("/"))
    return base[:-4] if base.lower().endswith(".tar") else base


def suffix_value(row: dict[str, Any], wanted: str) -> Any:
    """The value of the sample's member ``wanted`` (any case; not NaN), or None."""
    for col, value in row.items():
        if col.startswith("__"):
            continue
        if col.lower() == wanted.lower() and value is not None and not _is_nan(value):
            return value
    return None


def suffix_name(row: dict[str, Any], wanted: str) -> str:
    """The suffix as spelled in the shard (``JPG`` for ``jpg``)."""
    return next((c for c in row if c.lower() == wanted.lower()), wanted)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and float images rescaled, alpha composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 65535.0 * 255.0 if arr.max(initial=0) > 255 else arr
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        if img.mode == "F" and hi > lo:
            arr = (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


class _PixelLimit:
    """Pillow's own decompression-bomb limit (the module global ``Image.MAX_IMAGE_PIXELS``) set
    to a call's ``input.max_pixels`` for the call, and restored after it. Calls with the same
    limit run concurrently; a call with another limit waits until they are done, so no call
    ever decodes under another call's limit."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._limit: int | None = None
        self._saved: int | None = None

    @contextlib.contextmanager
    def __call__(self, limit: int) -> Iterator[None]:
        with self._cond:
            while self._users and self._limit != limit:
                self._cond.wait()
            if not self._users:
                self._saved, self._limit = Image.MAX_IMAGE_PIXELS, limit
                Image.MAX_IMAGE_PIXELS = limit
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if not self._users:
                    Image.MAX_IMAGE_PIXELS, self._limit = self._saved, None
                    self._cond.notify_all()


pixel_limit = _PixelLimit()


def _bomb_error(err: Exception, max_pixels: int) -> DecodeError:
    m = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(m.group(1))} pixels" if m else "too many pixels"
    return DecodeError(f"image refused as a decompression bomb: {size}, above input.max_pixels="
                       f"{max_pixels}; raise input.max_pixels if the image is genuine")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes to RGB with EXIF orientation applied; refuse bombs and corrupt data.

    ``max_pixels`` is Pillow's limit for this call, raised or lowered (Pillow's default would
    otherwise refuse genuine images above 89 M pixels whatever the config says).
    """
    if not data:
        raise DecodeError("image file is empty (0 bytes)")
    with pixel_limit(max_pixels), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _bomb_error(err, max_pixels) from None
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
            raise DecodeError(
                f"not a readable image ({len(data)} bytes, {type(err).__name__}); "
                "check the file is a JPEG, PNG or WebP"
            ) from None
        w, h = img.size
        if w * h > max_pixels:
            raise DecodeError(
                f"image is {w}x{h} = {w * h} pixels, above input.max_pixels={max_pixels} "
                "(decompression-bomb guard); raise input.max_pixels if the image is genuine"
            )
        if w < 1 or h < 1:
            raise DecodeError(f"image has an empty size {w}x{h}")
        try:
            img.load()
            img = ImageOps.exif_transpose(img) or img
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _bomb_error(err, max_pixels) from None
        except Exception as err:  # noqa: BLE001
            raise DecodeError(
                f"image data is truncated or corrupt ({type(err).__name__}: {err}); "
                "re-export the file"
            ) from None
    return to_rgb(img)


def crop_geometry(orig_h: int, orig_w: int, resize: int, crop: int) -> dict[str, int]:
    """Resize the short side to ``resize``, center-crop ``crop`` x ``crop`` (torchvision style)."""
    scale = resize / min(orig_h, orig_w)
    resized_h = max(crop, int(round(orig_h * scale)))
    resized_w = max(crop, int(round(orig_w * scale)))
    return {
        "resized_h": resized_h, "resized_w": resized_w,
        "crop_top": (resized_h - crop) // 2, "crop_left": (resized_w - crop) // 2,
        "crop_h": crop, "crop_w": crop,
    }


def preprocess(img: Image.Image, resize: int, crop: int) -> tuple[np.ndarray, dict[str, int]]:
    """The model's crop as uint8 HWC, resampled straight from the original (one resample)."""
    w, h = img.size
    geo = crop_geometry(h, w, resize, crop)
    sx, sy = geo["resized_w"] / w, geo["resized_h"] / h
    box = (
        geo["crop_left"] / sx, geo["crop_top"] / sy,
        (geo["crop_left"] + crop) / sx, (geo["crop_top"] + crop) / sy,
    )
    out = img.resize((crop, crop), Image.BILINEAR, box=box, reducing_gap=None)
    return np.asarray(out, dtype=np.uint8), geo


def parse_label(raw: Any) -> int:
    """A class label from a shard's ``cls`` member (bytes, text or int); DecodeError when it is
    not an integer."""
    if isinstance(raw, (int, np.integer)):
        return int(raw)
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        raise DecodeError(f"label (.cls) is not an integer: {text[:40]!r}") from None


def parse_boxes(raw: Any) -> dict:
    """``{"boxes": [[x0,y0,x1,y1], ...], "labels": [c, ...], "difficult": [bool, ...]}``
    validated and normalised (``difficult`` optional, kept only when given)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DecodeError(f"annotation (.json) is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise DecodeError("annotation (.json) must be an object with 'boxes' and 'labels'")
    boxes = obj.get("boxes", [])
    labels = obj.get("labels", [])
    if not isinstance(boxes, list) or not isinstance(labels, list):
        raise DecodeError("annotation (.json): 'boxes' and 'labels' must be lists")
    clean = []
    for b in boxes:
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
            raise DecodeError(f"annotation (.json): box {b!r} is not [x0, y0, x1, y1]")
        clean.append([float(v) for v in b])
    if labels and len(labels) != len(clean):
        raise DecodeError(f"annotation (.json): {len(clean)} boxes but {len(labels)} labels")
    try:
        labels = [int(v) for v in labels]
    except (TypeError, ValueError):
        raise DecodeError("annotation (.json): labels must be integers") from None
    out: dict[str, Any] = {"boxes": clean, "labels": labels}
    if "difficult" in obj:  # VOC: one flag per box (true/false or 1/0)
        flags = obj["difficult"]
        if not (isinstance(flags, list) and len(flags) == len(clean)
                and all(isinstance(v, (bool, int)) and v in (0, 1) for v in flags)):
            raise DecodeError(f"annotation (.json): 'difficult' must list one true/false (or 1/0) "
                              f"per box, got {flags!r}"[:200])
        out["difficult"] = [bool(v) for v in flags]
    return out


def _sidecar_error(err: Exception, what: str) -> str:
    """Why a ``.cls`` / ``.json`` was ignored: the parser's message, or for any other failure
    (a ``.json`` nested 10^6 deep raises RecursionError) its type; never raised further."""
    if isinstance(err, DecodeError):
        return str(err)
    if isinstance(err, RecursionError):
        return f"annotation ({what}) is nested too deeply to parse; ignored"
    return f"annotation ({what}) cannot be parsed ({type(err).__name__}: {str(err)[:120]}); ignored"


def decode_row(row: dict[str, Any], spec: DecodeSpec) -> dict[str, Any]:
    """One WebDataset sample (raw bytes per suffix) -> one decoded row (ok or error)."""
    shard = shard_name(row.get("__url__", ""))
    key = str(row.get("__key__", ""))
    out: dict[str, Any] = {
        "sample_id": f"{shard}/{key}", "shard": shard, "key": key, "image_file": "",
        "image": None, "orig_height": -1, "orig_width": -1,
        "resized_h": 0, "resized_w": 0, "crop_top": 0, "crop_left": 0, "crop_h": 0, "crop_w": 0,
        "label": -1, "label_error": "", "boxes_json": "", "boxes_error": "",
        "image_bytes": b"", "gt_mask_bytes": b"",
        "shard_samples": -1, "shard_error": "", "status": "ok", "error": "",
    }
    if row.get("__error__"):  # the shard reader could not read this sample whole
        out["status"], out["error"] = "error", str(row["__error__"])
        return out
    raw_label = suffix_value(row, spec.label_key) if spec.label_key else None
    if raw_label is not None:
        try:
            out["label"] = parse_label(raw_label)
        except Exception as err:  # noqa: BLE001 - a sidecar fails only its sample
            out["label_error"] = _sidecar_error(err, f".{spec.label_key}")
    raw_boxes = suffix_value(row, spec.boxes_key) if spec.boxes_key else None
    if raw_boxes is not None:
        try:
            out["boxes_json"] = json.dumps(parse_boxes(raw_boxes))
        except Exception as err:  # noqa: BLE001 - RecursionError, MemoryError, ...: this sample's
            out["boxes_error"] = _sidecar_error(err, f".{spec.boxes_key}")
    raw_mask = suffix_value(row, spec.mask_key) if spec.mask_key else None
    if isinstance(raw_mask, (bytes, bytearray)):
        out["gt_mask_bytes"] = bytes(raw_mask)
    data = None
    for k in spec.image_keys:
        data = suffix_value(row, k)
        if data is not None:
            out["image_file"] = f"{key}.{suffix_name(row, k)}"
            break
    try:
        if data is None:
            present = sorted(c for c in row if not c.startswith("__") and row[c] is not None
                             and not _is_nan(row[c]))
            raise DecodeError(
                "sample has no image: looked for ." + ", .".join(spec.image_keys)
                + "; found: " + (", ".join("." + p for p in present) or "nothing")
                + " (set input.image_keys if the images use another suffix)"
            )
        if not isinstance(data, (bytes, bytearray)):
            raise DecodeError(f"image member is not raw bytes ({type(data).__name__})")
        img = open_image(bytes(data), spec.max_pixels)
        out["orig_width"], out["orig_height"] = img.size
        arr, geo = preprocess(img, spec.resize, spec.crop)
        out["image"] = arr
        out.update(geo)
        if spec.keep_image:
            out["image_bytes"] = bytes(data)
    except DecodeError as err:
        out["status"], out["error"] = "error", str(err)
    except Exception as err:  # noqa: BLE001 - never fail the batch on one sample
        out["status"], out["error"] = "error", f"could not decode image: {type(err).__name__}: {err}"
    return out


def unpack(row: dict[str, Any]) -> dict[str, Any]:
    """A shard reader row carries its members pickled in ``members``: spread them out."""
    packed = row.get("members")
    if not isinstance(packed, (bytes, bytearray)):
        return row
    import pickle

    out = {k: v for k, v in row.items() if k != "members"}
    out.update(pickle.loads(packed) if packed else {})
    return out


def marker_row(row: dict[str, Any]) -> dict[str, Any]:
    """The decoded form of a shard-end marker: which shard, how many samples, why it ended."""
    shard = shard_name(row.get("__url__", ""))
    return {
        "sample_id": "", "shard": shard, "key": "", "image_file": "", "image": None,
        "orig_height": -1, "orig_width": -1, "resized_h": 0, "resized_w": 0, "crop_top": 0,
        "crop_left": 0, "crop_h": 0, "crop_w": 0, "label": -1, "label_error": "",
        "boxes_json": "", "boxes_error": "", "image_bytes": b"", "gt_mask_bytes": b"",
        "shard_samples": int(row.get("shard_samples", 0)),
        "shard_error": str(row.get("__error__") or ""),
        "status": SHARD_END, "error": "unreadable" if row.get("unreadable") else "",
    }


def decode_batch(rows: list[dict[str, Any]], spec: DecodeSpec) -> dict[str, np.ndarray]:
    """Decode rows into a column batch; error rows carry a zero image of the same shape.

    A row is either a WebDataset sample (``__key__``, ``__url__`` and one raw-bytes value per
    suffix) or a shard-end marker (``shard_end`` true), which is passed on.
    """
    decoded = [marker_row(r) if r.get("shard_end") else decode_row(unpack(r), spec) for r in rows]
    blank = np.zeros((spec.crop, spec.crop, 3), dtype=np.uint8)
    batch: dict[str, np.ndarray] = {}
    batch["image"] = np.stack([d["image"] if d["image"] is not None else blank for d in decoded]) \
        if decoded else np.zeros((0, spec.crop, spec.crop, 3), np.uint8)
    for col, kind in DECODE_KINDS.items():
        batch[col] = numpy_column(kind, [d[col] for d in decoded])
    return batch
