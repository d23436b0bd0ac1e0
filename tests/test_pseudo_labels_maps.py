"""Per-image label maps (IRN thresholds), the dense-CRF option, and how the post stage gets all of
a sample's maps even when its batches split the sample's rows. No Ray."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from salmap.workers.metrics.label_maps import (
    IGNORE,
    attach_sample_maps,
    class_scores,
    classes_in,
    crop_valid,
    decode_png,
    encode_png,
    label_map,
    pack_maps,
    unpack_maps,
)


def irn_reference(scores: np.ndarray, classes: list[int], fg: float, bg: float) -> np.ndarray:
    """IRN's cam_to_ir_label without the CRF: pad a background row at each threshold, arg-max,
    then class where the fg labelling says so, background where both say background, else
    ignore (jiwoon-ahn/irn step/cam_to_ir_label.py, written from its description)."""
    keys = np.array([0, *[c + 1 for c in classes]])
    at = {}
    for name, t in (("fg", fg), ("bg", bg)):
        padded = np.concatenate([np.full((1, *scores.shape[1:]), t, scores.dtype), scores])
        at[name] = keys[padded.argmax(0)]
    out = at["fg"].copy()
    out[at["fg"] == 0] = IGNORE
    out[(at["fg"] == 0) & (at["bg"] == 0)] = 0
    return out


def test_label_map_follows_the_irn_two_threshold_rule_exactly():
    rng = np.random.default_rng(0)
    scores = rng.random((3, 40, 50)).astype(np.float32) ** 3  # many values near each threshold
    scores[:, :5] = 0.30  # exact ties with the fg threshold: background pad wins, as in IRN
    classes = [7, 0, 999]
    got = label_map(scores, classes, fg=0.30, bg=0.05)
    np.testing.assert_array_equal(got, irn_reference(scores, classes, 0.30, 0.05))
    assert set(np.unique(got)) == {0, 8, 1, 1000, IGNORE}
    assert (got[:5] == IGNORE).all()  # 0.30 is not above fg, but above bg


def test_label_map_values_by_hand_and_invalid_pixels_ignored():
    s = np.zeros((2, 2, 3), np.float32)
    s[0] = [[0.9, 0.2, 0.0], [0.31, 0.3, 0.05]]
    s[1] = [[0.95, 0.0, 0.04], [0.1, 0.0, 0.06]]
    got = label_map(s, [4, 2], fg=0.3, bg=0.05)
    np.testing.assert_array_equal(got, [[3, IGNORE, 0], [5, IGNORE, IGNORE]])
    valid = np.array([[True, True, True], [False, True, True]])
    assert label_map(s, [4, 2], 0.3, 0.05, valid)[1, 0] == IGNORE
    with pytest.raises(ValueError, match="bg <= fg"):
        label_map(s, [4, 2], fg=0.1, bg=0.2)


def test_class_scores_are_scale_free_relu_over_max():
    m = np.stack([np.array([[-2.0, 1.0], [2.0, 4.0]]), np.zeros((2, 2)), -np.ones((2, 2))])
    s = class_scores(m)
    np.testing.assert_allclose(s[0], [[0, 0.25], [0.5, 1.0]])
    assert (s[1] == 0).all() and (s[2] == 0).all()  # no positive value: no class anywhere
    np.testing.assert_allclose(class_scores(m * 1e-9), s, rtol=1e-5)  # tiny gradients too


def test_crop_valid_uses_pixel_centres():
    v = crop_valid(4, 6, {"x0": 1.5, "y0": 0.0, "x1": 4.4, "y1": 2.6})
    np.testing.assert_array_equal(v.astype(int), [[0, 1, 1, 1, 0, 0]] * 3 + [[0] * 6])


def test_label_png_is_16_bit_and_round_trips_class_999_and_ignore():
    lm = np.array([[0, 1000, IGNORE], [286, 1, 0]], np.uint16)
    png = encode_png(lm)
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    np.testing.assert_array_equal(decode_png(png), lm)
    assert classes_in(lm) == [0, 285, 999]


def _actor_batch(samples: list[tuple[str, list[int], str]], h: int = 4, w: int = 4) -> dict:
    """An actor-output-like batch: (sample id, targets, status) per sample, maps marked by
    target so a test can tell which map went where."""
    cols: dict[str, list] = {k: [] for k in ("sample_id", "target", "status", "saliency",
                                             "image_bytes", "gt_mask_bytes")}
    for sid, targets, status in samples:
        for t in targets or [-1]:
            cols["sample_id"].append(sid)
            cols["target"].append(t)
            cols["status"].append(status)
            cols["saliency"].append(np.full((h, w), t, np.float16))
            cols["image_bytes"].append(f"img-{sid}".encode())
            cols["gt_mask_bytes"].append(f"gt-{sid}".encode())
    out = {k: np.array(v, dtype=object) for k, v in cols.items() if k != "saliency"}
    out["target"] = np.array(cols["target"], np.int64)
    out["saliency"] = np.stack(cols["saliency"])
    return out


def test_attach_sample_maps_packs_each_samples_maps_on_its_first_ok_row():
    batch = _actor_batch([("a", [3, 5, 9], "ok"), ("b", [], "error"), ("c", [1], "ok")])
    out = attach_sample_maps(batch)
    packs = list(out["sample_maps"])
    assert [bool(p) for p in packs] == [True, False, False, False, True]
    targets, maps = unpack_maps(packs[0])
    assert targets == [3, 5, 9]
    np.testing.assert_array_equal(maps[:, 0, 0], [3, 5, 9])
    assert maps.dtype == np.float16  # as the saliency column stores them
    assert list(out["image_bytes"]) == [b"img-a", b"", b"", b"", b"img-c"]
    assert list(out["gt_mask_bytes"]) == [b"gt-a", b"", b"", b"", b"gt-c"]
    assert unpack_maps(pack_maps([2], np.zeros((1, 2, 2), np.float32)))[0] == [2]


# -- the post stage, with a real model actor and a split batch --------------------------------
def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def two_class_rows():
    """The astronaut photo with two annotated classes, explained by a small random ResNet for
    both (targets all_labels), through the label-map actor class."""
    import skimage.data as data
    from salmap.pipeline.decode import DecodeSpec, decode_batch
    from salmap.pipeline.execute import explainer_class
    from salmap.workers.actor import ActorSpec

    photo = data.astronaut()[::4, ::4]  # 128 x 128
    gt = np.zeros(photo.shape[:2], np.uint8)
    gt[20:100, 10:80] = 4  # class 3
    gt[0:5] = 255
    buf = io.BytesIO()
    Image.fromarray(gt, mode="L").save(buf, format="PNG")
    rows = [{"__key__": "astro", "__url__": "/d/shard-000000.tar", "jpg": _jpeg(photo),
             "json": json.dumps({"boxes": [[10, 20, 80, 100], [60, 0, 120, 60]],
                                 "labels": [3, 7]}).encode(), "seg.png": buf.getvalue()}]
    spec = DecodeSpec(("jpg",), "cls", "json", 64, 72, 10**8, mask_key="seg.png", keep_image=True)
    batch = decode_batch(rows, spec)
    explainer = explainer_class(True)(ActorSpec(
        model={"name": "r18", "source": "torchvision:resnet18", "weights": "none",
               "input_size": 64}, method="gradient", targets="all_labels"))
    return explainer(batch), photo


LABELS = {"label_maps": True, "fg_threshold": 0.3, "bg_threshold": 0.05, "crf": None,
          "box_iou": 0.5}


def test_post_stage_writes_one_complete_label_map_per_sample_even_when_split(two_class_rows):
    from salmap.pipeline.post import post_batch

    out, photo = two_class_rows
    assert list(out["target"]) == [3, 7] and list(out["status"]) == ["ok", "ok"]
    whole = post_batch(out, {"pseudo_box": {}}, False, labels=LABELS).to_pylist()
    # the post stage's batches may split the sample's rows: each half alone
    halves = [post_batch(out, {"pseudo_box": {}}, False, rows=[i], labels=LABELS).to_pylist()[0]
              for i in (0, 1)]
    for rows in (whole, halves):
        pngs = [r["label_map_png"] for r in rows]
        assert pngs[0] is not None and pngs[1] is None  # once per sample
        lm = decode_png(pngs[0])
        assert lm.shape == photo.shape[:2]
        assert set(classes_in(lm)) <= {3, 7} and len(classes_in(lm)) == 2
    assert whole[0]["label_map_png"] == halves[0]["label_map_png"]
    # what the two maps give by hand: the same rule on the rows' own maps
    from salmap.pipeline.post import transform_of
    from salmap.workers.metrics.geometry import map_to_original

    t = transform_of(out, 0)
    maps = np.stack([map_to_original(out["saliency"][i].astype(np.float32), t) for i in (0, 1)])
    valid = crop_valid(t["orig_h"], t["orig_w"], whole[0]["crop_box"])
    np.testing.assert_array_equal(decode_png(whole[0]["label_map_png"]),
                                  label_map(class_scores(maps), [3, 7], 0.3, 0.05, valid))
    assert not valid.all()  # the centre crop leaves a border the model never saw
    # the ground-truth mask scores the label map, on the sample's row only
    q = whole[0]["label_map_quality"]
    assert q is not None and whole[1]["label_map_quality"] is None
    assert q["valid_px"] == 128 * 123  # 5 rows of 255 are ignored
    # box quality columns on every row of an annotated sample, at the configured IoU
    from salmap.workers.metrics.label_quality import box_match

    gt = {3: [[10, 20, 80, 100]], 7: [[60, 0, 120, 60]]}
    assert [r["gt_box_count"] for r in whole] == [1, 1]
    assert [r["pseudo_box_match"] for r in whole] == \
        [box_match(r["pseudo_box"], gt[r["target"]], 0.5) for r in whole]
    assert all(0 <= r["pseudo_box_score"] <= 1 for r in whole)
    loose = post_batch(out, {"pseudo_box": {}}, False, labels={**LABELS, "box_iou": 0.01})
    assert loose.column("pseudo_box_match").to_pylist() == \
        [box_match(r["pseudo_box"], gt[r["target"]], 0.01) for r in whole]
    assert loose.column("pseudo_box_match").to_pylist() != \
        [box_match(r["pseudo_box"], gt[r["target"]], 0.99) for r in whole]


def test_no_label_maps_without_the_option(two_class_rows):
    from salmap.pipeline.post import post_batch

    out, _ = two_class_rows
    rows = post_batch(out, {}, False, labels=None).to_pylist()
    assert all(r["label_map_png"] is None and r["pseudo_box_score"] is None for r in rows)
    assert all(r["gt_box_count"] is None for r in rows)  # box quality needs pseudo_box


# -- dense CRF ---------------------------------------------------------------------------------
crf = pytest.importorskip("salmap.workers.metrics.crf")


def test_unary_from_labels_matches_pydensecrf():
    utils = pytest.importorskip("pydensecrf.utils")
    labels = np.array([[0, 1, 2], [2, 2, 0]])
    np.testing.assert_allclose(crf.unary_from_labels(labels, 3, 0.7),
                               utils.unary_from_labels(labels, 3, 0.7, zero_unsure=False), rtol=1e-6)
    unsure = np.array([[True, False, False], [False, False, False]])
    u = crf.unary_from_labels(labels, 3, 0.7, unsure)
    np.testing.assert_allclose(u[:, 0], -np.log(1 / 3), rtol=1e-6)


def _two_colour_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A photo-like image: left of column 30 a textured red, right a textured blue; a score map
    for one class that is high on the left but spills 8 px past the colour edge."""
    rng = np.random.default_rng(1)
    h, w = 48, 64
    img = np.zeros((h, w, 3), np.float32)
    img[:, :30] = (200, 40, 40)
    img[:, 30:] = (40, 60, 200)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    x = np.arange(w)[None, :].repeat(h, 0)
    score = np.clip(1.0 - (x - 38) / 6.0, 0, 1)[None].astype(np.float32)  # falls off past 38
    truth = np.zeros((h, w), bool)
    truth[:, :30] = True
    return img, score, truth


def test_crf_snaps_the_label_map_to_the_image_edge_and_stays_valid():
    pytest.importorskip("pydensecrf.densecrf")
    img, score, truth = _two_colour_scene()
    valid = np.ones(truth.shape, bool)
    valid[:, :2] = False
    plain = label_map(score, [5], 0.3, 0.05, valid)
    for unary in ("labels", "scores"):
        refined = crf.crf_label_map(img, score, [5], 0.3, 0.05, valid, unary=unary)
        assert refined.dtype == np.uint16 and refined.shape == plain.shape
        assert set(np.unique(refined)) <= {0, 6, IGNORE}
        assert (refined[~valid] == IGNORE).all()
        assert (refined != plain).any()

        def iou(lm):
            fg = lm == 6
            return (fg & truth).sum() / (fg | truth).sum()

        assert iou(refined) > iou(plain) + 0.1, (unary, iou(refined), iou(plain))


def test_crf_combines_its_two_passes_as_irn(monkeypatch):
    """Pass 1 (background score at fg) decides the classes, pass 2 (at bg) what is certainly
    background; the rest is ignored. The CRF itself is replaced by the arg-min of the unary
    it is given, so the test sees which labels went into which pass."""
    seen = []

    def fake(image, unary, *args):
        labels = unary.argmin(axis=0).reshape(image.shape[:2])
        seen.append(labels)
        return labels if len(seen) == 1 else np.where(labels == 0, 0, labels)

    monkeypatch.setattr(crf, "_infer", fake)
    s = np.array([[[0.9, 0.2, 0.01, 0.0, 0.9]], [[0.1, 0.1, 0.02, 0.5, 0.0]]], np.float32)
    out = crf.crf_label_map(np.zeros((1, 5, 3), np.uint8), s, [10, 20], 0.3, 0.05,
                            valid=np.array([[True, True, True, True, False]]))
    # the unseen pixel gets a uniform unary (no opinion), whatever its scores
    assert seen[0].tolist() == [[1, 0, 0, 2, 0]] and seen[1].tolist() == [[1, 1, 0, 2, 0]]
    assert out.tolist() == [[11, IGNORE, 0, 21, IGNORE]]


def test_crf_needs_the_image_at_the_maps_size():
    img, score, _ = _two_colour_scene()
    with pytest.raises(ValueError, match="RGB at the scores' size"):
        crf.crf_label_map(img[:10], score, [5], 0.3, 0.05)


def test_missing_binding_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_crf(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError("No module named 'pydensecrf'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_crf)
    img, score, _ = _two_colour_scene()
    assert not crf.available()
    with pytest.raises(crf.CRFUnavailable, match=r"pip install 'salmap\[crf\]'"):
        crf.crf_label_map(img, score, [5], 0.3, 0.05)
