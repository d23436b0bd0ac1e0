"""Which config keys changed a unit's rows: named in the refusal to resume a run whose
committed rows were made with a different config (not just two hashes).

The keys are those :func:`salmap.pipeline.config.unit_hash` covers, read from two resolved configs
(the earlier driver's, as stored in its manifest, and this one), as dotted paths with the
model and method named: ``models[r18].input_size``, ``methods[gradient].params.steps``.
"""

from __future__ import annotations

import json
from typing import Any

from salmap.workers.unit_id import UnitId

_INPUT_KEYS = ("image_keys", "label_key", "boxes_key", "max_pixels", "mask_key")


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}", out)
    else:
        out[prefix] = value


def _named(items: Any, name: str) -> dict | None:
    for item in items or []:
        if isinstance(item, dict) and item.get("name") == name:
            return item
    return None


def unit_settings(config: dict, model: str, method: str) -> dict[str, Any] | None:
    """The settings that make unit ``model__method``'s rows, flattened; None when ``config``
    does not hold that unit."""
    m, meth = _named(config.get("models"), model), _named(config.get("methods"), method)
    if m is None or meth is None:
        return None
    out: dict[str, Any] = {}
    _flatten({k: v for k, v in m.items() if k != "name"}, f"models[{model}]", out)
    _flatten(meth.get("params") or {}, f"methods[{method}].params", out)
    out["targets"] = config.get("targets")
    _flatten(config.get("metrics"), "metrics", out)
    out["resources.precision"] = (config.get("resources") or {}).get("precision")
    out["run.map_dtype"] = (config.get("run") or {}).get("map_dtype")
    out["run.saliency_png"] = (config.get("run") or {}).get("saliency_png")
    for k in _INPUT_KEYS:
        out[f"input.{k}"] = (config.get("input") or {}).get(k)
    _flatten(config.get("pseudo_labels") or {}, "pseudo_labels", out)
    return out


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def changed_keys(old: dict | None, new: dict, unit_id: str, limit: int = 6) -> list[str]:
    """``key old -> new`` for each setting of ``unit_id`` that differs; [] when unknown."""
    model, method = UnitId.parse(unit_id)
    before = unit_settings(old or {}, model, method)
    after = unit_settings(new, model, method)
    if before is None or after is None:
        return []
    missing = object()
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, missing), after.get(key, missing)
        if a == b or (a is missing and b is None) or (b is missing and a is None):
            continue
        out.append(f"{key} {'(unset)' if a is missing else _show(a)} -> "
                   f"{'(unset)' if b is missing else _show(b)}")
    if len(out) > limit:
        out = [*out[:limit], f"and {len(out) - limit} more"]
    return out
