"""All fourteen saliency methods in ONE pipeline job: the real Ray pipeline (two-node session
cluster), the pretrained EfficientNet-Lite0, two real photos, CPU.

Cheap parameters for the iterative methods keep it well under two minutes; the maps must be
finite and non-constant for every (photo, method) row.
"""

from __future__ import annotations

import numpy as np
import pytest
from salmap.pipeline import api
from salmap.pipeline.demo_data import write_demo_shards
from salmap.pipeline.read import read_run
from salmap.pipeline.run import EXIT_OK
from salmap.workers.methods import get_class, names

pytestmark = pytest.mark.slow

# parameters of the iterative methods: a few steps each (the defaults are timed in the notes)
CHEAP = {
    "smoothgrad": {"nsamples": 3},
    "integrated_gradients": {"steps": 4},
    "dmbp": {"steps": 5},
    "hdm": {"steps": 2, "stages": 2, "benchmark_sizes": [4], "auxiliary_sizes": [8]},
}
PX = 96  # EfficientNet-Lite0's static SAME padding runs at any size; the CAM maps are 3x3


def test_all_fourteen_methods_in_one_job(tmp_path, ray_session, ray_cluster):
    assert len(names()) == 14
    shards = write_demo_shards(str(tmp_path / "photos"), per_shard=2, names=["chelsea", "coffee"])
    out = tmp_path / "out"
    cfg = {
        "run": {"id": "all14", "output": str(out), "report": False},
        "input": {"shards": shards},
        "models": [{"name": "lite0", "source": "efficientnet_lite0", "input_size": PX}],
        "methods": [{"name": n, "params": CHEAP.get(n, {})} for n in names()],
        "targets": "predicted",
        "metrics": [],
        "resources": {"batch_size": 2, "actors_per_unit": 1, "cpus_per_actor": 1,
                      "units_in_parallel": 2},
    }
    result = api.run(cfg, [f"ray.address={ray_cluster}"], verbose=True, out=lambda *a: None)
    assert result.exit_code == EXIT_OK

    run = str(out / "all14")
    df = read_run(run).to_table().to_pandas()  # the units' map shapes differ: no saliency here
    assert len(df) == 2 * 14
    assert sorted(set(df.method)) == sorted(names())
    assert df.groupby("method").size().eq(2).all()
    bad = df[df.status != "ok"]
    assert bad.empty, bad[["method", "key", "error"]].to_string()
    for name in names():
        table = read_run(run, unit=f"lite0__{name}").to_table(columns=["key", "saliency"])
        maps = table.column("saliency").combine_chunks().to_numpy_ndarray().astype(np.float64)
        assert maps.shape[0] == 2, name
        want = (PX, PX) if not get_class(name).uses_target_layer else (3, 3)
        assert maps.shape[1:] == want, (name, maps.shape)
        assert np.isfinite(maps).all(), name
        assert (maps.reshape(2, -1).std(1) > 0).all(), f"{name}: a constant map"
