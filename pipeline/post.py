"""CPU post stage: maps back to original pixels, PNG encoding, box-based metrics, final table."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from workers.actor import MODEL_METRIC_COLUMNS
from workers.metrics.geometry import map_to_input, map_to_original
from workers.metrics.registry import per_metric_params

from .schema import output_schema

GEOMETRY_KEYS = ("orig_h", "orig_w", "resized_h", "resized_w", "crop_top", "crop_left", "crop_h", "crop_w")


def transform_of(batch: dict[str, np.ndarray], i: int) -> dict[str, int]:
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
    """8-bit grayscale PNG of a map, min-max scaled; returns (png, min, max) to undo the scaling."""
    lo, hi = float(map_orig.min()), float(map_orig.max())
    scaled = np.zeros(map_orig.shape, np.uint8) if hi <= lo else \
        np.clip((map_orig - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(scaled, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), lo, hi


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


def _nan_to_none(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (float, np.floating)) and math.isnan(float(v)):
        return None
    return v


def post_batch(batch: dict[str, np.ndarray], post_metrics: dict[str, dict], run_curves: bool,
               file_metadata: dict[str, str] | None = None) -> pa.Table:
    """Actor rows (numpy columns) -> the final Arrow table (see :mod:`pipeline.schema`)."""
    n = len(batch["sample_id"])
    sal = np.asarray(batch["saliency"])
    h, w = (int(sal.shape[1]), int(sal.shape[2])) if sal.ndim == 3 else (1, 1)
    schema = output_schema(h, w, curves=run_curves)
    if file_metadata:
        schema = schema.with_metadata({k.encode(): v.encode() for k, v in file_metadata.items()})
    cols: dict[str, list] = {f.name: [] for f in schema}
    names = list(post_metrics)
    params = per_metric_params(dict(post_metrics))
    for i in range(n):
        ok = batch["status"][i] == "ok"
        t = transform_of(batch, i)
        for c in ("sample_id", "shard", "key", "model", "method", "target_source", "status", "error"):
            cols[c].append(str(batch[c][i]))
        target = int(batch["target"][i])
        label = int(batch["label"][i])
        cols["target"].append(target if target >= 0 else None)
        cols["label"].append(label if label >= 0 else None)
        cols["pred"].append(int(batch["pred"][i]) if ok else None)
        for c in ("pred_prob", "target_logit", "target_prob", "elapsed_ms"):
            cols[c].append(_nan_to_none(float(batch[c][i])))
        cols["orig_height"].append(t["orig_h"] if t["orig_h"] > 0 else None)
        cols["orig_width"].append(t["orig_w"] if t["orig_w"] > 0 else None)
        for c in MODEL_METRIC_COLUMNS:
            cols[c].append(_nan_to_none(float(batch[c][i])) if c in batch else None)
        if run_curves:
            for c in ("deletion_curve", "insertion_curve"):
                raw = str(batch[c][i]) if c in batch else ""
                cols[c].append(json.loads(raw) if raw else None)
        post: dict[str, Any] = {}
        if ok:
            cols["crop_box"].append(crop_box(t))
            native = sal[i].astype(np.float32)
            cols["saliency"].append(native)
            map_orig = map_to_original(native, t)
            png, lo, hi = encode_png(map_orig)
            cols["saliency_png"].append(png)
            cols["saliency_min"].append(lo)
            cols["saliency_max"].append(hi)
            if names:
                boxes, difficult = boxes_for_target(str(batch["boxes_json"][i]), target)
                try:
                    from workers.metrics import compute_post_metrics

                    post = compute_post_metrics(names, map_orig, boxes, params,
                                                saliency_input=map_to_input(native, t),
                                                difficult=difficult)
                except Exception as err:  # noqa: BLE001 - a metric bug must not lose the row
                    cols["error"][-1] = f"post metrics failed: {type(err).__name__}: {err}"
                    post = {}
        else:
            cols["crop_box"].append(None)
            cols["saliency"].append(None)
            cols["saliency_png"].append(None)
            cols["saliency_min"].append(None)
            cols["saliency_max"].append(None)
        cols["pseudo_box"].append(post.get("pseudo_box"))
        cols["pseudo_mask_png"].append(post.get("pseudo_mask_png"))
        for c in ("pointing_hit", "energy_pointing", "gini", "box_iou"):
            cols[c].append(_nan_to_none(post.get(c)))
    arrays = []
    for f in schema:
        if f.name == "saliency":
            arrays.append(_tensor_column(cols["saliency"], f.type, h, w))
        else:
            arrays.append(pa.array(cols[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _tensor_column(values: list[np.ndarray | None], typ: pa.DataType, h: int, w: int) -> pa.Array:
    flat = np.zeros((len(values), h * w), dtype=np.float16)
    mask = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v is None:
            mask[i] = True
        else:
            flat[i] = v.reshape(-1).astype(np.float16)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.float16()), h * w,
                                                mask=pa.array(mask))
    return pa.ExtensionArray.from_storage(typ, storage)


