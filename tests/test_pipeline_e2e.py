"""End-to-end jobs on a real (two-node) Ray cluster, local folders and a real S3 endpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import SECRET, TINY_SOURCE, salmap_in_process, small_config
from salmap.pipeline.config import load_config
from salmap.pipeline.read import read_run
from salmap.pipeline.run import EXIT_OK, run_job

pytestmark = pytest.mark.slow


def _job(tmp_path, shards, output, **extra):
    path = tmp_path / "job.yaml"
    path.write_text(small_config(shards, output, **extra))
    return path


def test_local_job_rows_maps_and_same_rows_as_in_process(tmp_path, make_shards, ray_cluster):
    shards = make_shards(n_shards=2, per_shard=3)
    out = tmp_path / "out"
    cfg = load_config(str(_job(tmp_path, shards, str(out))), [f"ray.address={ray_cluster}"])
    result = run_job(cfg, out=lambda *a: None)
    assert result.exit_code == EXIT_OK
    run = out / "t"
    # N samples x U units, one target each
    df = read_run(str(run)).to_table().to_pandas()
    assert len(df) == 6 * 2
    assert set(df.method) == {"gradient", "gradcam"}
    assert (df.status == "ok").all()
    assert df.groupby(["sample_id", "method"]).size().eq(1).all()
    # readable by plain pyarrow and pandas without salmap, maps finite with the documented shape
    for method, shape in (("gradient", (64, 64)), ("gradcam", (2, 2))):
        unit_dir = run / "data" / "tiny" / method
        table = pads.dataset(str(unit_dir), format="parquet", partitioning=None).to_table()
        maps = table.column("saliency").combine_chunks().to_numpy_ndarray()
        assert maps.shape == (6, *shape) and np.isfinite(maps).all()
        assert len(pd.read_parquet(unit_dir)) == 6
        names = {f.name for f in unit_dir.rglob("*.parquet")}
        assert names and all(re.fullmatch(r"part-[0-9a-f]{20}\.parquet", n) for n in names), names
        meta = pq.read_metadata(next(unit_dir.rglob("*.parquet"))).metadata
        assert b"salmap.config" in meta and b"salmap.versions" in meta
    # the multi-node run gives the rows an in-process loop gives
    import tarfile

    from salmap.pipeline.decode import DecodeSpec, decode_batch
    from salmap.workers.actor import ActorSpec, Explainer

    rows = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            cur: dict = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if cur and cur["__key__"] != key:
                    rows.append(cur)
                    cur = {}
                cur.update({"__key__": key, "__url__": shard, ext: tar.extractfile(m).read()})
            rows.append(cur)
    batch = decode_batch(rows, DecodeSpec(("jpg",), "cls", "json", 64, 73, 10**8))
    explainer = Explainer(ActorSpec(model={"name": "tiny", "source": TINY_SOURCE,
                                           "input_size": 64}, method="gradcam"))
    local = explainer(batch)
    got = df[df.method == "gradcam"].set_index("sample_id")
    for i, sid in enumerate(local["sample_id"]):
        assert got.loc[sid, "pred"] == local["pred"][i]
        np.testing.assert_allclose(got.loc[sid, "target_logit"], local["target_logit"][i], rtol=1e-4)
    manifest = (run / "manifest.json").read_text()
    assert '"status": "complete"' in manifest


def test_resume_finished_run_does_nothing(tmp_path, make_shards, ray_cluster):
    shards = make_shards(n_shards=1, per_shard=2)
    out = tmp_path / "out"
    job = _job(tmp_path, shards, str(out), methods=[{"name": "gradcam"}])
    cfg = load_config(str(job), [f"ray.address={ray_cluster}"])
    assert run_job(cfg, out=lambda *a: None).did_work
    said = []
    again = run_job(cfg, out=said.append)
    assert not again.did_work and again.exit_code == EXIT_OK
    assert any("already complete" in s for s in said)
    assert len(read_run(str(out / "t")).to_table()) == 2


@pytest.fixture
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def upload(endpoint: str, bucket: str, files: list[str], prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http",
                           allow_bucket_creation=True, region="us-east-1")
    fs.create_dir(bucket)
    urls = []
    for f in files:
        key = f"{bucket}/{prefix}/{os.path.basename(f)}"
        with fs.open_output_stream(key) as out, open(f, "rb") as src:
            out.write(src.read())
        urls.append(f"s3://{key}")
    return urls


def test_job_on_s3_endpoint(tmp_path, make_shards, ray_cluster, s3_server):
    shards = make_shards(n_shards=2, per_shard=2)
    upload(s3_server, "data", shards, "wds")
    local = make_shards(n_shards=1, per_shard=2, folder=tmp_path / "local", prefix="local")
    # one wave mixes S3 and local shards: each read task opens its own filesystem
    # the config itself from an s3:// URL, as a cluster entrypoint reads it: with a torchvision
    # model (a config read from storage may name importable code only when allowed)
    job = _job(tmp_path, ["s3://data/wds/shard-{000000..000001}.tar", local[0]], "s3://data/runs",
               storage={"endpoint": s3_server, "region": "us-east-1"},
               models=[{"name": "r18", "source": "torchvision:resnet18", "weights": "none",
                        "input_size": 64}])
    (config_url,) = upload(s3_server, "data", [str(job)], "configs")
    cfg = load_config(config_url, [f"storage.endpoint={s3_server}", f"ray.address={ray_cluster}"])
    result = run_job(cfg, out=lambda *a: None)
    assert result.exit_code == EXIT_OK
    df = read_run("s3://data/runs/t", storage={"endpoint": s3_server}).to_table().to_pandas()
    assert len(df) == 6 * 2 and (df.status == "ok").all()
    assert set(df.shard) == {"shard-000000", "shard-000001", "local-000000"}
    from salmap.pipeline.ledger import load_commits
    from salmap.pipeline.storage import Store

    commits = load_commits(Store.open("s3://data/runs/t", {"endpoint": s3_server}))
    assert all(len(waves) == 1 for waves in commits.values())  # one wave per unit, no failures
    manifest = __import__("salmap.pipeline.storage", fromlist=["Store"]).Store.open(
        "s3://data/runs/t", {"endpoint": s3_server}).read_bytes("manifest.json")
    assert SECRET.encode() not in manifest


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "salmap.pipeline.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("override, expected", [
    ("resources.batchsize=3", "did you mean 'batch_size'"),
    ("resources.batch_size=many", "resources.batch_size"),
    ("methods.0.name=gradcan", "did you mean 'gradcam'"),
    ("models.0.source=torchvision:resnet5", "did you mean 'resnet50'"),
    ("input.shards=/nonexistent/shard-{000..003}.tar", "none of the shards exist"),
    ("input.shards=/nonexistent/*.tar", "matches no shard"),
    ("input.shards=[/nonexistent/shard-{000..003}.tar]", "quote list items"),
])
def test_config_errors_are_clear(tmp_path, make_shards, override, expected, capsys):
    from salmap.pipeline.cli import main

    shards = make_shards(n_shards=1, per_shard=1)
    job = _job(tmp_path, shards, str(tmp_path / "out"))
    code = main(["run", str(job), override])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and "Traceback" not in err


def test_config_error_from_the_command_line(tmp_path):
    proc = _cli("run", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert "config file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_config_runs_with_metrics_summary_and_sanity(tmp_path, ray_cluster, capsys,
                                                          monkeypatch):
    """The demo config on real photos (EfficientNet-Lite0): every metric column filled, a summary
    that lists the region metrics first, Grad-CAM's region insertion AUC above its region
    deletion AUC on average, the pixel-level metrics not in the demo, and the sanity check."""
    from salmap.pipeline.demo_data import write_demo_shards

    data = tmp_path / "demo-data"
    photos = ["chelsea", "coffee", "astronaut"]  # three units x three photos: the suite's budget
    write_demo_shards(str(data), names=photos)
    monkeypatch.setenv("SALMAP_DEMO_DATA", str(data))
    proc = salmap_in_process(capsys, "run", "configs/demo.yaml", f"run.output={tmp_path / 'runs'}",
                             f"ray.address={ray_cluster}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]  # the demo ends with the report's path
    assert last.startswith("report: ") and last.endswith("index.html"), last
    assert (tmp_path / "runs" / "demo" / "report" / "index.html").is_file()
    assert "efficientnet_lite0__gradcam_pp" in proc.stdout and "images/s" in proc.stdout
    assert "summary (mean [95% bootstrap CI]" in proc.stdout
    cols = ["key", "method", "status", "region_deletion_auc", "region_insertion_auc", "average_drop",
            "confidence_increase", "pointing_hit", "energy_pointing", "gini", "box_iou", "pseudo_box",
            "pseudo_mask_png"]
    df = read_run(str(tmp_path / "runs" / "demo")).to_table(columns=cols).to_pandas()
    assert len(df) == len(photos) * 3 and (df.status == "ok").all()
    assert df[cols[3:]].notna().all().all()  # every demo photo has a box of its labelled class
    cam = df[df.method == "gradcam"]
    assert cam.region_insertion_auc.mean() > cam.region_deletion_auc.mean()
    manifest = json.loads((tmp_path / "runs" / "demo" / "manifest.json").read_text())
    summary = manifest["units"]["efficientnet_lite0__gradcam"]["summary"]
    assert summary["metrics"]["region_insertion_auc"]["n"] == len(photos)
    assert "deletion_auc" not in summary["metrics"] and "insertion_auc" not in summary["metrics"]
    lines = proc.stdout.splitlines()
    header = lines[lines.index("summary (mean [95% bootstrap CI] over ok rows):") + 1]
    assert header.split()[:4] == ["unit", "errors", "region_deletion_auc",
                                  "region_insertion_auc"], header
    sanity = salmap_in_process(capsys, "sanity", "configs/demo.yaml", f"run.output={tmp_path / 'runs'}",
                               "methods=[{name: gradient}]", "--samples", "2")
    assert sanity.returncode == 0, sanity.stderr[-2000:]
    table = pq.read_table(tmp_path / "runs" / "demo" / "sanity" / "sanity.parquet").to_pandas()
    assert table.layer.iloc[0] == "original" and len(table) > 2
    assert table.spearman_mean.iloc[-1] < 0.9  # randomizing the whole net changes gradient maps
    assert (tmp_path / "runs" / "demo" / "sanity" / "efficientnet_lite0__gradient.png").stat().st_size > 0


def test_units_in_parallel_is_capped_to_what_the_cluster_holds(ray_session):
    from salmap.pipeline.cluster import units_that_fit
    from salmap.pipeline.config import load_config

    cfg = load_config("configs/demo.yaml", ["resources.units_in_parallel=8", "resources.gpus_per_actor=0"])
    cpus = int(ray_session.cluster_resources()["CPU"])
    assert units_that_fit(cfg, 8) == cpus - 1  # one actor CPU per unit, one CPU left for reads
    assert units_that_fit(cfg, 2) == min(2, cpus - 1)


def test_a_shard_rewritten_under_the_same_name_is_never_skipped(tmp_path, ray_cluster):
    """`salmap shards` again after adding a photo, then the same run.id: a config error naming
    the shard and both ways out; with run.extend=true the shard is redone, new photo included."""
    import time as _time

    from conftest import jpeg_bytes, write_shard

    folder = tmp_path / "shards"
    folder.mkdir()
    shard = folder / "photos-000000.tar"
    write_shard(shard, [{"__key__": f"p{i}", "jpg": jpeg_bytes(i)} for i in range(2)])
    other = folder / "photos-000001.tar"
    write_shard(other, [{"__key__": "q0", "jpg": jpeg_bytes(9)}])
    job = _job(tmp_path, [str(shard), str(other)], str(tmp_path / "out"),
               methods=[{"name": "gradcam"}])
    cfg = load_config(str(job), [f"ray.address={ray_cluster}"])
    assert run_job(cfg, out=lambda *a: None).exit_code == EXIT_OK
    _time.sleep(0.05)  # a later modification time, as a re-run of `salmap shards` gives
    write_shard(shard, [{"__key__": f"p{i}", "jpg": jpeg_bytes(i)} for i in range(3)])
    proc = _cli("run", str(job), f"ray.address={ray_cluster}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "photos-000000 changed since it was committed" in proc.stderr
    assert "new run.id" in proc.stderr and "run.extend=true" in proc.stderr
    said: list[str] = []
    cfg = load_config(str(job), [f"ray.address={ray_cluster}", "run.extend=true"])
    assert run_job(cfg, out=said.append).exit_code == EXIT_OK
    assert any("withdrawn and redone" in s for s in said)
    df = read_run(str(tmp_path / "out" / "t")).to_table(columns=["sample_id"]).to_pandas()
    assert sorted(df.sample_id) == ["photos-000000/p0", "photos-000000/p1", "photos-000000/p2",
                                    "photos-000001/q0"]
