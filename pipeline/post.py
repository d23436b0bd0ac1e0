"""CPU post stage: maps back to original pixels, PNG encoding, box-based metrics, final table."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from workers.columns import BY_NAME, MAP_DTYPES, POST_METRIC_COLUMNS, output_schema
from workers.metrics.geometry import map_to_original
from workers.metrics.registry import per_metric_params

from .decode import SHARD_END

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
    """8-bit grayscale PNG of a map; returns (png, lo, hi) to undo the scaling:
    ``value = png / 255 * (hi - lo) + lo``.

    A map without negative values is min-max scaled (lo, hi = its min and max). A signed map
    (any value below zero) is scaled symmetrically, lo = -hi = -max |value|, so zero is the
    middle grey (127.5, stored as 128) and the sign of every pixel survives the encoding.
    """
    lo, hi = float(map_orig.min()), float(map_orig.max())
    if lo < 0:
        hi = max(-lo, hi)
        lo = -hi
    scaled = np.zeros(map_orig.shape, np.uint8) if hi <= lo else \
        np.clip((map_orig - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(scaled, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), lo, hi


def boxes_for_target(boxes_json: str, target: int) -> list[list[float]] | None:
    """Ground-truth boxes of the explained class (all boxes when the json has no labels)."""
    if not boxes_json:
        return None
    obj = json.loads(boxes_json)
    boxes, labels = obj.get("boxes", []), obj.get("labels", [])
    if not boxes:
        return None
    if labels:
        chosen = [b for b, c in zip(boxes, labels) if int(c) == int(target)]
        return chosen or None
    return boxes


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
               rows: list[int] | None = None) -> pa.Table:
    """Actor rows (numpy columns) -> the final Arrow table (columns: :mod:`workers.columns`).

    ``rows`` picks the batch rows to convert (default: every row that is not a shard-end
    marker).
    """
    sal = np.asarray(batch["saliency"])
    h, w = (int(sal.shape[1]), int(sal.shape[2])) if sal.ndim == 3 else (1, 1)
    schema = output_schema(h, w, curves=run_curves, map_dtype=map_dtype)
    if file_metadata:
        schema = schema.with_metadata({k.encode(): v.encode() for k, v in file_metadata.items()})
    if rows is None:
        rows = [i for i in range(len(batch["sample_id"])) if batch["status"][i] != SHARD_END]
    cols: dict[str, list] = {name: [] for name in _written(schema)}
    names = list(post_metrics)
    params = per_metric_params(dict(post_metrics))
    for i in rows:
        ok = batch["status"][i] == "ok"
        t = transform_of(batch, i)
        for name in cols:
            column = BY_NAME[name]
            if column.stage in ("post", "post_metric") or column.kind == "map":
                continue
            cols[name].append(_value(batch, name, column.kind, i))
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
                boxes = boxes_for_target(str(batch["boxes_json"][i]), int(batch["target"][i]))
                try:
                    from workers.metrics import compute_post_metrics

                    post = compute_post_metrics(names, map_orig, boxes, params)
                except Exception as err:  # noqa: BLE001 - a metric bug must not lose the row
                    cols["error"][-1] = f"post metrics failed: {type(err).__name__}: {err}"
                    post = {}
        else:
            for name in ("crop_box", "saliency", "saliency_png", "saliency_min", "saliency_max"):
                cols[name].append(None)
        for name in POST_METRIC_COLUMNS:
            cols[name].append(_nan_to_none(post.get(name)))
    arrays = []
    for f in schema:
        if f.name == "saliency":
            arrays.append(_tensor_column(cols["saliency"], f.type, h, w, MAP_DTYPES[map_dtype][1]))
        else:
            arrays.append(pa.array(cols[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


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


def _tensor_column(values: list[np.ndarray | None], typ: pa.DataType, h: int, w: int,
                   dtype: type = np.float16) -> pa.Array:
    flat = np.zeros((len(values), h * w), dtype=dtype)
    mask = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v is None:
            mask[i] = True
        else:
            flat[i] = v.reshape(-1).astype(dtype)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), h * w,
                                                mask=pa.array(mask))
    return pa.ExtensionArray.from_storage(typ, storage)
