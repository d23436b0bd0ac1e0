"""The run lock: never two holders when drivers race, fencing when the lock is lost.

The race tests start persistent worker processes that all try to acquire the same lock at one
barrier, trial after trial (no lock, a stale lock of a dead process, a stale lock whose
heartbeat is old), and count the winners of each trial.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import socket
import threading
import time

import pytest
from salmap.pipeline.lock import LOCK_KEY, LockHeld, LockLost, RunLock
from salmap.pipeline.storage import Store

WORKERS = 6


def _dead_pid() -> int:
    proc = mp.get_context("spawn").Process(target=int)
    proc.start()
    proc.join()
    return proc.pid


def _plant(store: Store, kind: str, dead_pid: int) -> None:
    """Leave the lock a crashed driver would leave (or none)."""
    if kind == "none":
        return
    if kind == "dead_pid":  # same host, process gone, heartbeat fresh
        info = {"owner": "crashed", "host": socket.gethostname(), "pid": dead_pid,
                "heartbeat": time.time(), "lease_s": 600}
    else:  # another host, heartbeat older than its lease
        info = {"owner": "crashed", "host": "elsewhere", "pid": 1,
                "heartbeat": time.time() - 100, "lease_s": 10}
    store.write_bytes(LOCK_KEY, json.dumps(info).encode())


def _racer(jobs, barrier, results) -> None:
    """A driver process: for each job (lock URLs and storage), race for every lock in turn."""
    while (job := jobs.get()) is not None:
        urls, storage = job
        for trial, url in enumerate(urls):
            lock = RunLock(Store.open(url, storage), lease_s=30)
            barrier.wait()
            time.sleep(random.random() * 0.01)  # vary the interleavings from trial to trial
            try:
                lock.acquire()
                won = True
            except LockHeld:
                won = False
            results.put((trial, won, lock.owner))
            barrier.wait()  # everybody has tried while the winner still holds it
            if won:
                lock.release()
        results.put(None)  # this job is done, locks released


@pytest.fixture(scope="module")
def racers():
    """WORKERS driver processes, started once (spawned: the test process may run Ray)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    queues = [ctx.Queue() for _ in range(WORKERS)]
    procs = [ctx.Process(target=_racer, args=(q, barrier, results), daemon=True) for q in queues]
    for p in procs:
        p.start()

    def race(urls: list[str], storage) -> dict[int, list[str]]:
        for q in queues:
            q.put((urls, storage))
        winners: dict[int, list[str]] = {t: [] for t in range(len(urls))}
        done = 0
        while done < WORKERS:
            item = results.get(timeout=120)
            if item is None:
                done += 1
            elif item[1]:
                winners[item[0]].append(item[2])
        return winners

    yield race
    for q in queues:
        q.put(None)
    for p in procs:
        p.join(timeout=60)


def _check_one_winner(urls: list[str], storage, winners: dict[int, list[str]]) -> None:
    for trial, owners in winners.items():
        assert len(owners) == 1, f"trial {trial} ({urls[trial]}): {len(owners)} holders"
        # the winner's lock was the one on the store (and its release removed it)
        assert not Store.open(urls[trial], storage).exists(LOCK_KEY)


def test_racing_drivers_never_both_hold_the_local_lock(tmp_path, racers):
    dead = _dead_pid()
    kinds = ["none", "dead_pid", "expired"]
    urls = []
    for t in range(90):
        store = Store.open(str(tmp_path / f"trial-{t}"))
        _plant(store, kinds[t % 3], dead)
        urls.append(store.uri)
    winners = racers(urls, None)
    _check_one_winner(urls, None, winners)


@pytest.fixture
def serial_s3():
    """A moto S3 endpoint that serves one request at a time: its conditional PUT is then atomic,
    as on S3 (moto's threaded server checks the condition and writes in two steps)."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app),
                         threaded=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="locks")
    yield {"endpoint": endpoint, "region": "us-east-1"}
    server.shutdown()


def test_racing_drivers_never_both_hold_the_s3_lock(serial_s3, racers):
    dead = _dead_pid()
    kinds = ["none", "dead_pid", "expired"]
    urls = []
    for t in range(12):
        store = Store.open(f"s3://locks/runs/trial-{t}", serial_s3)
        _plant(store, kinds[t % 3], dead)
        urls.append(store.uri)
    winners = racers(urls, serial_s3)
    _check_one_winner(urls, serial_s3, winners)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        yield Store.open(str(tmp_path / "run"))
        return
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    storage = {"endpoint": f"http://{host}:{port}", "region": "us-east-1"}
    import boto3

    boto3.client("s3", endpoint_url=storage["endpoint"], region_name="us-east-1").create_bucket(
        Bucket="bkt")
    yield Store.open("s3://bkt/runs/r", storage)
    server.stop()


def test_a_lost_takeover_race_leaves_the_winner_alone(store):
    """Two drivers read the same stale lock; the second to replace it must fail, not replace
    (or delete) the lock the first one just took."""
    _plant(store, "expired", 0)
    late, early = RunLock(store, lease_s=30), RunLock(store, lease_s=30)
    replace = late._obj.replace

    def replace_after_the_other_one(data, token):
        early.acquire()  # read the same stale lock and took it over first
        return replace(data, token)

    late._obj.replace = replace_after_the_other_one
    with pytest.raises(LockHeld, match="locked by another driver"):
        late.acquire()
    early.check()
    assert json.loads(store.read_bytes(LOCK_KEY))["owner"] == early.owner
    early.release()


def test_a_driver_presumed_dead_is_fenced_off(store):
    """A driver whose heartbeat stalled past its lease loses the lock to a second driver: its
    check() raises LockLost naming the taker, its release leaves the new lock alone."""
    first = RunLock(store, lease_s=0.4)
    first.acquire()
    first.check()
    first._stop.set()  # the driver hangs: no more heartbeats
    time.sleep(0.6)
    with pytest.raises(LockLost, match="lease of .* ran out"):
        first.check()
    second = RunLock(store, lease_s=30)
    second.acquire()  # takes the stale lock over
    with pytest.raises(LockLost, match="no longer holds"):
        first.check()
    first.release()
    second.check()
    assert json.loads(store.read_bytes(LOCK_KEY))["owner"] == second.owner
    second.release()
    assert not store.exists(LOCK_KEY)
    with pytest.raises(LockLost, match="released"):
        second.check()


def test_check_reads_the_lock_itself(store):
    """check() sees a takeover at once, long before the next heartbeat would."""
    lock = RunLock(store, lease_s=60)
    lock.acquire()
    store.delete(LOCK_KEY)  # an operator deletes it and another driver starts
    other = RunLock(store, lease_s=60)
    other.acquire()
    assert lock.lost is None
    with pytest.raises(LockLost, match="another driver took over"):
        lock.check()
    lock.release()
    other.check()
    other.release()


def test_the_heartbeat_notices_a_takeover(store):
    lock = RunLock(store, lease_s=0.4)
    lock.acquire()
    time.sleep(0.25)  # heartbeats renew it meanwhile
    lock.check()
    store.delete(LOCK_KEY)  # an operator deletes it and another driver starts
    other = RunLock(store, lease_s=30)
    other.acquire()
    deadline = time.time() + 5
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.02)
    assert lock.lost and "took over" in lock.lost
    with pytest.raises(LockLost, match="took over"):
        lock.check()
    lock.release()
    other.check()
    other.release()


def test_a_live_lock_is_refused_and_kept_alive_by_its_heartbeat(store):
    # a lease long enough that a heartbeat late by a loaded machine's stall (the S3 case's
    # moto server shares this process) does not let it lapse; slept through twice
    lock = RunLock(store, lease_s=1.5)
    lock.acquire()
    time.sleep(3.2)  # more than two leases: only heartbeats keep it fresh
    with pytest.raises(LockHeld, match="locked by another driver"):
        RunLock(store, lease_s=1.5).acquire()
    lock.check()
    lock.release()


def test_lease_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="> 0"):
        RunLock(Store.open(str(tmp_path)), lease_s=0)


@pytest.mark.slow
def test_a_run_that_loses_its_lock_commits_nothing_more(tmp_path, make_shards, ray_cluster,
                                                        monkeypatch):
    """Another driver takes the lock over right after the first commit: the run stops with
    LockLost before its next commit and leaves the other driver's lock alone."""
    from conftest import small_config
    from salmap.pipeline.config import load_config
    from salmap.pipeline.ledger import Ledger
    from salmap.pipeline.run import run_job

    shards = make_shards(n_shards=4, per_shard=2)
    job = tmp_path / "job.yaml"
    job.write_text(small_config(shards, str(tmp_path / "out"), methods=[{"name": "gradient"}],
                                run={"id": "fenced", "output": str(tmp_path / "out"),
                                     "report": False, "shards_per_wave": 1}))
    run = tmp_path / "out" / "fenced"
    intruder = {"owner": "intruder", "host": socket.gethostname(), "pid": 1,
                "heartbeat": time.time() + 3600, "lease_s": 3600}
    commit = Ledger.commit

    def commit_then_lose_the_lock(self, unit_id, record):
        commit(self, unit_id, record)
        if not (run / "intruder.tmp").exists():  # the first commit only
            (run / "intruder.tmp").write_text(json.dumps(intruder))
            os.link(run / "intruder.tmp", run / "intruder.lock")
            os.replace(run / "intruder.lock", run / LOCK_KEY)  # whole, as a driver's lock appears

    monkeypatch.setattr(Ledger, "commit", commit_then_lose_the_lock)
    with pytest.raises(LockLost, match="another driver took over"):
        run_job(load_config(str(job), [f"ray.address={ray_cluster}"]), out=lambda *a: None)
    assert len(list(run.glob("_commits/*/*.json"))) == 1
    assert json.loads((run / LOCK_KEY).read_text())["owner"] == "intruder"


def test_a_zombie_driver_is_dead():
    """A driver killed with its parent stays a zombie where init does not reap (containers):
    its lock must be taken over, not waited on for the whole lease."""
    import signal
    import subprocess

    from salmap.pipeline.lock import _pid_alive

    child = subprocess.Popen(["sleep", "30"])
    try:
        assert _pid_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.time() + 10
        while _pid_alive(child.pid) and time.time() < deadline:  # killed, not reaped yet
            time.sleep(0.05)
        assert not _pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
