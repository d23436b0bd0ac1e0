"""The one declaration of the row columns: what the decode stage, the model actor and the post
stage each fill, and what is written to Parquet with which Arrow type.

Everything that lists columns (the actor's output batch, the post stage's table, the Parquet
schema, the summaries) derives its list from :data:`COLUMNS`; a new column is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

BOX = pa.struct([("x0", pa.float32()), ("y0", pa.float32()), ("x1", pa.float32()),
                 ("y1", pa.float32())])
# a label map's per-class counts against a ground-truth mask (workers.metrics.label_quality)
LABEL_QUALITY = pa.struct([("classes", pa.list_(pa.int32())),
                           ("intersection", pa.list_(pa.int64())),
                           ("union", pa.list_(pa.int64())),
                           ("valid_px", pa.int64()), ("labelled_px", pa.int64())])

# Who fills a column:
#   "decode"       decode stage; carried through the actor unchanged (pass-through)
#   "actor"        the model actor (predictions, the map, status)
#   "model_metric" a model-side metric, computed in the actor (forward passes)
#   "post"         the post stage (geometry, PNGs)
#   "post_metric"  a post-side metric (CPU, one map at a time)
STAGES = ("decode", "actor", "model_metric", "post", "post_metric")

# How a column travels between stages as a numpy batch column.
KINDS = ("str", "int", "float", "bool", "map", "box", "binary", "curve", "record")


@dataclass(frozen=True)
class Column:
    """A column of the row: its name, who fills it, how it travels, how it is stored.

    ``arrow`` is None for internal columns (carried between stages, never written).
    ``written`` columns appear in every Parquet file in declaration order, except those with
    ``optional=True``, which appear only when the run asks for them (curves).
    """

    name: str
    stage: str
    kind: str
    arrow: pa.DataType | None = None
    optional: bool = False

    @property
    def written(self) -> bool:
        """Whether the column is stored in the Parquet output (not internal to the pipeline)."""
        return self.arrow is not None or self.kind == "map"


def _c(name: str, stage: str, kind: str, arrow: pa.DataType | None = None,
       optional: bool = False) -> Column:
    assert stage in STAGES and kind in KINDS, (name, stage, kind)
    return Column(name, stage, kind, arrow, optional)


COLUMNS: tuple[Column, ...] = (
    _c("sample_id", "decode", "str", pa.string()),
    _c("shard", "decode", "str", pa.string()),
    _c("key", "decode", "str", pa.string()),
    _c("image_file", "decode", "str", pa.string()),  # the image's member name inside the shard
    _c("model", "actor", "str", pa.string()),
    _c("method", "actor", "str", pa.string()),
    _c("target", "actor", "int", pa.int32()),
    _c("target_source", "actor", "str", pa.string()),
    _c("label", "decode", "int", pa.int32()),
    _c("pred", "actor", "int", pa.int32()),
    _c("pred_prob", "actor", "float", pa.float32()),
    _c("target_logit", "actor", "float", pa.float32()),
    _c("target_prob", "actor", "float", pa.float32()),
    _c("orig_height", "decode", "int", pa.int32()),
    _c("orig_width", "decode", "int", pa.int32()),
    _c("crop_box", "post", "box", BOX),
    _c("saliency", "actor", "map"),  # arrow type: saliency_type(h, w, dtype)
    _c("saliency_png", "post", "binary", pa.binary()),
    _c("saliency_min", "post", "float", pa.float32()),
    _c("saliency_max", "post", "float", pa.float32()),
    _c("pseudo_box", "post_metric", "box", BOX),
    _c("pseudo_mask_png", "post_metric", "binary", pa.binary()),
    # weak supervision (pipeline.post with the pseudo_box metric / pseudo_labels.label_maps):
    # the pseudo box's support in the map, its match with a ground-truth box of the target
    # class, how many such boxes the image has (null: no box annotation); one label map per
    # sample, on its first ok row, and its counts against a ground-truth mask
    _c("pseudo_box_score", "post", "float", pa.float32()),
    _c("pseudo_box_match", "post", "bool", pa.bool_()),
    _c("gt_box_count", "post", "int", pa.int32()),
    _c("label_map_png", "post", "binary", pa.binary()),
    _c("label_map_quality", "post", "record", LABEL_QUALITY),
    _c("deletion_auc", "model_metric", "float", pa.float32()),
    _c("insertion_auc", "model_metric", "float", pa.float32()),
    _c("average_drop", "model_metric", "float", pa.float32()),
    _c("confidence_increase", "model_metric", "float", pa.float32()),
    _c("road", "model_metric", "float", pa.float32()),
    # ROAD's two curves, each averaged over the percentiles, and their gap (= 2 road)
    _c("road_morf", "model_metric", "float", pa.float32()),
    _c("road_lerf", "model_metric", "float", pa.float32()),
    _c("road_gap", "model_metric", "float", pa.float32()),
    _c("region_deletion_auc", "model_metric", "float", pa.float32()),
    _c("region_insertion_auc", "model_metric", "float", pa.float32()),
    _c("pointing_hit", "post_metric", "bool", pa.bool_()),
    _c("energy_pointing", "post_metric", "float", pa.float32()),
    _c("gini", "post_metric", "float", pa.float32()),
    _c("box_iou", "post_metric", "float", pa.float32()),
    # average_drop's ingredients: p_c of the image (Y) and of the map-masked image (O)
    _c("confidence_clean", "model_metric", "float", pa.float32()),
    _c("confidence_masked", "model_metric", "float", pa.float32()),
    _c("deletion_curve", "model_metric", "curve", pa.list_(pa.float32()), optional=True),
    _c("insertion_curve", "model_metric", "curve", pa.list_(pa.float32()), optional=True),
    _c("region_deletion_curve", "model_metric", "curve", pa.list_(pa.float32()), optional=True),
    _c("region_insertion_curve", "model_metric", "curve", pa.list_(pa.float32()), optional=True),
    _c("status", "actor", "str", pa.string()),
    _c("error", "actor", "str", pa.string()),
    _c("elapsed_ms", "actor", "float", pa.float32()),
    # internal: the decode stage's geometry and annotations, used by the actor and post stage
    _c("resized_h", "decode", "int"),
    _c("resized_w", "decode", "int"),
    _c("crop_top", "decode", "int"),
    _c("crop_left", "decode", "int"),
    _c("crop_h", "decode", "int"),
    _c("crop_w", "decode", "int"),
    _c("boxes_json", "decode", "str"),
    # internal, only with label maps: the image's bytes (CRF refinement) and the ground-truth
    # mask's (input.mask_key), kept on one row per sample (workers.metrics.label_maps); the
    # packed maps of all of a sample's targets, on that row
    _c("image_bytes", "decode", "binary"),
    _c("gt_mask_bytes", "decode", "binary"),
    _c("sample_maps", "actor", "binary"),
    # internal: on a shard-end marker row, how many samples the shard held and why it ended
    # early (a truncated tar); see pipeline.shard_reader
    _c("shard_samples", "decode", "int"),
    _c("shard_error", "decode", "str"),
    # internal: which actor explained the batch, on which device, since when (ms since the
    # epoch), when the batch ended and how long it took; the driver's actor accounting
    # (pipeline.accounting)
    _c("actor_id", "actor", "str"),
    _c("actor_device", "actor", "str"),
    _c("actor_start_ms", "actor", "int"),
    _c("batch_end_ms", "actor", "int"),
    _c("batch_ms", "actor", "int"),
)

BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}

# the decode stage's columns the actor copies onto every row it returns
PASS_THROUGH: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.stage == "decode")
# the scalar columns of the model-side metrics (curves are separate)
MODEL_METRIC_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in COLUMNS if c.stage == "model_metric" and c.kind == "float")
CURVE_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.kind == "curve")
# columns the post stage fills for weak supervision (pipeline.post)
LABEL_COLUMNS: tuple[str, ...] = ("pseudo_box_score", "pseudo_box_match", "gt_box_count",
                                  "label_map_png", "label_map_quality")
# average_drop's ingredients (per-row probabilities, not metrics of their own)
METRIC_INGREDIENTS: tuple[str, ...] = ("confidence_clean", "confidence_masked")
# the per-row metric values a summary averages (model- and post-side, scalars only)
METRIC_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in COLUMNS if c.stage in ("model_metric", "post_metric")
    and c.kind in ("float", "bool") and c.name not in METRIC_INGREDIENTS)
POST_METRIC_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.stage == "post_metric")
# what the actor's output batch holds: pass-through, its own columns, model metrics
ACTOR_OUTPUT: tuple[str, ...] = tuple(
    c.name for c in COLUMNS if c.stage in ("decode", "actor", "model_metric"))

MAP_DTYPES = {"float16": (pa.float16(), np.float16), "float32": (pa.float32(), np.float32)}


def numpy_column(kind: str, values: list) -> np.ndarray:
    """A batch column of ``kind`` from Python values (None -> "", b"", -1 or NaN by kind)."""
    if kind in ("str", "curve"):
        return np.array(["" if v is None else v for v in values], dtype=object)
    if kind == "binary":
        return np.array([b"" if v is None else v for v in values], dtype=object)
    if kind == "int":
        return np.array([-1 if v is None else v for v in values], dtype=np.int64)
    if kind in ("float", "bool"):
        return np.array([np.nan if v is None else v for v in values], dtype=np.float32)
    return np.array(values, dtype=object)


def saliency_type(h: int, w: int, dtype: str = "float16") -> pa.DataType:
    """Canonical ``arrow.fixed_shape_tensor`` [h, w] (read by pyarrow, polars, DuckDB)."""
    return pa.fixed_shape_tensor(MAP_DTYPES[dtype][0], [h, w])


def output_schema(h: int, w: int, curves: bool = False, map_dtype: str = "float16") -> pa.Schema:
    """The Parquet schema of a unit whose maps are ``h x w``."""
    fields = []
    for c in COLUMNS:
        if not c.written or (c.optional and not curves):
            continue
        fields.append((c.name, saliency_type(h, w, map_dtype) if c.kind == "map" else c.arrow))
    return pa.schema(fields)


# what the decode stage hands the actor: the pass-through columns, the image, the annotation
# problems the actor reports on ok rows, and the status
DECODE_COLUMNS = (*PASS_THROUGH, "image", "label_error", "boxes_error", "status", "error")
#: the decode stage's columns but the image -> their kind (numpy_column), for the actor's input
DECODE_KINDS = {**{c: BY_NAME[c].kind for c in PASS_THROUGH},
                "label_error": "str", "boxes_error": "str", "status": "str", "error": "str"}
#: ``status`` of the marker row that ends a shard (pipeline.shard_reader); every stage, the
#: actor included, passes it on
SHARD_END = "shard_end"
