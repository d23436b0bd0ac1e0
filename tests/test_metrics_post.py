"""Post metrics (pointing game, energy pointing, Gini, pseudo labels, box IoU) and geometry."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from salmap.workers.metrics import MetricError, compute_post_metrics, get_spec
from salmap.workers.metrics.geometry import box_to_input, box_to_original, map_to_original
from salmap.workers.metrics.pointing import box_pixels, energy_pointing, pointing_hit
from salmap.workers.metrics.pseudo_labels import box_iou, foreground
from salmap.workers.metrics.sparseness import gini

ALL_POST = ["pointing_game", "energy_pointing", "gini", "pseudo_box", "pseudo_mask", "box_iou"]


def point_map(h, w, col, row):
    m = np.zeros((h, w), np.float32)
    m[row, col] = 1.0
    return m


# -- pointing game ------------------------------------------------------------------------
def test_pointing_tolerance_is_15px_strict():
    box = [50, 40, 100, 80]  # pixels 50..99 x 40..79
    # 14 px right of the last box column: hit; 15 px: miss (TorchRay tests d^2 < 15^2); 16: miss
    assert pointing_hit(point_map(120, 160, 99 + 14, 60), [box]) is True
    assert pointing_hit(point_map(120, 160, 99 + 15, 60), [box]) is False
    assert pointing_hit(point_map(120, 160, 99 + 16, 60), [box]) is False
    assert pointing_hit(point_map(120, 160, 50 - 14, 60), [box]) is True
    assert pointing_hit(point_map(120, 160, 50 - 15, 60), [box]) is False
    # diagonal: (9, 12) from the corner is 15 px -> miss; (9, 11) -> sqrt(202) < 15 -> hit
    assert pointing_hit(point_map(120, 160, 99 + 9, 79 + 12), [box]) is False
    assert pointing_hit(point_map(120, 160, 99 + 9, 79 + 11), [box]) is True
    assert pointing_hit(point_map(120, 160, 99 + 20, 60), [box], tolerance=25) is True


def test_pointing_union_of_boxes_ties_and_no_boxes():
    m = point_map(100, 100, 90, 90)
    assert pointing_hit(m, [[0, 0, 10, 10]]) is False
    assert pointing_hit(m, [[0, 0, 10, 10], [80, 80, 95, 95]]) is True
    assert pointing_hit(m, None) is None and pointing_hit(m, []) is None
    # a constant map points at pixel (0, 0): first index on ties
    assert pointing_hit(np.ones((100, 100)), [[0, 0, 1, 1]]) is True
    assert pointing_hit(np.ones((100, 100)), [[40, 40, 60, 60]]) is False
    # a map equal to the GT mask always hits
    gt = np.zeros((100, 100))
    gt[30:60, 20:40] = 1
    assert pointing_hit(gt, [[20, 30, 40, 60]]) is True


def test_energy_pointing_properties():
    h, w = 40, 50
    box = [10, 5, 30, 25]
    frac = (20 * 20) / (h * w)
    assert energy_pointing(np.ones((h, w)), [box]) == pytest.approx(frac)
    inside = np.zeros((h, w))
    inside[10:20, 12:28] = 3.0
    assert energy_pointing(inside, [box]) == pytest.approx(1.0)
    outside = np.zeros((h, w))
    outside[30:, 35:] = 1.0
    assert energy_pointing(outside, [box]) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    m = rng.random((h, w))
    assert energy_pointing(5 * m, [box]) == pytest.approx(energy_pointing(m, [box]))
    assert energy_pointing(m + 1, [box]) != pytest.approx(energy_pointing(m, [box]))
    # overlapping boxes: each pixel counted once
    assert energy_pointing(np.ones((h, w)), [box, [20, 5, 40, 25]]) == pytest.approx(
        30 * 20 / (h * w))
    assert energy_pointing(np.zeros((h, w)), [box]) is None
    assert energy_pointing(m, None) is None


def test_pointing_at_the_image_border_degenerate_boxes_and_nan():
    h, w = 30, 40
    last = point_map(h, w, w - 1, h - 1)  # the bottom-right pixel
    past = [30, 20, 55, 45]  # runs past the right and bottom edges
    assert pointing_hit(last, [past], tolerance=1) is True  # inside: distance 0 < 1
    assert box_pixels(past, h, w) == (30, 20, w - 1, h - 1)  # clipped, inclusive
    assert box_pixels([-5.0, -2.0, 3.0, 4.0], h, w) == (0, 0, 2, 3)
    assert pointing_hit(point_map(h, w, 35, 25), [[30, 20, 40, 30]], tolerance=1) is True
    assert pointing_hit(point_map(h, w, 29, 25), [[30, 20, 40, 30]], tolerance=1) is False
    assert pointing_hit(point_map(h, w, 35, 19), [[30, 20, 40, 30]], tolerance=1) is False
    edge = np.zeros((h, w))
    edge[:, -1] = 1.0
    edge[-1, :] = 1.0
    assert energy_pointing(edge, [past]) == pytest.approx(19 / 69)  # 69 px, 19 in the box
    # a box thinner than a pixel centre in either direction holds no pixel: no trial
    for thin in ([10.0, 5.0, 10.4, 20.0], [10.0, 5.0, 20.0, 5.4]):
        assert pointing_hit(last, [thin]) is None
        assert energy_pointing(np.ones((h, w)), [thin]) == 0.0
    # NaN never wins the argmax, and counts as no energy
    m = point_map(h, w, 5, 5)
    m[0, 0] = np.nan
    assert pointing_hit(m, [[4, 4, 7, 7]], tolerance=1) is True
    e = np.zeros((h, w))
    e[5, 5] = 1.0
    e[20, 20] = np.nan
    assert energy_pointing(e, [[4, 4, 7, 7]]) == pytest.approx(1.0)


def test_energy_pointing_of_signed_maps_uses_relu_by_default():
    """Negative evidence outside the box must not count as energy (ReLU), unless asked (abs)."""
    m = np.full((20, 20), -3.0)
    m[5:10, 5:10] = 1.0
    m[0, 0] = 2.0  # one positive pixel outside
    box = [5, 5, 10, 10]
    assert energy_pointing(m, [box]) == pytest.approx(25 / 27)
    assert energy_pointing(m, [box], sign="abs") == pytest.approx(25 / (25 + 2 + 3 * 374))
    out = compute_post_metrics(["energy_pointing"], m, [box], {})
    assert out["energy_pointing"] == pytest.approx(25 / 27)
    assert energy_pointing(-np.abs(m), [box]) is None  # no positive energy
    with pytest.raises(ValueError, match="energy_sign"):
        energy_pointing(m, [box], sign="square")


# -- Gini ---------------------------------------------------------------------------------
def test_gini_known_values():
    assert gini(np.full((20, 20), 3.0)) == pytest.approx(0.0, abs=1e-12)
    n = 1000
    eps = 1e-7
    one_hot = np.zeros(n)
    one_hot[17] = 5.0
    assert gini(one_hot) == pytest.approx((n - 1) / (n * (1 + n * eps)), rel=1e-9)
    # a = [1, 2, 3, 4] / 4: sum (2i - n - 1) a_i / (n sum a) = 2.5 / 10
    assert gini(np.array([4.0, 1.0, 3.0, 2.0]), eps=0.0) == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    assert gini(rng.random(200_000)) == pytest.approx(1 / 3, abs=0.005)
    assert gini(rng.exponential(size=200_000)) == pytest.approx(0.5, abs=0.01)
    assert gini(rng.normal(size=200_000)) == pytest.approx(np.sqrt(2) - 1, abs=0.01)


def test_gini_degenerate_maps_and_the_scale_of_eps():
    assert gini(np.zeros((6, 6))) == pytest.approx(0.0, abs=1e-12)  # constant, not NaN
    assert gini(np.array([5.0])) == pytest.approx(0.0)
    assert np.isnan(gini(np.zeros(0)))
    # eps is added after scaling by the maximum: the cap does not depend on the map's units
    n = 1000
    tiny = np.zeros(n)
    tiny[3] = 1e-4
    assert gini(tiny) == pytest.approx((n - 1) / (n * (1 + n * 1e-7)), rel=1e-9)
    # NaN counts as 0
    m = np.array([0.0, 2.0, 1.0, np.nan, 4.0])
    assert gini(m) == pytest.approx(gini(np.nan_to_num(m)))
    assert gini(m, eps=0.0) == pytest.approx(gini(np.array([0.0, 2.0, 1.0, 0.0, 4.0]), eps=0.0))


def test_gini_invariances():
    rng = np.random.default_rng(1)
    m = rng.random((30, 30))
    assert gini(m) == pytest.approx(gini(7 * m))
    assert gini(m) == pytest.approx(gini(rng.permutation(m.ravel())))
    assert gini(-m) == pytest.approx(gini(m))  # abs
    assert gini(m ** 4) > gini(m)  # more concentrated


# -- pseudo labels ------------------------------------------------------------------------
def test_pseudo_box_of_largest_blob_and_rules():
    m = np.zeros((60, 80), np.float32)
    m[10:30, 5:25] = 1.0  # 400 px
    m[40:50, 60:70] = 1.0  # 100 px
    out = compute_post_metrics(["pseudo_box"], m, None, {})
    assert out["pseudo_box"] == {"x0": 5.0, "y0": 10.0, "x1": 25.0, "y1": 30.0}
    both = compute_post_metrics(["pseudo_box"], m, None, {"largest_component": False})
    assert both["pseudo_box"] == {"x0": 5.0, "y0": 10.0, "x1": 70.0, "y1": 50.0}
    assert foreground(m).sum() == 400  # by default the largest component only
    holey = m.copy()
    holey[0, 0] = np.nan  # NaN is no evidence
    assert not foreground(holey, 0.0, largest_component=False)[0, 0]
    dots = np.zeros((5, 5))
    dots[0, 0] = dots[4, 4] = 1.0  # one-pixel components: the first wins, never the background
    assert foreground(dots).tolist() == (np.arange(25).reshape(5, 5) == 0).tolist()
    assert foreground(m, largest_component=False).sum() == 500
    # diagonal neighbours are connected (8-connectivity)
    d = np.zeros((10, 10))
    d[2, 2] = d[3, 3] = d[4, 4] = 1
    assert foreground(d).sum() == 3
    assert compute_post_metrics(["pseudo_box", "box_iou"], np.zeros((5, 5)), [[0, 0, 2, 2]], {}) \
        == {"pseudo_box": None, "box_iou": 0.0}


def test_pseudo_foreground_is_strictly_above_a_fraction_of_the_raw_maximum():
    """CAM's rule on the ReLU'd map as it is (no min-max first): a floor of 0.5 under a
    maximum of 4 is foreground at 0.1 x max; a value equal to threshold x max is not."""
    m = np.full((10, 12), 0.5)
    m[2:5, 3:7] = 4.0
    m[7, 1] = 1.0  # exactly 0.25 x 4.0
    fg = foreground(m, 0.1)
    assert fg.all()  # 0.5 > 0.4: with min-max first the floor would drop to 0
    fg = foreground(m, 0.25, largest_component=False)
    assert not fg[7, 1] and fg[2:5, 3:7].all() and fg.sum() == 12
    assert foreground(m, 0.2, largest_component=False)[7, 1]  # 1.0 > 0.8
    signed = m.copy()
    signed[0, :] = -9.0  # negative: never foreground, and the maximum is the positive one
    assert not foreground(signed, 0.0)[0].any() and foreground(signed, 0.0)[1:].all()
    assert not foreground(-m, 0.1).any()
    box = compute_post_metrics(["pseudo_box"], m, None, {"pseudo_threshold": 0.1})["pseudo_box"]
    assert box == {"x0": 0.0, "y0": 0.0, "x1": 12.0, "y1": 10.0}


def test_threshold_monotone_and_otsu():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:64, 0:64]
    m = np.exp(-((yy - 30) ** 2 + (xx - 20) ** 2) / 80.0) + 0.05 * rng.random((64, 64))
    areas = [foreground(m, t, largest_component=False).sum() for t in (0.1, 0.2, 0.4, 0.8)]
    assert all(a >= b for a, b in zip(areas, areas[1:])) and areas[0] > areas[-1]
    bimodal = np.full((50, 50), 0.1) + 0.02 * rng.random((50, 50))
    bimodal[20:35, 10:30] = 0.9
    out = compute_post_metrics(["pseudo_box"], bimodal, None, {"pseudo_threshold": "otsu"})
    assert out["pseudo_box"] == {"x0": 10.0, "y0": 20.0, "x1": 30.0, "y1": 35.0}
    for bad in (1.5, 1.0, -0.1, "half"):
        with pytest.raises(ValueError, match="pseudo_threshold"):
            foreground(m, bad)
    assert foreground(m, 0.0, largest_component=False).all()  # 0 is allowed: every m > 0
    # Otsu on a flat positive map: no split, every pixel is foreground
    assert foreground(np.full((6, 6), 0.5), "otsu").all()


def test_pseudo_mask_png_is_one_bit_at_original_size():
    m = np.zeros((37, 53), np.float32)
    m[5:20, 10:40] = 2.0
    m[30:33, 0:3] = 1.0  # a smaller second blob, dropped
    png = compute_post_metrics(["pseudo_mask"], m, None, {})["pseudo_mask_png"]
    img = Image.open(io.BytesIO(png))
    assert img.mode == "1" and img.size == (53, 37)
    back = np.asarray(img, dtype=bool)
    expected = np.zeros((37, 53), bool)
    expected[5:20, 10:40] = True
    assert np.array_equal(back, expected)


def test_box_iou():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [0, 5, 10, 15]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert box_iou([0, 0, 10, 10], [2, 3, 6, 8]) == pytest.approx(20 / 100)  # inside
    assert box_iou([0, 0, 4, 4], [4, 4, 8, 8]) == 0.0 and box_iou([0, 0, 4, 4], [5, 0, 8, 4]) == 0
    thin, flat = [0, 0, 0.5, 2], [0, 0, 2, 0.25]  # sub-pixel sides count as they are
    assert box_iou(thin, thin) == pytest.approx(1.0) and box_iou(flat, flat) == pytest.approx(1.0)
    assert box_iou(thin, [0, 0, 1, 2]) == pytest.approx(0.5)
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    m = np.zeros((50, 50))
    m[10:20, 10:20] = 1
    out = compute_post_metrics(["box_iou"], m, [[30, 30, 40, 40], [10, 10, 20, 25]], {})
    assert out["box_iou"] == pytest.approx(100 / 150)
    assert compute_post_metrics(["box_iou"], m, None, {})["box_iou"] is None


# -- geometry -----------------------------------------------------------------------------
def center_crop_transform(h0, w0, short=256, crop=224):
    s = short / min(h0, w0)
    rh, rw = max(crop, round(h0 * s)), max(crop, round(w0 * s))
    return {"orig_h": h0, "orig_w": w0, "resized_h": rh, "resized_w": rw,
            "crop_top": (rh - crop) // 2, "crop_left": (rw - crop) // 2,
            "crop_h": crop, "crop_w": crop}


def test_box_round_trip_and_clipping():
    t = center_crop_transform(300, 400)
    box = [150.0, 100.0, 250.5, 200.0]
    back = box_to_original(box_to_input(box, t), t)
    np.testing.assert_allclose(back, box, atol=1e-9)
    assert box_to_input([0, 0, 400, 300], t) == [0, 0, 224, 224]  # clipped to the crop
    with pytest.raises(ValueError, match="crop_w"):
        map_to_original(np.zeros((7, 7)), {k: v for k, v in t.items() if k != "crop_w"})


def test_map_to_original_identity_and_frame():
    ident = {"orig_h": 20, "orig_w": 30, "resized_h": 20, "resized_w": 30,
             "crop_top": 0, "crop_left": 0, "crop_h": 20, "crop_w": 30}
    m = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    np.testing.assert_array_equal(map_to_original(m, ident), m)
    t = center_crop_transform(300, 400)
    out = map_to_original(np.ones((7, 7), np.float32), t)
    assert out.shape == (300, 400) and out.dtype == np.float32
    x0, y0, x1, y1 = box_to_original([0, 0, 224, 224], t)
    assert out[int(y0) + 3:int(y1) - 3, int(x0) + 3:int(x1) - 3].min() == pytest.approx(1.0)
    assert out[:, : int(x0) - 2].max() == 0 and out[:, int(x1) + 2:].max() == 0


@pytest.mark.parametrize("h0,w0", [(300, 400), (500, 260)])
def test_pseudo_box_of_a_blob_survives_resize_and_crop(h0, w0):
    """A blob drawn at the model input maps back to its box in original pixels."""
    t = center_crop_transform(h0, w0)
    blob = [0.45 * w0, 0.35 * h0, 0.62 * w0, 0.58 * h0]  # inside the crop
    ix0, iy0, ix1, iy1 = box_to_input(blob, t)
    centres = np.arange(224) + 0.5
    inside_x = (centres >= ix0) & (centres < ix1)
    inside_y = (centres >= iy0) & (centres < iy1)
    m = (inside_y[:, None] & inside_x[None, :]).astype(np.float32)
    orig = map_to_original(m, t)
    box = compute_post_metrics(["pseudo_box"], orig, None, {"pseudo_threshold": 0.5})["pseudo_box"]
    np.testing.assert_allclose([box["x0"], box["y0"], box["x1"], box["y1"]], blob, atol=2.0)
    assert compute_post_metrics(["box_iou"], orig, [blob], {"pseudo_threshold": 0.5})[
        "box_iou"] > 0.95


# -- entry point --------------------------------------------------------------------------
def test_compute_post_metrics_fills_exactly_the_registered_columns():
    m = np.zeros((40, 40), np.float32)
    m[10:20, 10:20] = 1
    out = compute_post_metrics(ALL_POST, m, [[8, 8, 22, 22]], {}, saliency_input=m)
    expected = {c for name in ALL_POST for c in get_spec(name).columns}
    assert set(out) == expected
    assert out["pointing_hit"] is True and isinstance(out["gini"], float)
    no_boxes = compute_post_metrics(ALL_POST, m, None, {}, saliency_input=m)
    assert no_boxes["pointing_hit"] is None and no_boxes["energy_pointing"] is None
    assert no_boxes["box_iou"] is None and no_boxes["pseudo_box"] is not None
    with pytest.raises(MetricError, match="did you mean 'gini'"):
        compute_post_metrics(["ginni"], m, None, {})
    with pytest.raises(MetricError, match="model"):
        compute_post_metrics(["deletion_auc"], m, None, {})
    with pytest.raises(MetricError, match="pointing_tolerance"):
        compute_post_metrics(["pointing_game"], m, None, {"pointing_game": {"tolerance": 3}})


def test_config_params_stay_with_their_metric_except_the_pseudo_label_group():
    from salmap.workers.metrics.registry import per_metric_params, resolve_params

    nested = per_metric_params({"deletion_auc": {"steps": 56}, "insertion_auc": None,
                                "pseudo_box": {"pseudo_threshold": 0.5}, "box_iou": {}})
    assert resolve_params("deletion_auc", nested)["steps"] == 56
    assert resolve_params("insertion_auc", nested)["steps"] == 28
    assert resolve_params("box_iou", nested)["pseudo_threshold"] == 0.5
