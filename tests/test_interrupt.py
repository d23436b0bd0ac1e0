"""SIGTERM (a scheduler stopping the driver) ends a run like Ctrl-C: exit 3, manifest
"interrupted", lock released, resume hint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import small_config
from salmap.pipeline.interrupt import Terminated, mark_interrupted, sigterm_as_interrupt
from salmap.pipeline.storage import Store


def test_sigterm_raises_terminated_once_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match="SIGTERM"):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert signal.getsignal(signal.SIGTERM) is before
    with sigterm_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Terminated:
            os.kill(os.getpid(), signal.SIGTERM)  # during clean-up: ignored
            time.sleep(0.2)


def test_mark_interrupted_keeps_the_manifest(tmp_path):
    store = Store.open(str(tmp_path))
    store.write_json("manifest.json", {"status": "running", "units": {"a": {"rows": 3}}})
    assert mark_interrupted(store, "SIGTERM")
    manifest = store.read_json("manifest.json")
    assert manifest["status"] == "interrupted" and manifest["units"] == {"a": {"rows": 3}}
    assert manifest["interrupted"]["reason"] == "SIGTERM"


@pytest.mark.slow
def test_sigterm_mid_run_exits_3_interrupted_and_unlocked(tmp_path, make_shards, ray_cluster):
    shards = make_shards(n_shards=2, per_shard=6)
    job = tmp_path / "job.yaml"
    job.write_text(small_config(shards, str(tmp_path / "out"), run_id="term",
                                methods=[{"name": "integrated_gradients", "params": {"steps": 64}}],
                                resources={"batch_size": 2}))
    proc = subprocess.Popen([sys.executable, "-m", "salmap.pipeline.cli", "run", str(job),
                             f"ray.address={ray_cluster}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    started = threading.Event()
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "to do)" in line:  # printed once Ray is up and the waves start
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(240), "".join(lines)
    time.sleep(2.0)  # inside the Ray Data execution
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    run = tmp_path / "out" / "term"
    assert proc.returncode == 3, stderr[-3000:]
    assert "interrupted (SIGTERM); run the same command again to resume" in stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["interrupted"]["reason"] == "SIGTERM"
    assert not (run / "_lock.json").exists()


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, executable) of every process below ``pid``, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    exe: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                exe[int(entry)] = f.read().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append((child, exe.get(child, "")))
            todo.append(child)
    return out


def test_a_dead_driver_child_is_finished_by_its_supervisor(tmp_path, capsys):
    """Ray's C++ ended the driver before any clean-up: the supervisor marks the manifest
    interrupted with the cause, releases that driver's lock (not another's), one line, exit 3."""
    from salmap.pipeline.lock import RunLock
    from salmap.pipeline.supervise import _finish_for_dead_child

    store = Store.open(str(tmp_path / "run"))
    store.write_json("manifest.json", {"status": "running", "units": {}})
    lock = RunLock(store, lease_s=60)
    lock.acquire()
    lock._stop.set()  # the dead driver's heartbeat stopped with it
    notes = {"run": {"store": store.uri, "storage": None, "lock_owner": lock.owner},
             "deaths": []}
    assert _finish_for_dead_child(notes, 1, "Ray's raylet (pid 123) died") == 3
    manifest = store.read_json("manifest.json")
    assert manifest["status"] == "interrupted"
    assert manifest["interrupted"]["reason"].startswith("Ray failed: Ray's raylet (pid 123) died")
    assert not (tmp_path / "run" / "_lock.json").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["salmap: interrupted: Ray failed: Ray's raylet (pid 123) died (the driver then "
                   "ended with exit code 1); run the same command again to resume"]
    other = RunLock(store, lease_s=60)
    other.acquire()
    try:
        _finish_for_dead_child({**notes, "said": True}, -9, None)
        assert (tmp_path / "run" / "_lock.json").exists()  # another driver's lock stays
    finally:
        other.release()


@pytest.mark.slow
def test_raylet_killed_mid_run_interrupts_and_the_same_command_resumes(tmp_path, make_shards):
    """Its own local Ray instance (ray.address null), never the shared one: the raylet that this
    `salmap run` started is killed mid-run. One salmap line naming it, exit 3, the manifest
    interrupted with the cause, no lock; the same command then does every row exactly once
    (on main: exit 1, Ray's crash dump, manifest 'running', the lock left behind)."""
    from salmap.pipeline.read import read_run

    shards = make_shards(n_shards=2, per_shard=6)
    job = tmp_path / "job.yaml"
    job.write_text(small_config(shards, str(tmp_path / "out"), run_id="raylet",
                                methods=[{"name": "integrated_gradients", "params": {"steps": 32}}],
                                resources={"batch_size": 2}, ray={"num_cpus": 2}))
    command = [sys.executable, "-m", "salmap.pipeline.cli", "run", str(job)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the instance the first run starts checks its raylet every second, not every 3 s with 5
    # misses allowed: the death is noticed in about 3 s instead of 15
    fast_checks = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                   "RAY_health_check_failure_threshold": "3"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, **fast_checks})
    started = threading.Event()
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "to do)" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(300), "".join(lines)
    time.sleep(2.0)  # inside the Ray Data execution
    raylets = [pid for pid, exe in _descendants(proc.pid) if os.path.basename(exe) == "raylet"]
    assert len(raylets) == 1, _descendants(proc.pid)  # this run's own instance, one node
    os.kill(raylets[0], signal.SIGKILL)
    stderr = proc.communicate(timeout=300)[1]
    reader.join(timeout=10)
    stdout = "".join(lines)
    run = tmp_path / "out" / "raylet"
    assert proc.returncode == 3, stdout[-3000:] + stderr[-3000:]
    said = [ln for ln in (stdout + stderr).splitlines() if "interrupted" in ln]
    assert len(said) == 1 and said[0].startswith("salmap: interrupted: Ray failed: Ray's raylet")
    assert "run the same command again to resume" in said[0]
    assert "Raylet is terminated" not in stdout + stderr  # Ray's crash dump stays in its logs
    assert "Traceback" not in stdout + stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted", manifest["status"]
    assert manifest["interrupted"]["reason"].startswith("Ray failed: Ray's raylet")
    assert not (run / "_lock.json").exists()

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    df = read_run(str(run)).to_table(columns=["sample_id", "status"]).to_pandas()
    assert len(df) == 12 and df.sample_id.is_unique and (df.status == "ok").all()
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"


def test_ray_failures_are_told_from_a_units_own_errors():
    from ray import exceptions as rx
    from salmap.pipeline.ray_failure import describe_ray_message, ray_failure

    assert ray_failure(rx.LocalRayletDiedError()) == "Ray's raylet on this machine died"
    try:  # wrapped, as Ray Data raises it
        try:
            raise rx.NodeDiedError("node with node id: dfbcf94a30974b843d1a09e5 died")
        except rx.NodeDiedError as inner:
            raise RuntimeError("execution failed") from inner
    except RuntimeError as outer:
        assert ray_failure(outer) == "Ray node dfbcf94a3097 was lost"
    assert ray_failure(ValueError("bad shard")) is None
    assert ray_failure(rx.ActorDiedError()) is None  # one actor killed: Ray Data restarts it
    assert describe_ray_message("Raylet is terminated. Termination is unexpected.") == \
        "Ray's raylet died"
    assert describe_ray_message("The node with node id: 0123456789abcdef and address: x has "
                                "been marked dead because the detector has missed too many "
                                "heartbeats") == "Ray node 0123456789ab was lost"
    assert describe_ray_message("Task was killed due to the node running low on memory.") is None
