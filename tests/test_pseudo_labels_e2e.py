"""Weak supervision end to end on the demo photos: a Ray job with ``targets: all_labels`` and
label maps, exports to COCO (read by pycocotools) and VOC masks, quality against ground-truth
boxes and a ground-truth mask in the summary and the report, and the same job with the dense
CRF, whose masks differ and stay valid."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import salmap_in_process
from PIL import Image
from salmap.pipeline.export import export_run
from salmap.pipeline.read import read_run

REPO = Path(__file__).resolve().parent.parent
PHOTOS = ["chelsea", "astronaut", "rocket"]
UNIT = "efficientnet_lite0__gradcam"


def _horse_shard(folder: Path) -> None:
    """scikit-image's horse silhouette with its exact ground truth: the silhouette itself as a
    mask (class 339, sorrel: value 340, a 16-bit PNG) and its bounding box."""
    import skimage.data as data

    h = data.horse()  # True: background
    ys, xs = np.nonzero(~h)

    def png(arr: np.ndarray, fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        return buf.getvalue()

    members = {
        "horse.jpg": png(np.where(h, 0, 255).astype(np.uint8), "JPEG"),
        "horse.cls": b"339",
        "horse.json": json.dumps({"boxes": [[int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                             int(ys.max()) + 1]], "labels": [339]}).encode(),
        "horse.seg.png": png(np.where(h, 0, 340).astype(np.uint16), "PNG"),
    }
    with tarfile.open(folder / "horse-000000.tar", "w") as tar:
        for name, data_ in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data_)
            tar.addfile(info, io.BytesIO(data_))


@pytest.mark.slow
def test_label_maps_exports_quality_and_crf_on_the_demo_photos(tmp_path, ray_cluster, capsys):
    from pycocotools.coco import COCO
    from salmap.pipeline.demo_data import write_demo_shards
    from salmap.workers.metrics.label_maps import IGNORE, classes_in, decode_png

    data = tmp_path / "data"
    write_demo_shards(str(data), names=PHOTOS)
    _horse_shard(data)
    runs = tmp_path / "runs"
    common = [f"run.output={runs}", f"ray.address={ray_cluster}",
              f'input.shards=["{data}/demo-000000.tar","{data}/horse-000000.tar"]',
              "methods=[{name: gradcam}]", "targets=all_labels", "metrics=[pseudo_box]",
              "pseudo_labels.label_maps=true", "input.mask_key=seg.png"]
    proc = salmap_in_process(capsys, "run", str(REPO / "configs" / "demo.yaml"), "run.id=plain", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pseudo-label quality, efficientnet_lite0__gradcam: boxes precision" in proc.stdout
    plain = str(runs / "plain")

    rows = read_run(plain).to_table(columns=["sample_id", "target", "status", "label_map_png",
                                             "label_map_quality", "pseudo_box"]).to_pylist()
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)  # astronaut: 2 classes
    maps = {r["sample_id"]: decode_png(r["label_map_png"]) for r in rows if r["label_map_png"]}
    assert len(maps) == 4  # one label map per image
    targets = {}
    for r in rows:
        targets.setdefault(r["sample_id"], set()).add(r["target"])
    for sid, lm in maps.items():
        assert set(classes_in(lm)) <= targets[sid] and classes_in(lm), sid
    assert set(classes_in(maps["demo-000000/astronaut"])) == {812, 834}
    quality = [r["label_map_quality"] for r in rows if r["label_map_quality"]]
    assert len(quality) == 1 and quality[0]["classes"] == [-1, 339]  # the horse only

    manifest = json.loads((runs / "plain" / "manifest.json").read_text())
    q = manifest["units"][UNIT]["summary"]["label_quality"]
    assert q["boxes"]["gt_boxes"] == 5 and 0 <= q["boxes"]["precision"] <= 1
    assert q["masks"]["images"] == 1 and 0 < q["masks"]["miou"] <= 1 and "per_class" not in q["masks"]
    html = (runs / "plain" / "report" / "index.html").read_text()
    assert "<section id=labels>" in html and "label-quality-table" in html and "sorrel" in html

    # COCO through the command line, read by pycocotools
    out = salmap_in_process(capsys, "export", plain, "--format", "coco")
    assert out.returncode == 0, out.stderr[-2000:]
    coco = COCO(str(runs / "plain" / "export" / "coco" / f"{UNIT}.json"))
    sizes = {img["file_name"]: (img["width"], img["height"]) for img in coco.imgs.values()}
    assert sizes == {"demo-000000/chelsea.jpg": (451, 300), "demo-000000/astronaut.jpg": (512, 512),
                     "demo-000000/rocket.jpg": (640, 427), "horse-000000/horse.jpg": (400, 328)}
    boxes = sorted((r["target"] + 1, round(r["pseudo_box"]["x0"], 3), round(r["pseudo_box"]["y1"], 3))
                   for r in rows if r["pseudo_box"])
    assert sorted((a["category_id"], round(a["bbox"][0], 3), round(a["bbox"][1] + a["bbox"][3], 3))
                  for a in coco.anns.values()) == boxes
    # VOC masks: one PNG per image
    (voc,) = export_run(plain, "voc-masks")
    pngs = sorted(Path(voc, "SegmentationClass").rglob("*.png"))
    assert len(pngs) == 4

    # the same job with the dense CRF (on the horse: one Ray job fewer photos): other masks,
    # still valid label maps, closer to the horse's exact silhouette
    pytest.importorskip("pydensecrf.densecrf")
    crf = [c if not c.startswith("input.shards=") else f'input.shards=["{data}/horse-000000.tar"]'
           for c in common]
    proc = salmap_in_process(capsys, "run", str(REPO / "configs" / "demo.yaml"), "run.id=crf", "pseudo_labels.crf=true", *crf)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = [r for r in read_run(str(runs / "crf")).to_table(
        columns=["label_map_png", "label_map_quality"]).to_pylist() if r["label_map_png"]]
    refined, before = decode_png(r["label_map_png"]), maps["horse-000000/horse"]
    assert refined.shape == before.shape and (refined != before).mean() > 0.01
    assert set(np.unique(refined)) <= {0, 340, IGNORE}
    # the horse is wider than tall: the centre crop never sees the side edges
    assert (refined[:, [0, -1]] == IGNORE).all() and (before[:, [0, -1]] == IGNORE).all()
    iou = {name: dict(zip(q["classes"], np.divide(q["intersection"], q["union"])))[339]
           for name, q in (("plain", quality[0]), ("crf", r["label_map_quality"]))}
    assert iou["crf"] > iou["plain"], iou
    (voc_crf,) = export_run(str(runs / "crf"), "voc-masks")
    assert len(sorted(Path(voc_crf, "SegmentationClass").rglob("*.png"))) == 1
