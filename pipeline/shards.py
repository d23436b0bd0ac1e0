"""``salmap shards``: an image folder -> WebDataset shards (local or ``s3://``).

Two layouts: class sub-folders (``cat/001.jpg`` -> label = the folder's index in sorted order,
written to ``classes.json``), or a flat folder plus a CSV (``file,label[,x0,y0,x1,y1]``, one box
per line; repeated file names add boxes) or JSON (``{"file": {"label": c, "boxes": [...],
"labels": [...]}}``). Keys are the file paths without extension, made safe for tar names.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from pathlib import Path

from .storage import Store

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


class ShardsError(ValueError):
    """A usage error of ``salmap shards`` (no such folder, no images, an unreadable labels file):
    the CLI prints it as one line and exits 2."""


def _safe_key(rel: str) -> str:
    stem = os.path.splitext(rel)[0]
    return re.sub(r"[^A-Za-z0-9_\-/]", "_", stem).replace("/", "__")


def _read_labels(path: str) -> dict[str, dict]:
    try:
        return _parse_labels(path)
    except OSError as err:
        raise ShardsError(f"--labels {path}: {err.strerror or err}") from None
    except (ValueError, TypeError, AttributeError) as err:
        raise ShardsError(f"--labels {path} cannot be read ({err}); give a CSV file,label"
                          "[,x0,y0,x1,y1] or a JSON object {file: {label, boxes, labels}}") from None


def _parse_labels(path: str) -> dict[str, dict]:
    if path.lower().endswith(".json"):
        with open(path) as f:
            raw = json.load(f)
        return {k: (v if isinstance(v, dict) else {"label": v}) for k, v in raw.items()}
    out: dict[str, dict] = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].strip().lower() in ("file", "filename", "path"):
                continue
            name = row[0].strip()
            entry = out.setdefault(name, {})
            if len(row) > 1 and row[1].strip():
                entry["label"] = int(row[1])
            if len(row) >= 6:
                entry.setdefault("boxes", []).append([float(v) for v in row[2:6]])
                entry.setdefault("labels", []).append(int(row[1]))
    return out


def collect(images: str, labels: str | None = None,
            skipped: list[str] | None = None) -> list[tuple[str, Path, dict]]:
    """(key, file, annotations) for every image, in a stable order; files of other types are
    appended to ``skipped`` (paths relative to ``images``)."""
    root = Path(images)
    if not root.is_dir():
        raise ShardsError(f"{images} is not a folder" + (" (it is a file)" if root.exists() else ""))
    everything = sorted(p for p in root.rglob("*") if p.is_file())
    files = [p for p in everything if p.suffix.lower() in IMAGE_SUFFIXES]
    if skipped is not None:
        skipped.extend(p.relative_to(root).as_posix() for p in everything
                       if p.suffix.lower() not in IMAGE_SUFFIXES)
    ann = _read_labels(labels) if labels else {}
    subdirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    class_index = {c: i for i, c in enumerate(subdirs)} if subdirs and not labels else {}
    out = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        meta = dict(ann.get(rel, ann.get(p.name, {})))
        if class_index:
            meta.setdefault("label", class_index[p.relative_to(root).parts[0]])
        out.append((_safe_key(rel), p, meta))
    return out


def write_shards(images: str, output: str, per_shard: int = 1000, labels: str | None = None,
                 prefix: str = "shard", endpoint: str | None = None,
                 skipped: list[str] | None = None, notes: list[str] | None = None) -> list[str]:
    """Write ``<output>/<prefix>-000000.tar, ...`` and ``shards.json`` (sample counts);
    files that are not images of a supported type are listed in ``skipped``, and what the user
    should know about the result (a flat folder without labels) in ``notes``. A folder without
    images raises :class:`ShardsError`."""
    if per_shard < 1:
        raise ShardsError(f"--per-shard {per_shard}: give a number of images per shard >= 1")
    items = collect(images, labels, skipped)
    if not items:
        raise ShardsError(f"no images found in {images} (looked for "
                          f"{'/'.join(sorted(IMAGE_SUFFIXES))} files, in sub-folders too)")
    if notes is not None and not labels and all(len(p.relative_to(images).parts) == 1
                                                for _, p, _ in items):
        notes.append(f"{images} has no class sub-folders and no --labels was given: the shards "
                     "hold images without labels (fine for targets: predicted; for targets: "
                     "label give --labels labels.csv, file,label per line)")
    store = Store.open(output, {"endpoint": endpoint} if endpoint else None)
    written, counts = [], {}
    for s in range(0, len(items), per_shard):
        name = f"{prefix}-{s // per_shard:06d}"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for key, path, meta in items[s:s + per_shard]:
                members = {path.suffix.lower().lstrip("."): path.read_bytes()}
                if "label" in meta:
                    members["cls"] = str(int(meta["label"])).encode()
                if meta.get("boxes"):
                    members["json"] = json.dumps({"boxes": meta["boxes"],
                                                  "labels": meta.get("labels", [])}).encode()
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        store.write_bytes(f"{name}.tar", buf.getvalue())
        written.append(store.url(f"{name}.tar"))
        counts[name] = len(items[s:s + per_shard])
    if items:
        store.write_json("shards.json", {"samples": counts})
        root = Path(images)
        subdirs = sorted({p.relative_to(root).parts[0] for _, p, _ in items
                          if len(p.relative_to(root).parts) > 1})
        if subdirs and not labels:
            store.write_json("classes.json", {c: i for i, c in enumerate(subdirs)})
    return written
