"""How good the pseudo-labels are, where the shards carry ground truth.

* Boxes (``.json``): per class, the precision and recall of the pseudo boxes at an IoU threshold
  (0.5, the PASCAL / ILSVRC localisation criterion). Per row (one pseudo box per sample and
  explained class) :func:`box_match` says whether the box overlaps a ground-truth box of that
  class by at least the threshold; :func:`box_quality` sums over the dataset: precision =
  matched / pseudo boxes made on annotated images, recall = matched / ground-truth boxes of the
  explained classes (with ``targets: all_labels`` that is every annotated box). One box per
  class and image can match at most one of several instances.
* Masks (a ground-truth label PNG per image, same values as salmap's label maps: 0 background,
  ``c + 1`` for class ``c``, 255 in an 8-bit PNG or 65535 in a 16-bit PNG ignored): per image
  :func:`mask_counts` counts per class the intersection and union of the label map and the
  ground truth over the pixels both label (neither ignores); :func:`mask_quality` sums the
  counts over the dataset before dividing (the dataset mIoU, not a mean of per-image IoUs) and
  reports the coverage, the share of ground-truth pixels the label map does not ignore, since a
  label map could otherwise score well by ignoring everything hard.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from .label_maps import IGNORE
from .pseudo_labels import box_iou

BOX_IOU = 0.5
BACKGROUND_CLASS = -1  # how background is named in the per-class counts


# -- boxes -------------------------------------------------------------------------------
def box_match(box: dict[str, float] | None, gt_boxes: Sequence[Sequence[float]],
              iou: float = BOX_IOU) -> bool:
    """Whether the pseudo box overlaps one of ``gt_boxes`` with IoU >= ``iou``."""
    if box is None or not gt_boxes:
        return False
    b = (box["x0"], box["y0"], box["x1"], box["y1"])
    return any(box_iou(b, g) >= iou for g in gt_boxes)


def box_quality(targets: Iterable[Any], made: Iterable[Any], gt_counts: Iterable[Any],
                matches: Iterable[Any], iou: float = BOX_IOU) -> dict[str, Any] | None:
    """Dataset precision / recall of pseudo boxes from per-row values: the explained class,
    whether a pseudo box was made, the number of ground-truth boxes of that class in the image
    (None: the image has no box annotation; the row is left out) and whether the box matched.

    Returns None when no row had an annotation, else ``{"iou", "precision", "recall",
    "precision_class_mean", "recall_class_mean", "tp", "pseudo_boxes", "gt_boxes", "rows",
    "per_class": {class: {"tp", "pseudo_boxes", "gt_boxes", "precision", "recall"}}}``
    (precision / recall None where their denominator is 0).
    """
    per: dict[int, list[int]] = {}  # class -> [tp, pseudo boxes, gt boxes]
    rows = 0
    for c, m, g, hit in zip(targets, made, gt_counts, matches):
        if g is None or c is None:
            continue
        rows += 1
        acc = per.setdefault(int(c), [0, 0, 0])
        acc[0] += bool(hit) and bool(m)
        acc[1] += bool(m)
        acc[2] += int(g)
    if not rows:
        return None
    tp, made_n, gt_n = (sum(v[i] for v in per.values()) for i in range(3))
    per_class = {str(c): {"tp": v[0], "pseudo_boxes": v[1], "gt_boxes": v[2],
                          "precision": _ratio(v[0], v[1]), "recall": _ratio(v[0], v[2])}
                 for c, v in sorted(per.items())}
    return {
        "iou": float(iou), "precision": _ratio(tp, made_n), "recall": _ratio(tp, gt_n),
        "precision_class_mean": _mean(p["precision"] for p in per_class.values()),
        "recall_class_mean": _mean(p["recall"] for p in per_class.values()),
        "tp": tp, "pseudo_boxes": made_n, "gt_boxes": gt_n, "rows": rows, "per_class": per_class,
    }


# -- masks -------------------------------------------------------------------------------
def decode_gt_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """A ground-truth label PNG -> uint16 ``[H, W]`` in label-map values (ignore = 65535).

    Palette (``P``) PNGs give their indices (VOC ``SegmentationClass`` files), grayscale ones
    their values; 255 in an 8-bit PNG means ignore. Colour-coded RGB masks are refused.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
        raise ValueError(f"ground-truth mask is not a readable PNG ({type(err).__name__})") from None
    if img.mode not in ("P", "L", "I;16", "I;16B", "I;16L", "I"):
        raise ValueError(f"ground-truth mask has mode {img.mode}: save class ids as a palette "
                         "or grayscale PNG (0 background, c+1 for class c, 255 ignore)")
    arr = np.asarray(img)
    eight_bit = img.mode in ("P", "L")
    out = arr.astype(np.int64)
    if eight_bit:
        out[out == 255] = IGNORE
    if out.shape != tuple(shape):
        raise ValueError(f"ground-truth mask is {out.shape[1]}x{out.shape[0]}, the image "
                         f"{shape[1]}x{shape[0]}")
    if out.min() < 0 or out.max() > IGNORE:
        raise ValueError("ground-truth mask values out of range")
    return out.astype(np.uint16)


def mask_counts(lm: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    """Per-class intersection and union of a label map and a ground-truth mask (same values)
    over the pixels neither ignores, and the pixel counts behind the coverage.

    Returns ``{"classes": [model class, -1 = background], "intersection": [...],
    "union": [...], "valid_px": ground-truth pixels not ignored, "labelled_px": of those,
    the ones the label map labels}``.
    """
    lm = np.asarray(lm)
    gt = np.asarray(gt)
    if lm.shape != gt.shape:
        raise ValueError(f"label map {lm.shape} and ground truth {gt.shape} differ in size")
    valid = gt != IGNORE
    both = valid & (lm != IGNORE)
    a, b = lm[both].astype(np.int64), gt[both].astype(np.int64)
    values = np.union1d(np.unique(a), np.unique(b))
    ia, ib = np.searchsorted(values, a), np.searchsorted(values, b)
    k = len(values)
    pred = np.bincount(ia, minlength=k)
    true = np.bincount(ib, minlength=k)
    inter = np.bincount(ia[ia == ib], minlength=k)
    union = pred + true - inter
    return {"classes": [int(v) - 1 for v in values],
            "intersection": [int(x) for x in inter], "union": [int(x) for x in union],
            "valid_px": int(valid.sum()), "labelled_px": int(both.sum())}


def mask_quality(records: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Dataset mIoU of label maps from the per-image :func:`mask_counts` (None entries, images
    without a ground-truth mask, are skipped). None when no image had one.

    Returns ``{"miou", "miou_foreground", "coverage", "images", "per_class": {class: {"iou",
    "intersection", "union"}}}``; ``miou`` averages the classes with a non-empty union,
    background (-1) included, as VOC does; ``miou_foreground`` leaves background out.
    """
    inter: dict[int, int] = {}
    union: dict[int, int] = {}
    valid = labelled = images = 0
    for r in records:
        if not r:
            continue
        images += 1
        valid += int(r["valid_px"])
        labelled += int(r["labelled_px"])
        for c, i, u in zip(r["classes"], r["intersection"], r["union"]):
            inter[int(c)] = inter.get(int(c), 0) + int(i)
            union[int(c)] = union.get(int(c), 0) + int(u)
    if not images:
        return None
    per_class = {str(c): {"iou": _ratio(inter[c], union[c]), "intersection": inter[c],
                          "union": union[c]} for c in sorted(union)}
    ious = {c: v["iou"] for c, v in per_class.items() if v["iou"] is not None}
    return {
        "miou": _mean(ious.values()),
        "miou_foreground": _mean(v for c, v in ious.items() if int(c) != BACKGROUND_CLASS),
        "coverage": _ratio(labelled, valid), "images": images, "per_class": per_class,
    }


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _mean(values: Iterable[float | None]) -> float | None:
    v = [float(x) for x in values if x is not None]
    return float(np.mean(v)) if v else None
