"""The dataset summary at the end of a run: per unit, every metric's mean with a 95% bootstrap
interval, pointing-game accuracy averaged per class (TorchRay), error counts, and Win % of
average drop across the run's methods (Grad-CAM++).

Everything is computed from the units' aggregates (:mod:`salmap.pipeline.aggregate`), which the
commit records carry, so the end of a run reads no row and its memory does not grow with the
run: means, counts, per-class figures and label quality are exact; the interval is the
bootstrap while a unit's sample holds every row, the normal interval beyond; the win rate is
computed on the units' shared hash-selected sample (exact while it holds every row)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .aggregate import UNIT_SAMPLE
from .schema import METRIC_COLUMNS
from .storage import Store

QUALITY_COLUMNS = ("target", "status", "pseudo_box", "gt_box_count", "pseudo_box_match",
                   "label_map_quality")


def label_quality(table: Any) -> dict[str, Any] | None:
    """Pseudo-label quality of a unit's rows (a pyarrow table with :data:`QUALITY_COLUMNS`,
    those present): box precision / recall per class where rows have box annotations,
    label-map mIoU where they have ground-truth masks; None without either."""
    from salmap.workers.metrics.label_quality import box_quality, mask_quality

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
    """A unit's summary computed from its rows (read a batch at a time, bounded memory)."""
    from .rollup import files_aggregate

    return summary_from_aggregate(files_aggregate(store, files))


def _normal_interval(n: int, total: float, squares: float) -> tuple[float, float, float]:
    mean = total / n
    var = max(squares / n - mean * mean, 0.0) * (n / max(n - 1, 1))
    half = 1.96 * math.sqrt(var / n)
    return mean, mean - half, mean + half


def metric_summary(agg: dict[str, Any], name: str, bootstrap: Any = None
                   ) -> dict[str, Any] | None:
    """Mean and 95% interval of one metric of a unit's aggregate (:mod:`salmap.pipeline.aggregate`).

    While the aggregate's sample holds every row, exactly ``summarize`` (the percentile
    bootstrap) over the ok rows' values, in sorted order so the result does not depend on the
    order the rows were written in. Beyond that, the exact mean (sum / count) with the normal
    interval mean ± 1.96·sd/√n from the exact sum of squares (``"ci": "normal"``): for the
    thousands of rows where the sample stops holding them all, the bootstrap interval of a mean
    and the normal one agree to well under the interval's width. ``bootstrap``: the bootstrap
    function (default ``salmap.workers.metrics.summary.summarize``; the report passes its own copy,
    which imports no torch).
    """
    from .aggregate import sample_table

    stats = (agg.get("metrics") or {}).get(name)
    if not stats or stats[0] == 0:
        return None
    n, n_nan, total, squares = int(stats[0]), int(stats[1]), float(stats[2]), float(stats[3])
    if agg.get("complete"):
        cols = sample_table(agg)
        values = [v for v, st in zip(cols.get(name, []), cols.get("status", [])) if st == "ok"]
        v = np.sort(np.asarray([np.nan if x is None else float(x) for x in values], dtype=float))
        if bootstrap is None:
            from salmap.workers.metrics.summary import summarize as bootstrap
        return {**bootstrap(v), "ci": "bootstrap"}
    mean, lo, hi = _normal_interval(n, total, squares)
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": n, "n_nan": n_nan, "ci": "normal"}


def summary_from_aggregate(agg: dict[str, Any]) -> dict[str, Any]:
    """The summary of a unit (rows, errors, per-metric mean and interval, pointing accuracy
    averaged per class, pseudo-label quality) from its aggregate, whatever the run's size."""
    out: dict[str, Any] = {"rows": int(agg["rows"]), "errors": int(agg["errors"]), "metrics": {}}
    for name in METRIC_COLUMNS:
        s = metric_summary(agg, name)
        if s is not None:
            out["metrics"][name] = s
    if "pointing_hit" in out["metrics"]:
        out["pointing_accuracy_class_mean"] = pointing_from_aggregate(agg)
    quality = quality_totals(label_quality_from_aggregate(agg))
    if quality:
        out["label_quality"] = quality
    return out


def pointing_from_aggregate(agg: dict[str, Any]) -> float:
    """TorchRay pointing accuracy in %, the mean over classes of each class's hit rate."""
    cm = agg.get("class_metrics") or []
    if "pointing_hit" not in cm:
        return float("nan")
    j = cm.index("pointing_hit")
    rates = [v[2 + 2 * j] / v[1 + 2 * j] for v in (agg.get("classes") or {}).values()
             if v[1 + 2 * j] > 0]
    return float(100.0 * np.mean(rates)) if rates else float("nan")


def label_quality_from_aggregate(agg: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`label_quality` (with its per-class detail) from a unit's aggregate: precision,
    recall and mIoU are ratios of sums, so they are exact whatever the run's size."""
    from salmap.workers.metrics.label_quality import BOX_IOU, _mean, _ratio, mask_quality

    b, m = agg.get("boxes"), agg.get("masks")
    boxes = masks = None
    if b and b.get("rows"):
        per = {int(c): v for c, v in b["per"].items()}
        tp, made, gt = (sum(v[i] for v in per.values()) for i in range(3))
        per_class = {str(c): {"tp": v[0], "pseudo_boxes": v[1], "gt_boxes": v[2],
                              "precision": _ratio(v[0], v[1]), "recall": _ratio(v[0], v[2])}
                     for c, v in sorted(per.items())}
        boxes = {"iou": float(BOX_IOU), "precision": _ratio(tp, made), "recall": _ratio(tp, gt),
                 "precision_class_mean": _mean(p["precision"] for p in per_class.values()),
                 "recall_class_mean": _mean(p["recall"] for p in per_class.values()),
                 "tp": tp, "pseudo_boxes": made, "gt_boxes": gt, "rows": b["rows"],
                 "per_class": per_class}
    if m and m.get("images"):
        classes = sorted(m["union"], key=int)
        masks = mask_quality([{"classes": [int(c) for c in classes],
                               "intersection": [m["inter"].get(c, 0) for c in classes],
                               "union": [m["union"][c] for c in classes],
                               "valid_px": m["valid"], "labelled_px": m["labelled"]}])
        masks["images"] = int(m["images"])
    if boxes is None and masks is None:
        return None
    return {"boxes": boxes, "masks": masks}


def run_win_percent(units: dict[str, dict], aggregates: dict[str, dict]) -> dict[str, Any] | None:
    """Win % of average drop between the methods of each model, on the (sample, target) pairs
    that every method's aggregate sample holds: the same hash-selected samples in every unit,
    so every pair when the samples are complete (``"exact": true``), else up to
    :data:`salmap.pipeline.aggregate.UNIT_SAMPLE` samples (``"exact": false``, ``n`` says how many)."""
    from salmap.workers.metrics.summary import win_percent

    from .aggregate import sample_table

    by_model: dict[str, dict[str, dict]] = {}
    for uid, u in units.items():
        a = aggregates.get(uid)
        if a and a.get("rows"):
            by_model.setdefault(u["model"], {})[u["method"]] = a
    result = {}
    for model, methods in by_model.items():
        if len(methods) < 2:
            continue
        drops: dict[str, dict] = {}
        for method, a in methods.items():
            t = sample_table(a)
            if "average_drop" not in t:
                return None
            drops[method] = {(s, g): d for s, g, d in zip(t["sample_id"], t["target"],
                                                          t["average_drop"])}
        keys = sorted(set.intersection(*(set(d) for d in drops.values())), key=str)
        if not keys:
            continue
        result[model] = {**win_percent({m: [d[k] for k in keys] for m, d in drops.items()}),
                         "exact": all(a.get("complete") for a in methods.values())}
    return result or None


def _fmt(s: dict | None) -> str:
    if not s or s.get("n", 0) == 0 or math.isnan(s.get("mean", float("nan"))):
        return "-"
    mark = "*" if s.get("ci") == "normal" else ""
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]{mark}"


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
FIRST = ("region_deletion_auc", "region_insertion_auc", "road_gap", "road_morf", "road_lerf",
         "road")
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
    if any(c.endswith("*") for r in rows for c in r):
        out(f"* normal interval (mean ± 1.96 sd/√n from the exact sums): the unit has more than "
            f"the {UNIT_SAMPLE} samples its bootstrap sample holds")
    if set(SECONDARY) & set(metrics):
        out("deletion_auc / insertion_auc: pixel level, secondary; the faithfulness measures "
            "are region_deletion_auc / region_insertion_auc and ROAD (README, Metrics)")
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
