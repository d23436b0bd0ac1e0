"""Control-plane cost at dataset scale, by simulation: storage requests, seconds and bytes per
commit, driver memory (Python heap growth over the run, tracemalloc), and the cost of resuming and reading, from 100 to 10,000 shards x 42
units.

The real planner (``waves_of``), wave tracker, commit protocol (``_Run.commit``: commit record
+ manifest), ledger, resume load and reader run against an in-memory store that counts every
request (``salmap.pipeline.storage_stats``); only the Ray execution is stubbed: each wave "writes" one
small Parquet file and reports one sample per shard, as the real write stage would.

    .venv/bin/python bench/control_plane.py                    # 100, 1000, 10000 shards x 42 units
    .venv/bin/python bench/control_plane.py --shards 100 1000 --units 6
    .venv/bin/python bench/control_plane.py --s3-days 10 --commits 2000   # against S3 (moto)

``--s3-days``: the commit protocol against a real S3 API (moto on loopback, every HTTP request
counted at the server, ``tests/s3_counting.py``) with the real run lock, over a simulated
run of that many days: between commits, the driver's held-time sampler gets one sample per
simulated second, the actor accounting one batch entry per actor per 2 simulated seconds,
and one shard in four commits incomplete (the failure list grows). Only Ray is stubbed.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from salmap.pipeline.config import load_config  # noqa: E402
from salmap.pipeline.ledger import MANIFEST_KEY, Ledger, committed_files, load_commits  # noqa: E402
from salmap.pipeline.plan import units_of, waves_of  # noqa: E402
from salmap.pipeline.run import _Run  # noqa: E402
from salmap.pipeline.storage_stats import counting_memory_store  # noqa: E402
from salmap.pipeline.tracker import WaveTracker  # noqa: E402

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "vgg16", "efficientnet_b0", "densenet121"]
METHODS = ["gradient", "gradient_x_input", "gradcam", "gradcam_pp", "layercam", "smoothgrad",
           "integrated_gradients"]


def config(n_units: int):
    """A real, validated config with ``n_units`` (model, method) units (42 = 6 x 7)."""
    n_models = max(1, min(len(MODELS), -(-n_units // len(METHODS))))
    n_methods = max(1, -(-n_units // n_models))
    cfg = {
        "run": {"id": "sim", "output": "mem://runs", "report": False},
        "input": {"shards": ["mem://shards/"]},
        "models": [{"name": m, "source": f"torchvision:{m}", "weights": "none"}
                   for m in MODELS[:n_models]],
        "methods": [{"name": m} for m in METHODS[:n_methods]],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(cfg, f)
    loaded = load_config(f.name)
    Path(f.name).unlink()
    return loaded


def tiny_parquet() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"sample_id": ["s/0"], "status": ["ok"]}), buf)
    return buf.getvalue()


def simulate(n_shards: int, n_units: int, per_wave: int = 8, trace_memory: bool = False) -> dict:
    """One simulated run. Timings are taken with ``trace_memory`` off (tracemalloc slows every
    allocation, more so as the heap grows); the driver's memory with it on."""
    cfg = config(n_units)
    units = units_of(cfg)[:n_units]
    store, counts = counting_memory_store("mem://runs/sim")
    shards = [f"mem://shards/shard-{i:06d}.tar" for i in range(n_shards)]
    identity = {f"shard-{i:06d}": {"size": 1000 + i, "mtime_ns": 10**18 + i} for i in range(n_shards)}
    data = tiny_parquet()
    if trace_memory:
        tracemalloc.start()
    mem0 = tracemalloc.get_traced_memory()[0]
    ledger = Ledger.load(store)
    run = _Run(cfg, "sim", store, units, ledger, n_shards, [], time.time(), out=lambda *a: None)
    waves = waves_of(shards, per_wave)
    run.waves_total = len(waves) * len(units)
    per_commit: list[tuple[float, int, int]] = []  # seconds, requests, manifest bytes
    for unit in units:
        tracker = WaveTracker(unit.id, unit.config_hash, waves, identity)
        for wave in waves:
            names = [s.rsplit("/", 1)[1][:-4] for s in wave.shards]
            key = f"{unit.data_prefix}/{wave.id}/part-0.parquet"
            store.write_bytes(key, data)  # the stubbed write stage
            tracker.add_file(key, [(f"{n}/0", n, 1, "ok") for n in names])
            for n in names:
                tracker.add_marker(n, 1)
            (record,) = tracker.ready()
            before = sum(counts.values())
            t0 = time.perf_counter()
            run.commit(unit, record)
            seconds = time.perf_counter() - t0
            per_commit.append((seconds, sum(counts.values()) - before,
                               len(store.read_bytes(MANIFEST_KEY))))
            counts["get"] -= 1  # the measurement's own manifest read
    mem = tracemalloc.get_traced_memory()[0] - mem0
    if trace_memory:
        tracemalloc.stop()
    # resume: a new driver loads the ledger once and plans nothing
    before = dict(counts)
    t0 = time.perf_counter()
    resumed = Ledger.load(store)
    pending = sum(1 for u in units for s in shards
                  if s.rsplit("/", 1)[1][:-4] not in resumed.committed(u.id))
    resume_s = time.perf_counter() - t0
    resume_req = sum(counts.values()) - sum(before.values())
    # reader: the commit records once, then the file list
    before = dict(counts)
    t0 = time.perf_counter()
    files = committed_files(load_commits(store))
    read_s = time.perf_counter() - t0
    read_req = sum(counts.values()) - sum(before.values())
    n = len(per_commit)
    head, tail = per_commit[: max(1, n // 10)], per_commit[-max(1, n // 10):]
    return {
        "shards": n_shards, "units": len(units), "commits": n,
        "req_first": statistics.mean(r for _, r, _ in head),
        "req_last": statistics.mean(r for _, r, _ in tail),
        "ms_first": 1000 * statistics.median(s for s, _, _ in head),
        "ms_last": 1000 * statistics.median(s for s, _, _ in tail),
        "manifest_kb": per_commit[-1][2] / 1024, "driver_mb": mem / 2**20,
        "resume_s": resume_s, "resume_req": resume_req, "pending": pending,
        "read_s": read_s, "read_req": read_req, "files": len(files),
    }


def simulate_s3_days(days: float, commits: int, units: int = 42, actors: int = 4,
                     trace_memory: bool = False) -> dict:
    """The commit protocol on S3 (moto) with the real lock over ``days`` simulated days.
    Timings with ``trace_memory`` off (tracemalloc slows every allocation); the driver's heap
    growth with it on."""
    import os

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from s3_counting import CountingS3
    from salmap.pipeline.accounting import HeldSampler, UnitAccounting
    from salmap.pipeline.lock import RunLock
    from salmap.pipeline.storage import Store

    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(k, v)
    cfg = config(units)
    us = units_of(cfg)[:units]
    per_unit = -(-commits // len(us))
    shards = [f"s3://in/shard-{i:06d}.tar" for i in range(per_unit)]
    waves = waves_of(shards, 1)
    span = days * 86400.0
    step = span / (per_unit * len(us))
    data = tiny_parquet()
    rows: list[dict] = []
    with CountingS3() as s3:
        store = Store.open("s3://bkt/runs/sim", s3.storage)
        lock = RunLock(store, lease_s=3600)
        lock.acquire()
        run = _Run(cfg, "sim", store, us, Ledger.load(store), per_unit, [], time.time(),
                   out=lambda *a: None, lock=lock)
        run.waves_total = per_unit * len(us)
        run.held = HeldSampler("GPU")
        run.extra["cluster"] = {"peak_actors": 0}
        for u in us:
            run.accounting[u.id] = UnitAccounting(u.id, "GPU", 1.0)
        clock, n, batch, n_entries = 0.0, 0, 0, 0
        trackers = {u.id: WaveTracker(u.id, u.config_hash, waves, {}) for u in us}
        if trace_memory:
            tracemalloc.start()
        mem0 = tracemalloc.get_traced_memory()[0]
        for wave in waves:
            for u in us:
                # what happened on the cluster since the last commit (simulated time)
                end = clock + step
                t = clock
                while t < end:
                    run.held.add(t, 4.0, 4.0)
                    t += 1.0
                acc = run.accounting[u.id]
                entries = []
                while batch * 2.0 < end:
                    for a in range(actors):
                        entries.append((f"actor-{u.id}-{a}", "cuda:0", 0,
                                        int(batch * 2000), 1900, 32))
                    batch += 1
                acc.add(entries)
                n_entries += len(entries)
                clock = end
                name = wave.shards[0].rsplit("/", 1)[1][:-4]
                key = f"{u.data_prefix}/{wave.id}/part-0.parquet"
                store.write_bytes(key, data)  # the stubbed write stage
                tr = trackers[u.id]
                tr.add_file(key, [(f"{name}/0", name, 1, "ok")])
                tr.add_marker(name, 1, "truncated tar (simulated)" if n % 4 == 0 else "")
                (record,) = tr.ready()
                mark = s3.log.mark()
                t0 = time.perf_counter()
                run.commit(u, record)
                seconds = time.perf_counter() - t0
                t1 = time.perf_counter()
                with run.commit_lock:  # what a commit computes under the global lock
                    run.manifest("running", running=True)
                locked = time.perf_counter() - t1
                rows.append({"s": seconds, "locked": locked, "req": len(s3.log.since(mark)),
                             "kinds": s3.log.counts(mark)})
                n += 1
        mem = tracemalloc.get_traced_memory()[0] - mem0
        if trace_memory:
            tracemalloc.stop()
        lock.release()
        mark = s3.log.mark()
        resumed = Ledger.load(store)
        resume = s3.log.counts(mark)
        records = sum(t.waves for t in resumed.totals.values())
    k = max(1, len(rows) // 10)
    head, tail = rows[:k], rows[-k:]
    return {
        "days": days, "units": len(us), "commits": len(rows),
        "req_first": statistics.mean(r["req"] for r in head),
        "req_last": statistics.mean(r["req"] for r in tail),
        "kinds": dict(sum((r["kinds"] for r in tail), start=type(rows[0]["kinds"])())),
        "ms_first": 1000 * statistics.median(r["s"] for r in head),
        "ms_last": 1000 * statistics.median(r["s"] for r in tail),
        "locked_first": 1000 * statistics.median(r["locked"] for r in head),
        "locked_last": 1000 * statistics.median(r["locked"] for r in tail),
        "failures": len(run.ledger.shard_failures), "held_samples": int(span),
        "batches": n_entries, "driver_mb": mem / 2**20,
        "resume_records": records, "resume_requests": dict(resume),
    }


def main_s3(args) -> None:
    r = simulate_s3_days(args.s3_days, args.commits, args.units)
    r["driver_mb"] = None
    if args.memory:
        r["driver_mb"] = simulate_s3_days(args.s3_days, args.commits, args.units,
                                          trace_memory=True)["driver_mb"]
    kinds = ", ".join(f"{k} {v / max(1, r['commits'] // 10):.2f}" for k, v in sorted(r["kinds"].items()))
    print(f"## Commit protocol on S3 (moto, requests counted at the server, real lock), "
          f"{r['days']:g} simulated days\n")
    print("| units | commits | requests/commit (first 10% / last 10%) | last 10% by kind | "
          "ms/commit (median, first / last 10%) | ms under the global lock (first / last) | "
          "failed shards | held samples | actor batches | driver MiB | resume: requests |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {r['units']} | {r['commits']} | {r['req_first']:.2f} / {r['req_last']:.2f} | "
          f"{kinds} | {r['ms_first']:.2f} / {r['ms_last']:.2f} | {r['locked_first']:.2f} / "
          f"{r['locked_last']:.2f} | {r['failures']} | {r['held_samples']} | {r['batches']} | "
          f"{'-' if r['driver_mb'] is None else format(r['driver_mb'], '.1f')} | "
          f"{r['resume_records']} records: "
          f"{', '.join(f'{k} {v}' for k, v in sorted(r['resume_requests'].items()))} |",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--units", type=int, default=42)
    p.add_argument("--per-wave", type=int, default=8)
    p.add_argument("--device", default=None, help="not used: nothing runs on a device")
    p.add_argument("--s3-days", type=float, default=None,
                   help="the commit protocol on S3 (moto) over this many simulated days")
    p.add_argument("--commits", type=int, default=2000, help="with --s3-days: commits in all")
    p.add_argument("--memory", action="store_true",
                   help="with --s3-days: a second run under tracemalloc for the driver's heap")
    args = p.parse_args()
    if args.s3_days is not None:
        main_s3(args)
        return
    print("## Control plane by simulation (in-memory counting store, Ray stubbed)\n")
    print("| shards | units | commits | requests/commit (first 10% / last 10%) | ms/commit "
          "(median, first / last) | manifest KiB | driver MiB | resume: s, requests | "
          "read: s, requests, files |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.shards:
        r = simulate(n, args.units, args.per_wave)
        r["driver_mb"] = simulate(n, args.units, args.per_wave, trace_memory=True)["driver_mb"]
        print(f"| {r['shards']} | {r['units']} | {r['commits']} | {r['req_first']:.2f} / "
              f"{r['req_last']:.2f} | {r['ms_first']:.2f} / {r['ms_last']:.2f} | "
              f"{r['manifest_kb']:.1f} | {r['driver_mb']:.1f} | {r['resume_s']:.2f}, "
              f"{r['resume_req']} | {r['read_s']:.2f}, {r['read_req']}, {r['files']} |",
              flush=True)


if __name__ == "__main__":
    main()
