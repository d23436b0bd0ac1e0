"""Mergeable per-unit aggregates of committed rows: what the end of a run (summaries, win rate,
the report) reads instead of every row, so its memory does not grow with the run.

Each post/write task computes the aggregate of the rows it wrote (:func:`of_table`), the
driver merges a wave's into its commit record (``CommitRecord.aggregate``), and the ledger merges
the records into one per unit as the run goes (:func:`merge`). An aggregate is a JSON dict:

* ``rows``, ``errors``: row counts (errors: status other than ``ok``);
* ``metrics``: per metric column, over ok rows, ``[n, n_nan, sum, sum of squares, min, max]``;
* ``classes``: per explained class (target of ok rows), ``[ok rows, n_1, sum_1, ...]`` in the
  order of ``class_metrics`` (per-class means, pointing accuracy averaged per class);
* ``boxes`` / ``masks``: pseudo-label quality counts (precision/recall and mIoU are ratios of
  sums); ``curves``: per-step sums for the mean deletion/insertion curves; ``sal_min``;
* ``reasons``: error rows per (reason, status) with an example sample (at most
  :data:`MAX_REASONS` reasons, the most frequent; the rest are counted in ``other_reasons``);
* ``sample``: the rows of the samples with the smallest hash of their sample id (a bottom-k
  sample: bounded, reproducible, the same samples in every unit that saw them, and merged by
  keeping the k smallest again). A commit record carries at most :func:`wave_sample_size`
  samples (:data:`WAVE_SAMPLE` in a run of many waves), a unit at most :data:`UNIT_SAMPLE`;
  ``complete`` says whether the sample still holds every row (then figures computed from it
  are exact). ``bad``: the same for error rows, by the hash of (sample id, target).

Every part is a sum, a min/max or a bottom-k (the reason cap aside, which only matters past
:data:`MAX_REASONS` distinct reasons), so :func:`merge` is associative and the result
depends only on the committed rows (and, for the sample, on which rows each wave committed);
a redone wave replaces its record and so its contribution, never adds to it. Float sums are
deterministic up to rounding in the order of merging.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from salmap.workers.columns import CURVE_COLUMNS, METRIC_COLUMNS

VERSION = 1
WAVE_SAMPLE = 128  # samples (all their rows) a commit record carries
UNIT_SAMPLE = 2048  # samples a unit's merged aggregate keeps
BAD_SAMPLE = 50  # error rows kept per unit, for the report's error table
MAX_REASONS = 100  # distinct error reasons counted one by one per unit
ERROR_CHARS = 300  # an error message in the sample is cut to this many characters

# the scalar columns the sample keeps (those present), besides the metric columns
SAMPLE_COLUMNS = ("sample_id", "shard", "key", "image_file", "target", "target_source", "label",
                  "pred", "pred_prob", "target_prob", "orig_height", "orig_width",
                  "saliency_min", "saliency_max", "status", "error")


def wave_sample_size(shards_total: int, shards_per_wave: int) -> int:
    """The samples a unit's commit records carry: enough for twice :data:`UNIT_SAMPLE` over
    the run's waves (so the unit's sample fills up in a run of few, large waves), at least
    :data:`WAVE_SAMPLE`. A function of the config and the input only: a redone wave carries
    the same sample as the first attempt would have."""
    waves = max(1, -(-max(1, shards_total) // max(1, shards_per_wave)))
    return int(min(UNIT_SAMPLE, max(WAVE_SAMPLE, -(-2 * UNIT_SAMPLE // waves))))


# the metric columns, and the target's probability (the per-class table's fallback column)
AGG_METRICS = (*METRIC_COLUMNS, *(("target_prob",) if "target_prob" not in METRIC_COLUMNS else ()))


def sample_hash(sample_id: str) -> int:
    """A stable 63-bit hash of a sample id (the sample's rank for the bottom-k sample)."""
    return int.from_bytes(hashlib.blake2b(str(sample_id).encode(), digest_size=8).digest(),
                          "big") >> 1


def empty() -> dict[str, Any]:
    """The aggregate of no rows: what merging starts from."""
    return {"v": VERSION, "rows": 0, "errors": 0, "metrics": {}, "class_metrics": [],
            "classes": {}, "boxes": None, "masks": None, "curves": {}, "sal_min": None,
            "reasons": {}, "other_reasons": 0, "sample": {"cols": [], "rows": []},
            "complete": True, "bad": []}


def _floats(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if pa.types.is_boolean(col.type):
        col = pc.cast(col, pa.int8())
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)


def _py(v: Any) -> Any:
    """A JSON-safe scalar (NaN -> None, numpy -> Python)."""
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, str) and len(v) > ERROR_CHARS:
        return v[:ERROR_CHARS]
    return v


def reason_of(error: Any) -> str:
    """The grouping key of an error message: its text before the first colon (120 chars)."""
    return ("" if error is None else str(error)).split(":")[0][:120]


def _class_keys(table: pa.Table) -> np.ndarray:
    """Each row's explained class as the aggregate's key ("3"; "None" without a target)."""
    if "target" not in table.column_names:
        return np.full(table.num_rows, "None", dtype=object)
    keys = pc.fill_null(pc.cast(table.column("target"), pa.string()), "None")
    return np.asarray(keys.to_pylist(), dtype=object)


def _by_class(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct classes of ``rows`` (indices) and each row's position among them."""
    if rows.size == 0:
        return np.asarray([], dtype=object), np.asarray([], dtype=np.int64)
    return np.unique(keys[rows], return_inverse=True)


def of_table(table: pa.Table, file: str = "", keep: int = WAVE_SAMPLE) -> dict[str, Any]:
    """The aggregate of one table of output rows (``file``: where they are, kept in the
    sample so the report reads maps from that file only). Column-wise work, so the post/write
    tasks pay little for it."""
    names = set(table.column_names)
    out = empty()
    n = table.num_rows
    if n == 0:
        return out
    status = np.asarray(table.column("status").to_pylist(), dtype=object)
    ok = status == "ok"
    out["rows"], out["errors"] = int(n), int(n - ok.sum())
    keys = _class_keys(table)
    metrics = [m for m in AGG_METRICS if m in names]
    values = {m: _floats(table, m) for m in metrics}
    for m in metrics:
        v = values[m][ok]
        fin = v[np.isfinite(v)]
        if fin.size == 0 and table.column(m).null_count == n:
            continue
        out["metrics"][m] = [int(fin.size), int(v.size - fin.size), float(fin.sum()),
                             float((fin * fin).sum()),
                             float(fin.min()) if fin.size else None,
                             float(fin.max()) if fin.size else None]
    cm = out["class_metrics"] = sorted(out["metrics"])
    ok_rows = np.flatnonzero(ok)
    classes, where = _by_class(keys, ok_rows)
    k = len(classes)
    vectors = [np.bincount(where, minlength=k).astype(np.float64)]
    for m in cm:
        v = values[m][ok_rows]
        fin = np.isfinite(v)
        vectors.append(np.bincount(where[fin], minlength=k).astype(np.float64))
        vectors.append(np.bincount(where[fin], weights=v[fin], minlength=k))
    table_ = np.stack(vectors, axis=1) if k else np.zeros((0, 1 + 2 * len(cm)))
    out["classes"] = {str(c): [int(r[0]), *(int(x) if j % 2 == 0 else float(x)
                                            for j, x in enumerate(r[1:]))]
                      for c, r in zip(classes, table_)}
    out["boxes"] = _box_counts(table, ok, keys)
    out["masks"] = _mask_counts(table, ok)
    out["curves"] = _curve_sums(table)
    if "saliency_min" in names:
        lo = _floats(table, "saliency_min")
        lo = lo[np.isfinite(lo)]
        out["sal_min"] = float(lo.min()) if lo.size else None
    sids = table.column("sample_id").to_pylist()
    has_error = np.zeros(n, dtype=bool)
    if "error" in names:
        has_error = np.asarray(pc.fill_null(pc.greater(pc.utf8_length(table.column("error")), 0),
                                            False).to_pylist(), dtype=bool)
    bad_rows = np.flatnonzero(~ok | has_error)
    reasons: dict[str, list] = {}
    bad = []
    if bad_rows.size:
        errors = table.column("error").take(pa.array(bad_rows)).to_pylist() if "error" in names \
            else [None] * bad_rows.size
        targets = table.column("target").take(pa.array(bad_rows)).to_pylist() \
            if "target" in names else [None] * bad_rows.size
        for i, err, tgt in zip(bad_rows, errors, targets):
            r = reasons.setdefault(f"{reason_of(err)}\x1f{status[i]}", [0, sids[i]])
            r[0] += 1
            r[1] = min(r[1], sids[i], key=str)
            bad.append([sample_hash(f"{sids[i]}\x1f{tgt}"), sids[i], _py(tgt), str(status[i]),
                        _py(err)])
    out["reasons"] = reasons
    out["bad"] = sorted(bad, key=lambda b: (b[0], b[1]))[:BAD_SAMPLE]
    # the sample: the rows of the ``keep`` samples with the smallest hash, picked first
    ranked = sorted((sample_hash(s), s) for s in set(sids))
    if len(ranked) > keep:
        out["complete"] = False
        ranked = ranked[:keep]
    rank = dict((s, h) for h, s in ranked)
    picked = [i for i, s in enumerate(sids) if s in rank]
    cols = [c for c in SAMPLE_COLUMNS if c in names] + [m for m in metrics if m not in SAMPLE_COLUMNS]
    part = table.select(cols).take(pa.array(picked, type=pa.int64()))
    data = [part.column(c).to_pylist() for c in cols]
    rows = [[rank[sids[i]], file, *(_py(col[j]) for col in data)] for j, i in enumerate(picked)]
    out["sample"] = {"cols": cols, "rows": rows}
    return _cap(out, keep)


def _box_counts(table: pa.Table, ok: np.ndarray, keys: np.ndarray) -> dict | None:
    if "gt_box_count" not in table.column_names:
        return None
    gt = _floats(table, "gt_box_count")
    made = (np.asarray(table.column("pseudo_box").is_valid().to_pylist(), dtype=bool)
            if "pseudo_box" in table.column_names else np.zeros(len(gt), dtype=bool))
    match = (np.nan_to_num(_floats(table, "pseudo_box_match")) > 0
             if "pseudo_box_match" in table.column_names else np.zeros(len(gt), dtype=bool))
    rows = np.flatnonzero(ok & np.isfinite(gt) & (keys != "None"))
    if rows.size == 0:
        return None
    classes, where = _by_class(keys, rows)
    k = len(classes)
    tp = np.bincount(where, weights=(match[rows] & made[rows]).astype(float), minlength=k)
    mk = np.bincount(where, weights=made[rows].astype(float), minlength=k)
    g = np.bincount(where, weights=gt[rows], minlength=k)
    return {"rows": int(rows.size),
            "per": {str(c): [int(a), int(b), int(x)] for c, a, b, x in zip(classes, tp, mk, g)}}


def _mask_counts(table: pa.Table, ok: np.ndarray) -> dict | None:
    if "label_map_quality" not in table.column_names:
        return None
    inter: dict[str, int] = {}
    union: dict[str, int] = {}
    valid = labelled = images = 0
    records = table.column("label_map_quality").to_pylist()
    for i in np.flatnonzero(ok):
        r = records[i]
        if not r:
            continue
        images += 1
        valid += int(r["valid_px"])
        labelled += int(r["labelled_px"])
        for c, a, u in zip(r["classes"], r["intersection"], r["union"]):
            inter[str(int(c))] = inter.get(str(int(c)), 0) + int(a)
            union[str(int(c))] = union.get(str(int(c)), 0) + int(u)
    if not images:
        return None
    return {"images": images, "valid": valid, "labelled": labelled, "inter": inter,
            "union": union}


def _curve_sums(table: pa.Table) -> dict[str, dict]:
    out = {}
    for name in CURVE_COLUMNS:
        if name not in table.column_names:
            continue
        arr = table.column(name).combine_chunks().drop_null()
        if len(arr) == 0:
            continue
        lengths = np.asarray(pc.list_value_length(arr))
        k = int(np.bincount(lengths).argmax())
        arr = arr.filter(pa.array(lengths == k))
        v = np.asarray(arr.flatten(), dtype=np.float64).reshape(-1, k)
        v = v[np.isfinite(v).all(axis=1)]
        if len(v):
            out[name] = {"n": int(len(v)), "sum": v.sum(0).tolist(),
                         "sumsq": (v * v).sum(0).tolist()}
    return out


# -- merging ---------------------------------------------------------------------------------
def _merge_metric(a: list, b: list) -> list:
    lo = [x for x in (a[4], b[4]) if x is not None]
    hi = [x for x in (a[5], b[5]) if x is not None]
    return [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3],
            min(lo) if lo else None, max(hi) if hi else None]


def _sum_dict(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _class_vectors(agg: dict, cm: list[str]) -> dict[str, list]:
    """The per-class vectors re-laid onto metric order ``cm``."""
    own = agg.get("class_metrics") or []
    if own == cm:
        return agg.get("classes") or {}
    where = {m: i for i, m in enumerate(own)}
    out = {}
    for c, v in (agg.get("classes") or {}).items():
        w = [v[0]]
        for m in cm:
            i = where.get(m)
            w += [0, 0.0] if i is None else [v[1 + 2 * i], v[2 + 2 * i]]
        out[c] = w
    return out


def merge(a: dict | None, b: dict | None, keep: int = UNIT_SAMPLE) -> dict[str, Any]:
    """The aggregate of both sets of rows (``keep``: samples the result keeps)."""
    a, b = a or empty(), b or empty()
    out = empty()
    out["rows"], out["errors"] = a["rows"] + b["rows"], a["errors"] + b["errors"]
    ms = dict(a["metrics"])
    for m, v in b["metrics"].items():
        ms[m] = _merge_metric(ms[m], v) if m in ms else list(v)
    out["metrics"] = ms
    cm = out["class_metrics"] = sorted(ms)
    ca, cb = _class_vectors(a, cm), _class_vectors(b, cm)
    classes = {c: list(v) for c, v in ca.items()}
    for c, v in cb.items():
        classes[c] = [x + y for x, y in zip(classes[c], v)] if c in classes else list(v)
    out["classes"] = classes
    if a["boxes"] or b["boxes"]:
        ba, bb = a["boxes"] or {"rows": 0, "per": {}}, b["boxes"] or {"rows": 0, "per": {}}
        per = {c: list(v) for c, v in ba["per"].items()}
        for c, v in bb["per"].items():
            per[c] = [x + y for x, y in zip(per[c], v)] if c in per else list(v)
        out["boxes"] = {"rows": ba["rows"] + bb["rows"], "per": per}
    if a["masks"] or b["masks"]:
        z = {"images": 0, "valid": 0, "labelled": 0, "inter": {}, "union": {}}
        ma, mb = a["masks"] or z, b["masks"] or z
        out["masks"] = {"images": ma["images"] + mb["images"], "valid": ma["valid"] + mb["valid"],
                        "labelled": ma["labelled"] + mb["labelled"],
                        "inter": _sum_dict(ma["inter"], mb["inter"]),
                        "union": _sum_dict(ma["union"], mb["union"])}
    curves = {k: dict(v) for k, v in a["curves"].items()}
    for k, v in b["curves"].items():
        c = curves.get(k)
        if c is None or len(c["sum"]) != len(v["sum"]):  # a curve of another length: kept apart
            if c is None or v["n"] > c["n"]:
                curves[k] = dict(v)
            continue
        curves[k] = {"n": c["n"] + v["n"], "sum": [x + y for x, y in zip(c["sum"], v["sum"])],
                     "sumsq": [x + y for x, y in zip(c["sumsq"], v["sumsq"])]}
    out["curves"] = curves
    lows = [x for x in (a["sal_min"], b["sal_min"]) if x is not None]
    out["sal_min"] = min(lows) if lows else None
    reasons = {k: list(v) for k, v in a["reasons"].items()}
    for k, v in b["reasons"].items():
        if k in reasons:
            reasons[k] = [reasons[k][0] + v[0], min(reasons[k][1], v[1], key=str)]
        else:
            reasons[k] = list(v)
    other = a["other_reasons"] + b["other_reasons"]
    if len(reasons) > MAX_REASONS:
        order = sorted(reasons, key=lambda k: (-reasons[k][0], k))
        for k in order[MAX_REASONS:]:
            other += reasons.pop(k)[0]
    out["reasons"], out["other_reasons"] = reasons, other
    bad = sorted([*a["bad"], *b["bad"]], key=lambda r: (r[0], str(r[1])))
    out["bad"] = bad[:BAD_SAMPLE]
    out["complete"] = a["complete"] and b["complete"]
    out["sample"] = _merge_samples(a["sample"], b["sample"])
    return _cap(out, keep)


def _merge_samples(a: dict, b: dict) -> dict:
    if not a["rows"]:
        return {"cols": list(b["cols"]), "rows": list(b["rows"])}
    if not b["rows"]:
        return {"cols": list(a["cols"]), "rows": list(a["rows"])}
    cols = list(dict.fromkeys([*a["cols"], *b["cols"]]))

    def lay(s: dict) -> list[list]:
        if s["cols"] == cols:
            return s["rows"]
        where = [s["cols"].index(c) if c in s["cols"] else None for c in cols]
        return [[r[0], r[1], *(None if i is None else r[2 + i] for i in where)] for r in s["rows"]]

    return {"cols": cols, "rows": [*lay(a), *lay(b)]}


def _cap(agg: dict, keep: int) -> dict:
    """Keep the rows of the ``keep`` samples with the smallest hash (ties by sample id)."""
    s = agg["sample"]
    if not s["rows"]:
        return agg
    sid = s["cols"].index("sample_id") + 2
    ids = sorted({(r[0], str(r[sid])) for r in s["rows"]})
    if len(ids) > keep:
        agg["complete"] = False
        cut = ids[keep - 1]
        s["rows"] = [r for r in s["rows"] if (r[0], str(r[sid])) <= cut]
    s["rows"].sort(key=lambda r: (r[0], str(r[sid]), str(r[2 + s["cols"].index("target")])
                                  if "target" in s["cols"] else ""))
    agg["sample"] = s
    return agg


def merge_all(parts: Iterable[dict | None], keep: int = UNIT_SAMPLE) -> dict[str, Any]:
    """The merge of every aggregate in ``parts`` (None skipped), keeping ``keep`` sample rows."""
    out = empty()
    for p in parts:
        out = merge(out, p, keep)
    return out


# -- in a commit record ----------------------------------------------------------------------
def pack(agg: dict[str, Any]) -> dict[str, Any]:
    """The aggregate as a commit record carries it: ``{"v", "rows", "complete", "packed":
    compact JSON}``; records are written indented, which would double the size of the
    aggregate's long lists."""
    import json

    return {"v": VERSION, "rows": agg["rows"], "complete": agg["complete"],
            "packed": json.dumps(agg, separators=(",", ":"), allow_nan=False)}


def unpack(payload: dict[str, Any]) -> dict[str, Any]:
    """A record's aggregate (packed or not) as a dict :func:`merge` takes."""
    if "packed" in payload:
        import json

        return json.loads(payload["packed"])
    return payload


# -- reading -----------------------------------------------------------------------------------
def sample_table(agg: dict) -> dict[str, list]:
    """The sample as columns (``file`` and every kept column)."""
    s = agg.get("sample") or {"cols": [], "rows": []}
    cols = {"file": [r[1] for r in s["rows"]]}
    for i, c in enumerate(s["cols"]):
        cols[c] = [r[2 + i] for r in s["rows"]]
    return cols


def sample_samples(agg: dict) -> int:
    """How many distinct samples the sample holds."""
    s = agg.get("sample") or {"rows": []}
    return len({r[0] for r in s["rows"]})
