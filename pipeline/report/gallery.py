"""The gallery: every sample of each model, ranked, with every method's map overlaid.

A gallery item is one (sample, target); its score is the mean of the ranking score over the
model's methods, so the same photos are compared across methods side by side. Samples that
no method could explain (no ok row) come last, with their error. The index page shows every
item when there are few, else the best and worst few; the gallery pages show them all, a
page at a time (:data:`PAGE_SIZE` per model and page).

Each item's row carries an HTML id, :func:`sample_anchor` of its model, sample and target,
so other parts of the report (the strategy-cluster scatter plots) can link to the sample on
whichever page holds it (:func:`gallery_links`).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads

from .data import RunData, fmt, rank_expression
from .photos import Photos, load_photos
from .render import SEQUENTIAL, THUMB_SIDE, data_uri, overlay, photo_thumbnail

PAGE_SIZE = 50  # items per model on one gallery page
MAP_COLUMNS = ("sample_id", "target", "saliency_png", "saliency_min", "saliency_max",
               "pseudo_box", "crop_box")
CAPTION_METRICS = (("insertion_auc", "ins"), ("deletion_auc", "del"), ("box_iou", "IoU"),
                   ("pointing_hit", "hit"), ("average_drop", "drop"), ("road", "ROAD"))

Entry = tuple[str, "int | None", float]  # (sample_id, target, score)


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
    signed: dict[str, bool] = field(default_factory=dict)  # method -> draws a signed map


def sample_anchor(model: str, sample_id: str, target: int | None) -> str:
    """The HTML id of a gallery item: ``sample-<readable part>-<hash>``. The readable part is
    the sample id (``shard/key``) with every character outside ``[A-Za-z0-9_-]`` turned into
    ``-`` (so the id needs no escaping in an attribute or a URL fragment), cut to 48
    characters; the hash of model, sample id and target keeps ids apart that the cut or the
    replacement would merge. Stable: the same item has the same id in every report."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", sample_id).strip("-")[:48] or "x"
    digest = hashlib.blake2b(f"{model}\0{sample_id}\0{target}".encode(), digest_size=5).hexdigest()
    return f"sample-{slug}-{digest}"


def gallery_links(index: dict[str, list[tuple[str, list[Entry]]]],
                  pages: list[dict[str, list[tuple[str, list[Entry]]]]],
                  page_names: list[str]) -> dict[tuple[str, str, int | None], str]:
    """Where each gallery item is shown, as a link from the index page: ``{(model, sample_id,
    target): "#<anchor>" or "<page>#<anchor>"}``. The index's own items link within the index;
    the others to the gallery page that holds them (``page_names[k]`` for ``pages[k]``).
    Items on no page (cut by ``max_samples``) have no entry."""
    out: dict[tuple[str, str, int | None], str] = {}
    for name, plans in [("", index), *zip(page_names, pages)]:
        for model, sections in plans.items():
            for _, items in sections:
                for sid, tgt, _ in items:
                    out.setdefault((model, sid, tgt), f"{name}#{sample_anchor(model, sid, tgt)}")
    return out


def truth_boxes(boxes_json: str, target: int | None) -> list[list[float]]:
    """Ground-truth boxes of the explained class from a sample's annotation (all boxes when it
    has no labels), as the pipeline's box metrics pick them; [] when there are none."""
    from ..decode import parse_boxes

    try:  # the shard's own .json, read again: whatever fails to parse has no boxes (README)
        obj = parse_boxes(boxes_json) if boxes_json else {}
    except Exception:  # noqa: BLE001 - RecursionError of a .json nested 10^6 deep, ...
        return []
    boxes, labels = list(obj.get("boxes") or []), list(obj.get("labels") or [])
    if not labels:
        return boxes
    return [b for b, c in zip(boxes, labels) if target is not None and _target_key(c) == target]


def _target_key(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return int(value)


def rank_items(rows: pd.DataFrame) -> list[Entry]:
    """Every (sample, target) of one model's rows, best score first; samples with an ok row
    but no score next, then samples without any ok row (target None)."""
    if rows.empty:
        return []
    ok = rows[rows["status"] == "ok"]
    keys = ok.assign(_t=ok["target"].map(_target_key))
    means = keys.groupby(["sample_id", "_t"], dropna=False, sort=True)["score"].mean()
    scored = sorted(((sid, tgt, float(s)) for (sid, tgt), s in means.items()),
                    key=lambda e: (not np.isfinite(e[2]), -e[2] if np.isfinite(e[2]) else 0.0))
    explained = set(ok["sample_id"])
    failed = sorted(set(rows["sample_id"]) - explained)
    return [*scored, *((sid, None, float("nan")) for sid in failed)]


def index_plan(items: list[Entry], per_side: int, page_size: int = PAGE_SIZE
               ) -> list[tuple[str, list[Entry]]]:
    """The index page's sections: every item when they fit one page, else best and worst."""
    if not items:
        return []
    if len(items) <= page_size:
        return [(f"all {len(items)}, best first", items)]
    scored = [e for e in items if np.isfinite(e[2])]
    return [(f"best {per_side}", scored[:per_side]),
            (f"worst {per_side}, worst first", scored[::-1][:per_side])]


def page_plans(items_by_model: dict[str, list[Entry]], page_size: int = PAGE_SIZE,
               max_samples: int | None = None) -> list[dict[str, list[tuple[str, list[Entry]]]]]:
    """Gallery pages: page k holds items ``k*page_size ..`` of every model's ranking. With
    ``max_samples``, a model's ranking keeps its best and worst halves of that many."""
    kept = {}
    for model, items in items_by_model.items():
        if max_samples and len(items) > max_samples:
            half = max_samples // 2
            items = items[:max_samples - half] + items[len(items) - half:]
        kept[model] = items
    n_pages = max((math.ceil(len(v) / page_size) for v in kept.values()), default=0)
    pages = []
    for p in range(n_pages):
        plan = {}
        for model, items in kept.items():
            chunk = items[p * page_size:(p + 1) * page_size]
            if chunk:
                total = len(items_by_model[model])
                plan[model] = [(f"{p * page_size + 1}–{p * page_size + len(chunk)} of {total}, "
                                "best first", chunk)]
        pages.append(plan)
    return pages


def scored_rows(data: RunData, rank_by: str | None) -> tuple[str, pd.DataFrame]:
    rows = data.rows
    if rows.empty:
        return "", rows
    label, score = rank_expression(rows, rank_by)
    return label, rows.assign(score=score.to_numpy())


def render_galleries(data: RunData, rows: pd.DataFrame,
                     plans: dict[str, list[tuple[str, list[Entry]]]], storage: Any,
                     side: int = THUMB_SIDE, cmap: str = SEQUENTIAL, alpha: float = 0.5,
                     signed: str = "diverging") -> tuple[list[ModelGallery], Photos]:
    """One gallery per model for the planned items, and the photos read (with problems)."""
    wanted_ids = {sid for sections in plans.values() for _, items in sections
                  for sid, _, _ in items}
    shown = rows[rows["sample_id"].isin(wanted_ids)]
    photos = load_photos(set(zip(shown["shard"], shown["key"])),
                         dict(data.manifest.get("config", {}).get("input") or {}), storage)
    metrics = [(c, short) for c, short in CAPTION_METRICS if c in data.metrics][:4]
    galleries = []
    for model in data.models():
        sections = plans.get(model, [])
        units = [u for u in data.units if u.model == model]
        ids = {sid for _, items in sections for sid, _, _ in items}
        maps = {u.method: _read_maps(u, ids) for u in units}
        by_row = {u.method: rows[rows["unit"] == u.id] for u in units}
        modes = {u.method: signed if u.signed else None for u in units}
        rendered = []
        for title, items in sections:
            rendered.append((title, [_item(data, model, sid, tgt, s, by_row, maps, photos,
                                           metrics, side, cmap, alpha, modes)
                                     for sid, tgt, s in items]))
        note = "" if sections else "no rows for this model on this page"
        galleries.append(ModelGallery(model, [u.method for u in units], rendered, note,
                                      {u.method: u.signed for u in units}))
    return galleries, photos


def _read_maps(unit: Any, ids: set[str]) -> dict[tuple[str, int | None], dict]:
    """The map columns of ``ids``' rows, read from the files that hold them only."""
    if unit.dataset is None or not ids:
        return {}
    files = sorted({f for sid in ids for f in unit.files_of.get(sid, ())})
    if not files:
        return {}
    ds = pads.dataset(files, filesystem=unit.dataset.filesystem, format="parquet")
    cols = [c for c in MAP_COLUMNS if c in ds.schema.names]
    table = ds.to_table(columns=cols, filter=pc.field("sample_id").isin(sorted(ids)))
    return {(r["sample_id"], _target_key(r.get("target"))): r for r in table.to_pylist()}


def _named(index: Any, name: str) -> str:
    text = fmt(index, 0)
    return f"{text} ({name})" if name else text


def _item(data: RunData, model: str, sid: str, tgt: int | None, score: float,
          by_row: dict[str, pd.DataFrame], maps: dict[str, dict], photos: Photos,
          metrics: list[tuple[str, str]], side: int, cmap: str, alpha: float,
          modes: dict[str, str | None]) -> Item:
    mine = pd.concat([df[df["sample_id"] == sid] for df in by_row.values()])
    first = mine.sort_values("status", key=lambda s: s != "ok", kind="stable").iloc[0]
    shard, key = str(first["shard"]), str(first["key"])
    ow, oh = _int(first.get("orig_width")), _int(first.get("orig_height"))
    photo = photos.images.get((shard, key))
    if photo is not None and (not ow or not oh):
        ow, oh = photo.size
    truth = truth_boxes(photos.boxes_json.get((shard, key), ""), tgt)
    thumb = photo_thumbnail(photo, ow, oh, side, truth) if ow and oh else None
    names = data.classes
    parts = [f"label {_named(first.get('label'), names.label(model, first.get('label')))}",
             f"pred {_named(first.get('pred'), names.target(model, first.get('pred')))}"]
    if tgt is not None:
        parts.append(f"target {_named(tgt, names.target(model, tgt))}")
    parts.append(f"score {fmt(score)}")
    image_file = first.get("image_file")
    if isinstance(image_file, str) and image_file:
        parts.insert(0, image_file)
    item = Item(sid, tgt, score, " · ".join([sid, *parts]),
                data_uri(thumb) if thumb is not None else "")
    for method, df in by_row.items():
        item.cells[method] = _cell(df, maps.get(method, {}), sid, tgt, photo, ow, oh, metrics,
                                   side, cmap, alpha, modes.get(method))
    return item


def _int(v: Any) -> int:
    try:
        return 0 if v is None or pd.isna(v) else int(v)
    except (TypeError, ValueError):
        return 0


def _cell(df: pd.DataFrame, maps: dict, sid: str, tgt: int | None, photo: Any, ow: int, oh: int,
          metrics: list[tuple[str, str]], side: int, cmap: str, alpha: float,
          signed: str | None) -> Cell:
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
                  cmap=cmap, alpha=alpha,
                  value_range=(m.get("saliency_min"), m.get("saliency_max")), signed=signed)
    return Cell(uri=data_uri(img), caption=" · ".join(parts))
