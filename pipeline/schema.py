"""The Parquet output schema: one row per (sample, model, method, target)."""

from __future__ import annotations

import pyarrow as pa

BOX = pa.struct([("x0", pa.float32()), ("y0", pa.float32()), ("x1", pa.float32()), ("y1", pa.float32())])

METRIC_COLUMNS: dict[str, pa.DataType] = {
    "deletion_auc": pa.float32(),
    "insertion_auc": pa.float32(),
    "average_drop": pa.float32(),
    "confidence_increase": pa.float32(),
    "road": pa.float32(),
    "pointing_hit": pa.bool_(),
    "energy_pointing": pa.float32(),
    "gini": pa.float32(),
    "box_iou": pa.float32(),
}

# average_drop's ingredients: p_c of the image (Y) and of the map-masked image (O)
CONFIDENCE_COLUMNS: dict[str, pa.DataType] = {
    "confidence_clean": pa.float32(),
    "confidence_masked": pa.float32(),
}


def saliency_type(h: int, w: int) -> pa.DataType:
    """Canonical ``arrow.fixed_shape_tensor`` float16 [h, w] (read by pyarrow, polars, DuckDB)."""
    return pa.fixed_shape_tensor(pa.float16(), [h, w])


def output_schema(h: int, w: int, curves: bool = False) -> pa.Schema:
    fields = [
        ("sample_id", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("model", pa.string()),
        ("method", pa.string()),
        ("target", pa.int32()),
        ("target_source", pa.string()),
        ("label", pa.int32()),
        ("pred", pa.int32()),
        ("pred_prob", pa.float32()),
        ("target_logit", pa.float32()),
        ("target_prob", pa.float32()),
        ("orig_height", pa.int32()),
        ("orig_width", pa.int32()),
        ("crop_box", BOX),
        ("saliency", saliency_type(h, w)),
        ("saliency_png", pa.binary()),
        ("saliency_min", pa.float32()),
        ("saliency_max", pa.float32()),
        ("pseudo_box", BOX),
        ("pseudo_mask_png", pa.binary()),
        *METRIC_COLUMNS.items(),
        *CONFIDENCE_COLUMNS.items(),
    ]
    if curves:
        fields += [("deletion_curve", pa.list_(pa.float32())), ("insertion_curve", pa.list_(pa.float32()))]
    fields += [("status", pa.string()), ("error", pa.string()), ("elapsed_ms", pa.float32())]
    return pa.schema(fields)
