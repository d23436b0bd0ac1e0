"""Degeneracy checks (workers/methods/degeneracy.py): each fires on a map built to be
degenerate (gradient x input itself, Grad-CAM itself, a constant map, an empty map, a map on a
handful of pixels) and none fires on DMBP or HDM at their default loss on a small pure-ReLU
CNN trained on the synthetic shapes (few steps, to stay fast)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from salmap.workers.methods import build
from salmap.workers.methods.degeneracy import (
    correlation,
    degeneracy,
    relative_spread,
    support,
    top_share,
)
from salmap.workers.synthetic import make_dataset, normalise, train_model


@pytest.fixture(scope="module")
def shapes():
    """(model, images, labels): a width-8 VGG trained for 3 epochs on 320 shapes (seconds),
    explained on 4 images of the tuning split (seed 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_model("vgg", make_dataset(320, seed=0), seed=0, epochs=3, width=8,
                            cache_dir=None)
        data = make_dataset(4, seed=1)
        yield model, normalise(data.images), data.labels
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def baselines(shapes):
    model, x, y = shapes
    gxi = build("gradient_x_input", model)(x, y)
    cam = build("gradcam", model, target_layer="features.11")(x, y)
    return gxi, cam


def fired(maps, gxi, cam) -> set[str]:
    return {k for k, v in degeneracy(maps, gxi, cam).items() if v.any()}


def test_each_check_fires_on_its_degenerate_case(shapes, baselines):
    _model, x, _y = shapes
    gxi, cam = baselines
    h, w = x.shape[-2:]
    cam_up = F.interpolate(cam[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    assert fired(gxi, gxi, cam) == {"is_gradient_x_input"}
    assert fired(0.5 * gxi + 1e-3 * torch.randn_like(gxi) * gxi.std(), gxi, cam) == {
        "is_gradient_x_input"}  # rescaled and jittered: still the same map
    assert "is_gradcam" in fired(cam_up, gxi, cam)
    constant = torch.full_like(gxi, 0.7)
    assert {"constant", "top10_share"} <= fired(constant, gxi, cam)
    empty = torch.zeros_like(gxi)
    assert {"constant", "near_empty", "top10_share"} <= fired(empty, gxi, cam)
    dots = torch.zeros_like(gxi)
    dots[:, 3, 5], dots[:, 20, 9] = 1.0, 0.5
    assert {"near_empty", "top10_share"} <= fired(dots, gxi, cam)
    # the scores behind them
    torch.testing.assert_close(correlation(gxi, gxi), torch.ones(4))
    assert (relative_spread(constant) == 0).all() and (support(empty) == 0).all()
    torch.testing.assert_close(top_share(constant), torch.full((4,), 0.1), rtol=0, atol=2e-3)
    torch.testing.assert_close(top_share(dots), torch.ones(4))


@pytest.mark.parametrize("name,params", [
    ("dmbp", {"steps": 30, "lr": 0.3}),  # masks leave their 0.98 start in ~30 steps at lr 0.3
    ("hdm", {"steps": 10}),
])
def test_no_check_fires_on_the_optimised_methods(shapes, baselines, name, params):
    model, x, y = shapes
    gxi, cam = baselines
    maps = build(name, model, **params)(x, y)
    report = degeneracy(maps, gxi, cam)
    assert not any(v.any() for v in report.values()), {
        k: v.tolist() for k, v in report.items() if v.any()}
    assert (correlation(maps, gxi).abs() < 0.95).all()
