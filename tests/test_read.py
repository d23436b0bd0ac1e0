"""Reading a run: unit names, maps as [h, w] arrays, missing runs and units, ``salmap read``.

Runs here are written by hand (tests/test_report.py's make_run: units m__grad with 16x16
maps and m__cam with 4x4, error rows without maps); the readers on a real run's output
(pandas, polars, DuckDB) are exercised by tests/test_readme.py's snippets.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from salmap.pipeline.cli import main
from salmap.pipeline.read import (
    RunNotFound,
    UnitNotFound,
    maps,
    read_frame,
    read_run,
    resolve_unit,
    to_maps,
    units,
)
from test_report import make_run


def _tensor(values: list[np.ndarray], null: list[bool]) -> pa.Array:
    h, w = values[0].shape
    storage = pa.FixedSizeListArray.from_arrays(
        pa.array(np.concatenate([v.reshape(-1) for v in values]).astype(np.float32)), h * w,
        mask=pa.array(null))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), [h, w]), storage)


@pytest.fixture
def run(tmp_path):
    return str(make_run(tmp_path / "runs", str(tmp_path / "shards")))


def test_resolve_unit_accepts_the_method_or_model_alone_when_unambiguous():
    found = ["lite0__gradcam", "lite0__gradcam_pp", "r50__gradcam"]
    assert resolve_unit("lite0__gradcam", found) == "lite0__gradcam"
    assert resolve_unit("gradcam_pp", found) == "lite0__gradcam_pp"
    assert resolve_unit("r50", found) == "r50__gradcam"
    with pytest.raises(UnitNotFound, match=r"'gradcam' is ambiguous: lite0__gradcam, r50__gradcam"):
        resolve_unit("gradcam", found)
    with pytest.raises(UnitNotFound, match=r"did you mean 'gradcam_pp'\?"):
        resolve_unit("gradcam_p", found)


def test_maps_come_back_as_h_by_w_arrays(run):
    df = read_frame(run, maps=True)
    assert list(df["method"]) == ["cam"] * 4 + ["grad"] * 4  # units in name order
    shapes = [None if m is None else m.shape for m in df["saliency"]]
    assert shapes == [(4, 4), (4, 4), None, None, (16, 16), (16, 16), (16, 16), None]
    assert all(m.dtype == np.float32 and np.all(m == 0.5) for m in df["saliency"] if m is not None)
    assert "saliency_png" not in df and "saliency" not in read_frame(run)
    grad = maps(run, "grad")  # the method alone names the unit
    assert grad.shape == (4, 16, 16) and np.isnan(grad[3]).all() and np.all(grad[:3] == 0.5)
    frame = read_frame(run, "grad", maps=True)
    assert [m is None for m in frame["saliency"]] == list(np.isnan(grad).all(axis=(1, 2)))
    # to_maps reads a column as stored: a slice (an offset into the values), and a null row
    # whose values are present but masked (as the post stage builds them in memory)
    column = pq.read_table(f"{run}/data/m/grad/w0/part-000000.parquet").column("saliency")
    sliced = to_maps(column.combine_chunks().slice(2, 2))
    assert sliced.shape == (2, 16, 16) and np.all(sliced[0] == 0.5) and np.isnan(sliced[1]).all()
    masked = _tensor([np.ones((2, 2)), np.full((2, 2), 7.0), np.zeros((2, 2))], [False, True, False])
    got = to_maps(masked.slice(1, 2))
    assert np.isnan(got[0]).all() and np.all(got[1] == 0)
    with pytest.raises(UnitNotFound, match="has 2 units"):
        maps(run)  # two units: name one


def test_read_frame_columns_and_units(run):
    df = read_frame(run, "cam", columns=["sample_id", "status"])
    assert list(df.columns) == ["sample_id", "status"] and len(df) == 4
    with pytest.raises(KeyError, match="no column nope"):
        read_frame(run, "cam", columns=["sample_id", "nope"])
    assert units(run) == ["m__cam", "m__grad"]
    # all units at once: maps of different shapes leave the map column out of the dataset
    assert "saliency" not in read_run(run).schema.names
    assert "saliency" in read_run(run, unit="cam").schema.names


def test_a_missing_run_or_unit_is_named(run, tmp_path):
    with pytest.raises(RunNotFound, match="not found"):
        read_run(str(tmp_path / "runs" / "nonexistent"))
    with pytest.raises(UnitNotFound, match=r"no committed unit 'gard' \(did you mean 'grad'\?\)"):
        read_run(run, unit="gard")


def test_salmap_read_cli(run, tmp_path, capsys):
    out_file = tmp_path / "grad.npz"
    assert main(["read", run, "--unit", "grad", "--maps", str(out_file), "--head", "2"]) == 0
    out = capsys.readouterr().out
    assert "m__grad: 4 committed rows, maps 16x16 (float16)" in out
    assert "wrote" in out and "[4, 16, 16]" in out
    assert "shard-000000/b" not in out  # --maps writes the maps, without the rows' table
    saved = np.load(out_file)
    assert saved["maps"].shape == (4, 16, 16) and list(saved["target"]) == [3, 3, 3, -1]
    assert list(saved["status"]) == ["ok", "ok", "ok", "error"]
    assert main(["read", run]) == 0  # every unit: one line each, rows of both
    out = capsys.readouterr().out
    assert "m__cam: 4 committed rows, maps 4x4" in out and "m__grad: 4 committed rows" in out
    assert main(["read", str(tmp_path / "runs" / "nonexistent")]) == 2
    assert "nonexistent: not found" in capsys.readouterr().err
    assert main(["read", run, "--unit", "m"]) == 2  # the model names both units
    assert "ambiguous" in capsys.readouterr().err
    assert main(["read", run, "--maps", str(out_file)]) == 2  # --maps needs one unit


def test_export_names_units_the_same_way(run, tmp_path):
    from salmap.pipeline.export import ExportError, export_run

    (written,) = export_run(run, "parquet", output=str(tmp_path / "out"), unit="cam")
    assert written.rstrip("/").endswith("m__cam")
    with pytest.raises(ExportError, match=r"did you mean 'grad'"):
        export_run(run, "parquet", output=str(tmp_path / "out"), unit="gard")
