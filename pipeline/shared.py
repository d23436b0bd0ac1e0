"""Units of one model share one read and one decode of every shard (issue 23).

    shards -> read -> decode (once) -> pool of unit 1 -> pool of unit 2 -> ... -> post + write
      (one Parquet file per unit, batch and wave) -> the driver, which routes each record to
      its unit's tracker and commits per unit and per wave, as :mod:`salmap.pipeline.execute` does.

Each pool still holds one model and one method (a :class:`Link` actor): it explains the
decoded samples, packs its own output rows per input sample into one bytes column
``out:<k>``, and passes the input on; the last pool drops the image tensor. The post stage
unpacks each unit's rows and writes them exactly as a unit of its own would
(:func:`salmap.pipeline.execute.post_write`), so the files, records and commits are unchanged.

Trade-offs: the units of a group progress together (a wave commits for every unit at about
the same time; a slow method holds back its siblings' waves); the decoded tensor crosses the
object store once per pool instead of once; in exchange each shard is fetched and each image
decoded once per model instead of once per unit. A group execution that fails keeps every
wave its units committed; the units' pending waves are then redone one unit at a time
(:func:`salmap.pipeline.run._run_unit`), so a broken unit fails alone.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from .accounting import UnitAccounting, pool_class_name
from .decode import SHARD_END
from .execute import (
    IO_TASK_CPUS,
    POST_BATCH,
    RECORD_COLUMNS,
    UnitExecution,
    actor_pool,
    explainer_class,
    post_write,
    read_and_decode,
    take_record,
)
from .tracker import WaveTracker

OUT = "out:"  # prefix of a unit's packed output column: out:<k>


def _row_key(batch: dict[str, np.ndarray], i: int) -> tuple[str, str, bool]:
    return (str(batch["shard"][i]), str(batch["sample_id"][i]), batch["status"][i] == SHARD_END)


def pack_rows(inputs: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> np.ndarray:
    """Per input row, the output rows that came from it (same shard, sample id and marker
    flag) as pickled column slices; b"" for none. Every output row lands on exactly one input
    row (a repeated sample id: on its first)."""
    n = len(inputs["sample_id"])
    first: dict[tuple, int] = {}
    for i in range(n):
        first.setdefault(_row_key(inputs, i), i)
    owner = np.array([first[_row_key(out, r)] for r in range(len(out["sample_id"]))],
                     dtype=np.int64)
    packed = np.empty(n, dtype=object)
    packed[:] = b""
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(n + 1))
    for i in range(n):
        rows = order[bounds[i]:bounds[i + 1]]
        if len(rows):
            packed[i] = pickle.dumps({c: v[rows] for c, v in out.items()}, protocol=5)
    return packed


def unpack_rows(column: np.ndarray) -> dict[str, np.ndarray]:
    """The inverse of :func:`pack_rows` over a whole batch: one unit's actor output rows."""
    parts = [pickle.loads(b) for b in column if len(b)]
    if not parts:
        return {}
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def link_class(unit_id: str, k: int, label_maps: bool, last: bool) -> type:
    """The actor class of unit ``k`` of a group: its explainer on the input columns, its rows
    packed into ``out:<k>``, the input passed on (without the image after the last pool).
    Named after the unit, as a unit's own pool is (:func:`salmap.pipeline.accounting.pool_class_name`)."""
    base = explainer_class(label_maps)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {c: v for c, v in batch.items() if not c.startswith(OUT)}
        out = base.__call__(self, inputs)
        passed = {c: v for c, v in batch.items() if not (last and c in ("image", "jpeg"))}
        passed[f"{OUT}{k}"] = pack_rows(inputs, out)
        return passed

    return type(pool_class_name(unit_id), (base,), {"__call__": __call__})


class _PostWriteGroup:
    """Every unit's rows of a batch -> its Parquet files and records (``unit``: its index)."""

    def __init__(self, specs: list) -> None:
        self.specs = specs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: list[dict[str, Any]] = []
        for k, spec in enumerate(self.specs):
            rows = unpack_rows(batch[f"{OUT}{k}"])
            if not rows:
                continue
            for r in post_write(rows, spec):
                out.append({**r, "unit": k})
        return {c: np.array([r[c] for r in out], dtype=object if c != "unit" else np.int64)
                for c in (*RECORD_COLUMNS, "unit")}


def build_group_dataset(exs: list[UnitExecution]):
    """One Ray Data execution for units of one model with the same decode and waves."""
    ds = read_and_decode(exs[0])
    for k, ex in enumerate(exs):
        pool = actor_pool(ex)
        udf = link_class(ex.unit.id, k, bool((ex.write.labels or {}).get("label_maps")),
                         last=k == len(exs) - 1)
        ds = ds.map_batches(udf, fn_constructor_args=(ex.actor_spec,), batch_size=ex.batch_size,
                            batch_format="numpy", compute=pool, **ex.actor_resources)
    return ds.map_batches(_PostWriteGroup([ex.write for ex in exs]), batch_format="numpy",
                          batch_size=POST_BATCH, num_cpus=IO_TASK_CPUS)


def run_group(exs: list[UnitExecution], trackers: list[WaveTracker],
              on_commit: list[Callable[[dict], None]],
              on_progress: list[Callable[[int], None] | None],
              accounting: list[UnitAccounting | None]) -> None:
    """Stream the group's execution; each unit's complete waves go to its ``on_commit`` as
    soon as they are complete. Raises what the execution raised (committed waves stay)."""
    ds = build_group_dataset(exs)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        touched = set()
        for i in range(len(batch["kind"])):
            k = int(batch["unit"][i])
            touched.add(k)
            take_record(batch, i, trackers[k], accounting[k])
        for k in sorted(touched):
            for record in trackers[k].ready():
                on_commit[k](record)
            if on_progress[k] is not None:
                on_progress[k](trackers[k].samples_written)


# -- the driver side ---------------------------------------------------------------------
def _actor_ask(ex: UnitExecution) -> tuple[float, float]:
    """(CPUs, GPUs) the unit's pool needs to start: its fixed size, or an autoscaling pool's
    minimum (it grows only into resources that are free)."""
    n = ex.actors[0] if isinstance(ex.actors, tuple) else ex.actors
    return (n * float(ex.actor_resources.get("num_cpus", 0.0)),
            n * float(ex.actor_resources.get("num_gpus", 0.0)))


def group_jobs(cfg: Any, todo: list[tuple[Any, list]], execution: Callable[[Any, list], UnitExecution],
               cluster: dict[str, float] | None = None) -> list[list[tuple[Any, list]]]:
    """``todo``'s units in jobs: units of one model with the same decode and the same pending
    waves form one job (one shared read + decode), as many as fit the cluster at once (their
    pools all run together, and one CPU stays free for the read, decode and post tasks);
    every other unit is a job of its own. Order: the first unit's place in ``todo``."""
    if not cfg.resources.share_decode:
        return [[item] for item in todo]
    if cluster is None:
        import ray

        cluster = ray.cluster_resources() if ray.is_initialized() else {}
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    jobs: list[list[tuple[Any, list]]] = []
    open_jobs: dict[tuple, list[tuple[list, float, float]]] = {}
    for unit, waves in todo:
        ex = execution(unit, waves)
        key = (unit.model.name, ex.decode, ex.device_decode, tuple(w.id for w in waves))
        c, g = _actor_ask(ex)
        for entry in open_jobs.get(key, []):
            job, used_c, used_g = entry
            if used_c + c <= cpus - 1.0 and used_g + g <= gpus + 1e-9:
                job.append((unit, waves))
                open_jobs[key].remove(entry)
                open_jobs[key].append((job, used_c + c, used_g + g))
                break
        else:
            job = [(unit, waves)]
            jobs.append(job)
            open_jobs.setdefault(key, []).append((job, c, g))
    return jobs


def run_jobs(run: Any, todo: list[tuple[Any, list]], parallel: int, identity: dict,
             index: dict, actors: dict[str, Any]) -> None:
    """Every pending unit, grouped by :func:`group_jobs`; ``parallel`` pools at most at once
    (a job of k units holds k pools)."""
    import threading

    from .run import _run_unit, unit_execution

    def execution(unit, waves):
        return unit_execution(run.cfg, unit, waves, run.store, actors.get(unit.id))

    jobs = group_jobs(run.cfg, todo, execution)
    widest = max(len(j) for j in jobs)
    threads_n = max(1, parallel // widest)

    def do(job: list) -> None:
        if len(job) == 1:
            unit, waves = job[0]
            _run_unit(run, unit, waves, identity, index, actors.get(unit.id))
        else:
            run_shared(run, job, identity, index, actors)

    if threads_n == 1:
        for job in jobs:
            do(job)
        return
    queue, errors, qlock = list(jobs), [], threading.Lock()

    def worker() -> None:
        while not run.stopping.is_set():
            with qlock:
                if not queue:
                    return
                job = queue.pop(0)
            try:
                do(job)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                errors.append(err)
                return

    threads = [threading.Thread(target=worker, name=f"salmap-job-{i}", daemon=True)
               for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)  # short joins keep the main thread responsive to signals
    if errors:
        raise errors[0]


def run_shared(run: Any, job: list[tuple[Any, list]], identity: dict, index: dict,
               actors: dict[str, Any]) -> None:
    """One job of several units in one shared execution. If it fails, what each unit
    committed stays committed; each unit's other waves are then run on their own
    (:func:`salmap.pipeline.run._run_unit`: its retry and its failure report), so a unit that fails
    fails alone."""
    import time

    from .accounting import actor_lifetimes
    from .errors import root_cause
    from .lock import LockLost
    from .progress import ProgressLine
    from .run import _run_unit, fail_waves, unit_execution

    exs, trackers, commits, updates, lines = [], [], [], [], []
    for unit, waves in job:
        names = [shard_name_of(s) for w in waves for s in w.shards]
        total = sum(index[n] for n in names) if all(n in index for n in names) else None
        line = ProgressLine(unit.id, total, run.cfg, run.out)
        tracker = WaveTracker(unit.id, unit.config_hash, waves, identity, index)
        ex = unit_execution(run.cfg, unit, waves, run.store, actors.get(unit.id))
        ex.identity = identity

        def on_commit(record: dict, unit=unit, line=line) -> None:
            run.commit(unit, record)
            line.wave_done(record)

        exs.append(ex)
        trackers.append(tracker)
        commits.append(on_commit)
        updates.append(lambda n, line=line: line.update(n))
        lines.append(line)
    failed: str | None = None
    broken: str | None = None
    try:
        run_group(exs, trackers, commits, updates, [run.accounting.get(u.id) for u, _ in job])
    except LockLost:
        raise  # another driver owns the run now: stop everything, commit nothing more
    except Exception as err:  # noqa: BLE001 - each unit's rest is redone on its own below
        failed = root_cause(err)
        broken = pool_that_failed_to_start(err, [u.id for u, _ in job])
    now = time.time()
    for (unit, _), line in zip(job, lines):
        acc = run.accounting.get(unit.id)
        if acc is not None:
            acc.set_lifetimes({a: (start, end or now) for a, (start, end)
                               in actor_lifetimes(unit.id, run.driver_started).items()})
        line.finish()
    if failed is None:
        return
    run.out(f"salmap: {job[0][0].model.name}: the shared execution of {len(job)} units failed "
            f"({failed}); each unit's uncommitted waves run on their own")
    for (unit, _), tracker in zip(job, trackers):
        pending = tracker.pending()
        for w in pending:  # what the failed execution wrote for these is not committed
            run.store.delete_dir(f"{unit.data_prefix}/{w.id}")
        if pending and unit.id == broken and not tracker.done:
            # its actors died in their constructor on every start Ray Data allows: alone it
            # would fail the same way (as _run_unit, no retry when nothing was committed)
            fail_waves(run, unit, pending, failed)
        elif pending:
            _run_unit(run, unit, pending, identity, index, actors.get(unit.id))


def pool_that_failed_to_start(err: BaseException, unit_ids: list[str]) -> str | None:
    """The unit whose actors died in their constructor, when that is what ended the
    execution (Ray's ActorDiedError names the actor class, one per unit); else None."""
    from .accounting import pool_class_name
    from .errors import chain

    for e in chain(err):
        text = str(e)
        if "error raised in its creation task" not in text:
            continue
        named = [u for u in unit_ids if f"({pool_class_name(u)})" in text]
        if len(named) == 1:
            return named[0]
    return None


def shard_name_of(url: str) -> str:
    """The shard's name from its URL (a task-side import of
    :func:`~salmap.pipeline.decode.shard_name`)."""
    from .decode import shard_name

    return shard_name(url)
