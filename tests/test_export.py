"""``salmap export``: COCO (read back with pycocotools), VOC masks, Parquet; committed rows only,
from local folders and s3://, in bounded memory on a 10,000-row run.

The runs are written here without Ray, the way the pipeline writes them: Parquet files with the
schema of workers/columns.py named by pipeline.execute.part_name, made visible by commit records
written through pipeline.ledger.Ledger.commit.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from salmap.pipeline.execute import part_name
from salmap.pipeline.export import ExportError, export_run, voc_encoding, voc_palette
from salmap.pipeline.ledger import Ledger
from salmap.pipeline.storage import Store
from salmap.workers.columns import output_schema
from salmap.workers.metrics.label_maps import IGNORE, encode_png

REPO = Path(__file__).resolve().parent.parent
W, H = 32, 24  # original image size
UNIT, DATA = "m__gradcam", "data/m/gradcam"


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


MAP_PNG = _png(np.tile(np.arange(W, dtype=np.uint8) * 8, (H, 1)))  # a readable saliency PNG


def _label_map(classes: list[int], s: int) -> np.ndarray:
    """Left part: first class, right part: second class (if any), a band of ignore, background
    at the bottom; shifted by the sample index so maps differ."""
    lm = np.zeros((H, W), np.uint16)
    split = 8 + s % 8
    lm[:16, :split] = classes[0] + 1
    if len(classes) > 1:
        lm[:16, split + 2:] = classes[1] + 1
    lm[16:18] = IGNORE
    return lm


@functools.cache
def _label_map_png(classes: tuple[int, ...], s: int) -> bytes:
    """``_label_map`` as PNG bytes, encoded once per (classes, s): it depends on ``s % 8``
    only, so pass that."""
    return encode_png(_label_map(list(classes), s))


def _rows(shard: str, n: int, classes_of, payload: int, rng, quality: bool = False) -> list[dict]:
    rows = []
    for k in range(n):
        key = f"k{k:05d}"
        classes = classes_of(k)
        if classes is None:  # an error row
            rows.append({"sample_id": f"{shard}/{key}", "shard": shard, "key": key,
                         "image_file": f"{key}.jpg", "model": "m", "method": "gradcam",
                         "status": "error", "error": "image data is truncated"})
            continue
        for j, c in enumerate(classes):
            box = None if (k + j) % 7 == 3 else {"x0": 1.0 + j, "y0": 2.0, "x1": 9.5 + j,
                                                  "y1": 15.0 + k % 5}
            rows.append({
                "sample_id": f"{shard}/{key}", "shard": shard, "key": key,
                "image_file": f"{key}.jpg", "model": "m", "method": "gradcam", "target": c,
                "target_source": "all_labels", "pred": classes[0], "pred_prob": 0.5,
                "target_prob": 0.25 + 0.1 * j, "orig_height": H, "orig_width": W,
                "crop_box": {"x0": 4.0, "y0": 0.0, "x1": 28.0, "y1": 24.0},
                "saliency_png": MAP_PNG + rng.bytes(payload),  # padding: incompressible bulk
                "saliency_min": 0.0, "saliency_max": 1.0,
                "pseudo_box": box, "pseudo_box_score": None if box is None else 0.5 + 0.01 * j,
                "label_map_png": _label_map_png(tuple(classes), k % 8) if j == 0 else None,
                "status": "ok", "error": ""})
            if quality:  # ground truth: one box of each explained class; a mask on sample 1
                rows[-1].update(gt_box_count=1, pseudo_box_match=box is not None and k % 3 == 0)
                if j == 0 and k == 1:
                    rows[-1]["label_map_quality"] = {
                        "classes": [-1, *classes], "intersection": [300, 80, 0],
                        "union": [400, 100, 50], "valid_px": H * W, "labelled_px": 700}
    return rows


def _table(rows: list[dict]) -> pa.Table:
    schema = output_schema(4, 4)
    arrays = []
    for f in schema:
        if f.name == "saliency":
            ok = [r.get("status") == "ok" for r in rows]
            storage = pa.FixedSizeListArray.from_arrays(
                pa.array(np.zeros(len(rows) * 16, np.float16)), 16, mask=pa.array([not o for o in ok]))
            arrays.append(pa.ExtensionArray.from_storage(f.type, storage))
        else:
            arrays.append(pa.array([r.get(f.name) for r in rows], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_run(root: str, waves: int = 2, samples: int = 6, files_per_wave: int = 2,
              classes_of=None, payload: int = 64, storage=None, manifest: dict | None = None,
              quality: bool = False) -> str:
    """A committed run at ``root`` (local or s3://): ``waves`` waves of one shard each, rows
    spread over ``files_per_wave`` files so a sample's rows may sit in two files; plus an
    uncommitted file in a committed wave and an uncommitted wave, which no export may read."""
    rng = np.random.default_rng(0)
    classes_of = classes_of or (lambda k: None if k % 5 == 4 else ([285, 812] if k % 2 else [967]))
    store = Store.open(root, storage)
    ledger = Ledger(store)
    for w in range(waves + 1):
        wave, shard = f"w{w:05d}", f"shard-{w:06d}"
        rows = _rows(shard, samples, classes_of, payload, rng, quality)
        cut = [len(rows) * i // files_per_wave for i in range(files_per_wave + 1)]
        files = []
        for a, b in zip(cut, cut[1:]):
            part = rows[a:b]
            keys = [(r["sample_id"], -1 if r.get("target") is None else r["target"]) for r in part]
            key = f"{DATA}/{wave}/{part_name(UNIT, keys)}"
            sink = pa.BufferOutputStream()
            pq.write_table(_table(part), sink, compression="zstd")
            store.write_bytes(key, sink.getvalue().to_pybytes())
            files.append(key)
        stray = _table(rows[:2])  # written by a failed attempt: in the folder, not in the record
        sink = pa.BufferOutputStream()
        pq.write_table(stray, sink)
        store.write_bytes(f"{DATA}/{wave}/part-stray.parquet", sink.getvalue().to_pybytes())
        if w == waves:
            break  # the last wave never commits
        ledger.commit(UNIT, {"unit": UNIT, "wave": wave, "files": sorted(files), "rows": len(rows),
                             "errors": sum(r["status"] != "ok" for r in rows), "samples": samples,
                             "shards": [shard], "shard_identity": {}, "per_shard": {}})
    store.write_json("manifest.json", manifest or {
        "run_id": "t", "config": {"models": [{"name": "m", "source": "efficientnet_lite0",
                                              "weights": "DEFAULT"}]}})
    return store.uri


def committed_rows(run: str, storage=None) -> list[dict]:
    from salmap.pipeline.read import read_run

    cols = ["sample_id", "shard", "key", "status", "target", "pseudo_box", "label_map_png"]
    return read_run(run, storage=storage).to_table(columns=cols).to_pylist()


# -- COCO -------------------------------------------------------------------------------------
def test_coco_export_loads_in_pycocotools_with_one_image_per_sample(tmp_path):
    from pycocotools.coco import COCO

    run = write_run(str(tmp_path / "t"))
    (path,) = export_run(run, "coco")
    assert path == f"{run}/export/coco/{UNIT}.json"
    coco = COCO(path)
    rows = committed_rows(run)
    ok = [r for r in rows if r["status"] == "ok"]
    samples = {r["sample_id"] for r in ok}
    assert len(coco.imgs) == len(samples) == 2 * 5  # 2 committed waves, 1 error sample each
    by_file = {img["file_name"]: img for img in coco.imgs.values()}
    assert set(by_file) == {f"{r['shard']}/{r['key']}.jpg" for r in ok}
    assert all((img["width"], img["height"]) == (W, H) for img in coco.imgs.values())
    # one annotation per pseudo box, in original pixels, class + 1 as category id
    expected = sorted((r["sample_id"], r["target"] + 1, r["pseudo_box"]["x0"], r["pseudo_box"]["y1"])
                      for r in ok if r["pseudo_box"] is not None)
    got = sorted((coco.imgs[a["image_id"]]["salmap_sample_id"], a["category_id"], a["bbox"][0],
                  a["bbox"][1] + a["bbox"][3]) for a in coco.anns.values())
    assert got == expected and len(got) < len(ok)  # some maps gave no box
    assert all(a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3]) and 0 < a["score"] <= 1
               for a in coco.anns.values())
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert names == {286: "Egyptian cat", 813: "space shuttle", 968: "espresso"}
    # a sample whose two rows sit in two files is still one image with two boxes
    split = [i for i, img in coco.imgs.items() if len(coco.getAnnIds(imgIds=[i])) == 2]
    assert split


def test_coco_export_needs_pseudo_boxes_and_names_fall_back_to_ids(tmp_path):
    run = write_run(str(tmp_path / "t"), manifest={"config": {"models": [
        {"name": "m", "source": "torchvision:resnet18", "weights": "none"}]}})
    (path,) = export_run(run, "coco", output=str(tmp_path / "out"))
    cats = json.loads(Path(path).read_text())["categories"]
    assert [c["name"] for c in cats] == ["class_285", "class_812", "class_967"]
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"n{i}" for i in range(1000)))
    (path,) = export_run(run, "coco", output=str(tmp_path / "out"), class_names=str(names))
    assert [c["name"] for c in json.loads(Path(path).read_text())["categories"]] == \
        ["n285", "n812", "n967"]
    with pytest.raises(ExportError, match="no committed rows"):
        export_run(str(tmp_path / "nothing"), "coco")


def _rewrite(run: str, column: str, value) -> None:
    """Every data file of ``run`` with ``column`` set to ``value(row)`` (row: a dict)."""
    for f in Path(run, "data").rglob("*.parquet"):
        t = pq.read_table(f)
        values = [value(r) for r in t.to_pylist()]
        i = t.schema.get_field_index(column)
        t = t.set_column(i, t.schema.field(i), pa.array(values, type=t.schema.field(i).type))
        pq.write_table(t, f)


def _mask(r: dict) -> np.ndarray | None:
    """A pseudo mask inside the row's box: its top-left triangle (not a rectangle)."""
    b = r.get("pseudo_box")
    if r.get("status") != "ok" or b is None:
        return None
    m = np.zeros((H, W), bool)
    x0, y0, x1, y1 = (int(b[k]) for k in ("x0", "y0", "x1", "y1"))
    for y in range(y0, y1):
        m[y, x0:x0 + max(1, (x1 - x0) * (y1 - y) // (y1 - y0))] = True
    return m


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (24, 32), (375, 500)])
def test_rle_is_pycocotools_encoding_byte_for_byte(shape):
    from pycocotools import mask as mask_util
    from salmap.pipeline.coco_rle import encode

    rng = np.random.default_rng(shape[0])
    for p in (0.0, 0.02, 0.5, 0.98, 1.0):
        m = rng.random(shape) < p
        ours = encode(m)
        ref = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        assert ours == {"size": list(ref["size"]), "counts": ref["counts"].decode()}


def test_coco_export_carries_the_pseudo_masks_as_rle_that_ann_to_mask_reads(tmp_path):
    from pycocotools.coco import COCO
    from salmap.workers.metrics.pseudo_labels import mask_png

    run = write_run(str(tmp_path / "t"))
    _rewrite(run, "pseudo_mask_png", lambda r: None if _mask(r) is None else mask_png(_mask(r)))
    (path,) = export_run(run, "coco")
    coco = COCO(path)
    by_key = {(r["sample_id"], r["target"]): r for r in committed_rows(run)}
    assert coco.anns
    for ann in coco.anns.values():
        sid = coco.imgs[ann["image_id"]]["salmap_sample_id"]
        want = _mask({"status": "ok", **by_key[(sid, ann["category_id"] - 1)]})
        assert isinstance(ann["segmentation"]["counts"], str)  # compressed RLE
        got = coco.annToMask(ann)
        assert got.shape == (H, W) and np.array_equal(got.astype(bool), want)
        assert ann["area"] == int(want.sum()) < ann["bbox"][2] * ann["bbox"][3]


def test_exports_with_nothing_to_export_say_why_and_how_and_write_nothing(tmp_path, capsys):
    from salmap.pipeline.cli import main

    run = write_run(str(tmp_path / "t"))
    _rewrite(run, "label_map_png", lambda r: None)  # a run made without label maps
    out = str(tmp_path / "voc")
    with pytest.raises(ExportError, match=r"no label maps .* pseudo_labels\.label_maps=true"):
        export_run(run, "voc-masks", output=out)
    assert main(["export", run, "--format", "voc-masks", "--output", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pseudo_labels.label_maps=true" in err
    _rewrite(run, "pseudo_box", lambda r: None)  # ... and without pseudo boxes
    with pytest.raises(ExportError, match=r"did not compute pseudo boxes \(10 images\); add "
                                          r"pseudo_box"):
        export_run(run, "coco", output=out)
    assert main(["export", run, "--format", "coco", "--output", out]) == 2
    assert not Path(out).exists()  # not an empty train.txt, not a JSON without annotations
    manifest = json.loads(Path(run, "manifest.json").read_text())
    manifest["config"]["metrics"] = ["pseudo_box"]
    Path(run, "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="no map of the 10 images gave a pseudo box"):
        export_run(run, "coco", output=out)


# -- VOC masks --------------------------------------------------------------------------------
def test_voc_export_writes_one_palette_png_per_image_and_a_file_list(tmp_path):
    run = write_run(str(tmp_path / "t"))
    (folder,) = export_run(run, "voc-masks")
    folder = Path(folder)
    names = (folder / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    rows = committed_rows(run)
    with_maps = {f"{r['shard']}/{r['key']}": r["label_map_png"] for r in rows
                 if r["label_map_png"] is not None}
    assert sorted(names) == sorted(with_maps) and len(names) == 10
    pngs = sorted(str(p.relative_to(folder / "SegmentationClass"))[:-4]
                  for p in (folder / "SegmentationClass").rglob("*.png"))
    assert pngs == sorted(names)
    cmap = json.loads((folder / "class_map.json").read_text())
    # ImageNet ids do not fit under 255: the three classes are numbered 1..3 in class order
    assert [(c["value"], c["class"], c["name"]) for c in cmap["classes"]] == \
        [(1, 285, "Egyptian cat"), (2, 812, "space shuttle"), (3, 967, "espresso")]
    assert cmap["ignore"] == 255 and cmap["png_bits"] == 8
    lut = {0: 0, IGNORE: 255, 286: 1, 813: 2, 968: 3}
    for name in names:
        img = Image.open(folder / "SegmentationClass" / f"{name}.png")
        assert img.mode == "P" and img.getpalette()[:9] == voc_palette()[:9]
        src = np.asarray(Image.open(io.BytesIO(with_maps[name])))
        np.testing.assert_array_equal(np.asarray(img), np.vectorize(lut.get)(src))


def test_export_does_not_import_torch_and_agrees_on_the_ignore_value():
    import salmap.pipeline.export as export

    assert export.IGNORE == IGNORE
    code = "import sys, pipeline.export; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_voc_encodings_for_small_and_huge_class_sets():
    assert voc_encoding([0, 19])["values"] == {0: 1, 19: 20}  # VOC's own ids stay
    assert voc_encoding([3, 500])["values"] == {3: 1, 500: 2}
    wide = voc_encoding(list(range(0, 900, 3)))  # 300 classes
    assert wide["bits"] == 16 and wide["ignore"] == IGNORE and wide["values"][897] == 898


def test_voc_export_of_more_than_254_classes_is_16_bit(tmp_path):
    run = write_run(str(tmp_path / "t"), samples=150, classes_of=lambda k: [k * 2, k * 2 + 1])
    (folder,) = export_run(run, "voc-masks")
    png = next(Path(folder, "SegmentationClass").rglob("*.png"))
    img = Image.open(png)
    assert img.mode == "I;16"
    values = set(np.unique(np.asarray(img)).tolist())
    assert IGNORE in values and 0 in values and values - {0, IGNORE} <= set(range(1, 301))


def test_voc_export_needs_label_maps(tmp_path):
    from salmap.pipeline.cli import main

    run = write_run(str(tmp_path / "t"))
    # a run without label maps: the same rows, label_map_png dropped from the schema
    for f in Path(run, "data").rglob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["label_map_png"]), f)
    with pytest.raises(ExportError, match="pseudo_labels.label_maps=true"):
        export_run(run, "voc-masks")
    assert main(["export", run, "--format", "voc-masks"]) == 2


# -- Parquet ----------------------------------------------------------------------------------
def test_parquet_export_holds_exactly_the_committed_rows(tmp_path):
    run = write_run(str(tmp_path / "t"), files_per_wave=3)
    (folder,) = export_run(run, "parquet", output=str(tmp_path / "out"))
    table = pq.read_table(folder)
    want = committed_rows(run)
    assert table.num_rows == len(want) == 2 * 9  # per wave 2 + 3x2 rows + 1 error row
    assert sorted(zip(table.column("sample_id").to_pylist(), table.column("target").to_pylist()),
                  key=str) == sorted(((r["sample_id"], r["target"]) for r in want), key=str)
    assert "shard-000002" not in set(table.column("shard").to_pylist())  # uncommitted wave
    assert table.schema.field("saliency").type == output_schema(4, 4).field("saliency").type


# -- s3 ---------------------------------------------------------------------------------------
@pytest.fixture
def s3_endpoint():
    moto = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir("bkt")
    yield endpoint
    server.stop()


def test_exports_read_and_write_s3(tmp_path, s3_endpoint):
    from pycocotools.coco import COCO

    storage = {"endpoint": s3_endpoint, "region": "us-east-1"}
    run = write_run("s3://bkt/runs/t", storage=storage)
    (coco_url,) = export_run(run, "coco", storage=storage)
    assert coco_url == f"s3://bkt/runs/t/export/coco/{UNIT}.json"
    local = tmp_path / "coco.json"
    local.write_bytes(Store.open("s3://bkt/runs/t", storage).read_bytes(f"export/coco/{UNIT}.json"))
    assert len(COCO(str(local)).imgs) == 10
    (voc_url,) = export_run(run, "voc-masks", output="s3://bkt/voc", storage=storage)
    out = Store.open("s3://bkt/voc", storage)
    names = out.read_bytes(f"{UNIT}/ImageSets/Segmentation/train.txt").decode().split()
    assert len(names) == 10
    assert all(out.exists(f"{UNIT}/SegmentationClass/{n}.png") for n in names)
    from salmap.pipeline.cli import main

    code = main(["export", run, "--format", "parquet", "--endpoint", s3_endpoint,
                 "--output", "s3://bkt/pq"])
    assert code == 0
    assert Store.open("s3://bkt/pq", storage).list(UNIT)


# -- bounded memory ---------------------------------------------------------------------------
MEASURE = """
import json, sys, tracemalloc
import pyarrow as pa
from salmap.pipeline.export import export_run
base, out = pa.default_memory_pool(), {}
tracemalloc.start()
for i, run in enumerate([sys.argv[2], *sys.argv[2:]]):  # once unmeasured: imports happen then
    for fmt in ("coco", "voc-masks", "parquet"):
        pool = pa.proxy_memory_pool(base)  # its own peak, for this export only
        pa.set_memory_pool(pool)
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        export_run(run, fmt, output=f"{sys.argv[1]}/{i}-{fmt}")
        out[f"{run} {fmt}"] = {"python": tracemalloc.get_traced_memory()[1] - before,
                               "arrow": pool.max_memory()}
print(json.dumps(out))
"""


def test_export_of_a_10000_row_run_runs_in_bounded_memory(tmp_path):
    """Peak memory (Python objects and Arrow buffers) of exporting 10,000 rows stays that of
    exporting 1,000: the export holds one batch and one wave's sample ids, never the run."""
    two = lambda k: [285, 812]  # noqa: E731 - 2 rows per sample, 500 samples per wave
    plain = {"config": {"models": [{"name": "m", "source": "my.models:net", "weights": "none"}]}}
    small = write_run(str(tmp_path / "small"), waves=1, samples=500, classes_of=two, payload=4096,
                      manifest=plain)
    big = write_run(str(tmp_path / "big"), waves=10, samples=500, classes_of=two, payload=4096,
                    manifest=plain)
    assert len(committed_rows(big)) == 10_000
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "out"), small, big],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    for fmt in ("coco", "voc-masks", "parquet"):
        a, b = peaks[f"{small} {fmt}"], peaks[f"{big} {fmt}"]
        for kind in ("python", "arrow"):
            assert b[kind] < 1.2 * a[kind] + 2**18, (fmt, kind, a, b)
        # the 10,000 rows hold 40 MB of map PNGs alone
        assert b["python"] + b["arrow"] < 16 * 2**20, (fmt, b)
    coco = json.loads((tmp_path / "out" / "2-coco" / f"{UNIT}.json").read_text())  # big run's
    assert len(coco["images"]) == 5000 and len(coco["annotations"]) > 8000


def test_salmap_read_leaves_the_label_map_bytes_out(tmp_path, capsys):
    from salmap.pipeline.cli import main

    run = write_run(str(tmp_path / "t"))
    assert main(["read", run, "--head", "20"]) == 0
    out = capsys.readouterr().out
    assert "18 committed rows" in out and "PNG" not in out and "label_map_quality" in out


def test_the_report_uses_the_commit_records_it_is_given(tmp_path):
    """``salmap run`` hands the records it read for the summaries to the report, which then
    reads no commit record itself (it would otherwise list and read them all once more)."""
    import shutil

    from salmap.pipeline.ledger import load_commits
    from salmap.pipeline.report.data import load_run

    run = write_run(str(tmp_path / "t"))
    commits = load_commits(Store.open(run))
    assert sum(len(u.rows) for u in load_run(run).units) == 18
    shutil.rmtree(os.path.join(run, "_commits"))
    assert sum(len(u.rows) for u in load_run(run, commits=commits).units) == 18
    assert sum(len(u.rows) for u in load_run(run).units) == 0
