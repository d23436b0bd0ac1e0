"""Per-image label maps from the maps of all of an image's explained classes (IRN convention).

A label map gives every pixel of the original image one value:

* ``0`` background,
* ``c + 1`` for model class ``c`` (so class 0 stays distinct from background),
* :data:`IGNORE` (65535) for pixels a training loss should skip: the uncertain band between the
  background and the foreground threshold, and the parts of the image the model never saw
  (outside its centre crop).

The map is stored as a 16-bit grayscale PNG (:func:`encode_png`): 1000 ImageNet classes do not
fit an 8-bit PNG with 255 reserved. ``salmap export --format voc-masks`` rewrites it as the
8-bit palette PNG that VOC-style training code reads (:mod:`salmap.pipeline.export`).

Thresholds follow IRN (Ahn, Cho & Kwak, CVPR 2019; ``jiwoon-ahn/irn``, ``run_sample.py``
``conf_fg_thres=0.30``, ``conf_bg_thres=0.05``; ``step/cam_to_ir_label.py``): each class map is
made non-negative and divided by its maximum, a pixel takes the class with the highest score
when that score is above ``fg``, is background when every score is at most ``bg``, and is
ignored in between. IRN divides by ``max + 1e-5``; here a map is divided by its maximum alone,
so the labels do not depend on the map's scale (gradients are often far below 1e-5).

The post stage needs all of a sample's maps together, but its batches may split a sample's
rows. :func:`attach_sample_maps` therefore runs on the model actor's output (where all rows of
a sample are present) and packs the sample's maps onto its first ``ok`` row.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

IGNORE = 65535
BACKGROUND = 0
FG_THRESHOLD = 0.30  # IRN conf_fg_thres
BG_THRESHOLD = 0.05  # IRN conf_bg_thres

# decode-stage columns only the sample's designated row needs in the post stage
PER_SAMPLE_BYTES = ("image_bytes", "gt_mask_bytes")


def class_scores(maps: np.ndarray) -> np.ndarray:
    """``[k, H, W]`` raw maps -> ``relu(map) / max(relu(map))`` per class (zeros for a map
    without a positive value), float32."""
    m = np.maximum(np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0), 0.0)
    if m.ndim != 3:
        raise ValueError(f"maps must be [k, H, W], got shape {m.shape}")
    top = m.reshape(len(m), -1).max(axis=1) if m.size else np.zeros(len(m), np.float32)
    scale = np.where(top > 0, top, 1.0).astype(np.float32)
    return m / scale[:, None, None]


def check_thresholds(fg: float, bg: float) -> None:
    """Raise ValueError unless ``0 <= bg <= fg < 1``."""
    if not (0.0 <= float(bg) <= float(fg) < 1.0):
        raise ValueError(f"label map thresholds need 0 <= bg <= fg < 1, got fg={fg}, bg={bg}")


def label_ids(classes: Sequence[int]) -> np.ndarray:
    """Label-map values of model classes (``c + 1``)."""
    ids = np.asarray([int(c) + 1 for c in classes], dtype=np.int64)
    if ids.size and (ids.min() < 1 or ids.max() >= IGNORE):
        raise ValueError(f"class ids must be in [0, {IGNORE - 2}], got {list(classes)}")
    return ids


def label_map(scores: np.ndarray, classes: Sequence[int], fg: float = FG_THRESHOLD,
              bg: float = BG_THRESHOLD, valid: np.ndarray | None = None) -> np.ndarray:
    """The label map (uint16 ``[H, W]``) of normalised class scores ``[k, H, W]``.

    A pixel is class ``classes[j]`` (value ``classes[j] + 1``) when its best score, that of
    class ``j``, is ``> fg``; background (0) when every score is ``<= bg``; :data:`IGNORE`
    otherwise, and wherever ``valid`` is False. Ties go to the lower index, as ``argmax`` does.
    """
    check_thresholds(fg, bg)
    s = np.asarray(scores, dtype=np.float32)
    if s.ndim != 3 or len(s) != len(classes):
        raise ValueError(f"scores {s.shape} do not match {len(classes)} classes")
    ids = label_ids(classes)
    if len(s) == 0:
        out = np.zeros(s.shape[1:], np.uint16)
    else:
        top, best = s.max(axis=0), s.argmax(axis=0)
        out = np.where(top > fg, ids[best], np.where(top > bg, IGNORE, BACKGROUND)).astype(np.uint16)
    if valid is not None:
        out[~np.asarray(valid, dtype=bool)] = IGNORE
    return out


def crop_valid(h: int, w: int, crop_box: dict[str, float] | None) -> np.ndarray | None:
    """Pixels of an ``h x w`` original image whose centre lies in the model's input region
    (``crop_box`` in original pixels, exclusive ends); None when there is no crop box."""
    if crop_box is None:
        return None
    ys = np.arange(h) + 0.5
    xs = np.arange(w) + 0.5
    rows = (ys >= crop_box["y0"]) & (ys < crop_box["y1"])
    cols = (xs >= crop_box["x0"]) & (xs < crop_box["x1"])
    return rows[:, None] & cols[None, :]


def encode_png(lm: np.ndarray) -> bytes:
    """A label map as a 16-bit grayscale PNG."""
    arr = np.ascontiguousarray(lm, dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """A label-map PNG (:func:`encode_png`) back to uint16 ``[H, W]``."""
    img = Image.open(io.BytesIO(data))
    img.load()
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"a label map PNG must be single-channel, got mode {img.mode}")
    return arr.astype(np.uint16)


def classes_in(lm: np.ndarray) -> list[int]:
    """The model classes present in a label map (background and ignore left out)."""
    values = np.unique(lm)
    return [int(v) - 1 for v in values if v not in (BACKGROUND, IGNORE)]


# -- carrying a sample's maps from the actor to the post stage ------------------------------
def pack_maps(targets: Sequence[int], maps: np.ndarray) -> bytes:
    """``targets`` and their maps ``[k, h, w]`` as bytes (numpy ``.npy`` records, no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(targets, dtype=np.int64), allow_pickle=False)
    np.save(buf, np.ascontiguousarray(maps), allow_pickle=False)
    return buf.getvalue()


def unpack_maps(data: bytes) -> tuple[list[int], np.ndarray]:
    """A sample's packed maps -> (its targets, the maps ``[T, h, w]``)."""
    buf = io.BytesIO(data)
    targets = np.load(buf, allow_pickle=False)
    maps = np.load(buf, allow_pickle=False)
    return [int(t) for t in targets], maps


def attach_sample_maps(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Give an actor output batch a ``sample_maps`` column: on the first ``ok`` row of each
    sample, the packed maps of all the sample's ``ok`` rows (:func:`pack_maps`); ``b""``
    elsewhere. The per-sample byte columns (image, ground-truth mask) are kept on that row
    only, so they cross to the post stage once per sample, not once per target.

    Must run on a whole actor output: the rows of one sample all come out of one actor call.
    """
    n = len(batch["sample_id"])
    groups: dict[str, list[int]] = {}
    for i in range(n):
        if batch["status"][i] == "ok":
            groups.setdefault(str(batch["sample_id"][i]), []).append(i)
    packs = np.array([b""] * n, dtype=object)
    keep = np.zeros(n, dtype=bool)
    sal = np.asarray(batch["saliency"])
    for rows in groups.values():
        packs[rows[0]] = pack_maps([int(batch["target"][r]) for r in rows], sal[rows])
        keep[rows[0]] = True
    out = dict(batch)
    out["sample_maps"] = packs
    for col in PER_SAMPLE_BYTES:
        if col in out:
            out[col] = np.array([v if k else b"" for v, k in zip(out[col], keep)], dtype=object)
    return out
