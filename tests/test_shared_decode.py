"""Units of one model share one read and one decode (pipeline.shared): each shard is fetched
once from a real S3 API for two units, each image decoded by one decode stage, the rows are
those of separate executions, and a broken unit fails alone."""

from __future__ import annotations

import collections
import json
import pickle
import threading

import numpy as np
import pytest
from conftest import small_config
from salmap.pipeline.config import load_config
from salmap.pipeline.read import read_run
from salmap.pipeline.run import EXIT_INCOMPLETE, EXIT_OK, run_job
from salmap.pipeline.shared import group_jobs, pack_rows, unpack_rows


def test_pack_rows_gives_each_input_row_its_own_output_rows():
    inputs = {"shard": np.array(["a", "a", "a", "b"], dtype=object),
              "sample_id": np.array(["a/1", "a/2", "", "b/1"], dtype=object),
              "status": np.array(["ok", "error", "shard_end", "ok"], dtype=object)}
    # output: two targets for a/1, one error row, the marker, b/1; in another order
    out = {"shard": np.array(["a", "a", "b", "a", "a"], dtype=object),
           "sample_id": np.array(["a/2", "", "b/1", "a/1", "a/1"], dtype=object),
           "status": np.array(["error", "shard_end", "ok", "ok", "ok"], dtype=object),
           "target": np.array([-1, -1, 7, 3, 4]),
           "saliency": np.arange(5 * 4, dtype=np.float16).reshape(5, 2, 2)}
    packed = pack_rows(inputs, out)
    assert len(packed) == 4
    per_row = [pickle.loads(p)["target"].tolist() for p in packed]
    assert per_row == [[3, 4], [-1], [-1], [7]]
    back = unpack_rows(packed)
    assert sorted(back["target"].tolist()) == sorted(out["target"].tolist())
    assert back["saliency"].shape == (5, 2, 2)
    assert unpack_rows(np.array([b"", b""], dtype=object)) == {}


class _Unit:
    def __init__(self, model, method):
        self.model = type("M", (), {"name": model})()
        self.id = f"{model}__{method}"


class _Ex:
    def __init__(self, decode, cpus):
        self.decode, self.actors, self.actor_resources = decode, 1, {"num_cpus": cpus}
        self.device_decode = False


def _cfg(tmp_path, text: str):
    path = tmp_path / "job.json"
    path.write_text(text)
    return load_config(str(path))


def test_group_jobs_groups_one_models_units_as_far_as_the_cluster_holds_their_pools(tmp_path):
    cfg = _cfg(tmp_path, small_config(["x.tar"], "/tmp/o"))
    waves = [type("W", (), {"id": "w1"})()]
    todo = [(_Unit("a", "m1"), waves), (_Unit("b", "m1"), waves), (_Unit("a", "m2"), waves),
            (_Unit("a", "m3"), waves), (_Unit("a", "m4"), [type("W", (), {"id": "w2"})()])]
    jobs = group_jobs(cfg, todo, lambda u, w: _Ex("d", 1.0), {"CPU": 4.0})
    assert [[u.id for u, _ in j] for j in jobs] == [["a__m1", "a__m2", "a__m3"], ["b__m1"], ["a__m4"]]
    jobs = group_jobs(cfg, todo, lambda u, w: _Ex("d", 1.0), {"CPU": 3.0})  # 2 pools + 1 CPU
    assert [[u.id for u, _ in j] for j in jobs] == [["a__m1", "a__m2"], ["b__m1"], ["a__m3"], ["a__m4"]]
    autoscaling = _Ex("d", 1.0)
    autoscaling.actors = (1, 8)  # needs its minimum to start
    jobs = group_jobs(cfg, todo[:3], lambda u, w: autoscaling, {"CPU": 3.0})
    assert [[u.id for u, _ in j] for j in jobs] == [["a__m1", "a__m2"], ["b__m1"]]
    cfg.resources.share_decode = False
    assert all(len(j) == 1 for j in group_jobs(cfg, todo, lambda u, w: _Ex("d", 1.0), {"CPU": 9}))


@pytest.fixture
def counting_s3():
    """A moto S3 endpoint that counts the GET requests per object key."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    gets: collections.Counter = collections.Counter()

    def counting(environ, start_response):
        if environ["REQUEST_METHOD"] == "GET":
            gets[environ.get("PATH_INFO", "")] += 1
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, counting, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", gets
    server.shutdown()


@pytest.mark.slow
def test_two_units_of_one_model_read_each_shard_once(tmp_path, make_shards, ray_cluster,
                                                     counting_s3):
    from test_pipeline_e2e import upload

    endpoint, gets = counting_s3
    shards = make_shards(n_shards=2, per_shard=2)
    urls = upload(endpoint, "data", shards, "wds")
    storage = {"endpoint": endpoint, "region": "us-east-1"}
    keys = [u.replace("s3://", "/") for u in urls]
    from salmap.pipeline.shard_reader import read_shard

    gets.clear()
    for u in urls:  # what one read of each shard costs (the reader's ranged GETs)
        assert sum(len(c) for c in read_shard(u, storage)) == 3  # 2 samples + the end marker
    one_read = [gets[k] for k in keys]
    assert all(n >= 1 for n in one_read)
    rows, counts = {}, {}
    for share in (True, False):
        gets.clear()
        job = tmp_path / f"job-{share}.json"
        job.write_text(small_config(urls, "s3://data/runs", run_id=f"r{int(share)}",
                                    storage=storage))
        cfg = load_config(str(job), [f"ray.address={ray_cluster}",
                                     f"resources.share_decode={str(share).lower()}"])
        assert run_job(cfg, out=lambda *a: None).exit_code == EXIT_OK
        counts[share] = [gets[k] for k in keys]
        df = read_run(f"s3://data/runs/r{int(share)}", storage=storage).to_table().to_pandas()
        assert _records_without_aggregate(f"s3://data/runs/r{int(share)}", storage) == [], share
        rows[share] = df.sort_values(["method", "sample_id"]).reset_index(drop=True)
    assert counts[True] == one_read, (counts, one_read)  # read once for both units
    # once per unit; the first shard also gives the progress line its total (no shards.json):
    # ranged reads of its head, within issue 20's bound of 2 GETs per shard and unit
    assert counts[False][1:] == [2 * n for n in one_read[1:]], (counts, one_read)
    assert 2 * one_read[0] <= counts[False][0] <= 2 * 2 * one_read[0], (counts, one_read)
    shared, alone = rows[True], rows[False]
    assert len(shared) == 8 and (shared.status == "ok").all()
    for col in ("sample_id", "method", "target", "pred", "saliency_png"):
        assert shared[col].tolist() == alone[col].tolist(), col
    np.testing.assert_allclose(shared.target_logit, alone.target_logit, rtol=1e-5)


def _records_without_aggregate(run_url: str, storage: dict) -> list[str]:
    """The run's commit records that carry no aggregate: the end of the run would then read
    every row of their files again (issue 20)."""
    from salmap.pipeline.commit_record import decode_record
    from salmap.pipeline.ledger import list_records
    from salmap.pipeline.storage import Store

    store = Store.open(run_url, storage)
    index = list_records(store)
    keys = [k for waves in index.keys.values() for k in waves.values()]
    assert keys
    return [k for k in keys if decode_record(store.read_bytes(k), k).aggregate is None]


def test_the_group_reads_and_decodes_once(tmp_path, make_shards, ray_cluster):
    """The shared execution's plan: one read and one decode stage feed both units' pools."""
    from salmap.pipeline.plan import units_of, waves_of
    from salmap.pipeline.run import unit_execution
    from salmap.pipeline.shared import build_group_dataset
    from salmap.pipeline.storage import Store

    shards = make_shards(n_shards=1, per_shard=1)
    cfg = _cfg(tmp_path, small_config(shards, str(tmp_path / "o")))
    waves = waves_of(shards, 4)
    store = Store.open(str(tmp_path / "o" / "t"))
    exs = [unit_execution(cfg, u, waves, store, 1) for u in units_of(cfg)]
    ds = build_group_dataset(exs)
    names, op = [], ds._logical_plan.dag
    while op is not None:
        names.append(op.name)
        op = op.input_dependencies[0] if op.input_dependencies else None
    names.reverse()
    assert sum("_ReadShards" in n for n in names) == 1 and sum("_Decode" in n for n in names) == 1
    pools = [n for n in names if "tiny__" in n]
    assert len(pools) == 2 and "gradient" in pools[0] and "gradcam" in pools[1], names


@pytest.mark.slow
def test_a_broken_unit_fails_alone(tmp_path, make_shards, ray_cluster):
    shards = make_shards(n_shards=2, per_shard=2)
    job = tmp_path / "job.json"
    job.write_text(small_config(shards, str(tmp_path / "out"), methods=[
        {"name": "gradient"}, {"name": "gradcam", "params": {"target_layer": "no_such_layer"}}]))
    said: list[str] = []
    result = run_job(load_config(str(job), [f"ray.address={ray_cluster}"]), out=said.append)
    assert result.exit_code == EXIT_INCOMPLETE
    assert any("shared execution of 2 units failed" in s for s in said), said
    df = read_run(str(tmp_path / "out" / "t")).to_table().to_pandas()
    assert set(df.method) == {"gradient"} and len(df) == 4 and (df.status == "ok").all()
    assert any("tiny__gradcam" in f for f in result.failures) and not any(
        "tiny__gradient" in f for f in result.failures), result.failures
    manifest = json.loads((tmp_path / "out" / "t" / "manifest.json").read_text())
    assert manifest["units"]["tiny__gradient"]["rows"] == 4


def test_the_unit_whose_pool_died_in_its_constructor_is_named():
    from salmap.pipeline.shared import pool_that_failed_to_start

    died = RuntimeError(
        "The actor died because of an error raised in its creation task, "
        "ray::MapWorker(MapBatches(Explainer[r18__gradcam])).__init__() (pid=1, "
        "repr=MapWorker(MapBatches(Explainer[r18__gradcam])))\nMethodError: no such layer")
    units = ["r18__gradient", "r18__gradcam", "r18__gradcam_pp"]
    assert pool_that_failed_to_start(died, units) == "r18__gradcam"
    try:  # wrapped, as Ray Data raises it
        try:
            raise died
        except RuntimeError as inner:
            raise ValueError("execution failed") from inner
    except ValueError as outer:
        assert pool_that_failed_to_start(outer, units) == "r18__gradcam"
    # a batch that failed inside a running actor is not a failed start: every unit is redone
    assert pool_that_failed_to_start(RuntimeError(
        "Explainer[r18__gradcam] raised ValueError in __call__"), units) is None
