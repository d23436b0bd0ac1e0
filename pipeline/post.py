"""CPU post stage: maps back to original pixels, PNG encoding, box-based metrics, final table.

Not :mod:`salmap.workers.metrics.post` (the post-stage *metrics* this stage calls); the
saliency PNG is this module's :func:`encode_png`, the label-map PNG is
:func:`salmap.workers.metrics.label_maps.encode_png` (imported here under its own name).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
from salmap.workers.columns import (
    BY_NAME,
    LABEL_COLUMNS,
    MAP_DTYPES,
    POST_METRIC_COLUMNS,
    output_schema,
)
from salmap.workers.metrics.geometry import map_to_input, map_to_original, maps_to_sizes
from salmap.workers.metrics.registry import per_metric_params

from .decode import SHARD_END
from .png import gray_png

GEOMETRY_KEYS = ("orig_h", "orig_w", "resized_h", "resized_w", "crop_top", "crop_left", "crop_h", "crop_w")


def transform_of(batch: dict[str, np.ndarray], i: int) -> dict[str, int]:
    """Row ``i``'s decode geometry (original size, resize, crop): what maps it back to its pixels."""
    return {
        "orig_h": int(batch["orig_height"][i]), "orig_w": int(batch["orig_width"][i]),
        "resized_h": int(batch["resized_h"][i]), "resized_w": int(batch["resized_w"][i]),
        "crop_top": int(batch["crop_top"][i]), "crop_left": int(batch["crop_left"][i]),
        "crop_h": int(batch["crop_h"][i]), "crop_w": int(batch["crop_w"][i]),
    }


def crop_box(t: dict[str, int]) -> dict[str, float]:
    """The model input's region in original-image pixels."""
    sx, sy = t["orig_w"] / t["resized_w"], t["orig_h"] / t["resized_h"]
    return {"x0": t["crop_left"] * sx, "y0": t["crop_top"] * sy,
            "x1": (t["crop_left"] + t["crop_w"]) * sx, "y1": (t["crop_top"] + t["crop_h"]) * sy}


def encode_png(map_orig: np.ndarray) -> tuple[bytes, float, float]:
    """8-bit grayscale PNG of a map; returns (png, lo, hi) to undo the scaling:
    ``value = png / 255 * (hi - lo) + lo``.

    A map without negative values is min-max scaled (lo, hi = its min and max). A signed map
    (any value below zero) is scaled symmetrically, lo = -hi = -max |value|, so zero is the
    middle grey (127.5, stored as 128) and the sign of every pixel survives the encoding.
    """
    lo, hi = map_range(map_orig)
    scaled = np.zeros(map_orig.shape, np.uint8) if hi <= lo else \
        np.clip((map_orig - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return gray_png(scaled), lo, hi


def png_size(t: dict[str, int], map_h: int, map_w: int) -> tuple[int, int]:
    """``(height, width)`` of a ``native`` saliency PNG (``run.saliency_png``): the photo's frame
    scaled so that the model's crop holds as many pixels as the map has, never above the
    photo's size. A 7 x 7 CAM grid on a 4000 x 3000 photo makes a PNG of a few dozen pixels
    a side instead of 12 million pixels, with the same information."""
    crop_h = t["crop_h"] * t["orig_h"] / t["resized_h"]  # the crop's extent in original pixels
    crop_w = t["crop_w"] * t["orig_w"] / t["resized_w"]
    scale = min(1.0, max(map_h / crop_h, map_w / crop_w))
    return max(1, round(t["orig_h"] * scale)), max(1, round(t["orig_w"] * scale))


def map_range(m: np.ndarray) -> tuple[float, float]:
    """The ``(saliency_min, saliency_max)`` :func:`encode_png` would store for ``m``."""
    lo, hi = float(m.min()), float(m.max())
    return (-max(-lo, hi), max(-lo, hi)) if lo < 0 else (lo, hi)


def boxes_for_target(boxes_json: str, target: int
                     ) -> tuple[list[list[float]] | None, list[bool] | None]:
    """Ground-truth boxes of the explained class (all boxes when the json has no labels) and
    their VOC ``difficult`` flags (None when the json has none)."""
    if not boxes_json:
        return None, None
    obj = json.loads(boxes_json)
    boxes, labels = obj.get("boxes", []), obj.get("labels", [])
    flags = obj.get("difficult")
    if not boxes:
        return None, None
    keep = [int(c) == int(target) for c in labels] if labels else [True] * len(boxes)
    chosen = [b for b, k in zip(boxes, keep) if k]
    if not chosen:
        return None, None
    return chosen, None if flags is None else [bool(f) for f, k in zip(flags, keep) if k]


def annotated_boxes(boxes_json: str, target: int) -> list[list[float]] | None:
    """Ground-truth boxes of the explained class; None when the sample has no box annotation
    (an annotation without a box of that class gives [])."""
    if not boxes_json:
        return None
    obj = json.loads(boxes_json)
    boxes, labels = obj.get("boxes", []), obj.get("labels", [])
    if labels:
        return [b for b, c in zip(boxes, labels) if int(c) == int(target)]
    return list(boxes)


def sample_label_map(pack: bytes, t: dict[str, int], image_bytes: bytes,
                     labels: dict[str, Any]) -> np.ndarray:
    """The label map of one sample from its packed maps (workers.metrics.label_maps), in
    original pixels; refined by a dense CRF on the image when ``labels["crf"]`` is set."""
    from salmap.workers.metrics.label_maps import class_scores, crop_valid, label_map, unpack_maps

    targets, maps = unpack_maps(pack)
    scores = class_scores(np.stack([map_to_original(m.astype(np.float32), t) for m in maps]))
    valid = crop_valid(t["orig_h"], t["orig_w"], crop_box(t))
    fg, bg = float(labels["fg_threshold"]), float(labels["bg_threshold"])
    crf = labels.get("crf")
    if not crf:
        return label_map(scores, targets, fg, bg, valid)
    from salmap.workers.metrics.crf import crf_label_map

    from .decode import open_image

    if not image_bytes:
        raise ValueError("the image's bytes did not reach the post stage")
    image = np.asarray(open_image(image_bytes, int(labels.get("max_pixels", 89_478_485))))
    return crf_label_map(image, scores, targets, fg, bg, valid, iterations=crf["iterations"],
                         unary=crf["unary"], gt_prob=crf["gt_prob"], gaussian=crf["gaussian"],
                         bilateral=crf["bilateral"])


def label_columns(batch: dict[str, np.ndarray], i: int, t: dict[str, int], map_orig: np.ndarray,
                  post: dict[str, Any], labels: dict[str, Any] | None) -> tuple[dict, list[str]]:
    """The weak-supervision columns of one ok row (:data:`salmap.workers.columns.LABEL_COLUMNS`) and
    notes for its ``error`` column: the pseudo box's score and match with the ground truth
    (when the row has a pseudo box), the sample's label map and its counts against a
    ground-truth mask (on the row that carries the sample's maps)."""
    from salmap.workers.metrics.crf import CRFUnavailable
    from salmap.workers.metrics.label_maps import encode_png as encode_label_map_png
    from salmap.workers.metrics.label_quality import BOX_IOU, box_match, decode_gt_mask, mask_counts
    from salmap.workers.metrics.pseudo_labels import box_score

    out: dict[str, Any] = {}
    notes: list[str] = []
    if "pseudo_box" in post:
        box = post["pseudo_box"]
        out["pseudo_box_score"] = box_score(map_orig, box)
        gt = annotated_boxes(str(batch["boxes_json"][i]), int(batch["target"][i]))
        if gt is not None:
            out["gt_box_count"] = len(gt)
            out["pseudo_box_match"] = box_match(box, gt, float((labels or {}).get("box_iou", BOX_IOU)))
    pack = batch["sample_maps"][i] if "sample_maps" in batch else b""
    if not (labels and labels.get("label_maps") and pack):
        return out, notes
    image = batch["image_bytes"][i] if "image_bytes" in batch else b""
    try:
        lm = sample_label_map(pack, t, image, labels)
    except CRFUnavailable:
        raise  # a node without the binding: fail loudly, not one note per image
    except Exception as err:  # noqa: BLE001 - a label-map bug must not lose the row
        notes.append(f"label map failed: {type(err).__name__}: {err}")
        return out, notes
    out["label_map_png"] = encode_label_map_png(lm)
    mask = batch["gt_mask_bytes"][i] if "gt_mask_bytes" in batch else b""
    if mask:
        try:
            out["label_map_quality"] = mask_counts(lm, decode_gt_mask(mask, lm.shape))
        except Exception as err:  # noqa: BLE001 - a bad mask (sidecar) fails only its sample
            notes.append(f"ground-truth mask ignored: {err}")
    return out, notes


def _nan_to_none(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (float, np.floating)) and math.isnan(float(v)):
        return None
    return v


def _written(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema]


def post_batch(batch: dict[str, np.ndarray], post_metrics: dict[str, dict], run_curves: bool,
               file_metadata: dict[str, str] | None = None, map_dtype: str = "float16",
               rows: list[int] | None = None, labels: dict[str, Any] | None = None,
               png: str = "native") -> pa.Table:
    """Actor rows (numpy columns) -> the final Arrow table (columns: :mod:`salmap.workers.columns`).

    ``rows`` picks the batch rows to convert (default: every row that is not a shard-end
    marker). ``labels``: the run's ``pseudo_labels`` options (label maps, thresholds, CRF,
    box IoU; :func:`salmap.pipeline.config.pseudo_label_options`), None for the defaults.
    ``png``: the ``saliency_png`` preview (``run.saliency_png``): ``native`` at
    :func:`png_size`, ``original`` at the photo's size, ``none`` (``saliency_min`` and
    ``saliency_max`` are then the map's range as a PNG would store it).

    Vectorised over the batch: the scalar columns are converted column by column, the maps
    of rows that share a geometry are resampled to original pixels in one pass
    (:func:`salmap.workers.metrics.geometry.maps_to_sizes`), in chunks of :data:`MAP_CHUNK` rows
    to bound memory; per row remain the PNG encoding and, when asked for, the post metrics
    and weak-supervision columns.
    """
    sal = np.asarray(batch["saliency"])
    h, w = (int(sal.shape[1]), int(sal.shape[2])) if sal.ndim == 3 else (1, 1)
    schema = output_schema(h, w, curves=run_curves, map_dtype=map_dtype)
    if file_metadata:
        schema = schema.with_metadata({k.encode(): v.encode() for k, v in file_metadata.items()})
    status = np.asarray(batch["status"], dtype=object)
    if rows is None:
        rows = np.flatnonzero(status != SHARD_END)
    idx = np.asarray(rows, dtype=np.int64)
    n = len(idx)
    ok = status[idx] == "ok"
    errors = ["" if v is None else str(v) for v in batch["error"][idx]] if "error" in batch \
        else [None] * n
    post_cols: dict[str, list] = {name: [None] * n for name in (
        "crop_box", "saliency_png", "saliency_min", "saliency_max",
        *POST_METRIC_COLUMNS, *LABEL_COLUMNS)}
    names = list(post_metrics)
    params = per_metric_params(dict(post_metrics))
    per_row = bool(names or (labels and labels.get("label_maps")))  # needs the full-size map
    for positions, t in _geometry_groups(batch, idx, ok):
        box = crop_box(t)
        full = (t["orig_h"], t["orig_w"])
        preview = None if png == "none" else png_size(t, h, w) if png == "native" else full
        # the resamplings this geometry needs (one frame, resampled to each size)
        sizes = list(dict.fromkeys([*([full] if per_row else []), *([preview] if preview else [])]))
        for start in range(0, len(positions), MAP_CHUNK):
            chunk = positions[start:start + MAP_CHUNK]
            natives = sal[idx[chunk]].astype(np.float32)
            resampled = dict(zip(sizes, (m.numpy() for m in maps_to_sizes(natives, t, sizes)))
                             ) if sizes else {}
            originals, previews = resampled.get(full), resampled.get(preview)
            for j, pos in enumerate(chunk):
                i = int(idx[pos])
                post_cols["crop_box"][pos] = box
                if previews is None:
                    lo, hi = map_range(natives[j])
                else:
                    post_cols["saliency_png"][pos], lo, hi = encode_png(previews[j])
                post_cols["saliency_min"][pos] = lo
                post_cols["saliency_max"][pos] = hi
                if not per_row:
                    continue  # the defaults: no per-row work beyond the PNG
                map_orig = originals[j]
                post: dict[str, Any] = {}
                if names:
                    boxes, difficult = boxes_for_target(str(batch["boxes_json"][i]),
                                                        int(batch["target"][i]))
                    try:
                        from salmap.workers.metrics import compute_post_metrics

                        post = compute_post_metrics(names, map_orig, boxes, params,
                                                    saliency_input=map_to_input(natives[j], t),
                                                    difficult=difficult)
                    except Exception as err:  # noqa: BLE001 - a metric bug must not lose the row
                        errors[pos] = f"post metrics failed: {type(err).__name__}: {err}"
                        post = {}
                extra, notes = label_columns(batch, i, t, map_orig, post, labels)
                if notes:
                    errors[pos] = "; ".join([e for e in (errors[pos], *notes) if e])
                for name in POST_METRIC_COLUMNS:
                    post_cols[name][pos] = _nan_to_none(post.get(name))
                for name in LABEL_COLUMNS:
                    post_cols[name][pos] = extra.get(name)
    arrays = []
    for f in schema:
        column = BY_NAME[f.name]
        if f.name == "saliency":
            arrays.append(_tensor_column(sal, idx, ok, f.type, h, w, MAP_DTYPES[map_dtype][1]))
        elif f.name == "error":
            arrays.append(pa.array(errors, type=f.type))
        elif f.name in post_cols:
            arrays.append(pa.array(post_cols[f.name], type=f.type))
        else:
            arrays.append(_column(batch, f.name, column.kind, idx, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


MAP_CHUNK = 32  # maps resampled together: 32 x 400 x 300 float32 = 15 MB


def _geometry_groups(batch: dict[str, np.ndarray], idx: np.ndarray, ok: np.ndarray
                     ) -> list[tuple[list[int], dict[str, int]]]:
    """The ok rows' positions in ``idx`` grouped by their transform (one resampling each)."""
    if not ok.any():
        return []
    keys = ("orig_height", "orig_width", "resized_h", "resized_w", "crop_top", "crop_left",
            "crop_h", "crop_w")
    geo = np.stack([np.asarray(batch[k], dtype=np.int64)[idx] for k in keys], axis=1)
    groups: dict[tuple[int, ...], list[int]] = {}
    for pos in np.flatnonzero(ok):
        groups.setdefault(tuple(geo[pos].tolist()), []).append(int(pos))
    return [(positions, dict(zip(GEOMETRY_KEYS, key))) for key, positions in groups.items()]


def _column(batch: dict[str, np.ndarray], name: str, kind: str, idx: np.ndarray,
            typ: pa.DataType) -> pa.Array:
    """A batch column as its Parquet column (-1 ints and NaN floats are nulls)."""
    if name not in batch:
        return pa.nulls(len(idx), type=typ)
    v = np.asarray(batch[name])[idx]
    if kind == "int":
        v = v.astype(np.int64)
        return pa.array(v, type=typ, mask=v < 0)
    if kind in ("float", "bool"):
        f = v.astype(np.float64)
        nan = np.isnan(f)
        values = f != 0 if kind == "bool" else f
        return pa.array(values, type=typ, mask=nan)
    if kind == "str":
        return pa.array([str(x) for x in v], type=typ)
    if kind == "curve":
        return pa.array([json.loads(str(x)) if str(x) else None for x in v], type=typ)
    return pa.array(list(v), type=typ)


def _value(batch: dict[str, np.ndarray], name: str, kind: str, i: int) -> Any:
    """A batch value as its Parquet value (-1 ints and NaN floats are nulls)."""
    if name not in batch:
        return None
    v = batch[name][i]
    if kind == "str":
        return str(v)
    if kind == "int":
        return int(v) if int(v) >= 0 else None
    if kind == "float":
        return _nan_to_none(float(v))
    if kind == "bool":
        return None if _nan_to_none(float(v)) is None else bool(v)
    if kind == "curve":
        return json.loads(str(v)) if str(v) else None
    return v


def _tensor_column(sal: np.ndarray, idx: np.ndarray, ok: np.ndarray, typ: pa.DataType,
                   h: int, w: int, dtype: type = np.float16) -> pa.Array:
    """The ok rows' maps as a fixed-shape tensor column (null on the other rows)."""
    flat = np.zeros((len(idx), h * w), dtype=dtype)
    if ok.any():
        flat[ok] = sal[idx[ok]].reshape(int(ok.sum()), -1).astype(dtype)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), h * w,
                                                mask=pa.array(~ok))
    return pa.ExtensionArray.from_storage(typ, storage)
