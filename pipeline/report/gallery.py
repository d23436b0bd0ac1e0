"""The gallery: pick the best and worst samples of each model and render their maps.

A gallery item is one (sample, target); its score is the mean of the ranking score over the
model's methods, so the same photos are compared across methods side by side.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from .data import RunData, fmt, rank_expression
from .photos import Photos, load_photos
from .render import data_uri, overlay, photo_thumbnail

MAP_COLUMNS = ("sample_id", "target", "saliency_png", "pseudo_box", "crop_box")
CAPTION_METRICS = (("insertion_auc", "ins"), ("deletion_auc", "del"), ("box_iou", "IoU"),
                   ("pointing_hit", "hit"), ("average_drop", "drop"), ("road", "ROAD"))


@dataclass
class Cell:
    """One method's overlay for an item, or why there is none."""

    uri: str = ""
    caption: str = ""
    error: str = ""


@dataclass
class Item:
    sample_id: str
    target: int | None
    score: float
    title: str
    photo_uri: str = ""
    cells: dict[str, Cell] = field(default_factory=dict)


@dataclass
class ModelGallery:
    model: str
    methods: list[str]
    sections: list[tuple[str, list[Item]]]
    note: str = ""


def truth_boxes(boxes_json: str, target: int | None) -> list[list[float]]:
    """Ground-truth boxes of the explained class from a sample's annotation (all boxes when it
    has no labels), as the pipeline's box metrics pick them; [] when there are none."""
    try:
        obj = json.loads(boxes_json) if boxes_json else {}
    except json.JSONDecodeError:
        return []
    if not isinstance(obj, dict):
        return []
    boxes, labels = list(obj.get("boxes") or []), list(obj.get("labels") or [])
    if not labels:
        return boxes
    return [b for b, c in zip(boxes, labels) if target is not None and _target_key(c) == target]


def _target_key(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return int(value)


def select_items(rows: pd.DataFrame, per_side: int) -> list[tuple[str, list[tuple[str, int | None, float]]]]:
    """Sections of (sample_id, target, score): best first and worst first, or all when few."""
    scored = rows[np.isfinite(rows["score"].to_numpy(dtype=float))]
    if scored.empty:
        return []
    means = scored.groupby(["sample_id", scored["target"].map(_target_key)], dropna=False)["score"].mean()
    order = means.sort_values(ascending=False, kind="stable")
    items = [(sid, tgt, float(s)) for (sid, tgt), s in order.items()]
    if len(items) <= 2 * per_side:
        return [(f"all {len(items)}, best first", items)]
    return [(f"best {per_side}", items[:per_side]),
            (f"worst {per_side}, worst first", items[::-1][:per_side])]


def build_galleries(data: RunData, storage: Any, rank_by: str | None = None, per_side: int = 4,
                    side: int = 224, cmap: str = "jet", alpha: float = 0.5) -> tuple[str, list[ModelGallery], Photos]:
    """Rank label, one gallery per model, and the photos read (with their problems)."""
    rows = data.rows
    if rows.empty:
        return "", [], Photos()
    label, score = rank_expression(rows, rank_by)
    rows = rows.assign(score=score.to_numpy())
    plans = {}
    for model in data.models():
        plans[model] = select_items(rows[rows["model"] == model], per_side)
    wanted_ids = {sid for sections in plans.values() for _, items in sections for sid, _, _ in items}
    shown = rows[rows["sample_id"].isin(wanted_ids)]
    photos = load_photos(set(zip(shown["shard"], shown["key"])),
                         dict(data.manifest.get("config", {}).get("input") or {}), storage)
    metrics = [(c, short) for c, short in CAPTION_METRICS if c in data.metrics][:4]
    galleries = []
    for model, sections in plans.items():
        units = [u for u in data.units if u.model == model]
        maps = {u.method: _read_maps(u, wanted_ids) for u in units}
        by_row = {u.method: rows[rows["unit"] == u.id] for u in units}
        rendered = []
        for title, items in sections:
            rendered.append((title, [_item(sid, tgt, s, by_row, maps, photos, metrics, side, cmap, alpha)
                                     for sid, tgt, s in items]))
        note = "" if sections else "no row of this model has a ranking score (all rows failed?)"
        galleries.append(ModelGallery(model, [u.method for u in units], rendered, note))
    return label, galleries, photos


def _read_maps(unit: Any, ids: set[str]) -> dict[tuple[str, int | None], dict]:
    if unit.dataset is None or not ids:
        return {}
    cols = [c for c in MAP_COLUMNS if c in unit.dataset.schema.names]
    table = unit.dataset.to_table(columns=cols, filter=pc.field("sample_id").isin(sorted(ids)))
    return {(r["sample_id"], _target_key(r.get("target"))): r for r in table.to_pylist()}


def _item(sid: str, tgt: int | None, score: float, by_row: dict[str, pd.DataFrame],
          maps: dict[str, dict], photos: Photos, metrics: list[tuple[str, str]], side: int,
          cmap: str, alpha: float) -> Item:
    mine = pd.concat([df[df["sample_id"] == sid] for df in by_row.values()])
    first = mine.sort_values("status", key=lambda s: s != "ok", kind="stable").iloc[0]
    shard, key = str(first["shard"]), str(first["key"])
    ow, oh = _int(first.get("orig_width")), _int(first.get("orig_height"))
    photo = photos.images.get((shard, key))
    if photo is not None and (not ow or not oh):
        ow, oh = photo.size
    truth = truth_boxes(photos.boxes_json.get((shard, key), ""), tgt)
    thumb = photo_thumbnail(photo, ow, oh, side, truth) if ow and oh else None
    title = (f"{sid} · label {fmt(first.get('label'), 0)} · pred {fmt(first.get('pred'), 0)} · "
             f"target {fmt(tgt, 0)} · score {fmt(score)}")
    item = Item(sid, tgt, score, title, data_uri(thumb) if thumb is not None else "")
    for method, df in by_row.items():
        item.cells[method] = _cell(df, maps.get(method, {}), sid, tgt, photo, ow, oh, metrics,
                                   side, cmap, alpha)
    return item


def _int(v: Any) -> int:
    try:
        return 0 if v is None or pd.isna(v) else int(v)
    except (TypeError, ValueError):
        return 0


def _cell(df: pd.DataFrame, maps: dict, sid: str, tgt: int | None, photo: Any, ow: int, oh: int,
          metrics: list[tuple[str, str]], side: int, cmap: str, alpha: float) -> Cell:
    mine = df[(df["sample_id"] == sid) & (df["target"].map(_target_key) == tgt)]
    if mine.empty:
        failed = df[(df["sample_id"] == sid) & (df["status"] != "ok")]
        if not failed.empty:
            return Cell(error=f"{failed.iloc[0]['status']}: {failed.iloc[0]['error']}")
        return Cell(error="no row for this sample and target")
    row = mine.iloc[0]
    m = maps.get((sid, tgt))
    if row["status"] != "ok" or not m or not m.get("saliency_png"):
        return Cell(error=f"{row['status']}: {row['error'] or 'no map stored'}")
    parts = [f"score {fmt(row['score'])}"]
    for col, short in metrics:
        v = row.get(col)
        if col == "pointing_hit":
            parts.append(f"{short} {'–' if v is None or pd.isna(v) else ('✓' if v else '✗')}")
        else:
            parts.append(f"{short} {fmt(v)}")
    img = overlay(m["saliency_png"], ow, oh, side, photo, m.get("pseudo_box"), m.get("crop_box"),
                  cmap=cmap, alpha=alpha)
    return Cell(uri=data_uri(img), caption=" · ".join(parts))
