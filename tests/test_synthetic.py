"""The ground-truth data and models (workers/synthetic.py): exact masks, the corner cue where
and only where flagged, determinism, and a small model that learns the shapes (or the cue)."""

from __future__ import annotations

import pytest
import torch
from salmap.workers.synthetic import (
    accuracy,
    cue_masks,
    make_dataset,
    normalise,
    train_model,
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_shapes_types_and_determinism():
    d = make_dataset(40, seed=3, spurious_fraction=0.5, num_classes=3)
    images, labels, masks, cues = d
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert labels.dtype == torch.int64 and set(labels.tolist()) == {0, 1, 2}
    assert torch.bincount(labels).tolist() == [14, 13, 13]  # balanced
    assert masks.shape == (40, 32, 32) and masks.dtype == torch.bool
    assert cues.dtype == torch.bool and 0 < cues.sum() < 40
    again = make_dataset(40, seed=3, spurious_fraction=0.5, num_classes=3)
    assert all(torch.equal(a, b) for a, b in zip(d, again))
    assert not torch.equal(make_dataset(40, seed=4).images, make_dataset(40, seed=3).images)


@pytest.mark.parametrize("style", ["texture", "colour"])
def test_masks_are_the_object_and_the_cue_lies_outside(style):
    d = make_dataset(64, seed=1, spurious_fraction=1.0, style=style)
    area = d.masks.float().mean((1, 2))
    assert (area > 0.02).all() and (area < 0.5).all()
    cue = cue_masks(d.labels, 32, d.cue_size)
    assert not (cue & d.masks).any()
    for i in range(4):
        obj = d.images[i][:, d.masks[i]]
        if style == "colour":  # the object has one colour (up to its noise)
            assert obj.std(1).max() < 0.05
        else:  # the object is textured like the background
            assert obj.std(1).max() > 0.05
    # the flagged images are white exactly on their class's corner mark
    assert (d.images.permute(1, 0, 2, 3)[:, cue] == 1).all()
    plain = make_dataset(64, seed=1, spurious_fraction=0.0)
    assert not plain.cue_flags.any()
    assert not (plain.images.permute(1, 0, 2, 3)[:, cue] == 1).all()
    # class 0's mark is top left, class 1's top right
    c0, c1 = cue[d.labels == 0][0], cue[d.labels == 1][0]
    assert c0[:5, :5].any() and c1[:5, -5:].any()


def test_objects_are_placed_uniformly_and_only_marked_images_avoid_their_mark():
    """The object's centre is uniform over the positions where the object fits (a centred
    blob gains nothing but the geometry of fitting inside the frame); on images with the mark,
    overlapping positions are redrawn, so those objects never touch the mark, while unmarked
    objects of the same class still reach that corner."""
    size, n = 48, 1000
    # the "colour" style's smaller objects (half-size 4.8 to 9.6 px here; the placement code
    # is the same for both styles, the "texture" objects are larger and cover the centre more)
    d = make_dataset(n, seed=5, size=size, num_classes=4, style="colour")
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(),
                            indexing="ij")
    area = d.masks.flatten(1).sum(1).float()
    cy = (d.masks * ys).flatten(1).sum(1) / area
    cx = (d.masks * xs).flatten(1).sum(1) / area
    # every quadrant of the image holds about a quarter of the objects
    quad = (cy >= size / 2).long() * 2 + (cx >= size / 2).long()
    assert (torch.bincount(quad, minlength=4).float() / n - 0.25).abs().max() < 0.05
    # the centre pixel is rarely object (a centred Gaussian's pointing score), and objects
    # reach every border of the frame
    assert d.masks[:, size // 2, size // 2].float().mean() < 0.2  # 0.31 when centred
    for border in (d.masks[:, :3], d.masks[:, -3:], d.masks[:, :, :3], d.masks[:, :, -3:]):
        assert border.flatten(1).any(1).float().mean() > 0.01
    # a large mark (8 px) so that objects often reach it: never on marked images, often on
    # the others
    marked = make_dataset(600, seed=5, size=32, num_classes=4, spurious_fraction=0.5,
                          cue_size=8)
    near = torch.nn.functional.max_pool2d(
        cue_masks(marked.labels, 32, marked.cue_size)[:, None].float(), 3, 1, 1)[:, 0] > 0
    touching = (marked.masks & near).flatten(1).any(1)
    assert not touching[marked.cue_flags].any()  # redrawn where the mark is
    assert touching[~marked.cue_flags].float().mean() > 0.05  # unmarked: not restricted


def test_texture_objects_are_not_found_by_contrast_or_colour():
    """On the default ("texture") data the object is found by its shape only: model-blind maps
    of the contrast to mid-grey (``input``), of colour saturation and of the Sobel magnitude
    score near chance (the mask's share of the image) on relevance rank accuracy and the
    pointing game, and pixels inside and outside the object have the same distribution. On
    the "colour" data (saturated objects on grey) the ``input`` map finds every object."""
    from bench.groundtruth import baseline_maps, ground_truth_scores

    d = make_dataset(400, seed=2, num_classes=4)
    share = float(d.masks.float().mean())
    saturation = d.images.amax(1) - d.images.amin(1)
    for maps in (baseline_maps("input", d.images), saturation, baseline_maps("edge", d.images)):
        scores = ground_truth_scores(maps, d.masks)
        rank = sum(scores["rank"]) / len(d)
        pointing = sum(scores["pointing"]) / len(d)
        assert rank < share + 0.03 and pointing < share + 0.05, (rank, pointing, share)
    inside = d.masks[:, None].expand_as(d.images)
    contrast = (d.images - 0.5).abs()
    assert abs(contrast[inside].mean() - contrast[~inside].mean()) < 0.005
    assert abs(contrast[inside].std() - contrast[~inside].std()) < 0.005
    old = make_dataset(400, seed=2, num_classes=4, style="colour")
    scores = ground_truth_scores(baseline_maps("input", old.images), old.masks)
    assert sum(scores["rank"]) / len(old) > 0.95 and sum(scores["pointing"]) / len(old) > 0.95


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        make_dataset(4, 0, num_classes=9)
    with pytest.raises(ValueError, match="spurious_fraction"):
        make_dataset(4, 0, spurious_fraction=1.5)
    with pytest.raises(ValueError, match="style"):
        make_dataset(4, 0, style="plain")
    with pytest.raises(ValueError, match="arch"):
        train_model("mlp", make_dataset(4, 0), seed=0, cache_dir=None)


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_models_are_pure_relu_seeded_and_cached(arch, tmp_path):
    """A tiny training run (its accuracy is measured in bench/groundtruth.py): frozen eval-mode
    model, no biases, so each logit is exactly grad . x (F(x) = A(x) x); the cache returns
    the same weights without training again; another seed gives other weights."""
    train = make_dataset(48, seed=0, size=16)
    kw = dict(epochs=1, width=4, batch_size=16, cache_dir=tmp_path)
    model = train_model(arch, train, seed=0, **kw)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(getattr(m, "bias", None) is None for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    x = normalise(train.images[:3]).requires_grad_(True)
    y = model(x)
    (g,) = torch.autograd.grad(y[:, 1].sum(), x)
    torch.testing.assert_close((g * x).sum((1, 2, 3)), y[:, 1].detach(), rtol=1e-4, atol=1e-5)
    (cached,) = list(tmp_path.iterdir())
    stamp = cached.stat().st_mtime_ns
    again = train_model(arch, train, seed=0, **kw)  # loaded, not trained
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))
    assert cached.stat().st_mtime_ns == stamp and len(list(tmp_path.iterdir())) == 1
    other = train_model(arch, train, seed=1, **kw)
    assert not torch.equal(next(iter(other.state_dict().values())),
                           next(iter(model.state_dict().values())))
    assert 0.0 <= accuracy(model, train) <= 1.0


def test_ground_truth_scores():
    """Relevance mass and rank accuracy (CLEVR-XAI) and the pointing game on hand-made maps."""
    from salmap.workers.synthetic import pointing_hits, relevance_mass, relevance_rank

    m = torch.zeros(3, 4, 4, dtype=torch.bool)
    m[:, :2, :2] = True
    a = torch.zeros(3, 4, 4)
    a[0, 0, 0], a[0, 3, 3] = 3.0, 1.0  # 3/4 of the positive mass inside
    a[1] = -1.0
    a[1, 3, 3] = 2.0  # all positive mass outside
    a[2, :2, :2] = torch.tensor([[4.0, 3.0], [2.0, 1.0]])  # the top 4 = the mask
    assert relevance_mass(a, m).tolist() == pytest.approx([0.75, 0.0, 1.0])
    rank = relevance_rank(a, m)
    assert rank[1] == 0.0 and rank[2] == 1.0 and rank[0] in (0.25, 0.5, 0.75)
    assert pointing_hits(a, m).tolist() == [True, False, True]
    assert torch.isnan(relevance_mass(-torch.ones(1, 4, 4), m[:1])).all()


def test_groundtruth_bench_small(tmp_path, capsys):
    """The ground-truth benchmark end to end at toy size (the full one is in `make bench`):
    it trains on the training split, scores the evaluation split's correctly classified
    images, and prints one row per model-blind map and per method with three intervals."""
    from bench.groundtruth import main

    assert main(["--size", "16", "--classes", "2", "--train", "64", "--epochs", "1",
                 "--images", "6", "--width", "4", "--archs", "vgg", "--cache", str(tmp_path),
                 "--methods", "gradient_x_input,gradcam", "--randomised", "--eval-spurious",
                 "0.5", "--variant", "gradcam:target_layer=features.8"]) == 0
    out = capsys.readouterr().out
    assert "training split: 64 images (seed 0" in out and "evaluation split: seed 2" in out
    assert "| mass on the cue |" in out  # the evaluation images carry the corner cue
    assert "### vgg: accuracy" in out and "### vgg, untrained" in out
    lines = [line for line in out.splitlines() if line.startswith("| ")
             and not line.startswith(("| method", "| variant - default"))]
    rows = [line.split(" | ")[0].strip("| ") for line in lines]
    methods = ["gradient_x_input", "gradcam", "gradcam (target_layer=features.8)"]
    paired = "gradcam (target_layer=features.8) - gradcam"  # the per-image difference
    assert rows == ["random", "centre", "edge", "input", *methods, paired, *methods[:2]]
    for line in lines:  # mass, rank accuracy, pointing (and mass on the cue): mean [low, high]
        assert line.count("[") == (3 if " - " in line else 4)
    assert len(list(tmp_path.iterdir())) == 1  # the model's weights, cached


def test_parse_variant():
    from bench.groundtruth import parse_variant

    assert parse_variant("hdm:guidance=none,guidance_weight=10,auxiliary_sizes=(16, 32)") == (
        "hdm", {"guidance": "none", "guidance_weight": 10, "auxiliary_sizes": (16, 32)})
    assert parse_variant("gradient") == ("gradient", {})
