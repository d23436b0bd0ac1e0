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

from pipeline.interrupt import Terminated, mark_interrupted, sigterm_as_interrupt
from pipeline.storage import Store


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
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job),
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
