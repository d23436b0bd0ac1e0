"""The job on the driver: plan, check what is committed, run each unit's streaming
execution (:mod:`salmap.pipeline.execute`) and commit its waves as they complete
(:mod:`salmap.pipeline.ledger`), then summarise.

This module orchestrates; the pieces live by job: resume checks and the plan file in
:mod:`.resume`, the driver's shared state and the commit in :mod:`.driver`, how many units
and actors at once in :mod:`.pools` (policy: :mod:`.cluster`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field

from .accounting import HeldSampler, actor_lifetimes
from .aggregate import wave_sample_size
from .cluster import configure_data_context, gpus_per_actor, init_ray
from .commit_record import CommitRecord
from .config import (
    ConfigError,
    SalmapConfig,
    parse_targets,
    pseudo_label_options,
    split_metrics,
    to_container,
)
from .decode import DecodeSpec, shard_name
from .driver import DriverState, public_config, versions
from .errors import root_cause
from .execute import UnitExecution, WriteSpec, run_unit
from .interrupt import interrupt_reason, mark_interrupted
from .ledger import (
    MANIFEST_KEY,
    PLAN_KEY,
    next_generation,
    remove_uncommitted,
    start_ledger,
)
from .lock import LockLost, RunLock
from .plan import Unit, Wave, expand_shards, load_shard_index, units_of, waves_of
from .pools import plan_run
from .progress import ProgressLine
from .ray_failure import (
    RayFailure,
    local_ray_processes,
    ray_failure,
    recorded_death,
    watch_ray_errors,
)
from .redact import redact, redact_obj
from .resume import check_compatible, reconcile_changed_shards, write_plan
from .resume_check import redo_waves_with_missing_files
from .rollup import ledger_aggregates
from .storage import Store, check_job_storage
from .supervise import note
from .tracker import WaveTracker

log = logging.getLogger("salmap")

# the names this module had before the split (tests and benchmarks import them from here)
_Run = DriverState
_public_config = public_config  # looked up here at each call: a test may replace it
__all__ = ["DriverState", "RunResult", "check_compatible", "plan_run", "reconcile_changed_shards",
           "run_job", "unit_execution", "versions"]

EXIT_OK, EXIT_INTERNAL, EXIT_CONFIG, EXIT_INCOMPLETE, EXIT_LOCKED = 0, 1, 2, 3, 4
EXIT_ERROR_RATE = 5  # every shard done, but some unit's error rows exceed run.max_error_rate


@dataclass
class RunResult:
    run_id: str
    output: str
    exit_code: int
    units: dict[str, dict] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    did_work: bool = False
    report: str | None = None
    # unit id -> aggregate of its committed rows (pipeline.aggregate), for the report, which
    # then reads neither the commit records nor the rows for its tables
    aggregates: dict | None = field(default=None, repr=False)
    # unit -> share of its rows with status "error"; the units above run.max_error_rate
    error_rates: dict[str, float] = field(default_factory=dict)
    over_error_rate: list[str] = field(default_factory=list)
    max_error_rate: float | None = None



def resolve_run_id(cfg: SalmapConfig) -> str:
    """``run.id``, or a new one from the time (``run-YYYYmmdd-HHMMSS``, UTC)."""
    return cfg.run.id or dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%d-%H%M%S")





def error_rates(units: dict[str, dict]) -> dict[str, float]:
    """unit -> share of its committed rows with status ``error`` (units with rows)."""
    return {uid: u.get("errors", 0) / u["rows"] for uid, u in units.items() if u.get("rows")}


def _ending(result: RunResult, cfg: SalmapConfig, m: dict, failures: list[str]) -> None:
    """The exit code from the failures and the error rates (recorded in the manifest ``m``)."""
    result.units, result.failures = m["units"], [redact(f) for f in failures]
    result.max_error_rate = cfg.run.max_error_rate
    result.error_rates = error_rates(m["units"])
    result.over_error_rate = sorted(u for u, r in result.error_rates.items()
                                    if r > cfg.run.max_error_rate)
    m["error_rate"] = {"max": cfg.run.max_error_rate,
                       "units": {u: round(r, 6) for u, r in result.error_rates.items()},
                       "over": result.over_error_rate}
    result.exit_code = (EXIT_INCOMPLETE if result.failures else
                        EXIT_ERROR_RATE if result.over_error_rate else EXIT_OK)


def _write_report(run: DriverState, result: RunResult, m: dict) -> None:
    """The HTML report, under the run's lock; ``m["report"]`` says whether it was written, so
    that a run interrupted before it was (``pending``) gets it from the next ``salmap run``."""
    try:
        from .report import write_report

        result.report = write_report(run.store.uri, storage=run.cfg.storage,
                                     aggregates=result.aggregates)
        m["report"] = {"status": "written", "path": result.report}
    except ImportError as err:
        m["report"] = {"status": "not written", "error": f"{type(err).__name__}: {err}"}
    except Exception as err:  # noqa: BLE001 - the report never fails a run
        m["report"] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        run.out(f"salmap: report not written: {type(err).__name__}: {err}")
    m["updated"] = time.time()
    run.lock.check()
    run.store.write_json(MANIFEST_KEY, redact_obj(m))


def run_job(cfg: SalmapConfig, out=print, report: bool = False) -> RunResult:
    """Plan, execute pending work, commit; returns the outcome and the exit code. ``report``
    (``salmap run``, :func:`salmap.pipeline.api.run`): also the HTML report when ``run.report``, under
    the run's lock, and a report an interrupted run still owes. Everything it prints and stores
    passes :func:`salmap.pipeline.redact.redact`."""
    run_id = resolve_run_id(cfg)
    report = report and cfg.run.report
    printer = out
    out = lambda line: printer(redact(line))  # noqa: E731
    check_job_storage(cfg)  # a dead endpoint, bad credentials, a missing bucket: one line, fast
    store = Store.open(f"{cfg.run.output.rstrip('/')}/{run_id}", cfg.storage)
    missing: list[str] = []
    identity: dict[str, dict] = {}
    shards = expand_shards(cfg.input.shards, cfg.storage, missing=missing, identity=identity)
    units = units_of(cfg)
    lock = RunLock(store, lease_s=cfg.run.lock_lease_s)
    lock.acquire(next_generation(store))
    note(run={"store": store.uri, "storage": to_container(cfg)["storage"], "run_id": run_id,
              "lock_owner": lock.owner})
    result = RunResult(run_id=run_id, output=store.uri, exit_code=EXIT_OK)
    run: DriverState | None = None
    try:
        previous = store.read_json_if_exists(MANIFEST_KEY)
        if previous and previous.get("salmap_format", 1) < 2:
            raise ConfigError(f"run {run_id!r} was written by an older salmap (format "
                              f"{previous.get('salmap_format', 1)}); use a new run.id")
        plan_before = store.read_json_if_exists(PLAN_KEY)
        # this driver's generation: the records that count now are adopted, any record a
        # driver that lost the lock writes from here on is ignored (pipeline.ledger)
        ledger, commits = start_ledger(store, lock.generation, lock.owner, out)
        lost = redo_waves_with_missing_files(store, ledger, commits, {u.id for u in units}, out)
        check_compatible(run_id, ledger, plan_before, cfg, units, shards, previous)
        index = load_shard_index(shards, cfg.storage)
        for name, n in index.items():
            identity.setdefault(name, {})["samples"] = n
        reconcile_changed_shards(ledger, cfg, run_id, identity, out)
        redo = {u.id: {w.id for w in waves_of([s for s in shards if shard_name(s) not in
                                               ledger.committed(u.id)], cfg.run.shards_per_wave,
                                              cfg.run.samples_per_wave, index)} for u in units}
        kept: set[tuple[str, str]] = set()
        removed = remove_uncommitted(store, ledger, {u.id: u.data_prefix for u in units}, redo,
                                     kept)
        if removed:
            out(f"salmap: removed {len(removed)} uncommitted wave folder(s) left by an "
                "interrupted attempt")
        write_plan(store, plan_before, shards, identity, units)
        run = DriverState(cfg, run_id, store, units, ledger, len({*(plan_before or {}).get("shards", {}),
                                                          *map(shard_name, shards)}),
                   [f"shard {shard_name(m)} is missing: {m} does not exist" for m in missing],
                   (previous or {}).get("started", time.time()), out, lock)
        run.failures.extend(lost)
        run.dirty = kept
        for f in run.failures:
            out(f"salmap: FAILED {f}")
        report_due = (previous or {}).get("report")
        if report_due:  # kept until a report is written (an interrupt may come before)
            run.extra["report"] = report_due
        todo: list[tuple[Unit, list[Wave]]] = []
        for u in units:
            done = ledger.committed(u.id)
            pending = [s for s in shards if shard_name(s) not in done]
            waves = waves_of(pending, cfg.run.shards_per_wave, cfg.run.samples_per_wave, index)
            if waves:
                todo.append((u, waves))
        total_waves = run.waves_total = sum(len(w) for _, w in todo)
        if total_waves == 0:
            m = run.manifest("complete" if not run.all_failures() else "incomplete")
            _ending(result, cfg, m, run.all_failures())
            run.store.write_json(MANIFEST_KEY, m)
            if run.all_failures():
                out(f"salmap: run {run_id!r}: nothing left to do for the shards that exist")
            else:
                out(f"salmap: run {run_id!r} is already complete: every unit has committed every "
                    "shard; nothing to do")
            if report and (report_due or {}).get("status") == "pending":
                out(f"salmap: run {run_id!r} was interrupted before its report was written; "
                    "writing it now")
                _write_report(run, result, m)
            return result
        if report:
            run.extra["report"] = {"status": "pending"}
        run.write_manifest("running")
        result.did_work = True
        init_ray(cfg)
        from .logs import is_verbose

        note(ray_pids=local_ray_processes())
        watch_ray_errors(is_verbose(), on_death=lambda what: note(death=what))
        configure_data_context(cfg)
        out(f"salmap: run {run_id} -> {store.uri} ({len(shards)} shard(s), {len(units)} unit(s), "
            f"{total_waves} wave(s) to do)")
        plan = plan_run(run, todo, index, previous)
        if plan.note:
            out(f"salmap: {plan.note}")
        by_id = {u.id: (u, w) for u, w in todo}
        todo = [by_id[uid] for uid in plan.order]
        run.held = HeldSampler(plan.slots.resource).start()
        try:
            from .shared import run_jobs  # units of one model share a read + decode

            run_jobs(run, todo, plan.parallel, identity, index, plan.actors)
        finally:
            run.held.stop()
        failures = run.all_failures()
        # the units' aggregates, merged by the ledger as the waves committed: no row is read
        aggregates = ledger_aggregates(store, run.ledger)
        info = add_summaries(run.unit_info(), aggregates)
        m = run.manifest("complete" if not failures else "incomplete", info)
        try:
            from .summary import run_win_percent

            m["win_percent_average_drop"] = run_win_percent(m["units"], aggregates)
        except Exception as err:  # noqa: BLE001 - a summary never fails a run
            m["win_percent_average_drop"] = {"error": f"{type(err).__name__}: {err}"}
        m["finished"] = time.time()
        _ending(result, cfg, m, failures)
        m = redact_obj(m)
        lock.check()
        store.write_json(MANIFEST_KEY, m)
        result.aggregates = aggregates
        if report:
            _write_report(run, result, m)
        return result
    except (KeyboardInterrupt, RayFailure) as err:  # Ctrl-C, SIGTERM, or Ray died under the run
        if run is not None:
            with run.commit_lock:  # from here on no unit thread starts a commit
                run.stopping.set()
            run.wait_for_commits()  # and those in flight end before the lock is released
        mark_interrupted(store, f"Ray failed: {err.what}" if isinstance(err, RayFailure)
                         else interrupt_reason(err))
        raise
    except Exception as err:  # Ray dying outside a unit (planning, summaries): interrupted too
        died = ray_failure(err)
        if not died:
            raise
        if run is not None:
            with run.commit_lock:
                run.stopping.set()
        mark_interrupted(store, f"Ray failed: {died}")
        raise RayFailure(died) from err
    finally:
        lock.release()




def unit_execution(cfg: SalmapConfig, unit: Unit, waves: list[Wave], store: Store,
                   actors: int | tuple[int, int] | None = None) -> UnitExecution:
    """The unit's pipeline, from its config (the model's geometry without building it)."""
    from salmap.workers.actor import ActorSpec
    from salmap.workers.preprocessing import preprocess_of

    mode, k = parse_targets(cfg.targets)
    model_metrics, post_metrics, curves = split_metrics(cfg)
    pre = preprocess_of(unit.model.source, unit.model.weights, unit.model.input_size,
                        unit.model.mean, unit.model.std)
    labels = pseudo_label_options(cfg)
    decode = DecodeSpec(image_keys=tuple(cfg.input.image_keys), label_key=cfg.input.label_key,
                        boxes_key=cfg.input.boxes_key, crop=pre.crop, resize=pre.resize,
                        max_pixels=cfg.input.max_pixels, mask_key=cfg.input.mask_key or "",
                        keep_image=bool(labels["crf"]))
    spec = ActorSpec(
        model={"name": unit.model.name, "source": unit.model.source, "weights": unit.model.weights,
               "target_layer": unit.model.target_layer, "input_size": unit.model.input_size,
               "arch": unit.model.arch, "reshape": unit.model.reshape,
               "params": dict(unit.model.params), "mean": unit.model.mean, "std": unit.model.std},
        method=unit.method.name, method_params=dict(unit.method.params), targets=mode, topk=k,
        metrics=model_metrics, precision=cfg.resources.precision,
        channels_last=cfg.resources.channels_last, compile=cfg.resources.compile,
        map_dtype=cfg.run.map_dtype,
    )
    metadata = {
        "salmap.config": json.dumps(_public_config(cfg), sort_keys=True, default=str),
        "salmap.versions": json.dumps(versions(), sort_keys=True),
        "salmap.unit": unit.id, "salmap.config_hash": unit.config_hash,
        "salmap.normalization": json.dumps({"mean": list(pre.mean), "std": list(pre.std),
                                            "crop": pre.crop, "resize": pre.resize}),
    }
    write = WriteSpec(store_uri=store.uri, storage=cfg.storage, data_prefix=unit.data_prefix,
                      wave_of={shard_name(s): w.id for w in waves for s in w.shards},
                      post_metrics=post_metrics, curves=curves, metadata=metadata,
                      map_dtype=cfg.run.map_dtype, png=cfg.run.saliency_png, unit_id=unit.id,
                      labels=labels)
    gpus = gpus_per_actor(cfg)
    resources = {"num_gpus": gpus} if gpus > 0 else {"num_cpus": cfg.resources.cpus_per_actor}
    return UnitExecution(
        unit=unit, waves=waves, decode=decode, actor_spec=spec, write=write,
        batch_size=unit.method.batch_size or cfg.resources.batch_size,
        actors=actors if actors is not None else _fixed_actors(cfg), actor_resources=resources,
        max_tasks_in_flight_per_actor=cfg.resources.max_tasks_in_flight_per_actor,
        decode_batch_size=cfg.resources.decode_batch_size, storage=cfg.storage,
        max_member_bytes=cfg.input.max_member_bytes,
        device_decode=cfg.resources.decode_device == "cuda"
        or (cfg.resources.decode_device == "auto" and gpus > 0))


def _fixed_actors(cfg: SalmapConfig) -> int:
    n = cfg.resources.actors_per_unit
    return 1 if n == "auto" else int(n)


MAX_ATTEMPTS = 2  # a unit's execution is retried once for its uncommitted waves


def _run_unit(run: DriverState, unit: Unit, waves: list[Wave], identity: dict, index: dict,
              actors: int | tuple[int, int] | None = None) -> None:
    """Run one unit's waves in one streaming execution; retry once if it failed after
    committing something (a transient fault), else report the root cause for its shards."""
    from .shard_count import unit_total

    total, approx = unit_total([s for w in waves for s in w.shards], index, identity,
                               run.cfg.storage) if run.cfg.ray.progress != "off" else (None, False)
    progress = ProgressLine(unit.id, total, run.cfg, run.out, approx=approx)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        base = progress.committed_samples
        tracker = WaveTracker(unit.id, unit.config_hash, waves, identity, index,
                              sample_cap=wave_sample_size(run.shards_total,
                                                          run.cfg.run.shards_per_wave))
        ex = unit_execution(run.cfg, unit, waves, run.store, actors)
        ex.identity = identity

        def on_commit(record: CommitRecord, tracker=tracker) -> None:
            try:
                run.commit(unit, record)
            except Exception:  # not durable: the wave stays pending for the unit's retry
                tracker.not_committed(record.wave)
                raise
            progress.wave_done(record)

        try:
            run_unit(ex, tracker, on_commit, lambda n, base=base: progress.update(base + n),
                     run.accounting.get(unit.id))
            break
        except LockLost:
            raise  # another driver owns the run now: stop everything, commit nothing more
        except Exception as err:  # noqa: BLE001 - reported with its root cause below
            died = ray_failure(err) or recorded_death()
            if died:  # Ray itself failed: the run is interrupted, no shard is to blame
                raise RayFailure(died) from err
            reason = root_cause(err)
            waves = tracker.pending()
            # what the failed attempt wrote for these is not committed: deleted after their
            # commit (now, a driver that lost the lock could still commit them)
            run.dirty.update((unit.id, w.id) for w in waves)
            if (tracker.done or tracker.failed_commits) and attempt < MAX_ATTEMPTS and waves:
                run.out(f"salmap: {unit.id}: execution failed after committing "
                        f"{len(tracker.done)} wave(s) ({reason}); retrying the other "
                        f"{len(waves)} wave(s)")
                continue
            fail_waves(run, unit, waves, reason)
            break
    acc = run.accounting.get(unit.id)
    if acc is not None:  # the pool is gone: Ray's actor table has each actor's lifetime
        now = time.time()
        acc.set_lifetimes({a: (start, end or now) for a, (start, end)
                           in actor_lifetimes(unit.id, run.driver_started).items()})
    progress.finish()


def fail_waves(run: DriverState, unit: Unit, waves: list[Wave], reason: str) -> None:
    """Record the unit's ``waves`` as not done, naming their shards and the reason."""
    names = [shard_name(s) for w in waves for s in w.shards]
    with run.commit_lock:
        run._fail(f"{unit.id}: {len(names)} shard(s) not done "
                  f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): {reason}")


def add_summaries(units: dict[str, dict], aggregates: dict[str, dict]) -> dict[str, dict]:
    """Per unit: mean and 95% interval of every metric column, error counts, from the unit's
    aggregate (:mod:`salmap.pipeline.aggregate`)."""
    from .summary import summary_from_aggregate

    for uid, u in units.items():
        agg = aggregates.get(uid)
        if not agg or not agg.get("rows"):
            continue
        try:
            u["summary"] = summary_from_aggregate(agg)
        except Exception as err:  # noqa: BLE001 - a summary must never fail a run
            u["summary"] = {"error": f"{type(err).__name__}: {err}"}
    return units
