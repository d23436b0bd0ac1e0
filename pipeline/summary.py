"""The dataset summary at the end of a run: per unit, every metric's mean with a 95% bootstrap
interval, pointing-game accuracy averaged per class (TorchRay), error counts, and Win % of
average drop across the run's methods (Grad-CAM++)."""

from __future__ import annotations

import math
from typing import Any

import pyarrow.dataset as pads

from workers.metrics.summary import pointing_accuracy_per_class, summarize, win_percent

from .schema import METRIC_COLUMNS
from .storage import Store

QUALITY_COLUMNS = ("target", "status", "pseudo_box", "gt_box_count", "pseudo_box_match",
                   "label_map_quality")


def label_quality(table: Any) -> dict[str, Any] | None:
    """Pseudo-label quality of a unit's rows (a pyarrow table with :data:`QUALITY_COLUMNS`,
    those present): box precision / recall per class where rows have box annotations,
    label-map mIoU where they have ground-truth masks; None without either."""
    from workers.metrics.label_quality import box_quality, mask_quality

    cols = {c: table.column(c).to_pylist() for c in QUALITY_COLUMNS if c in table.column_names}
    if "status" not in cols or not ({"gt_box_count", "label_map_quality"} & set(cols)):
        return None
    ok = [s == "ok" for s in cols["status"]]

    def kept(name: str) -> list:
        return [v for v, good in zip(cols.get(name, [None] * len(ok)), ok) if good]

    boxes = box_quality(kept("target"), [b is not None for b in kept("pseudo_box")],
                        kept("gt_box_count"), kept("pseudo_box_match")) \
        if "gt_box_count" in cols else None
    masks = mask_quality(kept("label_map_quality")) if "label_map_quality" in cols else None
    if boxes is None and masks is None:
        return None
    return {"boxes": boxes, "masks": masks}


def quality_totals(q: dict[str, Any] | None) -> dict[str, Any] | None:
    """The label quality without its per-class detail (what the manifest keeps)."""
    if not q:
        return None
    return {k: (None if v is None else {kk: vv for kk, vv in v.items() if kk != "per_class"})
            for k, v in q.items()}


def unit_summary(store: Store, files: list[str]) -> dict[str, Any]:
    cols = dict.fromkeys(["sample_id", "target", "status", *METRIC_COLUMNS, *QUALITY_COLUMNS])
    dset = pads.dataset([store.path(f) for f in files], filesystem=store.fs, format="parquet")
    table = dset.to_table(columns=[c for c in cols if c in dset.schema.names])  # one scan
    status = table.column("status").to_pylist()
    ok = [s == "ok" for s in status]
    out: dict[str, Any] = {"rows": len(status), "errors": len(status) - sum(ok), "metrics": {}}
    for name in METRIC_COLUMNS:
        if name not in table.column_names:
            continue
        values = [v for v, good in zip(table.column(name).to_pylist(), ok) if good]
        if all(v is None for v in values):
            continue
        out["metrics"][name] = summarize([None if v is None else float(v) for v in values])
    if "pointing_hit" in out["metrics"]:
        hits = [v for v, good in zip(table.column("pointing_hit").to_pylist(), ok) if good]
        classes = [v for v, good in zip(table.column("target").to_pylist(), ok) if good]
        out["pointing_accuracy_class_mean"] = pointing_accuracy_per_class(hits, classes)
    quality = quality_totals(label_quality(table))
    if quality:
        out["label_quality"] = quality
    return out


def run_win_percent(store: Store, units: dict[str, dict], commits: dict) -> dict[str, Any] | None:
    """Win % of average drop between the methods of each model (same samples and targets)."""
    from .ledger import committed_files

    by_model: dict[str, dict[str, dict]] = {}
    for uid, u in units.items():
        files = committed_files(commits, uid)
        if files:
            by_model.setdefault(u["model"], {})[u["method"]] = {**u, "files": files}
    result = {}
    for model, methods in by_model.items():
        if len(methods) < 2:
            continue
        drops: dict[str, dict] = {}
        for method, u in methods.items():
            dset = pads.dataset([store.path(f) for f in u["files"]], filesystem=store.fs, format="parquet")
            if "average_drop" not in dset.schema.names:
                return None
            t = dset.to_table(columns=["sample_id", "target", "average_drop"])
            drops[method] = {(s, g): d for s, g, d in zip(*(t.column(c).to_pylist()
                                                           for c in ("sample_id", "target", "average_drop")))}
        keys = sorted(set.intersection(*(set(d) for d in drops.values())), key=str)
        if not keys:
            continue
        result[model] = win_percent({m: [d[k] for k in keys] for m, d in drops.items()})
    return result or None


def _fmt(s: dict | None) -> str:
    if not s or s.get("n", 0) == 0 or math.isnan(s.get("mean", float("nan"))):
        return "-"
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def quality_line(q: dict[str, Any] | None) -> str:
    """``boxes P 0.62 R 0.55 at IoU 0.5 (120 gt boxes); masks mIoU 0.43, coverage 0.81 (50
    images)`` from a label-quality summary; "" without one."""
    if not q:
        return ""

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    parts = []
    b, m = q.get("boxes"), q.get("masks")
    if b:
        parts.append(f"boxes precision {f(b['precision'])} recall {f(b['recall'])} at IoU "
                     f"{b['iou']:g} ({b['gt_boxes']} ground-truth boxes)")
    if m:
        parts.append(f"label maps mIoU {f(m['miou'])}, coverage {f(m['coverage'])} "
                     f"({m['images']} images with masks)")
    return "; ".join(parts)


# the faithfulness measures first (region-level, ROAD); pixel-level deletion / insertion last:
# a per-pixel order leaves the data distribution, so random and high-frequency maps score well
# there (README, "Which method explains the model best?")
FIRST = ("region_deletion_auc", "region_insertion_auc", "road")
SECONDARY = ("deletion_auc", "insertion_auc")


def _metric_order(name: str) -> tuple[int, str]:
    return (0 if name in FIRST else 2 if name in SECONDARY else 1, name)


def print_summaries(units: dict[str, dict], out=print) -> None:
    """One table: unit x metric, mean [95% CI]; then the pseudo-label quality per unit."""
    metrics = sorted({m for u in units.values() for m in ((u.get("summary") or {}).get("metrics") or {})},
                     key=_metric_order)
    if not metrics:
        _print_quality(units, out)
        return
    out("\nsummary (mean [95% bootstrap CI] over ok rows):")
    header = ["unit", "errors", *metrics]
    rows = []
    for uid, u in units.items():
        s = u.get("summary") or {}
        rows.append([uid, str(s.get("errors", u.get("errors", "-"))),
                     *(_fmt((s.get("metrics") or {}).get(m)) for m in metrics)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        out("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if set(SECONDARY) & set(metrics):
        out("deletion_auc / insertion_auc: pixel level, secondary; the faithfulness measures "
            "are region_deletion_auc / region_insertion_auc and road (README, Metrics)")
    _print_quality(units, out)
    pg = {uid: (u.get("summary") or {}).get("pointing_accuracy_class_mean") for uid, u in units.items()}
    if any(v is not None for v in pg.values()):
        out("pointing game, accuracy averaged per class: " +
            ", ".join(f"{k} {v:.1f}%" for k, v in pg.items() if v is not None and not math.isnan(v)))


def _print_quality(units: dict[str, dict], out) -> None:
    for uid, u in units.items():
        line = quality_line((u.get("summary") or {}).get("label_quality"))
        if line:
            out(f"pseudo-label quality, {uid}: {line}")
