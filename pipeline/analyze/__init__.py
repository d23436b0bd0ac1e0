"""``salmap analyze RUN``: strategy clusters and shortcut flags over a whole run (SpRAy).

Per unit and per explained class (``target``), the committed maps are downsampled to
32 x 32, normalised to relevance distributions, embedded spectrally on a kNN graph and
clustered with the number of clusters at the largest eigengap (:mod:`.core`); clusters
whose relevance sits outside the object or on one fixed off-centre region are flagged with
their evidence (:mod:`.flags`). Written next to the run:

* ``analysis/<unit>/rows.parquet``: per row sample_id, target, cluster, 2-D point ``x, y``,
  ``embedded`` (in the class's hash sample), shares of relevance in the ground-truth box,
  the pseudo box and on the border, ``focus_area`` (share of the image holding half of it);
* ``analysis/<unit>/clusters.parquet``: per cluster its size and share of the class, mean map
  (32 x 32, flattened), exemplar sample ids, mean metric values, where its relevance lies,
  ``flagged``, ``flags`` and ``evidence``;
* ``analysis/manifest.json``: the parameters and every flagged cluster (also summarised under
  ``analysis`` in the run's ``manifest.json``).

Small units (at most ``ray_threshold`` rows, 20 000 by default) are analysed in this
process; larger ones are split into groups of classes (each group at most
:data:`GROUP_ROWS` buffered maps) run as Ray tasks, on the cluster at ``ray_address`` when
given, else on a fresh local Ray instance.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..ledger import MANIFEST_KEY
from ..read import read_run, units
from ..storage import Store
from .classes import Params, analyze_classes
from .core import DEFAULT_CAP, MAX_CLUSTERS, SIDE
from .flags import Thresholds

ANALYSIS = "analysis"
ANALYSIS_MANIFEST = f"{ANALYSIS}/manifest.json"
RAY_THRESHOLD = 20_000  # rows of a unit above which classes are analysed in Ray tasks
GROUP_ROWS = 50_000  # buffered maps per Ray task at most (32 x 32 float32: 200 MB)

__all__ = ["ANALYSIS_MANIFEST", "AnalysisResult", "Params", "Thresholds", "analyze_run",
           "load_analysis", "rows_key", "clusters_key"]


def rows_key(unit: str) -> str:
    return f"{ANALYSIS}/{unit}/rows.parquet"


def clusters_key(unit: str) -> str:
    return f"{ANALYSIS}/{unit}/clusters.parquet"


@dataclass
class AnalysisResult:
    """What :func:`analyze_run` wrote: per unit its row and cluster tables and where."""

    run: str
    manifest: dict
    rows: dict[str, pa.Table] = field(default_factory=dict)
    clusters: dict[str, pa.Table] = field(default_factory=dict)

    def flagged(self) -> list[dict]:
        return [f for u in self.manifest["units"].values() for f in u["flagged"]]


def _class_counts(ds) -> dict[int, int]:
    t = ds.to_table(columns=["target"], filter=(pc.field("status") == "ok")
                    & pc.field("target").is_valid())
    vals, counts = np.unique(t.column("target").to_numpy(zero_copy_only=False),
                             return_counts=True)
    return {int(v): int(c) for v, c in zip(vals, counts)}


def class_groups(counts: dict[int, int], cap: int, budget: int = GROUP_ROWS) -> list[list[int]]:
    """Classes packed greedily (largest first) into groups of at most ``budget`` buffered
    maps (a class buffers at most ``2 * cap``); a class alone may exceed nothing."""
    groups: list[list[int]] = []
    loads: list[int] = []
    for c in sorted(counts, key=lambda c: (-counts[c], c)):
        need = min(counts[c], 2 * cap)
        for i, load in enumerate(loads):
            if load + need <= budget:
                groups[i].append(c)
                loads[i] += need
                break
        else:
            groups.append([c])
            loads.append(need)
    return groups


def _remote_classes(run: str, unit: str, classes: list[int], params: Params, storage: Any):
    ds = read_run(run, unit=unit, storage=storage)
    return analyze_classes(ds, classes, params, unit)


def _analyze_unit(run: str, unit: str, params: Params, storage: Any, ray_threshold: int,
                  ray_address: str | None) -> tuple[pa.Table, pa.Table, str, int]:
    ds = read_run(run, unit=unit, storage=storage)
    counts = _class_counts(ds)
    n = sum(counts.values())
    if n <= ray_threshold:
        rows, clusters = analyze_classes(ds, None, params, unit)
        return rows, clusters, "in-process", n
    import ray

    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=1)(_remote_classes)
    refs = [task.remote(run, unit, g, params, storage) for g in class_groups(counts, params.cap)]
    parts = ray.get(refs)
    rows = pa.concat_tables([p[0] for p in parts])
    clusters = pa.concat_tables([p[1] for p in parts])
    return rows, clusters, f"ray ({len(refs)} tasks)", n


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def analyze_run(run: str, storage: Any = None, unit: str | None = None,
                params: Params | None = None, ray_threshold: int = RAY_THRESHOLD,
                ray_address: str | None = None, class_names=None) -> AnalysisResult:
    """Analyse every unit of ``run`` (or ``unit``), write the Parquet files and manifests
    (see the module doc) and return what was written."""
    from ..read import resolve_unit

    params = params or Params()
    store = Store.open(run, storage)
    found = units(run, storage=storage)
    wanted = [resolve_unit(unit, found)] if unit else found
    t0 = time.perf_counter()
    out = AnalysisResult(run, {})
    info: dict[str, dict] = {}
    for u in wanted:
        t = time.perf_counter()
        rows, clusters, where, n = _analyze_unit(run, u, params, storage, ray_threshold,
                                                 ray_address)
        rows = rows.sort_by([("target", "ascending"), ("sample_id", "ascending")])
        clusters = clusters.sort_by([("target", "ascending"), ("cluster", "ascending")])
        store.write_bytes(rows_key(u), _parquet_bytes(rows))
        store.write_bytes(clusters_key(u), _parquet_bytes(clusters))
        out.rows[u], out.clusters[u] = rows, clusters
        flagged = []
        for r in clusters.filter(pc.field("flagged")).to_pylist():
            name = class_names(u, r["target"]) if class_names else f"class_{r['target']}"
            flagged.append({"unit": u, "target": r["target"], "class": name,
                            "cluster": r["cluster"], "size": r["size"],
                            "share": round(r["share"], 4), "flags": r["flags"],
                            "evidence": r["evidence"], "exemplars": r["exemplars"]})
        info[u] = {"rows": rows.num_rows, "rows_ok": n,
                   "classes": len(set(clusters.column("target").to_pylist())),
                   "clusters": clusters.num_rows, "where": where,
                   "seconds": round(time.perf_counter() - t, 3),
                   "rows_file": rows_key(u), "clusters_file": clusters_key(u),
                   "flagged": flagged}
    out.manifest = {
        "created": time.time(), "seconds": round(time.perf_counter() - t0, 3),
        "method": "SpRAy: per unit and target class, maps downsampled to "
                  f"{params.side}x{params.side}, non-negative part normalised to sum 1, "
                  "self-tuning kNN graph (k = max(5, sqrt(n)/2)), normalised-Laplacian "
                  "spectral embedding, clusters = connected components of the graph when several, "
                  "else at the largest eigengap "
                  f"(1..{params.max_clusters}), k-means, clusters with centroid cosine >= "
                  f"{params.merge_cosine} merged; 2-D = PCA of the embedding",
        "params": {"side": params.side, "cap": params.cap, "max_clusters": params.max_clusters,
                   "merge_cosine": params.merge_cosine,
                   "seed": params.seed, "ray_threshold": ray_threshold,
                   "thresholds": params.thresholds.as_dict()},
        "sampling": f"a class above {params.cap} rows is embedded on the {params.cap} rows "
                    "with the smallest blake2b hash of their sample_id; the rest are assigned "
                    "to the nearest cluster centroid",
        "units": info,
    }
    if unit and store.exists(ANALYSIS_MANIFEST):  # one unit again: keep the others' entries
        earlier = store.read_json(ANALYSIS_MANIFEST).get("units", {})
        out.manifest["units"] = {**{u: i for u, i in earlier.items() if u in found}, **info}
    store.write_json(ANALYSIS_MANIFEST, out.manifest)
    _note_in_run_manifest(store, out)
    return out


def _note_in_run_manifest(store: Store, result: AnalysisResult) -> None:
    """A short ``analysis`` entry in the run's manifest.json (rewritten by a later run of the
    job, which does not keep it; ``analysis/manifest.json`` stays)."""
    if not store.exists(MANIFEST_KEY):
        return
    m = store.read_json(MANIFEST_KEY)
    m["analysis"] = {"manifest": ANALYSIS_MANIFEST, "created": result.manifest["created"],
                     "flagged": [{k: f[k] for k in ("unit", "target", "class", "cluster",
                                                    "size", "flags", "evidence")}
                                 for f in result.flagged()]}
    store.write_json(MANIFEST_KEY, m)


def load_analysis(run: str, storage: Any = None) -> tuple[dict, dict[str, pa.Table],
                                                          dict[str, pa.Table]] | None:
    """``(manifest, rows per unit, clusters per unit)`` of a run's analysis, None if none."""
    store = Store.open(run, storage)
    if not store.exists(ANALYSIS_MANIFEST):
        return None
    m = store.read_json(ANALYSIS_MANIFEST)
    rows, clusters = {}, {}
    for u, i in m.get("units", {}).items():
        rows[u] = pq.read_table(io.BytesIO(store.read_bytes(i["rows_file"])))
        clusters[u] = pq.read_table(io.BytesIO(store.read_bytes(i["clusters_file"])))
    return m, rows, clusters


def summary_lines(result: AnalysisResult) -> list[str]:
    """The console summary: per unit its classes and clusters, then every flagged cluster
    with its evidence (flagged first, most images first)."""
    lines = []
    for u, i in result.manifest["units"].items():
        lines.append(f"{u}: {i['rows']} rows, {i['classes']} classes, {i['clusters']} clusters "
                     f"({i['where']}, {i['seconds']:.1f} s), {len(i['flagged'])} flagged")
    flagged = sorted(result.flagged(), key=lambda f: -f["size"])
    for f in flagged:
        lines.append(f"  FLAGGED {f['unit']} {f['class']} (target {f['target']}) cluster "
                     f"{f['cluster']}: {f['size']} images ({f['share']:.0%} of the class), "
                     f"{', '.join(f['flags'])}: {f['evidence']}; e.g. "
                     f"{', '.join(f['exemplars'][:3])}")
    return lines


__all__ += ["summary_lines", "class_groups", "DEFAULT_CAP", "MAX_CLUSTERS", "SIDE"]
