"""The HTML report: built from a synthetic run folder (no Ray), opened in headless Chromium.

The run is written by hand following pipeline/schema.py: two units of one model, four
samples in one real WebDataset shard (solid-colour JPEGs, so a photo can be recognised) with
its classes.json, error rows (one sample fails in every unit), curves stored by one unit only,
a manifest summary for one metric of one unit, and a torchvision model (class names).
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
from salmap.pipeline.post import encode_png
from salmap.pipeline.report import render_pages, render_report, write_report
from salmap.pipeline.schema import output_schema

REPO = Path(__file__).resolve().parent.parent
COLORS = {"a": (220, 30, 30), "b": (30, 200, 40), "c": (40, 60, 230), "d": (200, 200, 40)}
SIZE = (64, 48)  # original width, height
# per (unit, sample): (deletion_auc, insertion_auc); a ranks best, c worst (score = ins - del);
# d has no ok row anywhere (its image is broken in both units)
AUCS = {("grad", "a"): (0.1, 0.9), ("grad", "b"): (0.3, 0.5), ("grad", "c"): (0.6, 0.2),
        ("cam", "a"): (0.2, 0.8), ("cam", "b"): (0.4, 0.6)}
ERROR = "image data is truncated or corrupt (OSError: broken data stream)"
MANIFEST_DELETION = 0.4321  # the manifest summary's deletion_auc mean for unit m__grad
LABEL_NAME = "my-own-class-three"  # classes.json next to the shard names label 3
TARGET_NAME = "tiger shark"  # ImageNet class 3, from resnet18's torchvision weights


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
    (path.parent / "classes.json").write_text(json.dumps({"zero": 0, "one": 1, "two": 2,
                                                          LABEL_NAME: 3}))


def _tensor(maps: list[np.ndarray | None], h: int, w: int) -> pa.Array:
    flat = np.zeros((len(maps), h * w), np.float16)
    for i, m in enumerate(maps):
        if m is not None:
            flat[i] = m.reshape(-1)
    storage = pa.FixedSizeListArray.from_arrays(
        pa.array(flat.reshape(-1)), h * w, mask=pa.array([m is None for m in maps]))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float16(), [h, w]), storage)


def signed_map(i: int) -> np.ndarray:
    """A positive blob that moves right with i and a negative one, stronger, at the bottom
    right corner; zero elsewhere (original pixels)."""
    w, h = SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    pos = np.exp(-((xx - 10 - 20 * i) ** 2 + (yy - 12) ** 2) / 30.0)
    neg = 1.5 * np.exp(-((xx - 56) ** 2 + (yy - 40) ** 2) / 30.0)
    return pos - neg


def _unit_table(method: str, hw: int, curves: bool, signed: bool = False) -> pa.Table:
    schema = output_schema(hw, hw, curves=curves)
    rows, maps = [], []
    w, h = SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    for i, key in enumerate(COLORS):
        ok = (method, key) in AUCS
        dele, ins = AUCS.get((method, key), (None, None))
        row = {f.name: None for f in schema}
        row.update(sample_id=f"shard-000000/{key}", shard="shard-000000", key=key,
                   image_file=f"{key}.jpg", model="m", method=method,
                   target=3 if ok else None, target_source="label", label=3,
                   orig_height=h if key != "d" else None, orig_width=w if key != "d" else None,
                   status="ok" if ok else "error", error="" if ok else ERROR, elapsed_ms=5.0)
        if ok:
            if signed:
                png, lo, hi = encode_png(signed_map(i).astype(np.float32))
            else:
                blob = np.exp(-((xx - 10 - 20 * i) ** 2 + (yy - 24) ** 2) / 60.0)  # moves right
                png, lo, hi = _png((blob * 255).astype(np.uint8)), 0.0, 1.0
            row.update(pred=3, pred_prob=0.5, target_logit=1.0, target_prob=0.5,
                       crop_box={"x0": 8.0, "y0": 0.0, "x1": 56.0, "y1": 48.0},
                       saliency_png=png, saliency_min=lo, saliency_max=hi,
                       pseudo_box={"x0": 2.0 + 20 * i, "y0": 16.0, "x1": 18.0 + 20 * i, "y1": 32.0},
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


def make_run(root: Path, shards: str, curves: bool = True, signed: bool = False) -> Path:
    """A committed run folder at ``root/t``: units m__grad (16x16 maps, signed ones with
    ``signed``) and m__cam (4x4), in the layout data/<model>/<method>/<wave>/part-*.parquet."""
    run = root / "t"
    units = {}
    for method, hw, with_curves in (("grad", 16, curves), ("cam", 4, False)):
        uid = f"m__{method}"
        rel = f"data/m/{method}/w0/part-000000.parquet"
        (run / rel).parent.mkdir(parents=True)
        table = _unit_table(method, hw, with_curves, signed=signed and method == "grad")
        pq.write_table(table, run / rel)
        errors = sum(s != "ok" for s in table.column("status").to_pylist())
        record = {"unit": uid, "wave": "w0", "files": [rel], "rows": len(table), "errors": errors,
                  "shards": ["shard-000000"], "samples": len(table)}
        (run / "_commits" / uid).mkdir(parents=True)
        (run / "_commits" / uid / "w0.json").write_text(json.dumps(record))
        summary = {"metrics": {"deletion_auc": {"mean": MANIFEST_DELETION, "ci_low": 0.1,
                                                "ci_high": 0.6, "n": 3}}} if method == "grad" else None
        units[uid] = {"model": "m", "method": method, "rows": len(table), "errors": errors,
                      "samples": len(table), "images_per_s": 12.5, "elapsed_s": 0.24,
                      "summary": summary}
    manifest = {
        "run_id": "t", "status": "incomplete", "started": 1.7e9, "finished": 1.7e9 + 60,
        "config": {"input": {"shards": [shards], "image_keys": ["jpg"], "boxes_key": "json",
                             "label_key": "cls", "max_pixels": 10_000_000},
                   "models": [{"name": "m", "source": "torchvision:resnet18",
                               "weights": "DEFAULT"}],
                   "run": {"id": "t", "output": str(root)}},
        "versions": {"python": "3.x", "pyarrow": pa.__version__, "salmap": "test"},
        "shards_total": 2, "units": units,
        "failures": ["m__cam: shard shard-000001: worker died (test failure line)"],
        "failures_total": 1,
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


def _gallery(html: str) -> str:
    return html[html.index("<section id=gallery>"):html.index("</section>", html.index("<section id=gallery>"))]


def _mean_colour(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=float).reshape(-1, 3).mean(0)


def test_report_shows_every_sample_with_class_names(run_dir):
    html = render_report(str(run_dir), per_side=1)
    gallery = _gallery(html)
    # all 4 samples fit one page: every one on the index, ranked a, b, c, then d (no ok row)
    assert "all 4, best first" in gallery
    at = [gallery.index(f"<span class=sid>shard-000000/{k}</span>") for k in "abcd"]
    assert at == sorted(at), at
    photos = _data_uris(gallery, "shard-000000/")
    assert len(photos) == 4
    for img, key in zip(photos, "abcd"):
        assert int(np.argmax(_mean_colour(img))) == int(np.argmax(COLORS[key])), key
    # overlays: grad has maps for a, b, c; cam for a and b (c and d: error cells)
    assert len(_data_uris(gallery, "grad map of")) == 3 and len(_data_uris(gallery, "cam map of")) == 2
    assert gallery.count(ERROR) == 3  # cam's c, and d in both units
    # class names: the label's from classes.json, the prediction's and target's from the weights
    assert f"label 3 ({LABEL_NAME})" in gallery and f"target 3 ({TARGET_NAME})" in gallery
    assert f"pred 3 ({TARGET_NAME})" in gallery and "a.jpg" in gallery


def test_report_summary_per_class_and_failures(run_dir):
    html = render_report(str(run_dir), per_side=1)
    # summary (deletion_auc is the first metric column): the manifest's value where it has
    # one, else the mean of the unit's rows
    table = html[html.index("id=summary-table"):html.index("</table>", html.index("id=summary-table"))]
    cells = {m: re.findall(r"<td[^>]*>(.*?)</td>", row) for m, row in
             re.findall(r"<tr><td>m</td><td>(\w+)</td>(.*?)</tr>", table)}
    assert set(cells) == {"grad", "cam"}
    assert cells["grad"][4].startswith(f"{MANIFEST_DELETION:.3f}<br>")
    cam_del = np.mean([AUCS[("cam", k)][0] for k in "ab"])
    assert cells["cam"][4].startswith(f"{cam_del:.3f}<br>")
    assert cells["cam"][1] == "2"  # error rows: c and d
    # per class: class 3 with its name, 5 ok rows, deletion means per method
    start = html.index("id='per-class-m'")
    per_class = html[start:html.index("</table>", start)]
    (row,) = re.findall(r"<tr><td>3 tiger shark</td>(.*?)</tr>", per_class)
    values = re.findall(r"<td class=num>(.*?)</td>", row)
    assert values[0] == "5"
    grad_del = np.mean([AUCS[("grad", k)][0] for k in "abc"])
    assert values[1:3] == [f"{grad_del:.3f}", f"{cam_del:.3f}"]  # deletion_auc: grad, cam
    # failures with their reasons, and the error rows grouped by reason
    errors = html[html.index("<section id=errors>"):]
    assert "worker died (test failure line)" in errors
    reasons = errors[errors.index("id=reasons-table"):errors.index("</table>", errors.index("id=reasons-table"))]
    assert re.search(r"image data is truncated or corrupt \(OSError</td><td>error</td>"
                     r"<td class=num>3</td><td class=num>2</td>", reasons), reasons
    assert "Deletion and insertion curves" in html and "alt='curves of m'" in html


def test_report_pages_hold_every_sample(run_dir):
    pages = render_pages(str(run_dir), per_side=1, page_size=1)
    assert sorted(pages) == ["gallery-0001.html", "gallery-0002.html", "gallery-0003.html",
                             "gallery-0004.html", "index.html"]
    index = _gallery(pages["index.html"])
    # more samples than a page: the index shows the best and the worst, and links every page
    best_at, worst_at = index.index("best 1"), index.index("worst 1")
    assert best_at < index.index("shard-000000/a", best_at) < worst_at < index.index("shard-000000/c", worst_at)
    assert all(f"href='gallery-000{k}.html'" in index for k in range(1, 5))
    # page k holds the k-th sample of the ranking, with its photo and maps
    for k, key in enumerate("abcd", start=1):
        page = pages[f"gallery-000{k}.html"]
        assert re.findall(r"<span class=sid>(.*?)</span>", page) == [f"shard-000000/{key}"]
        assert f"{k}–{k} of 4, best first" in page and "href='index.html'" in page
    assert len(_data_uris(pages["gallery-0001.html"], "grad map of")) == 1
    # max_samples keeps the two ends of the ranking
    capped = render_pages(str(run_dir), per_side=1, page_size=1, max_samples=2)
    assert sorted(capped) == ["gallery-0001.html", "gallery-0002.html", "index.html"]
    assert "shard-000000/a" in capped["gallery-0001.html"]
    assert "shard-000000/d" in capped["gallery-0002.html"]
    assert "--max-samples 0" in capped["index.html"]


def test_gallery_caption_states_one_direction(run_dir):
    for rank_by, label in (("deletion_auc", "−deletion_auc"), (None, "insertion_auc − deletion_auc")):
        gallery = _gallery(render_report(str(run_dir), rank_by=rank_by))
        caption = gallery[:gallery.index("class='note legend'")]
        assert f"ranked by the score <b>{label}</b>" in caption
        assert "higher score is always better" in caption
        assert "lower is better)" not in caption and "(higher is better" not in caption


def test_signed_maps_are_centred_at_zero_or_drawn_as_magnitude(tmp_path):
    (tmp_path / "shards").mkdir()
    _write_shard(tmp_path / "shards" / "shard-000000.tar")
    run = make_run(tmp_path / "runs", str(tmp_path / "moved-away"), signed=True)
    # no photos (moved away): the overlay is the map alone on white, so colours are readable
    diverging = _data_uris(_gallery(render_report(str(run))), "grad map of")
    magnitude = _data_uris(_gallery(render_report(str(run), signed="abs")), "grad map of")
    gallery = _gallery(render_report(str(run)))
    assert "negative ← 0 → positive" in gallery and "Maps with negative values (grad)" in gallery
    w, h = SIZE

    def at(img: Image.Image, x: float, y: float) -> np.ndarray:  # original pixels -> colour
        return np.asarray(img, dtype=float)[int(y * img.size[1] / h), int(x * img.size[0] / w)]

    for i, (div, mag) in enumerate(zip(diverging, magnitude)):
        # (57, 40): the negative blob's peak is at x = 56, where the crop's dashed edge runs
        pos, neg, zero = at(div, 10 + 20 * i, 12), at(div, 57, 40), at(div, 30, 44)
        assert pos[0] > pos[2] + 60, pos  # positive evidence: red
        assert neg[2] > neg[0] + 60, neg  # negative evidence: blue
        assert zero.min() > 235, zero  # zero: no colour (white, or the photo)
        # |value|: both blobs are "high" on viridis (yellow), the background "low" (purple)
        mpos, mneg, mzero = at(mag, 10 + 20 * i, 12), at(mag, 57, 40), at(mag, 30, 44)
        assert mneg[0] > mneg[2] and mpos[0] > 100, (mpos, mneg)
        assert mzero[2] > mzero[0], mzero


def test_encode_png_keeps_the_sign_of_a_signed_map():
    m = signed_map(0).astype(np.float32)
    m[np.abs(m) < 1e-3] = 0.0  # exact zeros where the blobs have faded out
    png, lo, hi = encode_png(m)
    assert lo == -hi == pytest.approx(-float(np.abs(m).max()))
    level = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32)
    back = level / 255 * (hi - lo) + lo
    assert np.abs(back - m).max() <= (hi - lo) / 255
    # zero is the middle grey (128); beyond one 8-bit step, negatives are below, positives above
    step = (hi - lo) / 255
    assert level[m < -step].max() <= 127 < 128 <= level[m > step].min()
    assert set(np.unique(level[m == 0])) == {128} and (m == 0).sum() > 100
    big = np.abs(m) > step
    assert np.array_equal(np.sign(back[big]), np.sign(m[big]))
    # a map without negative values is min-max scaled as before
    png, lo, hi = encode_png(np.abs(m))
    level = np.asarray(Image.open(io.BytesIO(png)))
    assert (lo, hi) == (0.0, pytest.approx(float(np.abs(m).max()))) and level.min() == 0
    assert level.max() == 255


def test_pseudo_box_of_a_signed_map_uses_the_positive_evidence():
    from salmap.workers.metrics import compute_post_metrics

    m = signed_map(1)  # positive blob at (30, 12); a stronger negative one at (56, 40)
    box = compute_post_metrics(["pseudo_box"], m, None)["pseudo_box"]
    assert box["x0"] < 30 < box["x1"] and box["y0"] < 12 < box["y1"]
    assert box["x1"] < 50 and box["y1"] < 30  # nothing of the negative blob


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


def _check(url: str, profile: Path) -> dict:
    dom = _browser(["--dump-dom", f"{url}?check=1"], profile)
    match = re.search(r'<pre id="check">(.*?)</pre>', dom.stdout, re.S)
    assert match, f"no check output; chromium said: {dom.stderr[-2000:]}"
    return json.loads(unescape(match.group(1)))


@pytest.mark.timeout(300)
def test_report_in_headless_chromium(run_dir, tmp_path):
    if _chromium() is None:
        pytest.skip("chromium not installed: run scripts/install-chromium.sh (make test does)")
    # a stale page of an earlier, longer report is removed
    (run_dir / "report").mkdir()
    (run_dir / "report" / "gallery-0009.html").write_text("old")
    path = write_report(str(run_dir), per_side=1, page_size=2)
    assert path == os.path.abspath(run_dir / "report" / "index.html") and os.path.isfile(path)
    assert sorted(p.name for p in (run_dir / "report").iterdir()) == [
        "gallery-0001.html", "gallery-0002.html", "index.html"]
    check = _check(Path(path).as_uri(), tmp_path / "profile")
    # 1 colour bar + best and worst: 2 photos, 2 grad and 1 cam overlay + 2 charts
    assert check["images"] == 8 and check["all_loaded"], check
    assert check["tables"]["summary-table"] == 2  # one row per unit
    assert check["tables"]["errors-table"] == 3  # cam's c, d in both units
    assert check["tables"]["reasons-table"] == 1
    assert check["tables"]["per-class-m"] == 1  # class 3
    assert check["tables"]["versions-table"] == 3
    assert {"summary", "per-class", "gallery", "curves", "distributions", "errors",
            "config"} <= set(check["sections"])
    # the second gallery page: c (grad map, cam error) and d (errors in both units)
    page = _check((run_dir / "report" / "gallery-0002.html").as_uri(), tmp_path / "profile")
    assert page["images"] == 1 + 2 + 1 and page["all_loaded"], page  # bar, 2 photos, 1 map
    assert page["sections"] == ["gallery"]

    shot = REPO / "test-artifacts" / "report.png"
    shot.parent.mkdir(exist_ok=True)
    shot.unlink(missing_ok=True)
    _browser([f"--screenshot={shot}", "--window-size=1400,2000", Path(path).as_uri()],
             tmp_path / "profile2")
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as img:
        assert img.size == (1400, 2000)
        # not a blank page: the header band is dark and the gallery adds colour
        assert len(np.unique(np.asarray(img.convert("RGB").resize((140, 200))).reshape(-1, 3), axis=0)) > 50


def _lightness(rgb: np.ndarray) -> np.ndarray:
    """CIELAB L* of sRGB ``uint8 [..., 3]`` colours."""
    c = rgb.astype(np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    y = lin @ np.array([0.2126, 0.7152, 0.0722])
    return np.where(y > 216 / 24389, 116 * np.cbrt(y) - 16, y * 24389 / 27)


def test_maps_use_perceptually_uniform_colour_maps():
    """Lightness rises steadily along the sequential map (jet's goes up and down) and, on the
    diverging one, falls to white's at zero symmetrically from both ends."""
    from salmap.pipeline.report.render import DIVERGING, SEQUENTIAL, colorize, colormap_lut

    seq = _lightness(colormap_lut(SEQUENTIAL))  # (8-bit colours: steps within rounding)
    assert np.all(np.diff(seq) > -0.5) and seq[-1] - seq[0] > 60
    assert not np.all(np.diff(_lightness(colormap_lut("jet"))) > -0.5)
    div = _lightness(colormap_lut(DIVERGING))
    assert np.all(np.diff(div[:128]) > -0.5) and np.all(np.diff(div[128:]) < 0.5)
    assert abs(div[0] - div[-1]) < 15
    rgb, _ = colorize(np.arange(256, dtype=np.uint8)[None])  # the default is the uniform map
    lut = colormap_lut(SEQUENTIAL)
    assert (rgb[0, 0] == lut[0]).all() and (rgb[0, -1] == lut[-1]).all()
    assert all((lut == c).all(axis=1).any() for c in rgb[0])


def test_a_few_extreme_pixels_do_not_set_the_colour_range():
    from salmap.pipeline.report.render import colorize

    # unsigned: levels 0..25 everywhere, five pixels at 255 (0.2% of the map)
    gray = np.tile(np.linspace(0, 25, 50).round().astype(np.uint8), (50, 1))
    gray[0, :5] = 255
    rgb, _ = colorize(gray)
    lum = _lightness(rgb)
    assert lum[25, 49] > lum[25, 0] + 60  # the map's own top is bright, not 10% up the scale
    # signed (Integrated Gradients): +-0.05 evidence, a few pixels at +-1
    rng = np.random.default_rng(0)
    m = rng.normal(0, 0.02, (60, 60)).astype(np.float32)
    m[20:30, 20:30] = 0.05
    m[40:50, 40:50] = -0.05
    m[0, :6] = [1, -1, 1, -1, 1, -1]
    png, lo, hi = encode_png(m)
    gray = np.asarray(Image.open(io.BytesIO(png)))
    rgb, alpha = colorize(gray, lo, hi, "diverging")
    assert alpha[25, 25] > 0.5 and alpha[45, 45] > 0.5  # visible, not 5% of the scale
    assert rgb[25, 25, 0] > rgb[25, 25, 2] and rgb[45, 45, 2] > rgb[45, 45, 0]  # red / blue


def test_thumbnails_are_large_and_fill_their_column():
    from salmap.pipeline.report.page import CSS
    from salmap.pipeline.report.render import THUMB_SIDE, thumb_size

    assert thumb_size(640, 480, THUMB_SIDE) == (320, 240)
    assert "table.gallery{width:100%;table-layout:fixed}" in CSS
    assert "table.gallery img{display:block;width:100%;max-width:480px;height:auto" in CSS


def test_gallery_rows_carry_safe_stable_sample_anchors(run_dir):
    """Each gallery row's id is its item's sample_anchor, on whichever page shows it; the
    ids need no escaping and stay apart for ids that read alike."""
    from salmap.pipeline.report.gallery import sample_anchor

    hostile = sample_anchor("m", "shard-0/<x' onload=alert(1)>", 3)
    assert re.fullmatch(r"sample-[A-Za-z0-9_-]+", hostile) and hostile == sample_anchor(
        "m", "shard-0/<x' onload=alert(1)>", 3)
    assert len({sample_anchor("m", "s/a b", 3), sample_anchor("m", "s/a-b", 3),
                sample_anchor("m", "s/a b", 4), sample_anchor("n", "s/a b", 3)}) == 4
    pages = render_pages(str(run_dir), per_side=1, page_size=1)
    for k, key in enumerate("abc", start=1):  # d has no ok row: its target is None
        ids = re.findall(r"<tr id='([^']+)'>", pages[f"gallery-000{k}.html"])
        assert ids == [sample_anchor("m", f"shard-000000/{key}", 3)], (k, ids)
