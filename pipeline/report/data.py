"""What the report shows, read from a run: manifest, per-row metrics, summaries, curve means.

Only committed rows are read (through :func:`pipeline.read.read_run`), and only scalar columns
for the whole run; maps are read later for the few gallery samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ..ledger import MANIFEST_KEY, load_commits
from ..read import read_run
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
    "road": 1, "pointing_hit": 1, "energy_pointing": 1, "gini": 0, "box_iou": 1,
}

# Ranking fallbacks when insertion and deletion are missing (first one with values wins).
RANK_FALLBACK = ("insertion_auc", "deletion_auc", "road", "box_iou", "energy_pointing",
                 "average_drop", "confidence_increase", "target_prob")


@dataclass
class UnitData:
    """One (model, method) unit: its manifest entry, its rows, and where to read more."""

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

    @property
    def signed(self) -> bool:
        """Whether the unit's maps take negative values (its PNGs are centred at zero)."""
        if "saliency_min" not in self.rows or self.rows.empty:
            return False
        lo = pd.to_numeric(self.rows["saliency_min"], errors="coerce").to_numpy(dtype=float)
        return bool(np.nanmin(lo, initial=0.0) < 0)


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


def load_run(run: str, storage: Any = None, commits: dict | None = None) -> RunData:
    """Read a run's manifest and the scalar columns of every committed row (``commits``: the
    commit records, read here, once for the whole report, unless given)."""
    store = Store.open(run, storage)
    manifest = store.read_json(MANIFEST_KEY) if store.exists(MANIFEST_KEY) else {}
    infos: dict[str, dict] = dict(manifest.get("units") or {})
    if commits is None:
        commits = load_commits(store)
    for uid in commits:  # a manifest-less run: the commit records still name the units
        model, _, method = uid.partition("__")
        infos.setdefault(uid, {"model": model, "method": method})
    units = [_load_unit(run, storage, uid, info, commits) for uid, info in infos.items()]
    metrics = [m for m in METRIC_COLUMNS
               if any(m in u.rows and u.rows[m].notna().any() for u in units)]
    for u in units:
        u.summary = _summary(u, metrics)
        if u.dataset is not None:
            u.curves = curve_stats(u.dataset)
            u.label_quality = label_quality_of(u.dataset)
    return RunData(uri=run, manifest=manifest, units=units, metrics=metrics,
                   has_curves=any(u.curves for u in units),
                   classes=class_names(dict(manifest.get("config") or {}), storage))


def _load_unit(run: str, storage: Any, uid: str, info: dict, commits: dict) -> UnitData:
    model = info.get("model") or uid.partition("__")[0]
    method = info.get("method") or uid.partition("__")[2]
    empty = pd.DataFrame(columns=[*ROW_COLUMNS, *METRIC_COLUMNS])
    try:
        ds = read_run(run, unit=uid, storage=storage, commits=commits)
    except (ValueError, FileNotFoundError) as err:
        return UnitData(uid, model, method, info, empty, None, read_error=str(err))
    cols = [c for c in (*ROW_COLUMNS, *METRIC_COLUMNS) if c in ds.schema.names]
    rows = ds.to_table(columns=cols).to_pandas()
    return UnitData(uid, model, method, info, rows, ds)


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
    """The manifest's summary where it has a metric, else computed from the unit's rows."""
    found = _manifest_summary(unit.info)
    out = {m: {**found[m], "from_manifest": True} for m in metrics if m in found}
    computed = [m for m in metrics if m not in out and m in unit.rows]
    for m in computed:
        out[m] = bootstrap_mean(_float_values(unit.rows[m]))
    return out


def label_quality_of(dataset: pads.Dataset) -> dict[str, Any] | None:
    """Pseudo-label quality against the ground truth the rows carry, or None. Reads the
    ground-truth columns first: runs without box or mask ground truth import nothing more
    (the computation lives with the torch-based metrics)."""
    names = dataset.schema.names
    probe = [c for c in ("gt_box_count", "label_map_quality") if c in names]
    if not probe:
        return None
    t = dataset.to_table(columns=probe)
    if all(t.column(c).null_count == t.num_rows for c in probe):
        return None
    from ..summary import QUALITY_COLUMNS, label_quality

    return label_quality(dataset.to_table(columns=[c for c in QUALITY_COLUMNS if c in names]))


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean and 95% percentile-bootstrap interval of the finite values, with their count.

    The same estimate as ``workers.metrics.summary.summarize`` (used by the run's manifest
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


def curve_stats(dataset: pads.Dataset) -> dict[str, dict[str, np.ndarray]]:
    """Per curve column: mean, 95% normal interval half-width and count, streamed by batches."""
    present = [c for c in CURVE_COLUMNS if c in dataset.schema.names]
    acc: dict[str, list] = {}  # name -> [sum, sum of squares, count]
    for batch in dataset.to_batches(columns=present) if present else []:
        for name in present:
            arr = batch.column(name).drop_null()
            if len(arr) == 0:
                continue
            lengths = np.asarray(pc.list_value_length(arr))
            n_points = len(acc[name][0]) if name in acc else int(np.bincount(lengths).argmax())
            arr = arr.filter(pa.array(lengths == n_points))  # a curve of another length is left out
            values = np.asarray(arr.flatten(), dtype=np.float64).reshape(-1, n_points)
            values = values[np.isfinite(values).all(axis=1)]
            s, s2, n = acc.setdefault(name, [np.zeros(n_points), np.zeros(n_points), 0])
            acc[name] = [s + values.sum(0), s2 + (values ** 2).sum(0), n + len(values)]
    out = {}
    for name, (s, s2, n) in acc.items():
        if n == 0:
            continue
        mean = s / n
        var = np.maximum(s2 / n - mean ** 2, 0.0) * (n / max(n - 1, 1))
        out[name] = {"mean": mean, "ci": 1.96 * np.sqrt(var / n), "n": np.asarray(n)}
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
