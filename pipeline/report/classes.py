"""Class names for the report: what the model's outputs mean, and what the dataset's labels mean.

- A model's output classes: torchvision weights carry their categories (ImageNet, COCO, ...);
  the pretrained EfficientNet-Lite0 is an ImageNet-1k model.
- A dataset's label classes: ``classes.json`` (``{"name": index}``, written by ``salmap
  shards`` for class sub-folders) next to the input shards; without one, labels are taken to
  be the model's class indices (the demo's ``.cls`` are ImageNet indices).

Nothing here downloads anything: torchvision keeps the categories in its package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..storage import open_filesystem


@dataclass
class ClassNames:
    """Per model: output class index -> name; for labels: label index -> name."""

    models: dict[str, list[str]] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)
    labels_source: str = ""  # where the label names came from (a classes.json path)

    def target(self, model: str, index: Any) -> str:
        names = self.models.get(model)
        i = _int(index)
        return names[i] if names is not None and i is not None and 0 <= i < len(names) else ""

    def label(self, model: str, index: Any) -> str:
        i = _int(index)
        if i is None:
            return ""
        if self.labels:
            return self.labels.get(i, "")
        return self.target(model, i)


def _int(value: Any) -> int | None:
    try:
        if value is None or value != value:  # None or NaN
            return None
        return int(value)
    except (TypeError, ValueError):
        return None


def model_classes(model: dict) -> list[str] | None:
    """The categories of a model config entry's weights, or None (random weights, own models)."""
    from ..export import model_class_names

    names = model_class_names({"config": {"models": [dict(model)]}}, str(model.get("name")))
    return [names[i] for i in range(len(names))] if names else None


def _shard_folders(shards: list[str]) -> list[str]:
    """Folders that hold the config's shards (from pattern, file and folder entries)."""
    out = []
    for s in (str(x) for x in shards):
        if s.startswith("demo://"):
            continue
        special = [i for i in (s.find(c) for c in "{*?[") if i >= 0]
        if special:
            folder = os.path.dirname(s[:min(special)])
        elif s.lower().endswith(".tar"):
            folder = os.path.dirname(s)
        else:
            folder = s
        out.append(folder.rstrip("/") or ".")
    return list(dict.fromkeys(out))


def label_classes(input_cfg: dict, storage: Any = None) -> tuple[dict[int, str], str]:
    """``classes.json`` next to the input shards as index -> name, and its path ({} if none)."""
    for folder in _shard_folders(list(input_cfg.get("shards") or [])):
        path = f"{folder}/classes.json"
        try:
            fs, inner = open_filesystem(path, storage)
            with fs.open_input_stream(inner) as f:
                raw = json.loads(f.read().decode("utf-8"))
        except Exception:  # noqa: BLE001 - absent or unreadable: no label names
            continue
        if isinstance(raw, dict):
            try:
                return {int(i): str(name) for name, i in raw.items()}, path
            except (TypeError, ValueError):
                continue
        if isinstance(raw, list):
            return {i: str(name) for i, name in enumerate(raw)}, path
    return {}, ""


def class_names(config: dict, storage: Any = None) -> ClassNames:
    """The class names a run's report can use, from the run's resolved config."""
    names = ClassNames()
    for m in config.get("models") or []:
        cats = model_classes(dict(m))
        if cats:
            names.models[str(m.get("name"))] = cats
    names.labels, names.labels_source = label_classes(dict(config.get("input") or {}), storage)
    return names
