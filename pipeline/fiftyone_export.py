"""A run as a FiftyOne dataset folder: images, maps as heatmaps, pseudo boxes, metrics, clusters.

Written in FiftyOne's documented ``LegacyFiftyOneDataset`` layout, which needs no database to
write (``fiftyone`` itself is optional: ``pip install 'salmap[fiftyone]'``, only to load it)::

    <folder>/metadata.json          {"media_type": "image", "info": {...}}
    <folder>/samples.json           {"samples": [{"filepath": "data/...", ...}, ...]}
    <folder>/data/<sample>.<ext>    the images, read back from the run's input shards
    <folder>/maps/<unit>/<sample>__<target>.png   each map in original pixels (0..255)

Load it with ``fiftyone.Dataset.from_dir(folder, dataset_type=fiftyone.types.LegacyFiftyOneDataset)``.
One FiftyOne sample per image. Per unit ``U`` (``<model>__<method>``; a ``.`` in it made ``_``,
see :func:`field_prefixes`, ``info.fields`` maps each unit to its prefix) it has the fields
``U__map`` (``Heatmap``), ``U__pseudo_box`` (``Detections``), ``U__target``, one field per
metric (``U__deletion_auc``, ...) and, after ``salmap analyze``, ``U__cluster`` (numbered
per class), ``U__class_cluster`` (``"<target>/<cluster>"``: one value per cluster of the run),
``U__cluster_flagged``, ``U__x``, ``U__y``, so the app filters and sorts by any of them. A
sample explained for several targets shows its predicted class's row (else its first target);
all its targets are listed in ``U__targets``. Images that cannot be read back from the shards
are left out and counted in ``info.missing_images``.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import pyarrow.compute as pc
from salmap.workers.unit_id import UnitId

from .ledger import MANIFEST_KEY
from .read import read_run, units
from .storage import Store

INSTALL_HINT = "pip install 'salmap[fiftyone]'  (or: pip install fiftyone)"
ROW_COLUMNS = ("sample_id", "shard", "key", "target", "pred", "label", "status", "orig_height",
               "orig_width", "pseudo_box", "saliency_png", "target_prob")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", name)


def field_prefixes(unit_ids: list[str]) -> dict[str, str]:
    """Each unit's FiftyOne field prefix: the id with every character but letters, digits,
    ``_`` and ``-`` made ``_`` (FiftyOne reads a ``.`` in a field name as a path into an
    embedded document, and refuses names that start with ``_``: model names may have both),
    ``u`` before a leading ``_``, ``_2``, ``_3``, ... after a prefix already taken."""
    out: dict[str, str] = {}
    for u in unit_ids:
        base = re.sub(r"[^A-Za-z0-9_-]", "_", u)
        base = "u" + base if base.startswith("_") else base
        name, i = base, 1
        while name in out.values():
            i += 1
            name = f"{base}_{i}"
        out[u] = name
    return out


def _num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _detections(box: dict | None, w: int, h: int, label: str, score: Any) -> dict:
    dets = []
    if box is not None and w and h:
        dets.append({"_cls": "Detection", "label": label, "confidence": _num(score),
                     "bounding_box": [box["x0"] / w, box["y0"] / h, (box["x1"] - box["x0"]) / w,
                                      (box["y1"] - box["y0"]) / h]})
    return {"_cls": "Detections", "detections": dets}


def export_fiftyone(run: str, folder: str | None = None, storage: Any = None,
                    unit: str | None = None) -> str:
    """Write ``run`` as a FiftyOne dataset folder (see the module doc); returns the folder.
    The folder must be local (FiftyOne reads media from local paths); default
    ``<run>/export/fiftyone`` for a local run."""
    from salmap.workers.columns import METRIC_COLUMNS

    from .analyze import load_analysis
    from .export import namer
    from .report.photos import load_photos

    store = Store.open(run, storage)
    if folder is None:
        if store.is_s3:
            raise ValueError("an s3:// run needs a local output folder for the FiftyOne export")
        folder = store.path("export/fiftyone")
    folder = os.path.abspath(folder)
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    manifest = store.read_json(MANIFEST_KEY) if store.exists(MANIFEST_KEY) else {}
    analysis = load_analysis(run, storage)
    wanted = [unit] if unit else units(run, storage=storage)
    prefixes = field_prefixes(wanted)
    samples: dict[str, dict] = {}
    where: dict[str, tuple[str, str]] = {}
    for u in wanted:
        pre = prefixes[u]
        names = namer(store, UnitId.parse(u).model, None)
        ds = read_run(run, unit=u, storage=storage)
        metrics = [m for m in METRIC_COLUMNS if m in ds.schema.names]
        cols = [c for c in (*ROW_COLUMNS, *metrics) if c in ds.schema.names]
        clusters: dict[tuple[str, int], dict] = {}
        if analysis is not None and u in analysis[1]:
            flagged = {(r["target"], r["cluster"]) for r in
                       analysis[2][u].filter(pc.field("flagged")).select(["target", "cluster"])
                       .to_pylist()}
            for r in analysis[1][u].select(["sample_id", "target", "cluster", "x", "y"]).to_pylist():
                r["flagged"] = (r["target"], r["cluster"]) in flagged
                clusters[(r["sample_id"], r["target"])] = r
        maps_dir = os.path.join(folder, "maps", _safe(u))
        os.makedirs(maps_dir, exist_ok=True)
        for batch in ds.scanner(columns=cols, filter=pc.field("status") == "ok",
                                batch_size=256).to_batches():
            for r in batch.to_pylist():
                sid, t = r["sample_id"], r["target"]
                s = samples.setdefault(sid, {"tags": [], "salmap_sample_id": sid})
                where[sid] = (r["shard"], r["key"])
                if r.get("label") is not None and r["label"] >= 0:
                    s["ground_truth"] = {"_cls": "Classification", "label": names(r["label"])}
                targets = s.setdefault(f"{pre}__targets", [])
                targets.append(t)
                if len(targets) > 1 and t != r.get("pred"):
                    continue  # keep the predicted class's row (else the first target's)
                path = None
                if r.get("saliency_png"):
                    path = os.path.join(maps_dir, f"{_safe(sid)}__{t}.png")
                    with open(path, "wb") as fh:
                        fh.write(r["saliency_png"])
                s[f"{pre}__map"] = ({"_cls": "Heatmap", "map_path": path, "range": [0, 255]}
                                  if path else None)
                s[f"{pre}__target"] = t
                s[f"{pre}__target_name"] = names(t) if t is not None else None
                s[f"{pre}__pseudo_box"] = _detections(r.get("pseudo_box"), r.get("orig_width"),
                                                    r.get("orig_height"),
                                                    names(t) if t is not None else "?",
                                                    r.get("target_prob"))
                for m in metrics:
                    v = r.get(m)
                    s[f"{pre}__{m}"] = _num(float(v)) if isinstance(v, float) else v
                c = clusters.get((sid, t))
                if c is not None:
                    s[f"{pre}__cluster"] = c["cluster"]
                    s[f"{pre}__class_cluster"] = f"{t}/{c['cluster']}"  # ids restart per class
                    s[f"{pre}__cluster_flagged"] = c["flagged"]
                    s[f"{pre}__x"], s[f"{pre}__y"] = _num(c["x"]), _num(c["y"])
                else:  # a later (predicted) target's row without a cluster: drop the first's
                    for k in ("cluster", "class_cluster", "cluster_flagged", "x", "y"):
                        s.pop(f"{pre}__{k}", None)
    missing = 0
    by_shard: dict[str, set[str]] = {}
    sample_of = {v: k for k, v in where.items()}
    for shard, key in where.values():
        by_shard.setdefault(shard, set()).add(key)
    input_cfg = (manifest.get("config") or {}).get("input") or {}
    out = []
    for shard, keys in sorted(by_shard.items()):  # one shard's images in memory at a time
        photos = load_photos({(shard, k) for k in keys}, input_cfg, storage)
        for key in sorted(keys):
            sid = sample_of[(shard, key)]
            img = photos.images.get((shard, key))
            if img is None:
                missing += 1
                continue
            rel = os.path.join("data", _safe(sid) + ".png")
            img.convert("RGB").save(os.path.join(folder, rel))
            out.append({"filepath": rel, **samples[sid]})
    info = {"salmap_run": run, "run_id": manifest.get("run_id"), "units": wanted,
            "fields": prefixes, "missing_images": missing}
    with open(os.path.join(folder, "metadata.json"), "w") as fh:
        json.dump({"media_type": "image", "info": info}, fh)
    with open(os.path.join(folder, "samples.json"), "w") as fh:
        json.dump({"samples": out}, fh)
    return folder
