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


def unit_summary(store: Store, files: list[str]) -> dict[str, Any]:
    cols = ["sample_id", "target", "status", *METRIC_COLUMNS]
    dset = pads.dataset([store.path(f) for f in files], filesystem=store.fs, format="parquet")
    table = dset.to_table(columns=[c for c in cols if c in dset.schema.names])
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


def print_summaries(units: dict[str, dict], out=print) -> None:
    """One table: unit x metric, mean [95% CI]."""
    metrics = sorted({m for u in units.values() for m in ((u.get("summary") or {}).get("metrics") or {})})
    if not metrics:
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
    pg = {uid: (u.get("summary") or {}).get("pointing_accuracy_class_mean") for uid, u in units.items()}
    if any(v is not None for v in pg.values()):
        out("pointing game, accuracy averaged per class: " +
            ", ".join(f"{k} {v:.1f}%" for k, v in pg.items() if v is not None and not math.isnan(v)))
