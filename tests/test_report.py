"""The HTML report: built from a synthetic run folder (no Ray), opened in headless Chromium.

The run is written by hand following pipeline/schema.py: two units of one model, three
samples in one real WebDataset shard (solid-colour JPEGs, so a photo can be recognised), one
error row, curves stored by one unit only, and a manifest summary for one metric of one unit.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from html import unescape
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.report import render_report, write_report
from pipeline.schema import output_schema

REPO = Path(__file__).resolve().parent.parent
COLORS = {"a": (220, 30, 30), "b": (30, 200, 40), "c": (40, 60, 230)}  # red, green, blue
SIZE = (64, 48)  # original width, height
# per (unit, sample): (deletion_auc, insertion_auc); a ranks best, c worst (score = ins - del)
AUCS = {("grad", "a"): (0.1, 0.9), ("grad", "b"): (0.3, 0.5), ("grad", "c"): (0.6, 0.2),
        ("cam", "a"): (0.2, 0.8), ("cam", "b"): (0.4, 0.6)}
ERROR = "image data is truncated or corrupt (OSError: broken data stream)"
MANIFEST_DELETION = 0.4321  # the manifest summary's deletion_auc mean for unit m__grad


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", SIZE, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for key, color in COLORS.items():
            files = {"jpg": _jpeg(color), "cls": b"3"}
            if key == "a":
                files["json"] = json.dumps({"boxes": [[4, 4, 40, 30]], "labels": [3]}).encode()
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _tensor(maps: list[np.ndarray | None], h: int, w: int) -> pa.Array:
    flat = np.zeros((len(maps), h * w), np.float16)
    for i, m in enumerate(maps):
        if m is not None:
            flat[i] = m.reshape(-1)
    storage = pa.FixedSizeListArray.from_arrays(
        pa.array(flat.reshape(-1)), h * w, mask=pa.array([m is None for m in maps]))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float16(), [h, w]), storage)


def _unit_table(method: str, hw: int, curves: bool) -> pa.Table:
    schema = output_schema(hw, hw, curves=curves)
    rows, maps = [], []
    w, h = SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    for i, key in enumerate(COLORS):
        ok = (method, key) in AUCS
        dele, ins = AUCS.get((method, key), (None, None))
        blob = np.exp(-((xx - 10 - 20 * i) ** 2 + (yy - 24) ** 2) / 60.0)  # moves right with i
        row = {f.name: None for f in schema}
        row.update(sample_id=f"shard-000000/{key}", shard="shard-000000", key=key, model="m",
                   method=method, target=3 if ok else None, target_source="label", label=3,
                   orig_height=h, orig_width=w, status="ok" if ok else "error",
                   error="" if ok else ERROR, elapsed_ms=5.0)
        if ok:
            row.update(pred=3, pred_prob=0.5, target_logit=1.0, target_prob=0.5,
                       crop_box={"x0": 8.0, "y0": 0.0, "x1": 56.0, "y1": 48.0},
                       saliency_png=_png((blob * 255).astype(np.uint8)), saliency_min=0.0,
                       saliency_max=1.0, pseudo_box={"x0": 2.0 + 20 * i, "y0": 16.0,
                                                     "x1": 18.0 + 20 * i, "y1": 32.0},
                       deletion_auc=dele, insertion_auc=ins, gini=0.5 + 0.1 * i,
                       pointing_hit=key == "a", box_iou=0.6 if key == "a" else None)
            if curves:
                row["deletion_curve"] = list(np.linspace(0.5, 0.0, 11) * (1 + i))
                row["insertion_curve"] = list(np.linspace(0.0, 0.5, 11) * (1 + i))
        rows.append(row)
        maps.append(np.full((hw, hw), 0.5, np.float16) if ok else None)
    arrays = [_tensor(maps, hw, hw) if f.name == "saliency" else
              pa.array([r[f.name] for r in rows], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def make_run(root: Path, shards: str, curves: bool = True) -> Path:
    """A committed run folder at ``root/t``: units m__grad (16x16 maps) and m__cam (4x4)."""
    run = root / "t"
    units = {}
    for method, hw, with_curves in (("grad", 16, curves), ("cam", 4, False)):
        uid = f"m__{method}"
        rel = f"data/model=m/method={method}/wave=w0/part-000000.parquet"
        (run / rel).parent.mkdir(parents=True)
        table = _unit_table(method, hw, with_curves)
        pq.write_table(table, run / rel)
        errors = sum(s != "ok" for s in table.column("status").to_pylist())
        record = {"unit": uid, "wave": "w0", "files": [rel], "rows": 3, "errors": errors}
        (run / "_commits" / uid).mkdir(parents=True)
        (run / "_commits" / uid / "w0.json").write_text(json.dumps(record))
        summary = {"metrics": {"deletion_auc": {"mean": MANIFEST_DELETION, "ci_low": 0.1,
                                                "ci_high": 0.6, "n": 3}}} if method == "grad" else None
        units[uid] = {"model": "m", "method": method, "rows": 3, "errors": errors, "samples": 3,
                      "files": [rel], "images_per_s": 12.5, "elapsed_s": 0.24, "summary": summary}
    manifest = {
        "run_id": "t", "status": "incomplete", "started": 1.7e9, "finished": 1.7e9 + 60,
        "config": {"input": {"shards": [shards], "image_keys": ["jpg"], "boxes_key": "json",
                             "label_key": "cls", "max_pixels": 10_000_000},
                   "run": {"id": "t", "output": str(root)}},
        "versions": {"python": "3.x", "pyarrow": pa.__version__, "salmap": "test"},
        "shards": ["shard-000000"], "units": units,
        "failures": ["unit m__cam shard shard-000001: worker died (test failure line)"],
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.fixture
def run_dir(tmp_path) -> Path:
    (tmp_path / "shards").mkdir()
    _write_shard(tmp_path / "shards" / "shard-000000.tar")
    return make_run(tmp_path / "runs", str(tmp_path / "shards"))


def _data_uris(html: str, alt_prefix: str) -> list[Image.Image]:
    found = re.findall(r"<img src='data:image/\w+;base64,([^']+)' alt='" + re.escape(alt_prefix), html)
    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in found]


def test_report_content_from_parquet_and_shards(run_dir):
    html = render_report(str(run_dir), per_side=1)
    # gallery: one best and one worst item; the photo of the best (a) is red, the worst (c) blue
    best_at, worst_at = html.index("best 1"), html.index("worst 1")
    assert best_at < html.index("shard-000000/a", best_at) < worst_at < html.index("shard-000000/c", worst_at)
    photos = _data_uris(html, "shard-000000/")
    assert len(photos) == 2
    for img, key in zip(photos, "ac"):
        mean = np.asarray(img, dtype=float).reshape(-1, 3).mean(0)
        assert int(np.argmax(mean)) == int(np.argmax(COLORS[key])), (key, mean)
    # overlays: grad has a map for a and c, cam only for a (c is an error row shown as such)
    assert len(_data_uris(html, "grad map of")) == 2 and len(_data_uris(html, "cam map of")) == 1
    assert html.count(ERROR) == 2  # the gallery cell and the errors table
    # summary (deletion_auc is the first metric column): the manifest's value where it has
    # one, else the mean of the unit's rows
    table = html[html.index("id=summary-table"):html.index("</table>", html.index("id=summary-table"))]
    cells = {m: re.findall(r"<td[^>]*>(.*?)</td>", row) for m, row in
             re.findall(r"<tr><td>m</td><td>(\w+)</td>(.*?)</tr>", table)}
    assert set(cells) == {"grad", "cam"}
    assert cells["grad"][4].startswith(f"{MANIFEST_DELETION:.3f}<br>")
    cam_del = np.mean([AUCS[("cam", k)][0] for k in "ab"])
    assert cells["cam"][4].startswith(f"{cam_del:.3f}<br>")
    assert cells["cam"][1] == "1"  # error rows
    assert "worker died (test failure line)" in html
    assert "Deletion and insertion curves" in html and "alt='curves of m'" in html


def test_report_without_curves_or_shards(tmp_path):
    run = make_run(tmp_path / "runs", str(tmp_path / "moved-away"), curves=False)
    html = render_report(str(run))
    assert "did not store curves" in html and "alt='curves of" not in html
    assert "could not be read" in html and "photo unavailable" in html
    assert len(_data_uris(html, "grad map of")) == 3  # maps are still drawn, on no photo


def test_report_on_s3_keeps_a_local_copy(tmp_path, monkeypatch):
    moto = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                     "SALMAP_REPORT_DIR": str(tmp_path / "local")}.items():
            monkeypatch.setenv(k, v)
        (tmp_path / "shards").mkdir()
        _write_shard(tmp_path / "shards" / "shard-000000.tar")
        run = make_run(tmp_path / "runs", str(tmp_path / "shards"))
        fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir("bkt")
        pafs.copy_files(str(run), "bkt/runs/t", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        storage = {"endpoint": f"http://{host}:{port}", "region": "us-east-1"}
        path = write_report("s3://bkt/runs/t", storage=storage)
        assert path == str(tmp_path / "local" / "bkt" / "runs" / "t" / "report" / "index.html")
        with fs.open_input_stream("bkt/runs/t/report/index.html") as f:
            remote = f.read()
        assert remote == Path(path).read_bytes() and b"shard-000000/a" in remote
    finally:
        server.stop()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _browser(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=90)


@pytest.mark.timeout(240)
def test_report_in_headless_chromium(run_dir, tmp_path):
    if _chromium() is None:
        pytest.skip("chromium not installed: run scripts/install-chromium.sh (make test does)")
    path = write_report(str(run_dir))
    assert path == os.path.abspath(run_dir / "report" / "index.html") and os.path.isfile(path)
    url = Path(path).as_uri()
    dom = _browser(["--dump-dom", f"{url}?check=1"], tmp_path / "profile")
    match = re.search(r'<pre id="check">(.*?)</pre>', dom.stdout, re.S)
    assert match, f"no check output; chromium said: {dom.stderr[-2000:]}"
    check = json.loads(unescape(match.group(1)))
    # 1 colour bar + 3 photos + 5 overlays + 1 curves chart + 1 distributions chart
    assert check["images"] == 11 and check["all_loaded"], check
    assert check["tables"]["summary-table"] == 2  # one row per unit
    assert check["tables"]["errors-table"] == 1  # the one error row
    assert check["tables"]["versions-table"] == 3
    assert {"summary", "gallery", "curves", "distributions", "errors", "config"} <= set(check["sections"])

    shot = REPO / "test-artifacts" / "report.png"
    shot.parent.mkdir(exist_ok=True)
    shot.unlink(missing_ok=True)
    _browser([f"--screenshot={shot}", "--window-size=1400,2000", url], tmp_path / "profile2")
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as img:
        assert img.size == (1400, 2000)
        # not a blank page: the header band is dark and the gallery adds colour
        assert len(np.unique(np.asarray(img.convert("RGB").resize((140, 200))).reshape(-1, 3), axis=0)) > 50
