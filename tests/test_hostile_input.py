"""Hostile input: sample keys that are paths, sidecars that crash parsers (issue 21).

Unit tests for the key check, the writers' folder check and the decode of bad sidecars; one
short Ray run that reads a hostile shard, commits its good samples and exports VOC masks
without writing outside the export folder.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, small_config
from salmap.pipeline.decode import DecodeSpec, decode_row
from salmap.pipeline.safe_path import UnsafePath, join_inside, key_problem, shown_key

DEEP = b"[" * 1_000_000 + b"]" * 1_000_000  # RecursionError in json.loads
SPEC = DecodeSpec(("jpg",), "cls", "json", 32, 36, 10**8)


@pytest.mark.parametrize("key", ["a", "dir/a", "./a", "a/.b/c", "x" * 512, "çà/日本"])
def test_safe_keys_pass(key):
    assert key_problem(key) is None and join_inside("u/Seg", "s", key + ".png")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "..", "/etc/x", "C:x", "a\\..\\x", "a//b",
                                 "a/", "nul\x00", "tab\t", "\x9b", "x" * 1025, "bad\udcff", ""])
def test_unsafe_keys_are_refused_by_readers_and_writers(key):
    assert key_problem(key)
    with pytest.raises(UnsafePath):
        join_inside("u/SegmentationClass", "shard", key)


def test_shown_keys_are_escaped_and_stay_distinct():
    assert "longer than 512 bytes" in key_problem("x" * 513)  # a key; a written path may be 1024
    assert shown_key("a\x00b") == "a\\x00b" and shown_key("bad\udcff") == "bad\\udcff"
    long1, long2 = "x" * 600 + "1", "x" * 600 + "2"
    assert shown_key(long1) != shown_key(long2) and len(shown_key(long1)) <= 512


@pytest.mark.parametrize("boxes, phrase", [
    (DEEP, "nested too deeply"),
    (b"1" * 5000, "ValueError"),  # int digits limit: not a JSONDecodeError
    (b"\xff\xfe{", "not valid JSON"),
])
def test_a_sidecar_that_crashes_its_parser_fails_only_its_own_annotation(boxes, phrase):
    row = {"__key__": "k", "__url__": "s.tar", "jpg": jpeg_bytes(0), "cls": b"3", "json": boxes}
    out = decode_row(row, SPEC)
    assert out["status"] == "ok" and out["label"] == 3 and out["boxes_json"] == ""
    assert phrase in out["boxes_error"]


def test_any_exception_of_a_sidecar_parser_stays_in_its_sample(monkeypatch):
    import salmap.pipeline.decode as decode

    def boom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(decode.json, "loads", boom)
    out = decode_row({"__key__": "k", "__url__": "s.tar", "jpg": jpeg_bytes(0), "json": b"{}"},
                     SPEC)
    assert out["status"] == "ok" and "MemoryError" in out["boxes_error"]


def test_the_report_ignores_a_sidecar_that_crashes_its_parser():
    from salmap.pipeline.report.gallery import truth_boxes

    assert truth_boxes(DEEP.decode(), 1) == [] and truth_boxes("1" * 5000, 1) == []
    assert truth_boxes('{"boxes": [[1, 2, 3, 4]], "labels": [1]}', 1) == [[1.0, 2.0, 3.0, 4.0]]


def test_voc_export_refuses_a_key_that_leaves_its_folder(tmp_path):
    """Rows committed before keys were checked (or written by other tools) cannot make the
    export write outside its folder."""
    from salmap.pipeline.execute import part_name
    from salmap.pipeline.export import ExportError, export_run
    from salmap.pipeline.ledger import Ledger
    from salmap.pipeline.storage import Store
    from test_export import DATA, UNIT, _rows, _table

    rows = _rows("shard-000000", 2, lambda k: [3], 0, np.random.default_rng(0))
    rows[1].update(key="../../../../outside/x", sample_id="shard-000000/../../../../outside/x")
    store = Store.open(str(tmp_path / "run" / "t"))
    keys = [(r["sample_id"], r["target"]) for r in rows]
    name = f"{DATA}/w00000/{part_name(UNIT, keys)}"
    sink = pa.BufferOutputStream()
    pq.write_table(_table(rows), sink)
    store.write_bytes(name, sink.getvalue().to_pybytes())
    Ledger(store).commit(UNIT, {"unit": UNIT, "wave": "w00000", "files": [name], "rows": 2,
                                "errors": 0, "samples": 2, "shards": ["shard-000000"],
                                "shard_identity": {}, "per_shard": {}})
    out = tmp_path / "run" / "t" / "export" / "voc"
    with pytest.raises(ExportError, match=r"'\.\.' segment"):
        export_run(store.uri, "voc-masks", output=str(out))
    assert not any(p.name == "x.png" for p in tmp_path.rglob("*.png"))
    assert not (tmp_path / "outside").exists()


@pytest.mark.slow
def test_a_hostile_shard_commits_its_good_samples_and_exports_inside(tmp_path, ray_cluster):
    """A member named ../../../../outside/x.jpg and a .json nested 10^6 deep: the run exits 0
    with the good samples committed, the hostile sample an error row naming the member, the
    deep .json ignored on its sample; the VOC export writes nothing outside its folder."""
    from salmap.pipeline.config import load_config
    from salmap.pipeline.export import export_run
    from salmap.pipeline.read import read_frame
    from salmap.pipeline.report import write_report
    from salmap.pipeline.run import EXIT_OK, run_job

    root = tmp_path / "a" / "b" / "c" / "d"
    root.mkdir(parents=True)
    shard = root / "shard-000000.tar"
    members = [("good.jpg", jpeg_bytes(0, (64, 64))), ("good.cls", b"1"),
               ("../../../../outside/x.jpg", jpeg_bytes(1, (64, 64))),
               ("../../../../outside/x.cls", b"2"),
               ("deep.jpg", jpeg_bytes(2, (64, 64))), ("deep.cls", b"3"), ("deep.json", DEEP)]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = root / "out"
    cfg_path = tmp_path / "job.json"
    cfg_path.write_text(small_config([str(shard)], str(out), methods=[{"name": "gradcam"}],
                                     pseudo_labels={"label_maps": True}))
    # the hostile samples are error rows on purpose: above run.max_error_rate's default
    cfg = load_config(str(cfg_path), [f"ray.address={ray_cluster}", "run.max_error_rate=1"])
    result = run_job(cfg, out=lambda *a: None)
    assert result.exit_code == EXIT_OK and not result.failures
    df = read_frame(str(out / "t")).set_index("key")
    assert sorted(df.index) == ["../../../../outside/x", "deep", "good"]
    bad = df.loc["../../../../outside/x"]
    assert bad.status == "error" and "'../../../../outside/x.jpg'" in bad.error
    assert df.loc["deep"].status == "ok" and "nested too deeply" in df.loc["deep"].error
    assert df.loc["good"].status == "ok"
    before = set(tmp_path.rglob("*"))
    (folder,) = export_run(str(out / "t"), "voc-masks")
    pngs = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*.png"))
    assert pngs == ["SegmentationClass/shard-000000/deep.png",
                    "SegmentationClass/shard-000000/good.png"]
    # the report (thumbnails embedded in its pages) writes only under report/
    html = Path(write_report(str(out / "t"), max_samples=None))
    new = set(tmp_path.rglob("*")) - before
    outside = [p for p in new if not (p.is_relative_to(out / "t" / "export")
                                      or p.is_relative_to(out / "t" / "report"))]
    assert new and not outside, outside
    assert html.is_file() and "outside/x" in html.read_text()  # listed as an error row
    assert not (tmp_path / "a" / "outside").exists() and not (tmp_path / "outside").exists()
