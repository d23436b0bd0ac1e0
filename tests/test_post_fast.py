"""The post stage's fast paths give the same outputs as the row-by-row reference: the PNG
writer's pixels, the batched resampling, the table of post_batch."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from salmap.pipeline.png import gray_png
from salmap.pipeline.post import encode_png, map_range, png_size, post_batch
from salmap.workers.columns import ACTOR_OUTPUT, BY_NAME, numpy_column
from salmap.workers.metrics.geometry import map_to_original, maps_to_original

T = dict(orig_h=30, orig_w=41, resized_h=24, resized_w=32, crop_top=0, crop_left=4, crop_h=24,
         crop_w=24)


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (30, 41)])
def test_gray_png_decodes_to_the_same_pixels(shape):
    rng = np.random.default_rng(0)
    for img in (rng.integers(0, 256, shape, dtype=np.uint8), np.full(shape, 7, np.uint8)):
        decoded = Image.open(io.BytesIO(gray_png(img)))
        assert decoded.mode == "L" and decoded.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(decoded), img)


def test_gray_png_refuses_what_it_cannot_write():
    with pytest.raises(ValueError, match="uint8"):
        gray_png(np.zeros((3, 3), np.float32))


@pytest.mark.parametrize("t", [T, dict(T, orig_h=12, orig_w=10, crop_top=2, crop_left=1)])
def test_maps_to_original_equals_one_map_at_a_time(t):
    maps = np.random.default_rng(1).normal(size=(4, 6, 6)).astype(np.float32)
    batched = maps_to_original(maps, t).numpy()
    for j in range(4):
        np.testing.assert_array_equal(batched[j], map_to_original(maps[j], t))


def _batch(n: int) -> dict[str, np.ndarray]:
    cols = {name: numpy_column(BY_NAME[name].kind, [None] * n) for name in ACTOR_OUTPUT
            if name != "saliency"}
    cols.update(sample_id=np.array([f"s/{i}" for i in range(n)], dtype=object),
                shard=np.array(["s"] * n, dtype=object),
                status=np.array(["ok", "error", "ok", "shard_end", "ok"][:n], dtype=object),
                error=np.array(["", "bad", "", "", ""][:n], dtype=object),
                target=np.array([3, -1, 4, -1, 5][:n]), pred_prob=np.array([0.5, np.nan, 1, 0, 0.25]))
    geo = {"orig_height": "orig_h", "orig_width": "orig_w"}
    for k in ("orig_height", "orig_width", "resized_h", "resized_w", "crop_top", "crop_left",
              "crop_h", "crop_w"):
        cols[k] = np.full(n, T[geo.get(k, k)], dtype=np.int64)
    cols["orig_width"][4] = 50  # a second geometry in the batch
    cols["saliency"] = np.random.default_rng(2).normal(size=(n, 6, 6)).astype(np.float16)
    return cols


@pytest.mark.parametrize("png", ["original", "native", "none"])
def test_post_batch_matches_the_row_by_row_reference(png):
    b = _batch(5)
    table = post_batch(b, {}, False, png=png).to_pydict()
    assert table["sample_id"] == ["s/0", "s/1", "s/2", "s/4"]  # the marker is left out
    assert table["target"] == [3, None, 4, 5] and table["pred_prob"] == [0.5, None, 1.0, 0.25]
    assert table["error"] == ["", "bad", "", ""] and table["saliency"][1] is None
    for pos, i in enumerate([0, 1, 2, 4]):
        if b["status"][i] != "ok":
            assert table["saliency_png"][pos] is None and table["crop_box"][pos] is None
            continue
        t = dict(T, orig_w=int(b["orig_width"][i]))
        native = b["saliency"][i].astype(np.float32)
        if png == "none":
            assert table["saliency_png"][pos] is None
            assert (table["saliency_min"][pos], table["saliency_max"][pos]) == pytest.approx(
                map_range(native))
            continue
        size = png_size(t, 6, 6) if png == "native" else (30, t["orig_w"])
        ref = maps_to_original(native[None], t, size=size).numpy()[0] if png == "native" \
            else map_to_original(native, t)
        ref_png, lo, hi = encode_png(ref)
        assert (table["saliency_min"][pos], table["saliency_max"][pos]) == pytest.approx((lo, hi))
        got = np.asarray(Image.open(io.BytesIO(table["saliency_png"][pos])))
        np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(ref_png))))
        assert got.shape == size
        np.testing.assert_array_equal(np.asarray(table["saliency"][pos], np.float16).reshape(6, 6),
                                      b["saliency"][i])


@pytest.mark.parametrize(("orig", "map_side", "want"), [
    ((3000, 4000), 7, (8, 11)),  # a CAM grid on a phone photo: dozens of pixels, not 12 M
    ((300, 400), 224, (256, 341)),  # a gradient map: the crop at 224 px, as the map
    ((60, 90), 224, (60, 90)),  # never above the photo's own size
])
def test_a_native_png_holds_the_crop_at_the_maps_resolution(orig, map_side, want):
    from salmap.pipeline.decode import crop_geometry

    h, w = orig
    geo = crop_geometry(h, w, 256, 224)
    t = {"orig_h": h, "orig_w": w, "crop_h": 224, "crop_w": 224,
         **{k: geo[k] for k in ("resized_h", "resized_w", "crop_top", "crop_left")}}
    size = png_size(t, map_side, map_side)
    assert size == want
    # the crop's extent in the PNG: the map's side (the photo's own, where that is smaller)
    crop_px = 224 * h / t["resized_h"] * size[0] / h
    assert crop_px == pytest.approx(min(map_side, 224 * h / t["resized_h"]), abs=1.0)
