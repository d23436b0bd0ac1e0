"""One unit's classes analysed from its committed rows, streamed: two passes over record batches.

Pass 1 reads only the columns needed (sample id, target, map, boxes, metric values) a record
batch at a time, downsamples each map at once (:func:`salmap.pipeline.analyze.core.downsample`) and
keeps per class at most ``cap`` maps: those with the smallest :func:`sample_hash` of their
sample id (a deterministic sample; a bounded buffer of ``2 * cap`` maps per class is trimmed
as it fills), plus a few scalars per row. The sample is clustered
(:func:`salmap.pipeline.analyze.core.cluster_maps`). Pass 2, only for classes larger than ``cap``,
reads the maps again and assigns each one left out to the nearest cluster centroid (its mean
map counts all rows; the region consistency is measured on the embedded maps). Memory is
bounded per class by ``2 * cap`` downsampled maps (``cap=2000`` at 32 x 32: 16 MB) plus about
100 bytes per row.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ..read import MAP_COLUMN, to_maps
from .core import (
    DEFAULT_CAP,
    MAX_CLUSTERS,
    MERGE_COSINE,
    SIDE,
    assign,
    border_mask,
    box_mask,
    cluster_maps,
    downsample,
    features,
    focus_area,
    normalise,
    sample_hash,
)
from .flags import Thresholds, cell_size, flag, region_stats

EXEMPLARS = 6  # sample ids per cluster, nearest its centroid first
BATCH_ROWS = 512


@dataclass
class Params:
    """How a unit is analysed (``salmap analyze`` options)."""

    side: int = SIDE
    cap: int = DEFAULT_CAP
    max_clusters: int = MAX_CLUSTERS
    merge_cosine: float = MERGE_COSINE
    seed: int = 0
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass
class _Class:
    """Pass-1 state of one class: every row's scalars, the hash-sampled maps."""

    ids: list = field(default_factory=list)
    hashes: list = field(default_factory=list)
    scalars: dict = field(default_factory=lambda: defaultdict(list))
    buf_h: list = field(default_factory=list)
    buf_id: list = field(default_factory=list)
    buf_d: list = field(default_factory=list)
    buffered: int = 0
    native: tuple = ()  # the stored maps' (h, w)

    def keep(self, h: np.ndarray, ids: list, d: np.ndarray, cap: int) -> None:
        self.buf_h.append(h)
        self.buf_id.extend(ids)
        self.buf_d.append(d)
        self.buffered += len(ids)
        if self.buffered > 2 * cap:
            self.trim(cap)

    def trim(self, cap: int) -> None:
        if not self.buf_h:
            return
        h = np.concatenate(self.buf_h)
        d = np.concatenate(self.buf_d)
        order = np.argsort(h, kind="stable")[:cap]
        ids = [self.buf_id[i] for i in order]
        self.buf_h, self.buf_id, self.buf_d = [h[order]], ids, [d[order]]
        self.buffered = len(order)


def metric_columns(schema: pa.Schema) -> list[str]:
    """The run's metric columns present in this unit (averaged per cluster)."""
    from salmap.workers.columns import METRIC_COLUMNS

    return [c for c in METRIC_COLUMNS if c in schema.names]


def _row_filter(classes: list[int] | None) -> pc.Expression:
    f = (pc.field("status") == "ok") & pc.field("target").is_valid()
    if classes is not None:
        f = f & pc.field("target").isin(pa.array(classes, pa.int32()))
    return f


def _shares(batch: pa.RecordBatch, dist: np.ndarray, side: int) -> dict[str, np.ndarray]:
    """Per row: relevance share inside the ground-truth box (the run's energy_pointing,
    NaN without boxes), inside the pseudo box (NaN without one), on the border band."""
    n = len(dist)
    names = batch.schema.names
    gt = np.full(n, np.nan)
    if "energy_pointing" in names:
        gt = np.asarray(batch.column("energy_pointing").to_numpy(zero_copy_only=False),
                        dtype=float)
    pseudo = np.full(n, np.nan)
    if "pseudo_box" in names and "crop_box" in names:
        boxes = batch.column("pseudo_box").to_pylist()
        crops = batch.column("crop_box").to_pylist()
        for i, (b, c) in enumerate(zip(boxes, crops)):
            m = box_mask(b, c, side)
            if m is not None:
                pseudo[i] = float(dist[i][m].sum())
    border = dist[:, border_mask(side)].sum(axis=1)
    return {"box_share": gt, "pseudo_box_share": pseudo, "border_share": border,
            "focus_area": focus_area(dist)}


def _batches(ds: pads.Dataset, columns: list[str], classes: list[int] | None):
    scanner = ds.scanner(columns=columns, filter=_row_filter(classes), batch_size=BATCH_ROWS)
    for batch in scanner.to_batches():
        if batch.num_rows:
            yield batch


def analyze_classes(ds: pads.Dataset, classes: list[int] | None, params: Params,
                    unit: str = "") -> tuple[pa.Table, pa.Table]:
    """``(rows, clusters)`` tables for the given classes of one unit's dataset (None: every
    class). See the module doc for how it streams."""
    side, cap = params.side, params.cap
    metrics = metric_columns(ds.schema)
    light = ["sample_id", "target", *[c for c in ("pseudo_box", "crop_box") if c in ds.schema.names],
             *[m for m in metrics if m not in ("pseudo_box",)]]
    state: dict[int, _Class] = defaultdict(_Class)
    for batch in _batches(ds, [*light, MAP_COLUMN], classes):
        raw = to_maps(batch.column(MAP_COLUMN))
        dist = normalise(downsample(raw, side))
        targets = batch.column("target").to_numpy(zero_copy_only=False).astype(np.int64)
        ids = batch.column("sample_id").to_pylist()
        hashes = np.asarray([sample_hash(s) for s in ids], dtype=np.uint64)
        shares = _shares(batch, dist, side)
        mvals = {m: np.asarray(batch.column(m).to_numpy(zero_copy_only=False), dtype=float)
                 for m in metrics}
        for c in np.unique(targets):
            sel = np.nonzero(targets == c)[0]
            st = state[int(c)]
            st.native = st.native or tuple(int(v) for v in raw.shape[1:])
            st.ids.extend(ids[i] for i in sel)
            st.hashes.append(hashes[sel])
            for k, v in {**shares, **mvals}.items():
                st.scalars[k].append(v[sel])
            st.keep(hashes[sel], [ids[i] for i in sel], dist[sel], cap)
    results = {}
    for c, st in state.items():
        st.trim(cap)
        sample_d = st.buf_d[0]
        clus = cluster_maps(sample_d, params.max_clusters, params.seed, params.merge_cosine)
        results[c] = (st, clus)
    big = [c for c, (st, _) in results.items() if len(st.ids) > cap]
    assigned: dict[int, dict[str, tuple[int, float, float]]] = defaultdict(dict)
    extra_sum: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
    sampled = {c: set(results[c][0].buf_id) for c in big}
    if big:  # pass 2: the maps left out of the sample, to their nearest centroid
        for batch in _batches(ds, ["sample_id", "target", MAP_COLUMN], big):
            targets = batch.column("target").to_numpy(zero_copy_only=False).astype(np.int64)
            ids = batch.column("sample_id").to_pylist()
            for c in np.unique(targets):
                st, clus = results[int(c)]
                sel = [i for i in np.nonzero(targets == c)[0] if ids[i] not in sampled[int(c)]]
                if not sel:
                    continue
                dist = normalise(downsample(to_maps(batch.column(MAP_COLUMN).take(sel)), side))
                lab, xy = assign(dist, clus.centroids, features(st.buf_d[0]), clus.xy)
                for j, i in enumerate(sel):
                    assigned[int(c)][ids[i]] = (int(lab[j]), float(xy[j, 0]), float(xy[j, 1]))
                for k in np.unique(lab):
                    s = dist[lab == k].sum(axis=0)
                    extra_sum[int(c)][int(k)] = extra_sum[int(c)].get(int(k), 0) + s
    rows, clusters = [], []
    for c in sorted(results):
        st, clus = results[c]
        r, cl = _class_tables(c, st, clus, assigned.get(c, {}), extra_sum.get(c, {}),
                              metrics, params, unit)
        rows.append(r)
        clusters.append(cl)
    if not rows:
        return _empty_rows(), _empty_clusters(metrics, side)
    return pa.concat_tables(rows), pa.concat_tables(clusters)


def _class_tables(c: int, st: _Class, clus, assigned: dict, extra_sum: dict,
                  metrics: list[str], params: Params, unit: str) -> tuple[pa.Table, pa.Table]:
    side = params.side
    n = len(st.ids)
    scal = {k: np.concatenate(v) for k, v in st.scalars.items()}
    pos = {s: i for i, s in enumerate(st.buf_id)}
    label = np.empty(n, dtype=np.int64)
    xy = np.empty((n, 2))
    embedded = np.zeros(n, dtype=bool)
    for i, s in enumerate(st.ids):
        j = pos.get(s)
        if j is not None:
            label[i], xy[i], embedded[i] = clus.labels[j], clus.xy[j], True
        else:
            lab, x, y = assigned[s]
            label[i], xy[i] = lab, (x, y)
    rows = pa.table({
        "sample_id": pa.array(st.ids, pa.string()),
        "target": pa.array(np.full(n, c), pa.int32()),
        "cluster": pa.array(label, pa.int32()),
        "x": pa.array(xy[:, 0], pa.float32()), "y": pa.array(xy[:, 1], pa.float32()),
        "embedded": pa.array(embedded),
        **{k: pa.array(scal[k], pa.float32()) for k in ("box_share", "pseudo_box_share",
                                                       "border_share", "focus_area")},
    })
    sample_d = st.buf_d[0]
    x = features(sample_d)
    box_ref = reference_box_share(scal["box_share"], params.thresholds)
    out = defaultdict(list)
    for k in range(int(label.max()) + 1 if n else 0):
        members = label == k
        size = int(members.sum())
        if size == 0:
            continue
        in_sample = clus.labels == k
        total = sample_d[in_sample].sum(axis=0) + extra_sum.get(k, 0)
        mean_map = total / max(size, 1)
        # consistency and spread: on the embedded maps
        stats = region_stats(mean_map, sample_d[in_sample], cell_size(st.native, side))
        box = _nanmean(scal["box_share"][members])
        focus = _nanmean(scal["focus_area"][members])
        flags, evidence = flag(size, box, focus, stats, params.thresholds, box_ref)
        dist_c = ((x[in_sample] - clus.centroids[k]) ** 2).sum(axis=1)
        ids_k = [st.buf_id[j] for j in np.nonzero(in_sample)[0]]
        exemplars = [ids_k[j] for j in np.argsort(dist_c, kind="stable")[:EXEMPLARS]]
        out["unit"].append(unit)
        out["target"].append(c)
        out["cluster"].append(k)
        out["size"].append(size)
        out["share"].append(size / n)
        out["embedded"].append(int(in_sample.sum()))
        out["mean_map"].append(mean_map.astype(np.float32).ravel())
        out["exemplars"].append(exemplars)
        out["box_share"].append(box)
        out["pseudo_box_share"].append(_nanmean(scal["pseudo_box_share"][members]))
        out["border_share"].append(stats["border_share"])
        out["focus_area"].append(focus)
        out["region_area"].append(stats["region_area"])
        out["region_x"].append(stats["region_center"][0])
        out["region_y"].append(stats["region_center"][1])
        out["region_consistency"].append(stats["region_consistency"])
        out["hotspot_spread_cells"].append(stats["hotspot_spread"] / stats["cell"])
        out["box_ref"].append(box_ref)
        for m in metrics:
            out[f"mean_{m}"].append(_nanmean(scal[m][members]))
        out["flagged"].append(bool(flags))
        out["flags"].append(flags)
        out["evidence"].append(evidence)
        out["class_size"].append(n)
        out["k_neighbours"].append(clus.k_neighbours)
        out["eigenvalues"].append(np.asarray(clus.eigenvalues, dtype=np.float32))
    return rows, _clusters_table(out, metrics, side)


def reference_box_share(shares: np.ndarray, t: Thresholds) -> float:
    """What this model's maps of one class put in the object's box when they find it: the
    ``t.ref_quantile`` quantile of the class's per-image box shares (NaN with fewer than
    ``t.min_images`` of them). It carries the map's resolution and the objects' size, which
    the committed rows do not state (they hold each image's box share, not its box)."""
    v = np.asarray(shares, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.quantile(v, t.ref_quantile)) if len(v) >= t.min_images else float("nan")


def _nanmean(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def _clusters_schema(metrics: list[str], side: int) -> pa.Schema:
    return pa.schema([
        ("unit", pa.string()), ("target", pa.int32()), ("cluster", pa.int32()),
        ("size", pa.int64()), ("share", pa.float32()), ("embedded", pa.int64()),
        ("mean_map", pa.list_(pa.float32(), side * side)), ("exemplars", pa.list_(pa.string())),
        ("box_share", pa.float32()), ("pseudo_box_share", pa.float32()),
        ("border_share", pa.float32()), ("focus_area", pa.float32()),
        ("region_area", pa.float32()),
        ("region_x", pa.float32()), ("region_y", pa.float32()),
        ("region_consistency", pa.float32()), ("hotspot_spread_cells", pa.float32()),
        ("box_ref", pa.float32()),
        *[(f"mean_{m}", pa.float32()) for m in metrics],
        ("flagged", pa.bool_()), ("flags", pa.list_(pa.string())), ("evidence", pa.string()),
        ("class_size", pa.int64()), ("k_neighbours", pa.int32()),
        ("eigenvalues", pa.list_(pa.float32())),
    ])


def _clusters_table(cols: dict, metrics: list[str], side: int) -> pa.Table:
    schema = _clusters_schema(metrics, side)
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)


def _empty_clusters(metrics: list[str], side: int) -> pa.Table:
    return _clusters_schema(metrics, side).empty_table()


def _empty_rows() -> pa.Table:
    return pa.schema([("sample_id", pa.string()), ("target", pa.int32()),
                      ("cluster", pa.int32()), ("x", pa.float32()), ("y", pa.float32()),
                      ("embedded", pa.bool_()), ("box_share", pa.float32()),
                      ("pseudo_box_share", pa.float32()),
                      ("border_share", pa.float32()), ("focus_area", pa.float32())]).empty_table()
