"""``salmap export RUN --format coco | voc-masks | parquet``: a run's pseudo-labels in the formats
training code reads.

* ``coco``: one COCO detection JSON per unit, ``<unit>.json``. ``images``: one per sample with
  an ``ok`` row, ``file_name`` = ``<shard>/<image member>`` (what ``tar -xf <shard>.tar -C
  images/<shard>`` extracts), original ``width`` and ``height``. ``annotations``: one per
  pseudo box (``pseudo_box`` metric), ``bbox`` = ``[x, y, w, h]`` in original pixels,
  ``category_id`` = model class + 1 (detection code often reserves 0 for background), ``score``
  = the box's support in the map (``pseudo_box_score``), and where the row has a pseudo mask
  (``pseudo_mask`` metric) its ``segmentation`` as COCO RLE (compressed ``counts``; ``area``
  is then the mask's pixel count), which ``annToMask`` reads. ``categories``: the explained
  classes with their names.
* ``voc-masks``: per unit, ``SegmentationClass/<shard>/<key>.png`` for every label map
  (``pseudo_labels.label_maps``), ``ImageSets/Segmentation/train.txt`` (one ``<shard>/<key>``
  a line) and ``class_map.json`` (PNG value -> model class and name). The PNGs are 8-bit
  palette images (VOC colours) with 0 background and 255 ignore, as VOC-style loaders expect:
  value = class + 1 when every class is below 254 (a model trained on VOC's 20 classes gives
  VOC's ids), else the classes present are numbered 1..N in class order (N <= 254); with more
  than 254 classes the PNGs are 16-bit, value = class + 1, ignore 65535.
* ``parquet``: the committed rows as they are, ``<unit>/part-NNNNN.parquet``.

An export that would hold nothing (no pseudo box, no label map) raises :class:`ExportError`
naming the config key that makes them, and writes nothing.

Exports read committed rows only (the files named in the commit records), one Parquet batch at
a time, wave by wave, so memory does not grow with the run; the COCO JSON is assembled from
two temporary files on local disk. RUN and ``--output`` may be ``s3://`` URLs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from salmap.workers.unit_id import UnitId

from . import coco_rle
from .commit_record import CommitRecord
from .ledger import MANIFEST_KEY
from .rollup import committed_file_lists
from .safe_path import UnsafePath, join_inside, shown_key
from .storage import Store

FORMATS = ("coco", "voc-masks", "parquet")
# label-map values (workers.metrics.label_maps, not imported here: workers.metrics loads torch,
# 80 MB and seconds that an export does not need)
IGNORE = 65535
BATCH_ROWS = 256  # rows per Parquet batch read
PARQUET_FILE_ROWS = 100_000  # rows per exported Parquet file
WRITE_THREADS = 8  # concurrent PNG writes (S3 round trips), at most 2x this many in memory


class ExportError(ValueError):
    """The run cannot be exported in that format (the message says why and what to change)."""


# -- reading committed rows, wave by wave ----------------------------------------------------
def unit_waves(commits: dict[str, dict[str, CommitRecord]], unit: str) -> list[list[str]]:
    """The unit's committed files grouped by wave (a sample's rows never cross waves)."""
    return [list(rec.files) for _, rec in sorted(commits.get(unit, {}).items())]


def iter_batches(store: Store, files: list[str], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns`` (those the files have) from committed files, in order."""
    for f in files:
        with store.fs.open_input_file(store.path(f)) as src:
            pf = pq.ParquetFile(src)
            have = [c for c in columns if c in pf.schema_arrow.names]
            yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=have)


def unit_schema(store: Store, commits: dict, unit: str) -> pa.Schema | None:
    """The Arrow schema of the unit's committed rows (its first file's), or None without files."""
    files = [f for w in unit_waves(commits, unit) for f in w]
    if not files:
        return None
    with store.fs.open_input_file(store.path(files[0])) as src:
        return pq.ParquetFile(src).schema_arrow


@contextlib.contextmanager
def output_stream(store: Store, key: str):
    """A writable stream for ``key``: locally a temp file renamed into place when the block
    succeeds; on S3 an upload stream (multipart)."""
    if store.is_s3:
        with store.fs.open_output_stream(store.path(key)) as out:
            yield out
        return
    path = store.path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            yield out
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -- class names ---------------------------------------------------------------------------
def load_class_names(path: str | None) -> dict[int, str]:
    """Names from a file: a JSON list (index = class), a JSON object ``{class: name}`` or a
    text file with one name per line."""
    if not path:
        return {}
    text = open(path, encoding="utf-8").read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return {i: line.strip() for i, line in enumerate(text.splitlines()) if line.strip()}
    if isinstance(obj, list):
        return {i: str(n) for i, n in enumerate(obj)}
    if isinstance(obj, dict):
        return {int(k): str(v) for k, v in obj.items()}
    raise ExportError(f"{path}: class names must be a JSON list, a JSON object or lines of text")


def model_class_names(manifest: dict, model: str) -> dict[int, str]:
    """The class names a known pretrained model ships (torchvision weights, EfficientNet-Lite0's
    ImageNet classes); {} when unknown."""
    models = ((manifest.get("config") or {}).get("models")) or []
    m = next((m for m in models if m.get("name") == model), None)
    if not m or str(m.get("weights")) in ("None", "none", ""):
        return {}
    try:
        import torchvision.models as tvm

        src = str(m.get("source", ""))
        if src.startswith("torchvision:"):
            enum = tvm.get_model_weights(src.split(":", 1)[1])
            w = enum.DEFAULT if m.get("weights") in ("DEFAULT", None) else enum[m["weights"]]
            categories = w.meta.get("categories") or []
        elif src in ("efficientnet_lite0", "efficientnet-lite0"):
            categories = tvm.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
        else:
            return {}
    except Exception:  # noqa: BLE001 - names are a convenience; ids still identify classes
        return {}
    return dict(enumerate(categories))


def namer(store: Store, model: str, names_file: str | None) -> Callable[[int], str]:
    """Class index -> name: from ``names_file``, else the model's names in the manifest, else
    ``class_<i>``."""
    names = load_class_names(names_file)
    if not names:
        manifest = store.read_json(MANIFEST_KEY) if store.exists(MANIFEST_KEY) else {}
        names = model_class_names(manifest, model)
    return lambda c: names.get(int(c), f"class_{int(c)}")


# -- COCO ----------------------------------------------------------------------------------
COCO_COLUMNS = ["sample_id", "shard", "key", "image_file", "status", "target", "orig_height",
                "orig_width", "pseudo_box", "pseudo_box_score", "target_prob", "pseudo_mask_png"]


def export_coco(store: Store, commits: dict, unit: str, out: Store, names: Callable[[int], str],
                run: str) -> str:
    """``<unit>.json`` in ``out``; returns its URL."""
    schema = unit_schema(store, commits, unit)
    if schema is None or "pseudo_box" not in schema.names:
        raise ExportError(f"{unit}: the rows have no pseudo_box column; add pseudo_box to the "
                          "config's metrics")
    classes: set[int] = set()
    n_images = n_boxes = 0
    with tempfile.TemporaryDirectory(prefix="salmap-coco-") as tmp:
        img_path, ann_path = os.path.join(tmp, "images"), os.path.join(tmp, "annotations")
        with open(img_path, "w") as images, open(ann_path, "w") as anns:
            for files in unit_waves(commits, unit):
                image_ids: dict[str, int] = {}  # this wave's samples (a sample stays in its wave)
                for batch in iter_batches(store, files, COCO_COLUMNS):
                    for r in batch.to_pylist():
                        if r["status"] != "ok":
                            continue
                        sid = r["sample_id"]
                        if sid not in image_ids:
                            n_images += 1
                            image_ids[sid] = n_images
                            member = r.get("image_file") or r["key"]
                            images.write(("," if n_images > 1 else "") + json.dumps({
                                "id": n_images, "file_name": f"{r['shard']}/{member}",
                                "width": r["orig_width"], "height": r["orig_height"],
                                "salmap_sample_id": sid}))
                        classes.add(int(r["target"]))
                        b = r["pseudo_box"]
                        if b is None or b["x1"] <= b["x0"] or b["y1"] <= b["y0"]:
                            continue
                        n_boxes += 1
                        w, h = b["x1"] - b["x0"], b["y1"] - b["y0"]
                        score = r.get("pseudo_box_score")
                        ann = {"id": n_boxes, "image_id": image_ids[sid],
                               "category_id": int(r["target"]) + 1,
                               "bbox": [b["x0"], b["y0"], w, h], "area": w * h, "iscrowd": 0,
                               "score": 1.0 if score is None else score,
                               "salmap_target_prob": r.get("target_prob")}
                        if r.get("pseudo_mask_png"):
                            ann["segmentation"], ann["area"] = coco_rle.from_png(r["pseudo_mask_png"])
                        anns.write(("," if n_boxes > 1 else "") + json.dumps(ann))
        if not n_boxes:
            raise ExportError(f"{unit}: nothing to export: {_why_no_boxes(store, n_images)}")
        model, method = UnitId.parse(unit)
        head = {
            "info": {"description": f"salmap pseudo boxes: model {model}, method {method}",
                     "salmap_run": run, "salmap_unit": unit,
                     "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "licenses": [],
            "categories": [{"id": c + 1, "name": names(c), "supercategory": "salmap",
                            "salmap_class": c} for c in sorted(classes)],
        }
        key = f"{unit}.json"
        with output_stream(out, key) as dst:
            dst.write(json.dumps(head)[:-1].encode() + b', "images": [')
            _copy(img_path, dst)
            dst.write(b'], "annotations": [')
            _copy(ann_path, dst)
            dst.write(b"]}\n")
    return out.url(key)


def _why_no_boxes(store: Store, n_images: int) -> str:
    """Why a unit has no pseudo box, and what to change."""
    if not n_images:
        return "no ok rows"
    manifest = store.read_json(MANIFEST_KEY) if store.exists(MANIFEST_KEY) else {}
    metrics = ((manifest.get("config") or {}).get("metrics")) or []
    asked = {m if isinstance(m, str) else next(iter(m), "") for m in metrics
             if isinstance(m, (str, dict))}
    if "pseudo_box" in asked:
        return (f"no map of the {n_images} images gave a pseudo box (no foreground above "
                "the metric's pseudo_threshold)")
    return (f"the run did not compute pseudo boxes ({n_images} images); add pseudo_box (and "
            "pseudo_mask for segmentation) to the config's metrics, e.g. salmap run CONFIG "
            "'metrics=[pseudo_box, pseudo_mask]' run.id=NEW")


def _copy(path: str, dst: Any) -> None:
    with open(path, "rb") as src:
        while chunk := src.read(1 << 16):
            dst.write(chunk)


# -- VOC masks -----------------------------------------------------------------------------
def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB entries): bits of the index spread over R, G, B."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal.extend((r, g, b))
    return pal


def voc_encoding(classes: list[int]) -> dict[str, Any]:
    """How label-map values become VOC PNG values (see the module doc)."""
    classes = sorted(set(classes))
    if not classes or classes[-1] + 1 < 255:
        return {"bits": 8, "ignore": 255, "values": {c: c + 1 for c in classes},
                "rule": "value = class + 1"}
    if len(classes) <= 254:
        return {"bits": 8, "ignore": 255, "values": {c: i + 1 for i, c in enumerate(classes)},
                "rule": "classes present numbered 1..N in class order"}
    return {"bits": 16, "ignore": IGNORE, "values": {c: c + 1 for c in classes},
            "rule": "value = class + 1 (16-bit: more than 254 classes)"}


def _lut(enc: dict[str, Any]) -> np.ndarray:
    """Label-map value (uint16) -> VOC PNG value."""
    lut = np.full(IGNORE + 1, enc["ignore"], dtype=np.uint16 if enc["bits"] == 16 else np.uint8)
    lut[0] = 0
    for c, v in enc["values"].items():
        lut[c + 1] = v
    return lut


def voc_png(lm: np.ndarray, lut: np.ndarray, palette: list[int]) -> bytes:
    """A label map as a VOC PNG: 8-bit palette (indices are the values), or 16-bit gray."""
    arr = np.ascontiguousarray(lut[lm])
    if arr.dtype == np.uint8:
        img = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.tobytes())
        img.putpalette(palette)
    else:
        img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def export_voc(store: Store, commits: dict, unit: str, out: Store, names: Callable[[int], str],
               run: str) -> str:
    """``<unit>/`` in ``out`` (SegmentationClass, ImageSets/Segmentation/train.txt,
    class_map.json); returns its URL."""
    schema = unit_schema(store, commits, unit)
    if schema is None or "label_map_png" not in schema.names:
        raise ExportError(f"{unit}: the rows have no label maps; run with "
                          "pseudo_labels.label_maps=true")
    waves = unit_waves(commits, unit)
    classes: set[int] = set()
    for batch in iter_batches(store, [f for w in waves for f in w], ["status", "target"]):
        t = batch.to_pydict()
        classes.update(int(c) for c, s in zip(t["target"], t["status"]) if s == "ok")
    enc = voc_encoding(sorted(classes))
    lut, palette = _lut(enc), voc_palette()
    written = 0
    pending: list[Future] = []
    with tempfile.TemporaryDirectory(prefix="salmap-voc-") as tmp, \
            ThreadPoolExecutor(WRITE_THREADS) as pool:
        list_path = os.path.join(tmp, "train.txt")
        with open(list_path, "w") as names_out:
            for files in waves:
                for batch in iter_batches(store, files, ["shard", "key", "status", "label_map_png"]):
                    t = batch.to_pydict()
                    for shard, key, status, png in zip(t["shard"], t["key"], t["status"],
                                                       t["label_map_png"]):
                        if status != "ok" or png is None:
                            continue
                        lm = np.asarray(Image.open(io.BytesIO(png))).astype(np.uint16)
                        unknown = {int(v) - 1 for v in np.unique(lm)} - {-1, IGNORE - 1} \
                            - set(enc["values"])
                        if unknown:
                            raise ExportError(f"{unit}: label map of {shard}/{key} holds classes "
                                              f"{sorted(unknown)} that no row explains")
                        name = f"{shard}/{key}"
                        try:  # keys are data: one that would leave the folder is refused
                            dest = join_inside(f"{unit}/SegmentationClass", shard, f"{key}.png")
                        except UnsafePath as err:
                            raise ExportError(f"{unit}: sample {shard}/{shown_key(key)} cannot be "
                                              f"written inside the export: {err}") from None
                        data = voc_png(lm, lut, palette)
                        pending.append(pool.submit(out.write_bytes, dest, data))
                        names_out.write(name + "\n")
                        written += 1
                        if len(pending) >= 2 * WRITE_THREADS:
                            _drain(pending, keep=WRITE_THREADS)
            _drain(pending, keep=0)
        if not written:
            raise ExportError(
                f"{unit}: nothing to export: no label maps in the rows (the run was made without "
                "them); run with pseudo_labels.label_maps=true, e.g. salmap run CONFIG "
                "pseudo_labels.label_maps=true run.id=NEW")
        with output_stream(out, f"{unit}/ImageSets/Segmentation/train.txt") as dst:
            _copy(list_path, dst)
    out.write_json(f"{unit}/class_map.json", {
        "unit": unit, "run": run, "images": written, "png_bits": enc["bits"],
        "background": 0, "ignore": enc["ignore"], "rule": enc["rule"],
        "classes": [{"value": v, "class": c, "name": names(c)}
                    for c, v in sorted(enc["values"].items(), key=lambda kv: kv[1])],
        "palette": "PASCAL VOC" if enc["bits"] == 8 else None,
        "list": "ImageSets/Segmentation/train.txt", "masks": "SegmentationClass/<name>.png",
    })
    return out.url(unit)


def _drain(pending: list[Future], keep: int) -> None:
    while len(pending) > keep:
        pending.pop(0).result()


# -- Parquet -------------------------------------------------------------------------------
def export_parquet(store: Store, commits: dict, unit: str, out: Store) -> str:
    """The unit's committed rows in ``<unit>/part-NNNNN.parquet``; returns the folder's URL."""
    files = [f for w in unit_waves(commits, unit) for f in w]
    schema = unit_schema(store, commits, unit)
    if schema is None:
        raise ExportError(f"{unit} has no committed rows")
    meta = {k: v for k, v in (schema.metadata or {}).items() if k != b"salmap.wave"}
    schema = schema.with_metadata(meta)
    batches = iter_batches(store, files, schema.names)
    batch, part = next(batches, None), 0
    while batch is not None:
        with output_stream(out, f"{unit}/part-{part:05d}.parquet") as dst, \
                pq.ParquetWriter(dst, schema, compression="zstd") as writer:
            rows = 0
            while batch is not None and rows < PARQUET_FILE_ROWS:
                writer.write_batch(batch.cast(schema))
                rows += batch.num_rows
                batch = next(batches, None)
        part += 1
    return out.url(unit)


# -- entry point ---------------------------------------------------------------------------
def export_run(run: str, fmt: str, output: str | None = None, unit: str | None = None,
               storage: Any = None, class_names: str | None = None) -> list[str]:
    """Export every unit of ``run`` (or ``unit``) as ``fmt`` under ``output`` (default
    ``<run>/export/<fmt>``); returns what was written, one URL per unit."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    store = Store.open(run, storage)
    commits = committed_file_lists(store)  # the records' file lists; rows stream batch by batch
    if not commits:
        raise ExportError(f"{run} has no committed rows")
    if unit is not None:  # <model>__<method>, or the method (or model) alone when unambiguous
        from .read import UnitNotFound, resolve_unit

        try:
            unit = resolve_unit(unit, sorted(commits))
        except UnitNotFound as err:
            raise ExportError(f"{run}: {err}") from None
    out = Store.open(output or f"{store.uri}/export/{fmt}", storage)
    if not out.is_s3 and fmt == "parquet" and os.path.isdir(out.root):
        for u in [unit] if unit else sorted(commits):
            shutil.rmtree(out.path(u), ignore_errors=True)  # no stale parts of an earlier export
    written = []
    for u in [unit] if unit else sorted(commits):
        model = UnitId.parse(u).model
        if fmt == "coco":
            written.append(export_coco(store, commits, u, out, namer(store, model, class_names), run))
        elif fmt == "voc-masks":
            written.append(export_voc(store, commits, u, out, namer(store, model, class_names), run))
        else:
            written.append(export_parquet(store, commits, u, out))
    return written
