"""Exactly once under faults, resumable runs, bad input: each test counts rows against the input."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SECRET, jpeg_bytes, salmap_in_process, small_config, write_shard
from PIL import Image
from salmap.pipeline.config import load_config
from salmap.pipeline.read import read_run
from salmap.pipeline.run import EXIT_INCOMPLETE, EXIT_OK, run_job

pytestmark = pytest.mark.slow


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def bad_input_samples() -> dict[str, tuple[dict, str]]:
    """key -> (members, expected: 'ok' or a phrase of the error)."""
    good = jpeg_bytes(1)
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 30), (10, 200, 30, 5)).save(cmyk, format="JPEG")
    gray = io.BytesIO()
    Image.new("L", (40, 30), 120).save(gray, format="JPEG")
    sixteen = _png(np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16))
    bomb = _png(np.zeros((1200, 1200), np.uint8))
    return {
        "good": ({"jpg": good, "cls": b"3"}, "ok"),
        "random_bytes": ({"jpg": os.urandom(300), "cls": b"1"}, "not a readable image"),
        "empty": ({"jpg": b"", "cls": b"1"}, "empty"),
        "truncated": ({"jpg": good[: len(good) // 2], "cls": b"1"}, "truncated"),
        "no_image": ({"cls": b"1", "txt": b"hello"}, "sample has no image"),
        "bad_json": ({"jpg": good, "cls": b"2", "json": b"{not json"}, "ok"),
        "bad_cls": ({"jpg": good, "cls": b"cat"}, "needs an integer .cls"),
        "bomb": ({"png": bomb, "cls": b"1"}, "max_pixels"),
        "one_pixel": ({"png": _png(np.full((1, 1, 3), 200, np.uint8)), "cls": b"4"}, "ok"),
        "sixteen_bit": ({"png": sixteen, "cls": b"5"}, "ok"),
        "cmyk": ({"jpg": cmyk.getvalue(), "cls": b"6"}, "ok"),
        "rgba": ({"png": _png(np.full((30, 40, 4), 90, np.uint8), "RGBA"), "cls": b"7"}, "ok"),
        "grayscale": ({"jpeg": gray.getvalue(), "cls": b"8"}, "ok"),
        "upper_case": ({"JPG": good, "cls": b"9"}, "ok"),
        "sub/dir/slash": ({"jpg": good, "cls": b"1"}, "ok"),
        "../dotdot": ({"jpg": good, "cls": b"1"}, "'..' segment"),  # keys are not paths
        "odd chars é $&;|`": ({"jpg": good, "cls": b"1"}, "ok"),
    }


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "salmap.pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kw)


def test_bad_input_truncated_and_missing_shards(tmp_path, make_shards, ray_cluster, capsys):
    folder = tmp_path / "shards"
    folder.mkdir()
    corpus = bad_input_samples()
    write_shard(folder / "bad-000000.tar", [{"__key__": k, **m} for k, (m, _) in corpus.items()])
    good = make_shards(n_shards=1, per_shard=2, folder=folder, prefix="good")
    # a shard whose tar is cut in the middle of its second sample
    write_shard(folder / "cut-000000.tar",
                [{"__key__": f"c{i}", "jpg": jpeg_bytes(i, (64, 64)), "cls": b"1"} for i in range(3)])
    data = (folder / "cut-000000.tar").read_bytes()
    import tarfile

    with tarfile.open(folder / "cut-000000.tar") as tar:
        second = tar.getmember("c1.jpg")
    (folder / "cut-000000.tar").write_bytes(data[: second.offset_data + 700])
    job = tmp_path / "job.yaml"
    job.write_text(small_config(
        [str(folder / "bad-000000.tar"), good[0], str(folder / "cut-000000.tar"),
         str(folder / "gone-000000.tar")],
        str(tmp_path / "out"), methods=[{"name": "gradcam"}], targets="label",
        input={"max_pixels": 1_000_000}))
    proc = salmap_in_process(capsys, "run", str(job), f"ray.address={ray_cluster}")
    stderr = proc.stderr
    assert proc.returncode == EXIT_INCOMPLETE, stderr[-3000:]
    assert "gone-000000" in stderr and "missing" in stderr
    df = read_run(str(tmp_path / "out" / "t")).to_table().to_pandas()
    rows = df[df.shard == "bad-000000"].set_index("key")
    assert len(rows) == len(corpus), sorted(set(corpus) - set(rows.index))
    for key, (_, expected) in corpus.items():
        status, error = rows.loc[key, "status"], rows.loc[key, "error"]
        if expected == "ok":
            assert status == "ok", (key, error)
            assert np.isfinite(rows.loc[key, "saliency"]).all()
        else:
            assert status == "error" and expected in error, (key, error)
    assert "not valid JSON" in rows.loc["bad_json", "error"]  # an ok row says what it ignored
    assert "'cat'" in rows.loc["bad_cls", "error"]
    assert (df[df.shard == "good-000000"].status == "ok").sum() == 2
    manifest = json.loads((tmp_path / "out" / "t" / "manifest.json").read_text())
    failed = " ".join(manifest["failures"])
    # the truncated shard: the sample before the cut is explained, the cut one is an error row,
    # and the shard is reported failed with the root cause (not Ray's retry hint)
    cut = df[df.shard == "cut-000000"].set_index("key")
    assert sorted(cut.index) == ["c0", "c1"]
    assert cut.loc["c0", "status"] == "ok" and cut.loc["c1", "status"] == "error"
    assert "unexpected end of data" in cut.loc["c1", "error"]
    assert "cut-000000" in failed and "tarfile.ReadError: unexpected end of data" in failed
    assert "retried_io_errors" not in failed + stderr
    assert "tarfile.ReadError: unexpected end of data" in stderr  # on the console too
    assert "gone-000000" in failed
    assert manifest["status"] == "incomplete"


def test_worker_killed_mid_run_exactly_once(tmp_path, make_shards, ray_cluster, ray_dashboard):
    import ray
    from ray.util.state import list_actors

    shards = make_shards(n_shards=2, per_shard=6)
    job = tmp_path / "job.yaml"
    # ResNet-18, not the tiny CNN: the actor must still be working 2 s after it came up
    job.write_text(small_config(shards, str(tmp_path / "out"), run_id="kill-worker",
                                methods=[{"name": "integrated_gradients", "params": {"steps": 64}}],
                                resources={"batch_size": 2},
                                models=[{"name": "r18", "source": "torchvision:resnet18",
                                         "weights": "none", "input_size": 64}]))
    proc = _cli("run", str(job), f"ray.address={ray_cluster}")
    killed = 0
    deadline = time.time() + 240
    while time.time() < deadline and killed == 0 and proc.poll() is None:
        for a in list_actors(address=ray_dashboard, filters=[("state", "=", "ALIVE")],
                               detail=True):
            if "Explainer" in a.class_name and a.pid:
                time.sleep(2.0)  # let it take a batch
                node_ips = {n["NodeManagerAddress"] for n in ray.nodes()}
                assert node_ips
                os.kill(a.pid, signal.SIGKILL)
                killed += 1
                break
        time.sleep(0.5)
    stdout, stderr = proc.communicate(timeout=600)
    assert killed == 1, "no explainer actor was seen to kill"
    assert proc.returncode == EXIT_OK, stderr[-3000:]
    df = read_run(str(tmp_path / "out" / "kill-worker")).to_table(columns=["sample_id", "status"]).to_pandas()
    assert len(df) == 12 and df.sample_id.is_unique and (df.status == "ok").all()


def _committed(run: Path) -> int:
    return len(list((run / "_commits").rglob("*.json"))) if (run / "_commits").exists() else 0


def test_driver_killed_then_resumed_exactly_once(tmp_path, make_shards, ray_cluster):
    shards = make_shards(n_shards=2, per_shard=3)
    job = tmp_path / "job.yaml"
    job.write_text(small_config(shards, str(tmp_path / "out"), run_id="kill-driver",
                                methods=[{"name": "gradient"}, {"name": "gradcam"}, {"name": "layercam"}],
                                run={"id": "kill-driver", "output": str(tmp_path / "out"),
                                     "report": False, "shards_per_wave": 1},
                                # units apart: their commits spread over time, so the driver
                                # dies with some committed and some not (a shared execution
                                # commits its units' waves together, too fast to catch here)
                                resources={"share_decode": False}))
    run = tmp_path / "out" / "kill-driver"
    proc = _cli("run", str(job), f"ray.address={ray_cluster}")
    deadline = time.time() + 300
    while time.time() < deadline and _committed(run) < 2 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the driver finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _committed(run)
    assert 2 <= before < 6
    cfg = load_config(str(job), [f"ray.address={ray_cluster}"])
    said: list[str] = []
    result = run_job(cfg, out=said.append)
    assert result.exit_code == EXIT_OK
    assert _committed(run) == 6
    df = read_run(str(run)).to_table(columns=["sample_id", "method", "status"]).to_pandas()
    assert len(df) == 6 * 3
    assert not df.duplicated(["sample_id", "method"]).any()
    # only the uncommitted waves were redone
    waves_done = [s for s in said if "] " in s and " wave " in s]
    assert len(waves_done) == 6 - before


@pytest.mark.slow
def test_driver_killed_mid_shared_execution_then_resumed_exactly_once(tmp_path, make_shards,
                                                                       ray_cluster):
    """Units of one model sharing a read + decode (the default): the driver dies (SIGKILL)
    right after the fourth of the group's eight commits; the resumed run commits the rest once
    per unit and redoes no committed wave."""
    shards = make_shards(n_shards=4, per_shard=3)
    job = tmp_path / "job.yaml"
    job.write_text(small_config(shards, str(tmp_path / "out"), run_id="kill-shared",
                                run={"id": "kill-shared", "output": str(tmp_path / "out"),
                                     "report": False, "shards_per_wave": 1}))
    run = tmp_path / "out" / "kill-shared"
    # a small run's files reach the driver together, so a kill timed from outside finds
    # none or all of its waves committed: the driver kills itself after its fourth commit
    die = ("import os, signal; from salmap.pipeline.ledger import Ledger; done = []; "
           "commit = Ledger.commit\n"
           "def dying(self, *a, **k):\n"
           "    out = commit(self, *a, **k); done.append(1)\n"
           "    if len(done) == 4: os.kill(os.getpid(), signal.SIGKILL)\n"
           "    return out\n"
           "Ledger.commit = dying; from salmap.pipeline.cli import main; "
           f"main(['run', {str(job)!r}, 'ray.address={ray_cluster}'])")
    proc = subprocess.run([sys.executable, "-c", die], capture_output=True, text=True,
                          env={**os.environ, "SALMAP_NO_SUPERVISOR": "1"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    before = sorted(p.name for p in (run / "_commits").rglob("*.json"))
    assert len(before) == 4, before
    said: list[str] = []
    result = run_job(load_config(str(job), [f"ray.address={ray_cluster}"]), out=said.append)
    assert result.exit_code == EXIT_OK
    assert _committed(run) == 8
    df = read_run(str(run)).to_table(columns=["sample_id", "method", "status"]).to_pandas()
    assert len(df) == 2 * 4 * 3 and (df.status == "ok").all()
    assert not df.duplicated(["sample_id", "method"]).any()
    waves_done = [s for s in said if "] " in s and " wave " in s]
    assert len(waves_done) == 8 - 4, waves_done


def test_two_runs_with_one_id_second_is_refused(tmp_path, make_shards, ray_cluster, capsys):
    shards = make_shards(n_shards=1, per_shard=4)
    job = tmp_path / "job.yaml"
    job.write_text(small_config(shards, str(tmp_path / "out"), run_id="twice",
                                methods=[{"name": "integrated_gradients", "params": {"steps": 16}}]))
    first = _cli("run", str(job), f"ray.address={ray_cluster}")
    lock = tmp_path / "out" / "twice" / "_lock.json"
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.1)
    # the second driver in this process: it asks for the lock at once (no interpreter start)
    second = salmap_in_process(capsys, "run", str(job), f"ray.address={ray_cluster}")
    err2 = second.stderr
    out1, err1 = first.communicate(timeout=600)
    assert second.returncode == 4 and "locked by another driver" in err2
    assert first.returncode == EXIT_OK, err1[-2000:]
    df = read_run(str(tmp_path / "out" / "twice")).to_table(columns=["sample_id"]).to_pandas()
    assert len(df) == 4 and df.sample_id.is_unique


def test_transient_s3_write_errors_are_retried(tmp_path, make_shards, ray_cluster):
    from moto.server import ThreadedMotoServer
    from test_pipeline_e2e import upload

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        shards = make_shards(n_shards=2, per_shard=2)
        upload(endpoint, "flaky", shards, "wds")
        job = tmp_path / "job.yaml"
        job.write_text(small_config(["s3://flaky/wds/shard-{000000..000001}.tar"], "s3://flaky/runs",
                                    methods=[{"name": "gradcam"}], storage={"endpoint": endpoint}))
        state = tmp_path / "faults"
        proc = _cli("run", str(job), f"ray.address={ray_cluster}",
                    env={"SALMAP_INJECT_WRITE_FAULTS": f"3:{state}"})
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == EXIT_OK, stderr[-3000:]
        assert len(list(state.iterdir())) == 3  # three writes did fail
        df = read_run("s3://flaky/runs/t", storage={"endpoint": endpoint}).to_table(
            columns=["sample_id", "status"]).to_pandas()
        assert len(df) == 4 and df.sample_id.is_unique
        # credentials never reach the output or the logs
        from salmap.pipeline.storage import Store

        store = Store.open("s3://flaky/runs/t", {"endpoint": endpoint})
        for key in store.list(""):
            assert SECRET.encode() not in store.read_bytes(key), key
        assert SECRET not in stdout and SECRET not in stderr
    finally:
        server.stop()


def test_out_of_memory_splits_the_batch_down_to_one_sample(monkeypatch):
    from salmap.pipeline.decode import DecodeSpec, decode_batch
    from salmap.workers.actor import ActorSpec, Explainer

    rows = [{"__key__": f"k{i}", "__url__": "s.tar", "jpg": jpeg_bytes(i)} for i in range(5)]
    batch = decode_batch(rows, DecodeSpec(("jpg",), "cls", "json", 32, 36, 10**8))
    explainer = Explainer(ActorSpec(model={"name": "r18", "source": "torchvision:resnet18",
                                           "weights": "none", "input_size": 32}, method="gradient"))
    inner = explainer.method.attribute
    poison = explainer._to_tensor(batch["image"][[3]])[0]
    calls: list[int] = []

    def attribute(images, targets):
        calls.append(images.shape[0])
        holds_poison = any(torch.equal(img, poison) for img in images)
        if images.shape[0] > 2 or holds_poison:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return inner(images, targets)

    monkeypatch.setattr(explainer.method, "attribute", attribute)
    out = explainer(batch)
    assert calls[0] == 5 and all(c < 5 for c in calls[1:]) and calls.count(1) >= 1
    assert sorted(out["sample_id"]) == sorted(f"s/k{i}" for i in range(5))
    status = dict(zip(out["sample_id"], out["status"]))
    errors = dict(zip(out["sample_id"], out["error"]))
    assert [k for k, v in status.items() if v != "ok"] == ["s/k3"]
    assert "out of memory even for a single sample" in errors["s/k3"]


def test_a_failing_torch_compile_falls_back_to_eager(monkeypatch):
    """torch.compile fails lazily, at the first call; the actor then runs eager, same rows."""
    from salmap.pipeline.decode import DecodeSpec, decode_batch
    from salmap.workers.actor import ActorSpec, Explainer

    def broken_compile(model, **kw):
        def compiled(x):
            raise RuntimeError("backend compiler failed (simulated)")
        return compiled

    rows = [{"__key__": f"k{i}", "__url__": "s.tar", "jpg": jpeg_bytes(i)} for i in range(3)]
    batch = decode_batch(rows, DecodeSpec(("jpg",), "cls", "json", 32, 36, 10**8))
    model = {"name": "r18", "source": "torchvision:resnet18", "weights": "none", "input_size": 32}
    eager = Explainer(ActorSpec(model=model, method="gradcam", metrics={"deletion_auc": {}}))(batch)
    monkeypatch.setattr(torch, "compile", broken_compile)
    spec = ActorSpec(model=model, method="gradcam", metrics={"deletion_auc": {}}, compile=True)
    out = Explainer(spec)(batch)
    assert list(out["status"]) == ["ok"] * 3
    np.testing.assert_allclose(out["target_logit"], eager["target_logit"], rtol=1e-5)
    np.testing.assert_allclose(out["deletion_auc"], eager["deletion_auc"], rtol=1e-5)
