"""Pseudo-label quality against ground truth: box precision / recall per class, label-map mIoU
accumulated over the dataset, ground-truth mask decoding, and the config keys behind them."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image
from salmap.workers.metrics.label_maps import IGNORE
from salmap.workers.metrics.label_quality import (
    box_match,
    box_quality,
    decode_gt_mask,
    mask_counts,
    mask_quality,
)
from salmap.workers.metrics.pseudo_labels import box_score


def test_box_match_at_iou_half():
    gt = [[0, 0, 10, 10], [50, 50, 60, 60]]
    assert box_match({"x0": 0, "y0": 0, "x1": 10, "y1": 20}, gt)  # IoU exactly 0.5
    assert not box_match({"x0": 0, "y0": 0, "x1": 10, "y1": 21}, gt)
    assert box_match({"x0": 51, "y0": 50, "x1": 60, "y1": 60}, gt)  # the second instance
    assert not box_match(None, gt) and not box_match({"x0": 0, "y0": 0, "x1": 10, "y1": 10}, [])
    assert box_match({"x0": 0, "y0": 0, "x1": 10, "y1": 21}, gt, iou=0.4)


def test_box_quality_counts_per_class_and_leaves_unannotated_images_out():
    # (target, pseudo box made, gt boxes of the target in the image, matched)
    rows = [
        (1, True, 1, True),    # class 1: hit
        (1, True, 2, False),   # class 1: two instances, the box matches neither
        (1, False, 1, False),  # class 1: empty map, no box: a miss, not a false positive
        (2, True, 0, False),   # class 2 is not in this annotated image: a false positive
        (2, True, None, True),  # not annotated: left out entirely
    ]
    q = box_quality(*zip(*rows))
    c1, c2 = q["per_class"]["1"], q["per_class"]["2"]
    assert (c1["tp"], c1["pseudo_boxes"], c1["gt_boxes"]) == (1, 2, 4)
    assert c1["precision"] == 0.5 and c1["recall"] == 0.25
    assert (c2["tp"], c2["pseudo_boxes"], c2["gt_boxes"]) == (0, 1, 0)
    assert c2["precision"] == 0.0 and c2["recall"] is None
    assert q["precision"] == pytest.approx(1 / 3) and q["recall"] == 0.25  # micro
    assert q["precision_class_mean"] == 0.25 and q["recall_class_mean"] == 0.25
    assert q["rows"] == 4
    assert box_quality([1], [True], [None], [True]) is None


def test_box_score_is_the_mean_normalised_map_inside_the_box():
    m = np.zeros((10, 10))
    m[2:4, 2:6] = 2.0
    m[2:4, 6:8] = -1.0
    assert box_score(m, {"x0": 2, "y0": 2, "x1": 6, "y1": 4}) == 1.0
    assert box_score(m, {"x0": 2, "y0": 2, "x1": 8, "y1": 4}) == pytest.approx(8 / 12)
    assert box_score(m, None) is None and box_score(np.zeros((3, 3)), {"x0": 0, "y0": 0,
                                                                     "x1": 2, "y1": 2}) == 0.0


def test_mask_counts_by_hand_with_ignore_on_both_sides():
    gt = np.array([[0, 0, 5, 5], [0, 5, 5, IGNORE]], np.uint16)
    lm = np.array([[0, 5, 5, IGNORE], [5, 5, 0, 5]], np.uint16)
    c = mask_counts(lm, gt)
    assert c["classes"] == [-1, 4]  # background, class 4 (value 5)
    # pixels both label: (0,0) 0/0, (0,1) 5/0, (0,2) 5/5, (1,0) 5/0, (1,1) 5/5, (1,2) 0/5
    assert c["intersection"] == [1, 2]
    assert c["union"] == [1 + 2 + 1, 4 + 1]  # bg: pred {1}, true {3}; cls: pred 4, true 3
    assert c["valid_px"] == 7 and c["labelled_px"] == 6


def test_dataset_miou_accumulates_counts_not_per_image_ious():
    """Spec §8.5: a 1-pixel object found exactly and a 99-pixel object missed entirely give a
    class IoU of 1/100, not the mean of per-image IoUs (0.5)."""
    gt1 = np.zeros((10, 10), np.uint16)
    gt1[0, 0] = 3
    gt2 = np.zeros((10, 10), np.uint16)
    gt2.flat[:99] = 3
    lm1 = gt1.copy()
    lm2 = np.zeros((10, 10), np.uint16)
    q = mask_quality([mask_counts(lm1, gt1), None, mask_counts(lm2, gt2)])
    assert q["per_class"]["2"]["iou"] == pytest.approx(1 / 100)
    assert q["images"] == 2 and q["coverage"] == 1.0
    bg = q["per_class"]["-1"]["iou"]
    assert bg == pytest.approx((99 + 1) / (99 + 100))  # image 1: 99/99, image 2: 1/100
    assert q["miou"] == pytest.approx((bg + 0.01) / 2) and q["miou_foreground"] == pytest.approx(0.01)
    assert mask_quality([None]) is None


def test_coverage_falls_when_the_label_map_ignores_pixels():
    gt = np.full((4, 4), 2, np.uint16)
    lm = gt.copy()
    lm[:2] = IGNORE
    q = mask_quality([mask_counts(lm, gt)])
    assert q["coverage"] == 0.5 and q["per_class"]["1"]["iou"] == 1.0


def _png(arr: np.ndarray, mode: str | None = None, palette: bool = False) -> bytes:
    img = Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)
    if palette:
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in (i, 0, 255 - i)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_decode_gt_mask_accepts_voc_palette_grayscale_and_16_bit():
    arr = np.array([[0, 1, 255], [21, 0, 3]], np.uint8)
    for data in (_png(arr, "L"), _png(arr, "L", palette=True)):
        got = decode_gt_mask(data, (2, 3))
        np.testing.assert_array_equal(got, [[0, 1, IGNORE], [21, 0, 3]])
    wide = np.array([[0, 1000, 65535], [255, 0, 3]], np.uint16)
    np.testing.assert_array_equal(decode_gt_mask(_png(wide), (2, 3)), wide)  # 255 is a class
    with pytest.raises(ValueError, match="palette or grayscale"):
        decode_gt_mask(_png(np.zeros((2, 3, 3), np.uint8)), (2, 3))
    with pytest.raises(ValueError, match="3x2, the image 4x2"):
        decode_gt_mask(_png(arr, "L"), (2, 4))
    with pytest.raises(ValueError, match="not a readable PNG"):
        decode_gt_mask(b"nope", (2, 3))


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["input.mask_key=seg.png"], "set pseudo_labels.label_maps=true"),
    (["pseudo_labels.crf=true"], "refines the label maps"),
    (["pseudo_labels.label_maps=true", "pseudo_labels.fg_threshold=0.1",
      "pseudo_labels.bg_threshold=0.2"], "bg_threshold <= fg_threshold"),
    (["pseudo_labels.label_maps=true", "pseudo_labels.crf=true", "pseudo_labels.crf_unary=label"],
     "did you mean 'labels'"),
    (["pseudo_labels.box_iou=0"], "box_iou"),
])
def test_config_errors(overrides, message):
    from salmap.pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config("configs/demo.yaml", overrides)


def test_crf_without_the_binding_is_a_config_error(monkeypatch):
    import salmap.workers.metrics.crf as crf
    from salmap.pipeline.config import ConfigError, load_config

    monkeypatch.setattr(crf, "available", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'salmap\[crf\]'"):
        load_config("configs/demo.yaml", ["pseudo_labels.label_maps=true", "pseudo_labels.crf=true"])


def test_unit_hash_changes_with_label_options_but_not_for_the_defaults():
    from salmap.pipeline.config import load_config, unit_hash

    def h(*overrides):
        cfg = load_config("configs/demo.yaml", list(overrides))
        return unit_hash(cfg, cfg.models[0], cfg.methods[0])

    base = h()
    assert h("pseudo_labels.fg_threshold=0.3", "input.mask_key=null") == base
    assert h("pseudo_labels.label_maps=true") != base
    assert h("pseudo_labels.label_maps=true", "input.mask_key=seg.png") != \
        h("pseudo_labels.label_maps=true")


# -- summary and report ---------------------------------------------------------------------
def test_run_summary_and_report_show_label_quality(tmp_path):
    """A committed run (written as the pipeline writes it, tests/test_export.py) whose rows
    carry box matches and one mask's counts per wave: the numbers worked out by hand."""
    from salmap.pipeline.ledger import committed_files, load_commits
    from salmap.pipeline.report import render_report
    from salmap.pipeline.storage import Store
    from salmap.pipeline.summary import print_summaries, unit_summary
    from test_export import UNIT, write_run

    run = write_run(str(tmp_path / "t"), quality=True)
    store = Store.open(run)
    summary = unit_summary(store, committed_files(load_commits(store), UNIT))
    q = summary["label_quality"]
    # per wave: espresso 1 of 2 boxes right, 2 gt; cat 0 of 2 (one map gave none), 3 gt;
    # shuttle 1 of 3, 3 gt; two waves
    assert (q["boxes"]["tp"], q["boxes"]["pseudo_boxes"], q["boxes"]["gt_boxes"]) == (4, 14, 16)
    assert q["boxes"]["precision"] == pytest.approx(4 / 14) and q["boxes"]["recall"] == 0.25
    assert q["boxes"]["precision_class_mean"] == pytest.approx((0.5 + 0 + 1 / 3) / 3)
    assert q["masks"]["miou"] == pytest.approx((0.75 + 0.8 + 0.0) / 3)
    assert q["masks"]["coverage"] == pytest.approx(1400 / (2 * 24 * 32)) and q["masks"]["images"] == 2
    assert "per_class" not in q["boxes"] and "per_class" not in q["masks"]  # the manifest stays small
    said: list[str] = []
    print_summaries({UNIT: {"summary": summary}}, out=said.append)
    assert any("boxes precision 0.286 recall 0.250 at IoU 0.5 (16 ground-truth boxes)" in s and
               "label maps mIoU 0.517, coverage 0.911 (2 images with masks)" in s for s in said)

    html = render_report(run)
    section = html[html.index("<section id=labels>"):]
    section = section[:section.index("</section>")]
    cells = re.findall(r"<td class='num[^']*'>([^<]*)</td>", section)
    assert cells[:7] == ["0.286", "0.250", "0.278", "0.278", "0.517", "0.400", "0.911"]
    rows = dict(re.findall(r"<td>([^<]+)</td><td class=num>([^<]*)</td>", section))
    assert rows == {"background": "–", "Egyptian cat": "0.000", "space shuttle": "0.333",
                    "espresso": "0.500"}


def test_report_says_when_there_is_no_ground_truth(tmp_path):
    from salmap.pipeline.report import render_report
    from test_export import write_run

    html = render_report(write_run(str(tmp_path / "t")))
    assert "No ground truth to score the pseudo-labels against" in html
