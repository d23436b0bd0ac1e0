"""The post stage's metric wiring: Gini on the map over the model input (not the zero-padded
original-pixel map), and the VOC ``difficult`` flags from the annotation to the pointing game."""

from __future__ import annotations

import json

import numpy as np
import pytest
from salmap.pipeline.decode import DecodeError, parse_boxes
from salmap.pipeline.post import boxes_for_target, post_batch
from salmap.workers.metrics import MetricError, compute_post_metrics
from salmap.workers.metrics.geometry import map_to_input, map_to_original
from salmap.workers.metrics.pointing import pointing_hit
from salmap.workers.metrics.sparseness import gini


def center_crop(h0: int, w0: int, short: int = 73, crop: int = 64) -> dict[str, int]:
    s = short / min(h0, w0)
    rh, rw = max(crop, round(h0 * s)), max(crop, round(w0 * s))
    return {"orig_h": h0, "orig_w": w0, "resized_h": rh, "resized_w": rw,
            "crop_top": (rh - crop) // 2, "crop_left": (rw - crop) // 2,
            "crop_h": crop, "crop_w": crop}


def actor_batch(maps: list[np.ndarray], transforms: list[dict[str, int]],
                boxes_json: list[str] | None = None, target: int = 3) -> dict[str, np.ndarray]:
    """What the model actor hands the post stage, for ok rows without model metrics."""
    n = len(maps)
    text = {c: np.array([f"{c}{i}" for i in range(n)], dtype=object)
            for c in ("sample_id", "shard", "key", "model", "method")}
    return {
        **text,
        "target_source": np.array(["predicted"] * n, dtype=object),
        "status": np.array(["ok"] * n, dtype=object), "error": np.array([""] * n, dtype=object),
        "target": np.full(n, target), "label": np.full(n, -1), "pred": np.full(n, target),
        **{c: np.full(n, 0.5, np.float32)
           for c in ("pred_prob", "target_logit", "target_prob", "elapsed_ms")},
        "orig_height": np.array([t["orig_h"] for t in transforms]),
        "orig_width": np.array([t["orig_w"] for t in transforms]),
        **{k: np.array([t[k] for t in transforms])
           for k in ("resized_h", "resized_w", "crop_top", "crop_left", "crop_h", "crop_w")},
        "boxes_json": np.array(boxes_json or [""] * n, dtype=object),
        "saliency": np.stack(maps).astype(np.float16),
    }


# the aspect ratios of the photos (astronaut, chelsea, coffee) and a portrait one
SHAPES = [(512, 512), (300, 451), (400, 600), (500, 260)]


def test_gini_of_a_constant_map_is_zero_whatever_the_aspect_ratio():
    """On the original-pixel map, zero outside the centre crop, a constant map scored the
    share of the photo outside the crop (0.23-0.49); on the model's input it is 0."""
    transforms = [center_crop(h, w) for h, w in SHAPES]
    table = post_batch(actor_batch([np.full((7, 7), 0.7)] * 4, transforms), {"gini": {}}, False)
    assert table.column("error").to_pylist() == [""] * 4
    np.testing.assert_allclose(table.column("gini").to_pylist(), 0.0, atol=1e-6)


def test_gini_is_computed_on_the_map_at_the_model_input_resolution():
    rng = np.random.default_rng(0)
    native = [(rng.random((7, 7)) ** 3).astype(np.float16).astype(np.float32) for _ in SHAPES]
    transforms = [center_crop(h, w) for h, w in SHAPES]
    table = post_batch(actor_batch(native, transforms), {"gini": {}}, False)
    got = table.column("gini").to_pylist()
    for m, t, g in zip(native, transforms, got):
        at_input = map_to_input(m, t)
        assert at_input.shape == (64, 64)
        assert g == pytest.approx(gini(at_input), abs=1e-6)
        assert g != pytest.approx(gini(m), abs=1e-3)  # not the native 7x7 map
        assert g != pytest.approx(gini(map_to_original(m, t)), abs=1e-3)  # nor the padded one
    # the same map at every aspect ratio scores the same
    same = post_batch(actor_batch([native[0]] * 4, transforms), {"gini": {}}, False)
    np.testing.assert_allclose(same.column("gini").to_pylist(), got[0], atol=1e-6)


def test_map_to_input_is_a_bilinear_upsampling_to_the_crop():
    t = center_crop(300, 451, short=9, crop=8)
    m = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    # align_corners=False, 2 -> 8: source coordinate (i + 0.5) / 4 - 0.5, clamped to [0, 1]
    w = np.clip((np.arange(8) + 0.5) / 4 - 0.5, 0, 1)
    rows = (1 - w)[:, None] * m[0] + w[:, None] * m[1]
    expected = (1 - w)[None, :] * rows[:, :1] + w[None, :] * rows[:, 1:]
    np.testing.assert_allclose(map_to_input(m, t), expected, atol=1e-6)


def test_gini_needs_the_input_map():
    m = np.ones((5, 5), np.float32)
    with pytest.raises(MetricError, match="saliency_input"):
        compute_post_metrics(["gini"], m, None, {})
    assert compute_post_metrics(["gini"], np.zeros((9, 9)), None, {},
                                saliency_input=np.full((4, 4), 2.0))["gini"] == pytest.approx(0)


# -- VOC difficult flags ------------------------------------------------------------------
def test_pointing_skips_a_class_whose_boxes_are_all_difficult():
    m = np.zeros((60, 60), np.float32)
    m[10, 10] = 1.0
    near, far = [5, 5, 15, 15], [40, 40, 50, 50]
    assert pointing_hit(m, [near], difficult=[True]) is None
    assert pointing_hit(m, [near, far], difficult=[True, True]) is None
    # one non-difficult box: a trial, and the GT region is the union with the difficult ones
    assert pointing_hit(m, [near, far], difficult=[True, False]) is True
    assert pointing_hit(m, [far], difficult=[False]) is False
    assert pointing_hit(m, [near], difficult=None) is True
    with pytest.raises(ValueError, match="one flag per box"):
        pointing_hit(m, [near, far], difficult=[True])
    out = compute_post_metrics(["pointing_game", "energy_pointing", "box_iou"], m, [near],
                               {}, difficult=[True])
    assert out["pointing_hit"] is None
    assert out["energy_pointing"] == pytest.approx(1.0)  # the other metrics use every box
    assert out["box_iou"] is not None


def test_parse_boxes_accepts_difficult_flags():
    raw = {"boxes": [[0, 0, 5, 5], [1, 1, 9, 9]], "labels": [2, 3], "difficult": [1, False]}
    assert parse_boxes(json.dumps(raw)) == {"boxes": [[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 9.0, 9.0]],
                                            "labels": [2, 3], "difficult": [True, False]}
    assert "difficult" not in parse_boxes(json.dumps({"boxes": [[0, 0, 1, 1]], "labels": [1]}))
    for bad in ([1], [1, 2], ["yes", 0], None):
        with pytest.raises(DecodeError, match="difficult"):
            parse_boxes(json.dumps({**raw, "difficult": bad}))


def test_difficult_flags_reach_the_pointing_game_through_the_post_stage():
    t = {"orig_h": 64, "orig_w": 64, "resized_h": 64, "resized_w": 64,
         "crop_top": 0, "crop_left": 0, "crop_h": 64, "crop_w": 64}
    m = np.zeros((64, 64), np.float32)
    m[10, 10] = 1.0
    ann = {"boxes": [[5, 5, 15, 15], [40, 40, 50, 50], [30, 0, 40, 10]], "labels": [3, 3, 7]}
    rows = [json.dumps({**ann, "difficult": d}) for d in
            ([True, True, False], [True, False, True], [False, False, False])] + [json.dumps(ann)]
    assert boxes_for_target(rows[0], 3) == ([[5, 5, 15, 15], [40, 40, 50, 50]], [True, True])
    assert boxes_for_target(rows[3], 3) == ([[5, 5, 15, 15], [40, 40, 50, 50]], None)
    assert boxes_for_target(rows[0], 5) == (None, None)
    table = post_batch(actor_batch([m] * 4, [t] * 4, rows), {"pointing_game": {}}, False)
    assert table.column("error").to_pylist() == [""] * 4
    assert table.column("pointing_hit").to_pylist() == [None, True, True, True]


def test_transforms_of_one_pixel_are_valid_and_zero_is_not():
    one = {"orig_h": 1, "orig_w": 1, "resized_h": 1, "resized_w": 1, "crop_top": 0,
           "crop_left": 0, "crop_h": 1, "crop_w": 1}
    assert map_to_original(np.full((3, 3), 2.0), one).tolist() == [[2.0]]
    assert map_to_input(np.full((3, 3), 2.0), one).tolist() == [[2.0]]
    for key in ("orig_h", "resized_w", "crop_h"):
        with pytest.raises(ValueError, match=key):
            map_to_input(np.ones((3, 3)), {**one, key: 0})


@pytest.mark.parametrize("frame,orig", [((20, 20), (10, 40)), ((20, 20), (40, 10)),
                                        ((20, 8), (10, 16)), ((8, 20), (16, 10))])
def test_a_side_that_shrinks_is_antialiased_even_when_the_other_grows(frame, orig):
    """The resized frame back to an original where one side shrinks and the other grows."""
    import torch
    import torch.nn.functional as F

    t = {"orig_h": orig[0], "orig_w": orig[1], "resized_h": frame[0], "resized_w": frame[1],
         "crop_top": 0, "crop_left": 0, "crop_h": frame[0], "crop_w": frame[1]}
    m = np.random.default_rng(4).random(frame).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(m)[None, None], size=orig, mode="bilinear",
                        align_corners=False, antialias=True)[0, 0].numpy()
    plain = F.interpolate(torch.from_numpy(m)[None, None], size=orig, mode="bilinear",
                          align_corners=False)[0, 0].numpy()
    got = map_to_original(m, t)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert np.abs(got - plain).max() > 1e-2


def test_a_crop_larger_than_the_frame_and_boxes_outside_the_crop():
    import torch
    from salmap.workers.metrics.geometry import box_to_input

    t = {"orig_h": 30, "orig_w": 30, "resized_h": 30, "resized_w": 30, "crop_top": -5,
         "crop_left": -3, "crop_h": 40, "crop_w": 40}
    m = np.random.default_rng(5).random((40, 40)).astype(np.float32)
    np.testing.assert_array_equal(map_to_original(m, t), m[5:35, 3:33])
    grad = torch.from_numpy(m).requires_grad_(True)  # a map still attached to a graph
    np.testing.assert_array_equal(map_to_original(grad, t), m[5:35, 3:33])
    inside = {**t, "crop_top": 2, "crop_left": 4, "crop_h": 20, "crop_w": 20}
    assert box_to_input([0, 0, 3, 10], inside) == [0.0, 0.0, 0.0, 8.0]  # left of the crop
    assert box_to_input([5, 0, 10, 1], inside) == [1.0, 0.0, 6.0, 0.0]  # above it
