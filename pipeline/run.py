"""The job: plan, then for each unit and wave one Ray Data execution, then commit.

read_webdataset (raw bytes, one task per shard) -> decode (CPU tasks) -> Explainer actors
(one pool per unit) -> post (CPU tasks) -> write_parquet (fixed names, overwrite, one folder
per wave) -> reconcile row counts -> commit record -> manifest.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.dataset as pads

from . import __version__
from .cluster import configure_data_context, gpus_per_actor, init_ray, units_that_fit
from .commit import (
    MANIFEST_KEY,
    RunLock,
    load_commits,
    remove_uncommitted,
    write_commit,
)
from .config import (
    ConfigError,
    SalmapConfig,
    metric_specs,
    parse_targets,
    stable_hash,
    to_container,
)
from .decode import DecodeSpec, decode_batch, shard_name
from .interrupt import interrupt_reason, mark_interrupted
from .plan import Unit, Wave, expand_shards, load_shard_index, units_of, waves_of
from .progress import ProgressReporter
from .storage import Store, check_job_storage, open_filesystem

log = logging.getLogger("salmap")

EXIT_OK, EXIT_INTERNAL, EXIT_CONFIG, EXIT_INCOMPLETE, EXIT_LOCKED = 0, 1, 2, 3, 4


@dataclass
class RunResult:
    run_id: str
    output: str
    exit_code: int
    units: dict[str, dict] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    did_work: bool = False
    report: str | None = None


def versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import torchvision

    return {"salmap": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "ray": ray.__version__, "pyarrow": pyarrow.__version__,
            "python": sys.version.split()[0]}


def resolve_run_id(cfg: SalmapConfig) -> str:
    return cfg.run.id or dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%d-%H%M%S")


# CPU asks of the stages around the actors. Read, post and write mostly wait on I/O; keeping
# them small matters on small nodes: Ray places a task on one node, so a 1-CPU task cannot
# start on two 1-CPU nodes that each hold a 0.5-CPU actor, and the execution waits forever.
IO_TASK_CPUS = 0.25
DECODE_TASK_CPUS = 0.5


# -- one wave of one unit ---------------------------------------------------------------
class _Decode:
    """Decode stage callable (a plain function object, so it runs as stateless CPU tasks)."""

    def __init__(self, spec: DecodeSpec) -> None:
        self.spec = spec

    def __call__(self, df):  # pandas block from read_webdataset
        rows = df.to_dict("records")
        return decode_batch(rows, self.spec)


class _Post:
    def __init__(self, post_metrics: dict[str, dict], curves: bool, metadata: dict[str, str],
                 progress=None) -> None:
        self.post_metrics = post_metrics
        self.curves = curves
        self.metadata = metadata
        self.progress = progress

    def __call__(self, batch):
        from .post import post_batch

        table = post_batch(batch, self.post_metrics, self.curves, self.metadata)
        if self.progress is not None:
            self.progress.add.remote(len(set(batch["sample_id"])))
        return table


def _filename_provider():
    """Deterministic file names (``part-<task>.parquet``): a retried wave overwrites its own
    files instead of adding new ones next to them."""
    from ray.data.datasource import FilenameProvider

    class FixedNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:  # noqa: ARG002
            return f"part-{task_index:06d}.parquet"

    return FixedNames()


def split_metrics(cfg: SalmapConfig) -> tuple[dict[str, dict], dict[str, dict], bool]:
    """(model-side metrics, post-stage metrics, curves wanted)."""
    specs = metric_specs(cfg)
    try:
        from workers.metrics import METRICS
    except ImportError:
        METRICS = {}
    model, post = {}, {}
    for name, params in specs.items():
        kind = METRICS.get(name, {}).get("kind") if isinstance(METRICS.get(name), dict) else \
            getattr(METRICS.get(name), "kind", None)
        (model if kind == "model" else post)[name] = params
    curves = any(p.get("curves") for p in specs.values())
    return model, post, curves


def execute_wave(cfg: SalmapConfig, unit: Unit, wave: Wave, store: Store, model_pre,
                 index: dict[str, int] | None = None, progress=None) -> dict:
    """Run one Ray Data execution for (unit, wave); return the reconciled commit record."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from workers.actor import ActorSpec, Explainer

    t0 = time.time()
    mode, k = parse_targets(cfg.targets)
    model_metrics, post_metrics, curves = split_metrics(cfg)
    in_fs, _ = open_filesystem(wave.shards[0], cfg.storage)
    paths = [s[len("s3://"):] if s.startswith("s3://") else s for s in wave.shards]
    ds = ray.data.read_webdataset(paths, filesystem=in_fs, decoder=None,
                                  override_num_blocks=len(paths), num_cpus=IO_TASK_CPUS)
    dspec = DecodeSpec(
        image_keys=tuple(cfg.input.image_keys), label_key=cfg.input.label_key,
        boxes_key=cfg.input.boxes_key, crop=model_pre.crop, resize=model_pre.resize,
        max_pixels=cfg.input.max_pixels,
    )
    ds = ds.map_batches(_Decode(dspec), batch_format="pandas",
                        batch_size=cfg.resources.decode_batch_size, num_cpus=DECODE_TASK_CPUS)
    spec = ActorSpec(
        model={"name": unit.model.name, "source": unit.model.source, "weights": unit.model.weights,
               "target_layer": unit.model.target_layer, "input_size": unit.model.input_size,
               "arch": unit.model.arch},
        method=unit.method.name, method_params=dict(unit.method.params), targets=mode, topk=k,
        metrics=model_metrics, precision=cfg.resources.precision,
        channels_last=cfg.resources.channels_last, compile=cfg.resources.compile,
    )
    gpus = gpus_per_actor(cfg)
    batch_size = unit.method.batch_size or cfg.resources.batch_size
    map_kwargs: dict[str, Any] = {"num_gpus": gpus} if gpus > 0 else {"num_cpus": cfg.resources.cpus_per_actor}
    ds = ds.map_batches(
        Explainer, fn_constructor_args=(spec,), batch_size=batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=cfg.resources.actors_per_unit,
                                  max_tasks_in_flight_per_actor=cfg.resources.max_tasks_in_flight_per_actor),
        **map_kwargs,
    )
    metadata = {
        "salmap.config": json.dumps(_public_config(cfg), sort_keys=True, default=str),
        "salmap.versions": json.dumps(versions(), sort_keys=True),
        "salmap.unit": unit.id, "salmap.config_hash": unit.config_hash, "salmap.wave": wave.id,
        "salmap.normalization": json.dumps({"mean": list(model_pre.mean), "std": list(model_pre.std),
                                            "crop": model_pre.crop, "resize": model_pre.resize}),
    }
    ds = ds.map_batches(_Post(post_metrics, curves, metadata, progress), batch_format="numpy",
                        batch_size=64, num_cpus=IO_TASK_CPUS)
    out_fs, out_root = open_filesystem(store.url(f"{unit.data_prefix}/wave={wave.id}"), cfg.storage)
    ds.write_parquet(out_root, filesystem=out_fs, mode="overwrite",
                     filename_provider=_filename_provider(), compression="zstd",
                     ray_remote_args={"num_cpus": IO_TASK_CPUS})
    return reconcile(store, unit, wave, time.time() - t0, index)


def reconcile(store: Store, unit: Unit, wave: Wave, elapsed: float,
              index: dict[str, int] | None = None) -> dict:
    """Count what the wave wrote; refuse to commit duplicates, rows of foreign shards, or fewer
    samples than the shard index says a shard holds."""
    prefix = f"{unit.data_prefix}/wave={wave.id}"
    files = [f for f in store.list(prefix) if f.endswith(".parquet")]
    expected_shards = {shard_name(s) for s in wave.shards}
    per_shard: dict[str, dict[str, int]] = {s: {"samples": 0, "rows": 0, "errors": 0} for s in expected_shards}
    seen: set[tuple[str, int]] = set()
    samples: set[str] = set()
    rows = errors = 0
    if files:
        dset = pads.dataset([store.path(f) for f in files], filesystem=store.fs, format="parquet")
        tbl = dset.to_table(columns=["sample_id", "shard", "target", "status"])
        for sid, shard, target, status in zip(*(tbl.column(c).to_pylist() for c in
                                                ("sample_id", "shard", "target", "status"))):
            key = (sid, -1 if target is None else int(target))
            if key in seen:
                raise RuntimeError(f"duplicate row for sample {sid!r} target {target} in {prefix}")
            seen.add(key)
            if shard not in per_shard:
                raise RuntimeError(f"row of unexpected shard {shard!r} in {prefix}")
            if sid not in samples:
                samples.add(sid)
                per_shard[shard]["samples"] += 1
            per_shard[shard]["rows"] += 1
            rows += 1
            if status != "ok":
                per_shard[shard]["errors"] += 1
                errors += 1
    for shard, expected in (index or {}).items():
        if shard in per_shard and per_shard[shard]["samples"] != expected:
            raise RuntimeError(
                f"shard {shard}: {per_shard[shard]['samples']} samples have rows but its index "
                f"(shards.json) lists {expected}; the shard is unreadable past some point or the index is stale"
            )
    return {
        "unit": unit.id, "wave": wave.id, "config_hash": unit.config_hash,
        "shards": sorted(expected_shards), "files": files, "rows": rows, "errors": errors,
        "samples": len(samples), "per_shard": per_shard, "elapsed_s": round(elapsed, 3),
        "committed_at": time.time(),
    }


# -- the whole run ------------------------------------------------------------------------
def _public_config(cfg: SalmapConfig) -> dict:
    """The resolved config as stored in the manifest (it never holds credentials)."""
    return to_container(cfg)


def check_compatible(manifest: dict, cfg: SalmapConfig, units: list[Unit], shards: list[str]) -> None:
    """Same run id, different work: refuse unless run.extend says new units/shards are fine."""
    old_units = manifest.get("units", {})
    for u in units:
        old = old_units.get(u.id)
        if old and old.get("config_hash") != u.config_hash:
            raise ConfigError(
                f"run {manifest.get('run_id')!r} was started with a different config for unit "
                f"{u.id} (hash {old.get('config_hash')} vs {u.config_hash}); use a new run.id, or "
                "restore the original config to resume"
            )
    new_units = [u.id for u in units if u.id not in old_units]
    old_shards = set(manifest.get("shards", []))
    new_shards = [shard_name(s) for s in shards if shard_name(s) not in old_shards]
    if (new_units or new_shards) and not cfg.run.extend and old_units:
        what = []
        if new_units:
            what.append(f"new units {', '.join(new_units)}")
        if new_shards:
            what.append(f"{len(new_shards)} new shard(s) (e.g. {new_shards[0]})")
        raise ConfigError(
            f"run {manifest.get('run_id')!r} exists and this config adds {' and '.join(what)}; "
            "pass run.extend=true to add them to the run, or use a new run.id"
        )


def build_manifest(store: Store, run_id: str, cfg: SalmapConfig, units: list[Unit], shards: list[str],
                   started: float, failures: list[str], status: str, previous: dict | None) -> dict:
    commits = load_commits(store)
    all_shards = sorted(set((previous or {}).get("shards", [])) | {shard_name(s) for s in shards})
    prev_units = (previous or {}).get("units", {})
    unit_ids = list(dict.fromkeys([*prev_units, *(u.id for u in units)]))
    by_id = {u.id: u for u in units}
    out_units = {}
    for uid in unit_ids:
        recs = commits.get(uid, {})
        per_shard: dict[str, dict] = {}
        for rec in recs.values():
            per_shard.update(rec["per_shard"])
        u = by_id.get(uid)
        base = prev_units.get(uid, {})
        elapsed = sum(r["elapsed_s"] for r in recs.values())
        samples = sum(r["samples"] for r in recs.values())
        out_units[uid] = {
            "model": u.model.name if u else base.get("model"),
            "method": u.method.name if u else base.get("method"),
            "config_hash": u.config_hash if u else base.get("config_hash"),
            "data": u.data_prefix if u else base.get("data"),
            "rows": sum(r["rows"] for r in recs.values()),
            "errors": sum(r["errors"] for r in recs.values()),
            "samples": samples,
            "shards_committed": sorted(per_shard),
            "shards_pending": sorted(set(all_shards) - set(per_shard)),
            "per_shard": per_shard,
            "files": [f for _, r in sorted(recs.items()) for f in r["files"]],
            "elapsed_s": round(elapsed, 3),
            "images_per_s": round(samples / elapsed, 3) if elapsed > 0 else None,
            "summary": base.get("summary"),
        }
    return {
        "run_id": run_id, "status": status, "salmap_format": 1,
        "output": store.uri, "config": _public_config(cfg),
        "config_hash": stable_hash({u: v["config_hash"] for u, v in out_units.items()}),
        "versions": versions(), "shards": all_shards, "units": out_units,
        "failures": failures,
        "started": (previous or {}).get("started", started), "updated": time.time(),
        "read_rule": "committed rows = the files listed under units.*.files (or _commits/*/*.json)",
    }


def run_job(cfg: SalmapConfig, out=print) -> RunResult:
    """Plan, execute pending waves, commit; returns the outcome and the exit code."""
    run_id = resolve_run_id(cfg)
    check_job_storage(cfg)  # a dead endpoint, bad credentials, a missing bucket: one line, fast
    store = Store.open(f"{cfg.run.output.rstrip('/')}/{run_id}", cfg.storage)
    missing: list[str] = []
    shards = expand_shards(cfg.input.shards, cfg.storage, missing=missing)
    units = units_of(cfg)
    previous = store.read_json(MANIFEST_KEY) if store.exists(MANIFEST_KEY) else None
    if previous:
        check_compatible(previous, cfg, units, shards)
    lock = RunLock(store, lease_s=cfg.run.lock_lease_s)
    lock.acquire()
    result = RunResult(run_id=run_id, output=store.uri, exit_code=EXIT_OK)
    started = time.time()
    try:
        removed = remove_uncommitted(store, {u.id: u.data_prefix for u in units})
        if removed:
            out(f"salmap: removed {len(removed)} uncommitted wave folder(s) left by an interrupted attempt")
        commits = load_commits(store)
        plan: list[tuple[Unit, list[Wave]]] = []
        for u in units:
            done = {s for rec in commits.get(u.id, {}).values() for s in rec["shards"]}
            pending = [s for s in shards if shard_name(s) not in done]
            plan.append((u, waves_of(pending, cfg.run.shards_per_wave)))
        total_waves = sum(len(w) for _, w in plan)
        failures: list[str] = [f"shard {shard_name(m)} is missing: {m} does not exist" for m in missing]
        for f in failures:
            out(f"salmap: FAILED {f}")
        manifest = build_manifest(store, run_id, cfg, units, shards, started, failures,
                                  "running" if total_waves else "complete", previous)
        store.write_json(MANIFEST_KEY, manifest)
        if total_waves == 0:
            if failures:
                out(f"salmap: run {run_id!r}: nothing left to do for the shards that exist")
            else:
                out(f"salmap: run {run_id!r} is already complete: every unit has committed every "
                    "shard; nothing to do")
            result.units = manifest["units"]
            result.failures = failures
            result.exit_code = EXIT_INCOMPLETE if failures else EXIT_OK
            return result
        result.did_work = True
        init_ray(cfg)
        configure_data_context(cfg)
        from workers.models import load_model

        out(f"salmap: run {run_id} -> {store.uri} ({len(shards)} shard(s), {len(units)} unit(s), "
            f"{total_waves} wave(s) to do)")
        index = load_shard_index(shards, cfg.storage)
        done_waves = 0
        commit_lock = threading.Lock()  # commit records, manifest and counters across unit threads

        def run_unit(unit: Unit, waves: list[Wave]) -> None:
            nonlocal done_waves
            pre = load_model(unit.model.source, unit.model.weights, unit.model.target_layer,
                             unit.model.input_size, unit.model.arch).preprocess
            pending = [s for w in waves for s in w.shards]
            total = sum(index.get(shard_name(s), 0) for s in pending) \
                if all(shard_name(s) in index for s in pending) else None
            reporter = ProgressReporter(unit.id, total, cfg, out)
            try:
                for wave in waves:
                    records = _run_wave_isolating(cfg, unit, wave, store, pre, failures, out, index,
                                                  reporter.counter)
                    with commit_lock:
                        for rec in records:
                            lock.check()  # fencing: never commit after losing the lock
                            write_commit(store, unit.id, rec["wave"], rec)
                            store.write_json(MANIFEST_KEY, build_manifest(
                                store, run_id, cfg, units, shards, started, failures, "running",
                                previous))
                        done_waves += 1
                        rate = sum(r["samples"] for r in records) / max(
                            1e-9, sum(r["elapsed_s"] for r in records)) if records else 0.0
                        out(f"salmap: [{done_waves}/{total_waves}] {unit.id} wave {wave.id}: "
                            f"{sum(r['rows'] for r in records)} rows, {rate:.2f} images/s")
            finally:
                reporter.stop()

        todo = [(u, w) for u, w in plan if w]
        wanted = max(1, min(cfg.resources.units_in_parallel, len(todo)))
        parallel = units_that_fit(cfg, wanted) if wanted > 1 else 1
        if parallel < wanted:
            out(f"salmap: running {parallel} unit(s) at once, not {wanted}: the cluster's CPUs/GPUs "
                "hold no more actor pools with a CPU left for reading")
        if parallel == 1:
            for unit, waves in todo:
                run_unit(unit, waves)
        else:
            # each unit is its own Ray Data execution with its own actor pool; running several at
            # once keeps several devices busy when the cluster has them
            with ThreadPoolExecutor(parallel, thread_name_prefix="salmap-unit") as pool:
                for fut in [pool.submit(run_unit, u, w) for u, w in todo]:
                    fut.result()
        status = "complete" if not failures else "incomplete"
        manifest = build_manifest(store, run_id, cfg, units, shards, started, failures, status, previous)
        manifest["units"] = add_summaries(store, manifest["units"])
        try:
            from .summary import run_win_percent

            manifest["win_percent_average_drop"] = run_win_percent(store, manifest["units"])
        except Exception as err:  # noqa: BLE001 - a summary never fails a run
            manifest["win_percent_average_drop"] = {"error": f"{type(err).__name__}: {err}"}
        manifest["finished"] = time.time()
        lock.check()
        store.write_json(MANIFEST_KEY, manifest)
        result.units = manifest["units"]
        result.failures = failures
        result.exit_code = EXIT_INCOMPLETE if failures else EXIT_OK
        return result
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM under sigterm_as_interrupt
        mark_interrupted(store, interrupt_reason(err))
        raise
    finally:
        lock.release()


def _run_wave_isolating(cfg: SalmapConfig, unit: Unit, wave: Wave, store: Store, pre,
                        failures: list[str], out, index=None, progress=None) -> list[dict]:
    """Run a wave; if it fails, run its shards one by one so one bad shard fails alone."""
    prefix = f"{unit.data_prefix}/wave={wave.id}"
    try:
        return [execute_wave(cfg, unit, wave, store, pre, index, progress)]
    except Exception as err:  # noqa: BLE001
        store.delete_dir(prefix)
        if len(wave.shards) == 1:
            reason = _one_line(err)
            failures.append(f"{unit.id}: shard {shard_name(wave.shards[0])} failed: {reason}")
            out(f"salmap: FAILED {unit.id} shard {shard_name(wave.shards[0])}: {reason}")
            return []
    records = []
    for shard in wave.shards:
        records.extend(_run_wave_isolating(cfg, unit, Wave([shard]), store, pre, failures, out,
                                           index, progress))
    return records


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    # Ray wraps the user exception; keep its last meaningful line
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else type(err).__name__


def add_summaries(store: Store, units: dict[str, dict]) -> dict[str, dict]:
    """Per unit: mean and 95% bootstrap interval of every metric column, error counts."""
    try:
        from .summary import unit_summary
    except ImportError:
        return units
    for u in units.values():
        if not u.get("files"):
            continue
        try:
            u["summary"] = unit_summary(store, u["files"])
        except Exception as err:  # noqa: BLE001 - a summary must never fail a run
            u["summary"] = {"error": f"{type(err).__name__}: {err}"}
    return units
