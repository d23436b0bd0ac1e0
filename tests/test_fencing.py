"""The fencing window, closed: a driver paused between its lock check and its record write
while another driver takes the run over. Whatever the order, readers see exactly one record
per committed wave, written by the driver that held the lock, pointing at files that exist;
the paused driver's late record is ignored and the next driver's start deletes it. Driven at
the ledger and lock layer (what ``run_job`` does at its start and per commit), no Ray, 20
rounds on a local folder and 20 on S3 (moto)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from s3_counting import CountingS3
from salmap.pipeline.ledger import (
    list_records,
    load_commits,
    next_generation,
    remove_uncommitted,
    start_ledger,
)
from salmap.pipeline.lock import LOCK_KEY, LockLost, RunLock
from salmap.pipeline.plan import units_of, waves_of
from salmap.pipeline.rollup import committed_file_lists
from salmap.pipeline.run import _Run
from salmap.pipeline.storage import Store
from salmap.pipeline.verify import format_table, verify_run
from test_commit_protocol import _cfg, _config_once, _wave_record  # noqa: F401 - a fixture

SHARDS = ["/x/s-0.tar", "/x/s-1.tar"]
# what the new driver does while the paused one waits: the paused one resumes before the new
# one commits the wave, after it, after it withdrew the wave (its shard changed), or after it
# committed the same shards in other waves (a config with another run.shards_per_wave)
VARIANTS = ("lands_first", "lands_after", "withdrawn", "repartitioned")


def _start(cfg, store: Store, unit) -> tuple[_Run, RunLock]:
    """A driver's start as ``run_job`` does it: the lock with a new generation, then the
    ledger of that generation."""
    lock = RunLock(store, lease_s=600)
    lock.acquire(next_generation(store))
    ledger, _ = start_ledger(store, lock.generation, lock.owner)
    return _Run(cfg, "r", store, [unit], ledger, 0, [], time.time(), out=lambda *a: None,
                lock=lock), lock


def _round(store: Store, cfg, unit, variant: str) -> None:
    run_a, lock_a = _start(cfg, store, unit)
    (wave,) = waves_of(SHARDS, 2)
    record_a = _wave_record(store, unit, wave, "a")
    checked, resume = threading.Event(), threading.Event()

    def pause(_unit, _record):  # the seam: between A's lock check and its record write
        checked.set()
        assert resume.wait(30)

    run_a.after_check = pause
    outcome: list[BaseException | None] = []

    def commit_a():
        try:
            run_a.commit(unit, record_a)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001
            outcome.append(err)

    thread = threading.Thread(target=commit_a)
    thread.start()
    assert checked.wait(30)
    lock_a._stop.set()  # A is paused: no heartbeat; its lease runs out (the lock says so)
    info = json.loads(store.read_bytes(LOCK_KEY))
    store.write_bytes(LOCK_KEY, json.dumps({**info, "heartbeat": time.time() - 1000}).encode())
    run_b, lock_b = _start(cfg, store, unit)  # takes the stale lock over
    assert lock_b.generation == lock_a.generation + 1
    b_waves = waves_of(SHARDS, 1 if variant == "repartitioned" else 2)
    kept: set = set()  # run_job: wave folders without a record go, but those it redoes
    remove_uncommitted(store, run_b.ledger, {unit.id: unit.data_prefix},
                       {unit.id: {w.id for w in b_waves}}, kept)
    run_b.dirty = kept

    def a_resumes():
        resume.set()
        thread.join(30)
        assert outcome and (outcome[0] is None or isinstance(outcome[0], LockLost)), outcome

    if variant == "lands_first":
        a_resumes()
    for w in b_waves:
        run_b.commit(unit, _wave_record(store, unit, w, "b"))
    if variant == "withdrawn":
        run_b.ledger.uncommit(unit.id, wave.id, unit.data_prefix)
    if variant != "lands_first":
        a_resumes()
    lock_b.release()
    expected = [] if variant == "withdrawn" else [w.id for w in b_waves]
    _check(store, unit, expected)
    # A's late record is there, ignored; `salmap verify` notes it
    checks = verify_run(store.uri, store.storage)
    assert checks[unit.id].stale == 1 and "1 stale commit record(s)" in "\n".join(
        format_table(checks))
    # the next driver's start deletes A's late record and reads the same
    run_c, lock_c = _start(cfg, store, unit)
    lock_c.release()
    assert list_records(store).stale == []
    _check(store, unit, expected)


def _check(store: Store, unit, expected: list[str]) -> None:
    """Exactly one record per expected wave, B's, every file it lists there; the readers
    (the ledger's load, the file lists of ``salmap read`` and exports) agree."""
    commits = load_commits(store)  # raises on a shard committed twice
    waves = commits.get(unit.id, {})
    assert sorted(waves) == sorted(expected)
    present = set(store.list(unit.data_prefix))
    for rec in waves.values():
        assert rec["files"] and all(f in present for f in rec["files"]), (rec, present)
        assert all(f.endswith("part-b.parquet") for f in rec["files"])
    lists = committed_file_lists(store).get(unit.id, {})
    assert {w: r["files"] for w, r in lists.items()} == {w: r["files"] for w, r in waves.items()}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_driver_paused_in_its_commit_window_never_makes_its_record_count(tmp_path, where):
    cfg = _cfg(tmp_path, "/unused")
    (unit,) = units_of(cfg)
    if where == "local":
        for i in range(20):
            _round(Store.open(str(tmp_path / f"run-{i}")), cfg, unit, VARIANTS[i % 4])
        return
    with CountingS3() as s3:
        for i in range(20):
            _round(Store.open(f"s3://bkt/runs/r{i}", s3.storage), cfg, unit, VARIANTS[i % 4])


def test_a_generation_is_started_once(tmp_path):
    """Two drivers that got the same generation (the lock was deleted by hand under a live
    one): the second start is refused, as a lost lock."""
    store = Store.open(str(tmp_path / "run"))
    start_ledger(store, 1)
    with pytest.raises(LockLost, match="generation 1"):
        start_ledger(store, 1)
    assert next_generation(store) == 2


@pytest.mark.slow
def test_a_real_run_paused_at_the_seam_loses_its_wave_to_the_driver_that_took_over(
        tmp_path, make_shards, ray_cluster, monkeypatch):
    """``salmap run`` on Ray, paused at its real seam (after its lock check, before its first
    record write): meanwhile another driver takes the lock over, commits that wave with its own
    files and ends. The paused run's record lands but never counts; the run stops at its next
    lock check; the next run resumes from the other driver's record, deletes the late one, and
    ``salmap verify`` finds the run whole."""
    import shutil

    from conftest import small_config
    from salmap.pipeline.config import load_config
    from salmap.pipeline.run import EXIT_OK, run_job

    shards = make_shards(n_shards=2, per_shard=2)
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(small_config(shards, str(out), methods=[{"name": "gradient"}],
                                run={"id": "fenced", "output": str(out), "report": False,
                                     "shards_per_wave": 1}))
    cfg = load_config(str(job), [f"ray.address={ray_cluster}"])
    store = Store.open(str(out / "fenced"))
    taken: list[dict] = []

    def other_driver_takes_over(unit, record):
        """Driver B, while A is paused: the lock goes stale, B takes it, commits A's wave with
        its own copy of the files, and releases."""
        if taken:
            return
        info = json.loads(store.read_bytes(LOCK_KEY))
        store.write_bytes(LOCK_KEY, json.dumps({**info, "heartbeat": time.time() - 1e4,
                                                "pid": 1 << 30}).encode())
        lock_b = RunLock(store, lease_s=600)
        lock_b.acquire(next_generation(store))
        ledger_b, _ = start_ledger(store, lock_b.generation, lock_b.owner)
        files = [f.replace("/part-", "/part-b") for f in record["files"]]
        for src, dst in zip(record["files"], files):
            shutil.copyfile(store.path(src), store.path(dst))
        taken.append(ledger_b.commit(unit.id, {**record, "files": files}))
        lock_b.release()

    real_post_init = _Run.__post_init__

    def with_seam(self):
        real_post_init(self)
        self.after_check = other_driver_takes_over

    monkeypatch.setattr(_Run, "__post_init__", with_seam)
    with pytest.raises(LockLost):
        run_job(cfg, out=lambda *a: None)
    monkeypatch.setattr(_Run, "__post_init__", real_post_init)
    (b_record,) = taken
    late = list_records(store).stale
    assert len(late) == 1 and late[0].endswith(f"{b_record['wave']}.g1.json")  # A's, ignored
    (unit_id,) = load_commits(store)
    assert load_commits(store)[unit_id] == {b_record["wave"]: b_record}
    assert run_job(cfg, out=lambda *a: None).exit_code == EXIT_OK
    commits = load_commits(store)[unit_id]
    assert len(commits) == 2 and commits[b_record["wave"]] == b_record
    assert list_records(store).stale == []
    checks = verify_run(str(out / "fenced"))
    assert all(u.ok for u in checks.values()) and checks[unit_id].rows_found == 4
