"""What the report shows, read from a run: manifest, summaries, per-class means, curve means,
error reasons, and a bounded sample of rows for the gallery and the distributions.

Everything comes from the units' aggregates (:mod:`salmap.pipeline.aggregate`), which the commit
records carry: the report reads the records (a chunk at a time, none kept), not the rows, so
its memory does not grow with the run. ``UnitData.rows`` is the unit's hash-selected sample of
rows (every row while the unit has at most :data:`salmap.pipeline.aggregate.UNIT_SAMPLE` samples);
maps are read later, for the gallery's samples only, from the files that hold them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
from salmap.workers.unit_id import UnitId

from ..aggregate import UNIT_SAMPLE, sample_samples, sample_table
from ..ledger import MANIFEST_KEY
from ..schema import METRIC_COLUMNS
from ..storage import Store
from .classes import ClassNames, class_names

ROW_COLUMNS = ("sample_id", "shard", "key", "image_file", "model", "method", "target",
               "target_source", "label", "pred", "pred_prob", "target_prob", "orig_height",
               "orig_width", "saliency_min", "saliency_max", "status", "error")
CURVE_COLUMNS = ("deletion_curve", "insertion_curve")

# +1 higher is better, -1 lower is better, 0 no preferred direction (metric docs in
# workers/metrics/registry.py); used for the arrows in the table and to pick the best mean.
DIRECTION: dict[str, int] = {
    "deletion_auc": -1, "insertion_auc": 1, "average_drop": -1, "confidence_increase": 1,
    "road": 1, "road_morf": -1, "road_lerf": 1, "road_gap": 1, "region_deletion_auc": -1,
    "region_insertion_auc": 1, "pointing_hit": 1, "energy_pointing": 1, "gini": 0, "box_iou": 1,
}

# Ranking fallbacks when insertion and deletion are missing (first one with values wins).
RANK_FALLBACK = ("insertion_auc", "deletion_auc", "road", "box_iou", "energy_pointing",
                 "average_drop", "confidence_increase", "target_prob")


@dataclass
class UnitData:
    """One (model, method) unit: its manifest entry, its aggregate, its sample of rows (all
    rows while ``complete``) and the files that hold the sample's maps."""

    id: str
    model: str
    method: str
    info: dict[str, Any]
    rows: pd.DataFrame
    dataset: pads.Dataset | None
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    read_error: str = ""
    label_quality: dict[str, Any] | None = None  # pipeline.summary.label_quality, per class
    agg: dict[str, Any] = field(default_factory=dict, repr=False)
    files_of: dict[str, list[str]] = field(default_factory=dict, repr=False)  # sample -> paths

    @property
    def n_rows(self) -> int:
        """Committed rows of the unit (all of them, not the sample's)."""
        return int(self.agg.get("rows", len(self.rows)))

    @property
    def n_errors(self) -> int:
        if "errors" in self.agg:
            return int(self.agg["errors"])
        return int((self.rows["status"] != "ok").sum()) if len(self.rows) else 0

    @property
    def complete(self) -> bool:
        """Whether ``rows`` holds every committed row (else a hash-selected sample)."""
        return bool(self.agg.get("complete", True))

    @property
    def signed(self) -> bool:
        """Whether the unit's maps take negative values (its PNGs are centred at zero)."""
        lo = self.agg.get("sal_min")
        return lo is not None and float(lo) < 0


@dataclass
class RunData:
    """Everything the report needs about a run except the pictures."""

    uri: str
    manifest: dict[str, Any]
    units: list[UnitData]
    metrics: list[str]
    has_curves: bool
    classes: ClassNames = field(default_factory=ClassNames)

    @property
    def rows(self) -> pd.DataFrame:
        frames = [u.rows.assign(unit=u.id) for u in self.units if len(u.rows)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=[*ROW_COLUMNS, *METRIC_COLUMNS, "unit"])

    def models(self) -> list[str]:
        return list(dict.fromkeys(u.model for u in self.units))


def load_run(run: str, storage: Any = None, commits: dict | None = None,
             aggregates: dict[str, dict] | None = None) -> RunData:
    """Read a run's manifest and its units' aggregates: ``aggregates`` when the caller has
    them (``salmap run`` hands over the ledger's), else from ``commits`` (records already in
    memory), else from the commit records, read a chunk at a time (:mod:`salmap.pipeline.rollup`)."""
    from ..rollup import from_commits, unit_aggregates

    store = Store.open(run, storage)
    manifest = store.read_json(MANIFEST_KEY) if store.exists(MANIFEST_KEY) else {}
    infos: dict[str, dict] = dict(manifest.get("units") or {})
    if aggregates is None:
        aggregates = from_commits(store, commits) if commits is not None else unit_aggregates(store)
    for uid in aggregates:  # a manifest-less run: the commit records still name the units
        model, method = UnitId.parse(uid)
        infos.setdefault(uid, {"model": model, "method": method})
    units = [_load_unit(store, uid, info, aggregates.get(uid)) for uid, info in infos.items()]
    metrics = [m for m in METRIC_COLUMNS
               if any((u.agg.get("metrics") or {}).get(m, [0])[0] > 0 for u in units)]
    for u in units:
        u.summary = _summary(u, metrics)
        u.curves = curves_of(u.agg)
        u.label_quality = _label_quality(u.agg)
    return RunData(uri=run, manifest=manifest, units=units, metrics=metrics,
                   has_curves=any(u.curves for u in units),
                   classes=class_names(dict(manifest.get("config") or {}), storage))


def _load_unit(store: Store, uid: str, info: dict, agg: dict | None) -> UnitData:
    parsed = UnitId.parse(uid)
    model = info.get("model") or parsed.model
    method = info.get("method") or parsed.method
    if not agg or not agg.get("rows"):
        empty = pd.DataFrame(columns=[*ROW_COLUMNS, *METRIC_COLUMNS])
        return UnitData(uid, model, method, info, empty, None,
                        read_error=f"no committed rows for unit {uid!r}", agg=agg or {})
    cols = sample_table(agg)
    where = cols.pop("file")
    files = sorted(set(where))
    files_of: dict[str, list[str]] = {}
    for sid, f in zip(cols["sample_id"], where):
        if store.path(f) not in files_of.setdefault(sid, []):
            files_of[sid].append(store.path(f))
    rows = pd.DataFrame(cols)
    rows.insert(rows.columns.get_loc("sample_id") + 1, "model", model)
    rows.insert(rows.columns.get_loc("model") + 1, "method", method)
    ds = pads.dataset([store.path(f) for f in files], filesystem=store.fs, format="parquet") \
        if files else None
    return UnitData(uid, model, method, info, rows, ds, agg=agg, files_of=files_of)


def sample_note(units: list[UnitData]) -> str:
    """What the sample-based parts of the report show, when a unit's sample is not every row."""
    partial = [u for u in units if not u.complete]
    if not partial:
        return ""
    sizes = ", ".join(f"{u.id}: {sample_samples(u.agg)} of {u.n_rows} rows' samples"
                      for u in partial[:6])
    return (f"These units have more samples than the report keeps per unit ({UNIT_SAMPLE}): "
            f"the gallery, the distributions, the error rows listed and the win rate use the "
            f"samples with the smallest hash of their sample id (the same samples in every "
            f"unit), {sizes}{', ...' if len(partial) > 6 else ''}. Counts, means, per-class "
            f"means, curves and pseudo-label quality are over every row.")


def _label_quality(agg: dict) -> dict[str, Any] | None:
    if not agg or not (agg.get("boxes") or agg.get("masks")):
        return None  # runs without box or mask ground truth import nothing more
    from ..summary import label_quality_from_aggregate

    return label_quality_from_aggregate(agg)


def curves_of(agg: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per curve column: mean, 95% normal interval half-width and count, from the sums."""
    out = {}
    for name, c in (agg.get("curves") or {}).items():
        n = int(c["n"])
        if n == 0:
            continue
        s, s2 = np.asarray(c["sum"], dtype=float), np.asarray(c["sumsq"], dtype=float)
        mean = s / n
        var = np.maximum(s2 / n - mean ** 2, 0.0) * (n / max(n - 1, 1))
        out[name] = {"mean": mean, "ci": 1.96 * np.sqrt(var / n), "n": np.asarray(n)}
    return out


def _float_values(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series.astype("object").where(series.notna(), None),
                         errors="coerce").astype(float).to_numpy()


def _manifest_summary(info: dict) -> dict[str, dict]:
    """``{metric: {"mean", "ci_low", "ci_high", "n"}}`` from a manifest ``summary`` entry.

    Accepts the metric dicts at the top level or under one level of nesting (e.g. "metrics").
    """
    found: dict[str, dict] = {}
    summary = info.get("summary")
    if not isinstance(summary, dict):
        return found
    for scope in (summary, *[v for v in summary.values() if isinstance(v, dict)]):
        for name, value in scope.items():
            if name in METRIC_COLUMNS and isinstance(value, dict) and "mean" in value:
                found.setdefault(name, value)
    return found


def _summary(unit: UnitData, metrics: list[str]) -> dict[str, dict]:
    """The manifest's summary where it has a metric, else computed from the unit's aggregate
    (:func:`salmap.pipeline.summary.metric_summary`)."""
    from ..summary import metric_summary

    found = _manifest_summary(unit.info)
    out = {m: {**found[m], "from_manifest": True} for m in metrics if m in found}
    for m in metrics:
        if m not in out:
            s = metric_summary(unit.agg, m, bootstrap_mean)
            if s is not None:
                out[m] = s
    return out


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean and 95% percentile-bootstrap interval of the finite values, with their count.

    The same estimate as ``salmap.workers.metrics.summary.summarize`` (used by the run's manifest
    summaries); kept here so the report does not import the torch-based metrics package.
    """
    v = values[np.isfinite(values)]
    out = {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": int(v.size)}
    if v.size == 0:
        return out
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // v.size)  # bound the resample index matrix
    means = np.concatenate([v[rng.integers(0, v.size, size=(min(chunk, n_boot - s), v.size))].mean(1)
                            for s in range(0, n_boot, chunk)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    out.update(mean=float(v.mean()), ci_low=float(lo), ci_high=float(hi))
    return out


def rank_expression(rows: pd.DataFrame, rank_by: str | None) -> tuple[str, pd.Series]:
    """Per-row score where higher is better, and its label.

    ``rank_by``: None (insertion_auc - deletion_auc, else the first metric with values in
    :data:`RANK_FALLBACK`), a column name (lower-is-better metrics are negated) or ``"a - b"``.
    """
    def has(col: str) -> bool:
        return col in rows and rows[col].notna().any()

    if rank_by is None:
        if has("insertion_auc") and has("deletion_auc"):
            rank_by = "insertion_auc - deletion_auc"
        else:
            rank_by = next((c for c in RANK_FALLBACK if has(c)), "")
    if not rank_by:
        return "", pd.Series(np.nan, index=rows.index)
    if "-" in rank_by:
        a, _, b = (p.strip() for p in rank_by.partition("-"))
        for c in (a, b):
            if c not in rows:
                raise ValueError(f"rank_by {rank_by!r}: no column {c!r} in the run")
        return f"{a} − {b}", pd.Series(_float_values(rows[a]) - _float_values(rows[b]),
                                       index=rows.index)
    if rank_by not in rows:
        raise ValueError(f"rank_by {rank_by!r}: no such column in the run")
    sign = -1.0 if DIRECTION.get(rank_by, 1) < 0 else 1.0
    label = rank_by if sign > 0 else f"−{rank_by}"
    return label, pd.Series(sign * _float_values(rows[rank_by]), index=rows.index)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell: fixed digits, '–' for missing values."""
    if value is None:
        return "–"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "–"
    if abs(v) >= 1000 or (v != 0 and abs(v) < 10 ** -digits):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}"
