"""The commit protocol against a real S3 API (moto on loopback, every HTTP request counted at
the server) and a local folder: requests per commit and per resumed record, the fencing window
of a driver that lost the run's lock, commit writes that fail, damaged records. No Ray."""

from __future__ import annotations

import json
import threading
import time
import types

import pytest
from s3_counting import CountingS3
from salmap.pipeline.commit_record import DamagedRecord, encode_record
from salmap.pipeline.config import load_config
from salmap.pipeline.ledger import (
    COMMITS,
    Ledger,
    commit_key,
    load_commits,
    remove_uncommitted,
)
from salmap.pipeline.lock import LOCK_KEY, LockLost, RunLock
from salmap.pipeline.plan import units_of, waves_of
from salmap.pipeline.resume_check import redo_waves_with_missing_files
from salmap.pipeline.run import _Run
from salmap.pipeline.storage import Store
from salmap.pipeline.tracker import WaveTracker


def _cfg(tmp_path, output: str):
    cfg = {"run": {"id": "r", "output": output, "report": False}, "input": {"shards": ["/x/"]},
           "models": [{"name": "m", "source": "torchvision:resnet18", "weights": "none"}],
           "methods": [{"name": "gradient"}]}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(cfg))
    return load_config(str(path))


@pytest.fixture(autouse=True)
def _config_once(monkeypatch):
    """The config's resolved form and units once per config (OmegaConf is slow), so that the
    20 rounds below measure the protocol, not the config."""
    import salmap.pipeline.run

    real, memo = salmap.pipeline.run._public_config, {}

    def once(cfg):
        if id(cfg) not in memo:
            memo[id(cfg)] = real(cfg)
        return memo[id(cfg)]

    monkeypatch.setattr(salmap.pipeline.run, "_public_config", once)


_UNITS: dict[int, list] = {}


def _driver(cfg, store, lock=None):
    if id(cfg) not in _UNITS:
        _UNITS[id(cfg)] = units_of(cfg)
    (unit,) = _UNITS[id(cfg)]
    return _Run(cfg, "r", store, [unit], Ledger.load(store), 0, [], time.time(),
                out=lambda *a: None, lock=lock), unit


def _wave_record(store, unit, wave, tag: str) -> dict:
    """What the execution does for a wave: write its file(s), report rows and shard ends; the
    tracker's record. ``tag`` names this attempt's file."""
    tracker = WaveTracker(unit.id, unit.config_hash, [wave], {})
    names = [s.rsplit("/", 1)[1][:-4] for s in wave.shards]
    key = f"{unit.data_prefix}/{wave.id}/part-{tag}.parquet"
    store.write_bytes(key, tag.encode())
    tracker.add_file(key, [(f"{n}/0", n, 1, "ok") for n in names])
    for n in names:
        tracker.add_marker(n, 1)
    (record,) = tracker.ready()
    return record


def _history(store, unit, n: int) -> None:
    for c in range(n):
        name = f"h-{c:06d}"
        store.write_bytes(commit_key(unit.id, f"w{c}"), encode_record({
            "unit": unit.id, "wave": f"w{c}", "config_hash": unit.config_hash, "shards": [name],
            "files": [f"{unit.data_prefix}/w{c}/part-0.parquet"], "rows": 1, "errors": 0,
            "samples": 1, "per_shard": {name: {"samples": 1, "rows": 1, "errors": 0}}}))


def test_a_commit_is_three_requests_and_a_resumed_record_one_on_s3(tmp_path):
    """Counted at the S3 server: a commit is the lock's check (GET), its record (one
    conditional PUT) and the manifest (one PUT), whatever came before; a new driver reads each
    record with one GET after one listing. (Before: 7 per commit, HEAD + GET per record.)"""
    cfg = _cfg(tmp_path, "s3://bkt/runs")
    with CountingS3() as s3:
        store = Store.open("s3://bkt/runs/r", s3.storage)
        (unit,) = units_of(cfg)
        _history(store, unit, 40)
        lock = RunLock(store, lease_s=600)
        lock.acquire()
        run, unit = _driver(cfg, store, lock)
        for wave in waves_of([f"/x/s-{i}.tar" for i in range(3)], 1):
            record = _wave_record(store, unit, wave, "a")
            mark = s3.log.mark()
            run.commit(unit, record)
            got = s3.log.since(mark)
            assert sorted(k for k, _ in got) == ["GET", "PUT", "PUT-IF-NONE-MATCH"], got
            assert {p.rsplit("/", 1)[1] for k, p in got} == {
                LOCK_KEY, "manifest.json", f"{wave.id}.json"}
        lock.release()
        mark = s3.log.mark()
        again = Ledger.load(store)
        assert again.totals[unit.id].waves == 43
        assert s3.log.counts(mark) == {"LIST": 1, "GET": 43}


def _fencing_round(store: Store, cfg, a_lands_first: bool) -> None:
    """Driver A checks its lock, pauses before its record write; its lease runs out (the lock
    object says so), B takes over and redoes the wave; A resumes (before or after B's commit).
    Exactly one record for the wave, pointing at files that exist."""
    lock_a = RunLock(store, lease_s=600)
    lock_a.acquire()
    run_a, unit = _driver(cfg, store, lock_a)
    (wave,) = waves_of(["/x/s-0.tar", "/x/s-1.tar"], 2)
    record_a = _wave_record(store, unit, wave, "a")
    checked, resume = threading.Event(), threading.Event()

    def pause(_unit, _record):
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
    lock_a._stop.set()  # A is paused: no heartbeat; the lease runs out
    info = json.loads(store.read_bytes(LOCK_KEY))
    store.write_bytes(LOCK_KEY, json.dumps({**info, "heartbeat": time.time() - 1000}).encode())
    lock_b = RunLock(store, lease_s=600)
    lock_b.acquire()  # takes over the stale lock
    run_b, _ = _driver(cfg, store, lock_b)
    kept: set = set()
    remove_uncommitted(store, run_b.ledger, {unit.id: unit.data_prefix}, {unit.id: {wave.id}}, kept)
    run_b.dirty = kept
    record_b = _wave_record(store, unit, wave, "b")
    if a_lands_first:
        resume.set()
        thread.join(30)
        run_b.commit(unit, record_b)
    else:
        run_b.commit(unit, record_b)
        resume.set()
        thread.join(30)
        assert isinstance(outcome[0], LockLost), outcome
    lock_b.release()
    commits = load_commits(store)
    assert list(commits[unit.id]) == [wave.id]
    files = commits[unit.id][wave.id]["files"]
    assert files == [f"{unit.data_prefix}/{wave.id}/part-{'a' if a_lands_first else 'b'}.parquet"]
    assert store.list(f"{unit.data_prefix}/{wave.id}") == files  # the other attempt's is gone
    assert len(store.list(COMMITS)) == 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_driver_that_lost_the_lock_in_its_commit_window_never_breaks_a_wave(tmp_path, where):
    cfg = _cfg(tmp_path, "/unused")
    if where == "local":
        for i in range(20):
            _fencing_round(Store.open(str(tmp_path / f"run-{i}")), cfg, a_lands_first=i % 2 == 1)
        return
    with CountingS3() as s3:
        for i in range(20):
            _fencing_round(Store.open(f"s3://bkt/runs/r{i}", s3.storage), cfg,
                           a_lands_first=i % 2 == 1)


def test_a_record_is_never_replaced_by_a_plain_write(tmp_path):
    """The record is created, never overwritten: committing a wave whose record another
    driver wrote, while this one still holds the lock, adopts a complete record and never
    keeps two."""
    cfg = _cfg(tmp_path, "/unused")
    store = Store.open(str(tmp_path / "run"))
    run, unit = _driver(cfg, store)
    (wave,) = waves_of(["/x/s-0.tar"], 1)
    first = _wave_record(store, unit, wave, "a")
    run.commit(unit, first)
    run.commit(unit, first)  # the same bytes again (a retried request that had landed): fine
    assert load_commits(store)[unit.id][wave.id] == first


def test_a_failed_record_write_names_the_record_and_leaves_the_wave_pending(tmp_path,
                                                                             monkeypatch):
    cfg = _cfg(tmp_path, "/unused")
    store = Store.open(str(tmp_path / "run"))
    run, unit = _driver(cfg, store)
    waves = waves_of(["/x/s-0.tar", "/x/s-1.tar"], 1)
    tracker = WaveTracker(unit.id, unit.config_hash, waves, {})
    store.write_bytes(f"{unit.data_prefix}/{waves[0].id}/part-0.parquet", b"x")
    tracker.add_file(f"{unit.data_prefix}/{waves[0].id}/part-0.parquet", [("s-0/0", "s-0", 1, "ok")])
    tracker.add_marker("s-0", 1)
    (record,) = tracker.ready()
    # more injected storage faults than the storage policy's attempts (storage.retries = 5)
    monkeypatch.setenv("SALMAP_INJECT_WRITE_FAULTS", f"6:{tmp_path / 'faults'}")
    monkeypatch.setattr("salmap.pipeline.storage.time.sleep", lambda s: None)
    with pytest.raises(Exception) as err:
        run.commit(unit, record)
    tracker.not_committed(record["wave"])
    message = str(err.value)
    assert store.url(commit_key(unit.id, waves[0].id)) in message and "SLOW_DOWN" in message
    assert len(list((tmp_path / "faults").iterdir())) == 5  # five attempts, then the error
    assert [w.id for w in tracker.pending()] == [w.id for w in waves]
    assert not store.exists(commit_key(unit.id, waves[0].id))
    assert run.ledger.totals == {}


@pytest.mark.parametrize("damage, says", [
    (lambda raw: raw[: len(raw) // 2], "not valid JSON"),
    (lambda raw: b"{}", "field 'unit' is missing"),
    (lambda raw: raw.replace(b'"files": [', b'"files": [\n    "data/m/gradient/WAVE/part-a.parquet",'),
     "part-a.parquet twice"),
    (lambda raw: raw.replace(b'"rows": 2', b'"rows": 3'), "'rows' is 3 but its shards hold 2"),
    (lambda raw: raw.replace(b'"files": [', b'"files": [\n    "../other/x.parquet",'),
     "is not under the wave's folder"),
])
def test_a_damaged_record_is_named_with_the_way_out(tmp_path, damage, says):
    cfg = _cfg(tmp_path, "/unused")
    store = Store.open(str(tmp_path / "run"))
    run, unit = _driver(cfg, store)
    (wave,) = waves_of(["/x/s-0.tar", "/x/s-1.tar"], 2)
    run.commit(unit, _wave_record(store, unit, wave, "a"))
    key = commit_key(unit.id, wave.id)
    raw = store.read_bytes(key)
    store.write_bytes(key, damage(raw.replace(b"WAVE", b"")).replace(b"WAVE", wave.id.encode()))
    with pytest.raises(DamagedRecord) as err:
        load_commits(store)
    message = str(err.value)
    assert store.url(key) in message and says in message
    assert "move the record away" in message and "salmap verify" in message


def test_a_shard_committed_by_two_records_is_damage(tmp_path):
    cfg = _cfg(tmp_path, "/unused")
    store = Store.open(str(tmp_path / "run"))
    run, unit = _driver(cfg, store)
    w1, w2 = waves_of(["/x/s-0.tar", "/x/s-1.tar"], 2)[0], waves_of(["/x/s-1.tar"], 1)[0]
    run.commit(unit, _wave_record(store, unit, w1, "a"))
    store.write_bytes(commit_key(unit.id, w2.id), encode_record(_wave_record(store, unit, w2, "b")))
    with pytest.raises(DamagedRecord, match="shard s-1 is committed by it and by"):
        load_commits(store)


def test_a_committed_wave_whose_file_is_gone_is_redone_on_resume(tmp_path):
    cfg = _cfg(tmp_path, "/unused")
    store = Store.open(str(tmp_path / "run"))
    run, unit = _driver(cfg, store)
    waves = waves_of(["/x/s-0.tar", "/x/s-1.tar"], 1)
    for w in waves:
        run.commit(unit, _wave_record(store, unit, w, "a"))
    store.delete(f"{unit.data_prefix}/{waves[1].id}/part-a.parquet")
    commits = load_commits(store)
    ledger = Ledger.load(store, commits)
    said: list[str] = []
    assert redo_waves_with_missing_files(store, ledger, commits, {unit.id}, said.append) == []
    assert set(ledger.committed(unit.id)) == {"s-0"}  # s-1 is pending again
    assert list(load_commits(store)[unit.id]) == [waves[0].id]
    assert "withdrawn and the wave redone" in said[0] and "part-a.parquet" in said[0]
    # a unit this config does not run: reported (the run exits non-zero), not redone
    store.delete(f"{unit.data_prefix}/{waves[0].id}/part-a.parquet")
    commits = load_commits(store)
    lines = redo_waves_with_missing_files(store, Ledger.load(store, commits), commits, set(),
                                          said.append)
    assert len(lines) == 1 and "lost 1 file(s)" in lines[0] and "move" in lines[0]


def test_a_real_run_on_s3_commits_with_three_requests_and_resumes_with_one_per_record(
        tmp_path, make_shards, ray_cluster):
    """``salmap run`` on Ray against a counting moto S3 endpoint: every commit record is one
    conditional PUT and nothing else; the lock checks and manifest PUTs add at most one each
    per commit (plus the run's start and end); a resumed run reads each record with one GET."""
    from conftest import small_config
    from salmap.pipeline.run import EXIT_OK, run_job
    from test_pipeline_e2e import upload

    with CountingS3(buckets=()) as s3:
        shards = make_shards(n_shards=2, per_shard=2)
        urls = upload(s3.endpoint, "bkt", shards, "wds")
        job = tmp_path / "job.yaml"
        job.write_text(small_config(urls, "s3://bkt/runs", methods=[{"name": "gradient"}],
                                    run={"lock_lease_s": 600, "shards_per_wave": 1},
                                    storage=s3.storage))
        cfg = load_config(str(job), [f"ray.address={ray_cluster}"])
        mark = s3.log.mark()
        assert run_job(cfg, out=lambda *a: None).exit_code == EXIT_OK
        got = s3.log.since(mark)
        on_records = [(k, p) for k, p in got if "/_commits/" in p and p.endswith(".json")]
        written = [p for k, p in on_records if k == "PUT-IF-NONE-MATCH"]
        commits = len(written)
        assert commits == 2 and len(set(written)) == 2, on_records
        # a record is its one PUT and nothing else: the end of the run reads no record (the
        # summaries come from the aggregates the ledger merged as the waves committed)
        assert sorted(k for k, _ in on_records) == ["PUT-IF-NONE-MATCH"] * 2
        lock_gets = sum(1 for k, p in got if p.endswith("/_lock.json") and k == "GET")
        manifest_puts = sum(1 for k, p in got if p.endswith("/manifest.json") and k == "PUT")
        assert lock_gets <= commits + 2 and manifest_puts <= commits + 2, got
        control = [(k, p) for k, p in got if p.rsplit("/", 1)[-1] in (
            "_lock.json", "manifest.json", "_plan.json") or "/_commits/" in p]
        assert not [k for k, _ in control if k.startswith("MPU") or k == "HEAD"], control
        mark = s3.log.mark()
        assert run_job(cfg, out=lambda *a: None).exit_code == EXIT_OK  # already complete
        again = [(k, p) for k, p in s3.log.since(mark) if "/_commits/" in p]
        assert sorted(k for k, p in again if p.endswith(".json")) == ["GET", "GET"], again


@pytest.mark.parametrize("faults, committed", [(5, 2), (10, 0)])
def test_a_failed_record_write_is_retried_by_the_unit_then_reported(tmp_path, monkeypatch,
                                                                      faults, committed):
    """The first record write fails after the storage's 5 attempts: the wave stays pending,
    the unit's retry redoes it (5 faults: both waves end committed); when the retry's write
    fails too (10 faults), the failure names the record and the storage error."""
    import salmap.pipeline.run
    from salmap.pipeline.run import _run_unit

    cfg = _cfg(tmp_path, "/unused")
    store = Store.open(str(tmp_path / "run"))
    run, unit = _driver(cfg, store)
    said: list[str] = []
    run.out = said.append
    waves = waves_of(["/x/s-0.tar", "/x/s-1.tar"], 1)
    attempts = []

    def execution(ex, tracker, on_commit, on_progress=None, accounting=None):
        """The unit's execution, Ray stubbed: each pending wave's file, rows and shard end."""
        attempts.append([w.id for w in ex.waves])
        for wave in ex.waves:
            name = wave.shards[0].rsplit("/", 1)[1][:-4]
            key = f"{unit.data_prefix}/{wave.id}/part-{len(attempts)}.parquet"
            store.write_bytes(key, b"x")
            tracker.add_file(key, [(f"{name}/0", name, 1, "ok")])
            tracker.add_marker(name, 1)
            for record in tracker.ready():
                on_commit(record)

    monkeypatch.setattr(salmap.pipeline.run, "unit_execution",
                        lambda cfg, u, w, s, a=None: types.SimpleNamespace(waves=list(w)))
    monkeypatch.setattr(salmap.pipeline.run, "run_unit", execution)
    monkeypatch.setenv("SALMAP_INJECT_WRITE_FAULTS", f"{faults}:{tmp_path / 'faults'}")
    monkeypatch.setattr("salmap.pipeline.storage.time.sleep", lambda s: None)
    _run_unit(run, unit, waves, {}, {})
    # the first attempt failed at its first commit; the retry redid both waves
    assert attempts == [[waves[0].id, waves[1].id]] * 2
    assert len(load_commits(store).get(unit.id, {})) == committed
    if committed:
        assert not run.failures and "retrying" in " ".join(said)
        # the first attempt's file of the redone wave is gone, the record's is there
        assert store.list(f"{unit.data_prefix}/{waves[0].id}") == [
            f"{unit.data_prefix}/{waves[0].id}/part-2.parquet"]
    else:
        (line,) = run.failures
        assert store.url(commit_key(unit.id, waves[0].id)) in line and "SLOW_DOWN" in line
