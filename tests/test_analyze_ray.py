"""``salmap analyze`` above its Ray threshold: classes analysed in Ray tasks, the same result
as in-process."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from salmap.pipeline.analyze import Params, analyze_run

from bench.planted_shortcut import UNIT, write_run

pytestmark = pytest.mark.slow


def test_ray_tasks_give_the_in_process_result(tmp_path, ray_session):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    maps, targets = [], []
    for i in range(90):
        c = i % 3
        cy, cx = [(1, 1), (6, 6), (1, 6)][(i // 3) % 2 + (c == 2)]
        maps.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0) + rng.random((8, 8)) * 0.05)
        targets.append(c)
    maps, targets = np.asarray(maps, np.float32), np.asarray(targets)
    run = write_run(str(tmp_path / "r"), maps, targets, targets, per_file=30)
    params = Params(side=8, cap=20)
    local = analyze_run(run, params=params)
    assert local.manifest["units"][UNIT]["where"] == "in-process"
    remote = analyze_run(run, params=params, ray_threshold=10)
    assert remote.manifest["units"][UNIT]["where"].startswith("ray (")
    for name in ("rows", "clusters"):
        a, b = getattr(local, name)[UNIT], getattr(remote, name)[UNIT]
        cols = [c for c in a.column_names if c not in ("mean_map", "eigenvalues", "x", "y")]
        # NaN where the run has no boxes: compared as equal
        pd.testing.assert_frame_equal(a.select(cols).to_pandas(), b.select(cols).to_pandas())
    assert local.rows[UNIT].column("embedded").to_pylist().count(True) == 60  # 20 per class
