"""COCO run-length encoding of a binary mask, without pycocotools (an export needs only this).

The compressed string form ``pycocotools.mask.encode`` writes: counts of alternating 0 / 1 runs
in column-major order, starting with zeros; each count after the second stored as the
difference to the count two before, in 5-bit groups with a continuation bit, offset by 48
(``rleToString`` in the COCO API's maskApi.c). ``annToMask`` and ``mask.decode`` read it back.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def run_lengths(mask: np.ndarray) -> list[int]:
    """Lengths of the alternating runs of ``mask`` (2-D, truthy = 1) in column-major order,
    the first run being zeros (0 when the first pixel is set)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], edges, [flat.size]))
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat[0] else counts


def counts_string(counts: list[int]) -> str:
    """COCO's compressed ``counts`` string of a run-length list."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as on C's signed long
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def encode(mask: np.ndarray) -> dict:
    """``{"size": [h, w], "counts": "..."}``: the mask as a COCO RLE ``segmentation``."""
    h, w = np.asarray(mask).shape
    return {"size": [int(h), int(w)], "counts": counts_string(run_lengths(mask))}


def from_png(png: bytes) -> tuple[dict, int]:
    """A mask PNG (``pseudo_mask_png``: 1-bit, original size) as (COCO RLE, pixel area)."""
    mask = np.asarray(Image.open(io.BytesIO(png)).convert("L")) > 0
    return encode(mask), int(mask.sum())
