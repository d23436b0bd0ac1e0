"""Issue 20, item 2: the end of a run costs the same memory at 10^4 and 10^7 committed rows.

For each size a synthetic run is written the way the pipeline writes one: real Parquet files
(the output schema, 4x4 float16 maps and a small PNG per row: small maps keep 10^7 rows
writable in minutes), one aggregate per file (:func:`salmap.pipeline.aggregate.of_table`, what the
post/write tasks compute), merged per wave by the real :class:`salmap.pipeline.tracker.WaveTracker`
and committed by the real :class:`salmap.pipeline.ledger.Ledger` (commit records in ``_commits/``),
plus a manifest. Two units (one model, two methods) share the sample ids, one target per
sample, 1% error rows. The generator holds one file's rows at a time.

Then each end-of-run stage runs in a fresh Python subprocess, on the real code, and reports
its wall time and peak resident memory (``ru_maxrss``) and the same less the resident size
after its imports:

* ``summary``: the units' aggregates folded from the commit records
  (:func:`salmap.pipeline.rollup.unit_aggregates`, a chunk of records at a time), the summaries
  (:func:`salmap.pipeline.summary.summary_from_aggregate`), the win rate and the console table;
* ``report``: ``salmap report`` (:func:`salmap.pipeline.report.write_report`, every page);
* ``export``: ``salmap export --format parquet`` (:func:`salmap.pipeline.export.export_run`);
* ``read``: every row through :func:`salmap.pipeline.read.read_batches` (two columns) and
  ``salmap read --head 5``.

    PYTHONPATH=. python bench/end_of_run.py --sizes 10000,1000000,10000000

Nothing is stubbed but the model: rows are synthetic, the code that reads them is the code a
run uses. Files hold ``--file-rows`` rows (the pipeline writes smaller ones, ``POST_BATCH``;
more files cost the export time, not the end-of-run memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

UNITS = (("m", "a"), ("m", "b"))
STAGES = ("summary", "report", "export", "read")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- the synthetic run -----------------------------------------------------------------------
def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(16, dtype=np.uint8).reshape(4, 4) * 16), mode="L").save(buf, "PNG")
    return buf.getvalue()


def _table(start: int, n: int, method_seed: int, png: bytes):
    """Rows ``start .. start + n`` of one unit (sample ``s-<k>``, shard ``shard-<k // 10000>``)."""
    import numpy as np
    import pyarrow as pa
    from salmap.workers.columns import output_schema

    schema = output_schema(4, 4)
    k = np.arange(start, start + n)
    rng = np.random.default_rng([start, method_seed])
    bad = (k * 7919) % 100 == 13
    ok = ~bad
    sids = [f"s-{i:09d}" for i in k]
    cols = {
        "sample_id": sids, "shard": [f"shard-{i // 10000:06d}" for i in k],
        "key": [f"{i:09d}" for i in k], "image_file": None, "model": ["m"] * n,
        "method": [UNITS[method_seed][1]] * n, "target": np.where(ok, k % 1000, -1),
        "target_source": ["pred"] * n, "label": k % 1000, "pred": k % 1000,
        "pred_prob": rng.random(n), "target_prob": rng.random(n), "orig_height": [32] * n,
        "orig_width": [32] * n, "status": np.where(ok, "ok", "error"),
        "error": np.where(ok, "", "image data is truncated: synthetic"),
        "deletion_auc": rng.random(n), "insertion_auc": rng.random(n),
        "average_drop": rng.random(n) * 100, "gini": rng.random(n),
        "pointing_hit": rng.random(n) > 0.5, "saliency_min": np.zeros(n),
        "saliency_max": np.ones(n),
    }
    arrays = []
    for f in schema:
        v = cols.get(f.name)
        if f.name == "saliency":
            storage = pa.FixedSizeListArray.from_arrays(
                pa.array(rng.random(n * 16).astype(np.float16)), 16, mask=pa.array(bad))
            arrays.append(pa.ExtensionArray.from_storage(f.type, storage))
        elif f.name == "saliency_png":
            arrays.append(pa.array([None if b else png for b in bad], type=f.type))
        elif v is None:
            arrays.append(pa.nulls(n, f.type))
        else:
            arr = pa.array(v)
            if f.name == "target":
                arr = pa.array(np.where(ok, k % 1000, 0), mask=bad)
            if f.name in ("deletion_auc", "insertion_auc", "average_drop", "gini", "pointing_hit",
                          "pred_prob", "target_prob", "saliency_min", "saliency_max"):
                arr = pa.array(v, mask=bad)
            arrays.append(arr.cast(f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def generate(run: str, rows: int, file_rows: int, files_per_wave: int, unit: int) -> None:
    """Write unit number ``unit`` of the synthetic run (its files and commit records)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from salmap.pipeline.aggregate import of_table, wave_sample_size
    from salmap.pipeline.ledger import Ledger
    from salmap.pipeline.plan import Wave
    from salmap.pipeline.storage import Store
    from salmap.pipeline.tracker import WaveTracker

    store = Store.open(run)
    ledger = Ledger(store)
    png = _png()
    per_unit = rows // len(UNITS)
    n_files = -(-per_unit // file_rows)
    for seed, (model, method) in enumerate(UNITS):
        if seed != unit:
            continue
        uid = f"{model}__{method}"
        for w0 in range(0, n_files, files_per_wave):
            chunk = range(w0, min(n_files, w0 + files_per_wave))
            shard = f"gen-{w0:06d}.tar"
            wave = Wave([shard])
            tracker = WaveTracker(uid, "bench", [wave],  # the record's sample, as a run's
                                  sample_cap=wave_sample_size(-(-n_files // files_per_wave), 1))
            samples = 0
            for f in chunk:
                start, n = f * file_rows, min(file_rows, per_unit - f * file_rows)
                table = _table(start, n, seed, png)
                key = f"data/{model}/{method}/{wave.id}/part-{f:06d}.parquet"
                sink = pa.BufferOutputStream()
                pq.write_table(table, sink, compression="zstd")
                store.write_bytes(key, sink.getvalue().to_pybytes())
                keys = list(zip(table.column("sample_id").to_pylist(), [shard.removesuffix(".tar")] * n,
                                [-1 if t is None else t for t in table.column("target").to_pylist()],
                                table.column("status").to_pylist()))
                tracker.add_file(key, keys, json.loads(json.dumps(of_table(table, key))))
                samples += n
            tracker.add_marker(shard.removesuffix(".tar"), samples)
            for record in tracker.ready():
                ledger.commit(uid, record)


def finish(run: str) -> dict:
    """The manifest; returns the data's size on disk and the commit records' sizes."""
    from salmap.pipeline.ledger import MANIFEST_KEY
    from salmap.pipeline.storage import Store

    store = Store.open(run)
    units = {f"{m}__{me}": {"model": m, "method": me} for m, me in UNITS}
    store.write_json(MANIFEST_KEY, {"run_id": os.path.basename(run), "status": "complete",
                                    "config": {"run": {"id": os.path.basename(run)}},
                                    "units": units, "shards_total": 0, "failures": [],
                                    "started": time.time(), "finished": time.time()})
    sizes = store.list_sizes("_commits")
    data = sum(store.list_sizes("data").values())
    return {"data_mb": data / 2**20, "records": len(sizes),
            "record_kb_max": max(sizes.values()) / 1024, "record_kb_mean":
            sum(sizes.values()) / len(sizes) / 1024}


# -- the stages ------------------------------------------------------------------------------
def stage(name: str, run: str, work: str) -> dict:
    """Run one end-of-run stage (in this process); returns what it measured."""
    from salmap.pipeline.export import export_run
    from salmap.pipeline.read import read_batches
    from salmap.pipeline.report import write_report
    from salmap.pipeline.rollup import unit_aggregates
    from salmap.pipeline.storage import Store
    from salmap.pipeline.summary import print_summaries, run_win_percent, summary_from_aggregate

    base = _rss_mb()
    t0 = time.perf_counter()
    extra: dict = {}
    if name == "summary":
        aggs = unit_aggregates(Store.open(run))
        units = {u: {"model": u.split("__")[0], "method": u.split("__")[1],
                     "summary": summary_from_aggregate(a)} for u, a in aggs.items()}
        win = run_win_percent(units, aggs)
        lines: list[str] = []
        print_summaries(units, lines.append)
        extra = {"rows": sum(a["rows"] for a in aggs.values()), "win_n": win["m"]["n"],
                 "win_exact": win["m"]["exact"]}
    elif name == "report":
        path = write_report(run)
        extra = {"pages": len(os.listdir(os.path.dirname(path)))}
    elif name == "export":
        out = os.path.join(work, "export")
        shutil.rmtree(out, ignore_errors=True)
        export_run(run, "parquet", output=out)
        extra = {"files": sum(len(f) for _, _, f in os.walk(out))}
        shutil.rmtree(out, ignore_errors=True)
    elif name == "read":
        rows = sum(len(df) for df in read_batches(run, columns=["sample_id", "deletion_auc"]))
        from salmap.pipeline.cli import main

        devnull = open(os.devnull, "w")
        saved, sys.stdout = sys.stdout, devnull
        try:
            main(["read", run, "--head", "5"])
        finally:
            sys.stdout = saved
        extra = {"rows": rows}
    return {"stage": name, "seconds": time.perf_counter() - t0, "peak_mb": _peak_mb(),
            "above_imports_mb": _peak_mb() - base, **extra}


def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(proc.args[2:])} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _child(args: list[str]) -> dict:
    return _result(_start(args))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,1000000,10000000")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--file-rows", type=int, default=4096)
    p.add_argument("--files-per-wave", type=int, default=32)
    p.add_argument("--work", default="/tmp/salmap-end-of-run")
    p.add_argument("--keep", action="store_true", help="keep the synthetic runs")
    p.add_argument("--device", default="cpu", help="ignored: the end of a run uses no device")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        kind, run, *rest = a.child
        if kind == "generate":
            generate(run, int(rest[0]), a.file_rows, a.files_per_wave, int(rest[1]))
            out = {"peak_mb": _peak_mb()}
        else:
            out = stage(kind, run, a.work)
        print(json.dumps(out))
        return 0
    one, five, fifteen = os.getloadavg()
    print("## End of run: memory and time against committed rows (issue 20)\n")
    print(f"date {time.strftime('%Y-%m-%d')}; CPU, {os.cpu_count()} cores; load average "
          f"{one:.1f}, {five:.1f}, {fifteen:.1f}; two units x rows/2, {a.file_rows} rows per "
          f"file, {a.files_per_wave} files per wave; peak = ru_maxrss of a fresh process per "
          "stage (imports included), above imports = peak less the resident size after them\n")
    print("| rows | records (mean / max KB) | data MB | stage | seconds | peak MB | "
          "above imports MB | detail |")
    print("|---:|---|---:|---|---:|---:|---:|---|")
    for size in (int(s) for s in a.sizes.split(",")):
        run = os.path.join(a.work, f"run-{size}")
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()  # one generator per unit, side by side
        procs = [_start(["--file-rows", str(a.file_rows), "--files-per-wave", str(a.files_per_wave),
                         "--child", "generate", run, str(size), str(u)]) for u in range(len(UNITS))]
        peaks = [_result(pr)["peak_mb"] for pr in procs]
        gen = {**finish(run), "seconds": time.perf_counter() - t0, "peak_mb": max(peaks)}
        rec = f"{gen['records']} ({gen['record_kb_mean']:.0f} / {gen['record_kb_max']:.0f})"
        print(f"| {size:,} | {rec} | {gen['data_mb']:.0f} | (generate) | {gen['seconds']:.1f} | "
              f"{gen['peak_mb']:.0f} | | |", flush=True)
        for name in a.stages.split(","):
            r = _child(["--work", a.work, "--child", name, run])
            detail = ", ".join(f"{k} {v}" for k, v in r.items()
                               if k not in ("stage", "seconds", "peak_mb", "above_imports_mb"))
            print(f"| {size:,} | | | {name} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | "
                  f"{r['above_imports_mb']:.0f} | {detail} |", flush=True)
        if not a.keep:
            shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
