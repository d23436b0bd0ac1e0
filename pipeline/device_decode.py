"""JPEG decode on the actors' device (``resources.decode_device``): the CPU stage only reads
each JPEG's header (size, orientation) and parses the annotations; the actor decodes, resizes
and crops on its device (:mod:`salmap.workers.device_decode`).

A sample goes the CPU way (:func:`salmap.pipeline.decode.decode_row`) when its image is not a plain
JPEG that the device path reproduces: another format, an EXIF rotation, a colour mode other
than RGB or greyscale (CMYK), or anything the header check refuses. So the switch changes
where the work is done, not which samples succeed.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from .decode import (
    DECODE_KINDS,
    DecodeSpec,
    crop_geometry,
    decode_row,
    marker_row,
    suffix_name,
    suffix_value,
    unpack,
)

DEFERRED_MODES = ("RGB", "L")


def jpeg_header(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(height, width) of a JPEG the device can decode as the CPU would; None otherwise."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        img = Image.open(io.BytesIO(data))  # lazy: the header only
        if img.format != "JPEG" or img.mode not in DEFERRED_MODES:
            return None
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: let Pillow rotate it
            return None
        w, h = img.size
    except Exception:  # noqa: BLE001 - the CPU path gives the user the reason
        return None
    if w < 1 or h < 1 or w * h > max_pixels:
        return None
    return h, w


def defer_row(row: dict[str, Any], spec: DecodeSpec) -> dict[str, Any]:
    """One sample -> a decoded row whose ``jpeg`` holds the image bytes for the device (and
    ``image`` None), or the CPU-decoded row where the device path does not apply."""
    data, key = None, None
    for k in spec.image_keys:
        data = suffix_value(row, k)
        if data is not None:
            key = k
            break
    header = jpeg_header(bytes(data), spec.max_pixels) \
        if isinstance(data, (bytes, bytearray)) and not row.get("__error__") else None
    if header is None:
        return {**decode_row(row, spec), "jpeg": b""}
    # the annotations as the CPU path parses them: decode_row without the image member
    out = decode_row({c: v for c, v in row.items() if c != suffix_name(row, key)}, spec)
    h, w = header
    out.update(status="ok", error="", image=None, orig_height=h, orig_width=w,
               image_file=f"{row.get('__key__', '')}.{suffix_name(row, key)}",
               jpeg=bytes(data), **crop_geometry(h, w, spec.resize, spec.crop))
    if spec.keep_image:
        out["image_bytes"] = bytes(data)
    return out


def defer_batch(rows: list[dict[str, Any]], spec: DecodeSpec) -> dict[str, Any]:
    """:func:`salmap.pipeline.decode.decode_batch` for the device path: the same columns (a blank
    image where the device decodes) plus ``jpeg`` (b"" where the CPU decoded)."""
    import numpy as np
    from salmap.workers.columns import numpy_column

    decoded = [{**marker_row(r), "jpeg": b""} if r.get("shard_end") else defer_row(unpack(r), spec)
               for r in rows]
    blank = np.zeros((spec.crop, spec.crop, 3), dtype=np.uint8)
    cols: dict[str, Any] = {"image": np.stack([d["image"] if d["image"] is not None else blank
                                               for d in decoded]) if decoded
                            else np.zeros((0, spec.crop, spec.crop, 3), np.uint8)}
    for name, kind in DECODE_KINDS.items():
        cols[name] = numpy_column(kind, [d[name] for d in decoded])
    cols["jpeg"] = numpy_column("binary", [d["jpeg"] for d in decoded])
    return cols


class DeferredDecode:
    """The decode stage's callable with ``resources.decode_device`` set."""

    def __init__(self, spec: DecodeSpec) -> None:
        self.spec = spec

    def __call__(self, df):  # pandas block from salmap.pipeline.execute._ReadShards
        return defer_batch(df.to_dict("records"), self.spec)
