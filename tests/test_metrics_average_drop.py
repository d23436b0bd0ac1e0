"""Average Drop % / Increase in Confidence %: fixed points, spaces, monotonicity, ranges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from salmap.workers.metrics import compute_model_metrics
from salmap.workers.metrics.average_drop import explanation_images, scale_map
from torch import nn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NAMES = ["average_drop", "confidence_increase"]


def run(model, x, maps, t, mean=MEAN, std=STD, **params):
    return compute_model_metrics(NAMES, model, x, maps, t, params, mean, std, max_batch=3)


def probs(model, x, t):
    with torch.no_grad():
        return torch.softmax(model(x), 1)[torch.arange(len(t)), t]


@pytest.mark.parametrize("space", ["pixel", "normalized"])
def test_map_of_ones_keeps_the_image(tiny_model, space):
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([0, 1, 2, 3])
    out = run(tiny_model, x, torch.ones(4, 4, 4), t, mult_normalize="none", mult_space=space)
    assert torch.equal(out["average_drop"], torch.zeros(4))
    assert torch.equal(out["confidence_increase"], torch.zeros(4))
    torch.testing.assert_close(out["confidence_masked"], probs(tiny_model, x, t))


@pytest.mark.parametrize("space", ["pixel", "normalized"])
def test_map_of_zeros_gives_the_baseline_image(tiny_model, space):
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([4, 1, 2])
    baseline = torch.zeros_like(x) if space == "normalized" else (
        (0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1).expand_as(x)
    y, o = probs(tiny_model, x, t), probs(tiny_model, baseline, t)
    for normalize, maps in (("none", torch.zeros(3, 4, 4)), ("minmax", torch.full((3, 4, 4), 2.0))):
        out = run(tiny_model, x, maps, t, mult_normalize=normalize, mult_space=space)
        torch.testing.assert_close(out["confidence_masked"], o, atol=1e-6, rtol=0)
        torch.testing.assert_close(out["average_drop"], 100 * (y - o).clamp_min(0) / y,
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(out["confidence_increase"], 100.0 * (o > y).float())


def test_pixel_space_product_is_normalize_of_map_times_pixels():
    x = torch.randn(2, 3, 5, 5)
    scale = torch.rand(2, 5, 5)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expected = ((x * std + mean) * scale[:, None] - mean) / std
    torch.testing.assert_close(explanation_images(x, scale, "pixel", mean, std), expected)
    torch.testing.assert_close(explanation_images(x, scale, "normalized", mean, std),
                               x * scale[:, None])


def test_minmax_scaling_per_image():
    maps = torch.stack([torch.linspace(-1, 3, 16).view(4, 4), torch.linspace(2, 4, 16).view(4, 4)])
    s = scale_map(maps, "relu", "minmax")
    assert s[0].min() == 0 and s[1].min() == 0
    assert s[0].max() == pytest.approx(1, abs=1e-6) and s[1].max() == pytest.approx(1, abs=1e-6)
    assert scale_map(-maps, "abs", "max").max() <= 1


class PositiveLinear(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w, requires_grad=False)

    def forward(self, x):
        z = (x * self.w).flatten(1).sum(1) - 3.0
        return torch.stack([z, torch.zeros_like(z)], 1)


def test_drop_never_grows_when_the_map_grows_on_a_positive_linear_model():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(1, 3, 8, 8, generator=g) * 0.1
    model = PositiveLinear(w)
    x = torch.rand(6, 3, 8, 8, generator=g)  # non-negative pixels (mean 0, std 1)
    small = torch.rand(6, 8, 8, generator=g)
    big = small + torch.rand(6, 8, 8, generator=g) * (1 - small)
    t = torch.zeros(6, dtype=torch.long)
    kw = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "mult_normalize": "none"}
    d_small = run(model, x, small, t, **kw)["average_drop"]
    d_big = run(model, x, big, t, **kw)["average_drop"]
    d_one = run(model, x, torch.ones(6, 8, 8), t, **kw)["average_drop"]
    assert bool((d_big <= d_small + 1e-5).all()) and bool((d_big > d_one).all())
    assert bool((d_small > d_big).any())


def test_ranges_and_consistency(resnet18):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    maps = torch.randn(6, 4, 4)
    t = torch.arange(6)
    out = run(resnet18, x, maps, t)
    drop, inc = out["average_drop"].numpy(), out["confidence_increase"].numpy()
    assert ((drop >= 0) & (drop <= 100)).all()
    assert set(np.unique(inc)) <= {0.0, 100.0}
    assert (drop[inc == 100] == 0).all()
    y, o = out["confidence_clean"], out["confidence_masked"]
    torch.testing.assert_close(y, probs(resnet18, x, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["average_drop"], 100 * (y - o).clamp_min(0) / y)


def expected_drop(model, x, maps, t, sign, normalize, space):
    """Average drop from its definition, step by step: the map upsampled bilinearly, made
    non-negative, scaled per image; E = L * I in pixels (or L * x); Y, O softmax scores."""
    up = torch.nn.functional.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear",
                                         align_corners=False)[:, 0]
    pos = up.clamp_min(0) if sign == "relu" else up.abs()
    lo = pos.flatten(1).min(1).values.view(-1, 1, 1)
    hi = pos.flatten(1).max(1).values.view(-1, 1, 1)
    scale = {"minmax": (pos - lo) / (hi - lo), "max": pos / hi, "none": pos}[normalize][:, None]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    e = ((x * std + mean) * scale - mean) / std if space == "pixel" else x * scale
    y, o = probs(model, x, t), probs(model, e, t)
    return y, o, 100 * (y - o).clamp_min(0) / y, 100.0 * (o > y).float()


@pytest.mark.parametrize("sign,normalize,space", [
    ("relu", "minmax", "pixel"), ("abs", "minmax", "pixel"), ("relu", "max", "normalized"),
    ("abs", "none", "normalized")])
def test_drop_and_increase_match_the_definition_on_signed_maps(tiny_model, sign, normalize,
                                                                space):
    """Signed 4x4 maps on 16x16 images: Y, O, drop and increase recomputed independently
    (not from the Y and O the metric returns)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 3, 16, 16, generator=g)
    maps = torch.randn(6, 4, 4, generator=g) + 0.3
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    y, o, drop, inc = expected_drop(tiny_model, x, maps, t, sign, normalize, space)
    out = run(tiny_model, x, maps, t, mult_sign=sign, mult_normalize=normalize, mult_space=space)
    torch.testing.assert_close(out["confidence_clean"], y, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["confidence_masked"], o, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["average_drop"], drop, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["confidence_increase"], inc)
    assert (drop > 1).any() and (drop == 0).any()  # both cases occur


def test_defaults_are_relu_minmax_pixel_space(tiny_model):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 3, 16, 16, generator=g)
    maps = torch.randn(4, 4, 4, generator=g)
    t = torch.tensor([1, 2, 3, 4])
    _, o, drop, _ = expected_drop(tiny_model, x, maps, t, "relu", "minmax", "pixel")
    out = compute_model_metrics(NAMES, tiny_model, x, maps, t, None, MEAN, STD)
    torch.testing.assert_close(out["confidence_masked"], o, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["average_drop"], drop, atol=1e-4, rtol=0)


def test_constant_maps_are_flagged(tiny_model):
    """A constant map min-max scales to all zeros: the explanation image is the fully masked
    image, whatever the method meant; such rows carry a note."""
    x = torch.randn(4, 3, 16, 16)
    maps = torch.randn(4, 4, 4)
    maps[1] = 0.0
    maps[3] = 2.5
    out = run(tiny_model, x, maps, torch.tensor([0, 1, 2, 3]))
    notes = out["_notes"]
    assert [bool(n) for n in notes] == [False, True, False, True]
    assert "constant map" in notes[1] and "average_drop" in notes[1]
    # a map negative everywhere is constant after ReLU, too
    neg = run(tiny_model, x[:1], -torch.rand(1, 4, 4) - 0.1, torch.tensor([0]))
    assert "constant map" in neg["_notes"][0]
    # with max scaling a constant map keeps the image (drop 0): flagged as well
    keep = run(tiny_model, x[:2], torch.stack([torch.full((4, 4), 2.0), maps[0]]),
               torch.tensor([0, 1]), mult_normalize="max")
    assert "constant map" in keep["_notes"][0] and keep["_notes"][1] == ""
    only = compute_model_metrics(["confidence_increase"], tiny_model, x, maps,
                                 torch.tensor([0, 1, 2, 3]), {}, MEAN, STD)
    assert [bool(n) for n in only["_notes"]] == [False, True, False, True]


def test_the_constant_map_note_reaches_the_row(monkeypatch):
    """In the actor, the note lands in the row's error text (the row stays ok)."""
    from conftest import jpeg_bytes
    from salmap.pipeline.decode import DecodeSpec, decode_batch
    from salmap.workers.actor import ActorSpec, Explainer

    rows = [{"__key__": f"k{i}", "__url__": "s.tar", "jpg": jpeg_bytes(i)} for i in range(3)]
    batch = decode_batch(rows, DecodeSpec(("jpg",), "cls", "json", 32, 36, 10**8))
    explainer = Explainer(ActorSpec(model={"name": "r18", "source": "torchvision:resnet18",
                                           "weights": "none", "input_size": 32},
                                    method="gradient", metrics={"average_drop": {}}))
    inner = explainer.method.attribute

    def attribute(images, targets):
        maps = inner(images, targets)
        maps[1] = 0.0
        return maps

    monkeypatch.setattr(explainer.method, "attribute", attribute)
    out = explainer(batch)
    assert list(out["status"]) == ["ok"] * 3
    errors = list(out["error"])
    assert "constant map" in errors[1] and errors[0] == errors[2] == ""
    assert np.isfinite(out["average_drop"]).all()


@pytest.mark.parametrize("option,value", [("mult_sign", "signed"), ("mult_normalize", "l2"),
                                          ("mult_space", "log"), ("score", "prob")])
def test_unknown_options_fail_before_any_forward(option, value):
    from salmap.workers.metrics import MetricError

    def forward(z):
        raise AssertionError("no forward expected")

    for names in (["average_drop"], ["confidence_increase"]):
        with pytest.raises(MetricError, match=option):
            compute_model_metrics(names, forward, torch.zeros(1, 3, 4, 4), torch.rand(1, 4, 4),
                                  torch.tensor([0]), {option: value}, MEAN, STD)


@pytest.mark.parametrize("normalize", ["minmax", "max"])
def test_scaling_is_exact_so_the_map_magnitude_does_not_matter(tiny_model, normalize):
    """Gradient maps can be 1e-9 small: their scaled multiplier must still reach 1 (a 1e-7
    in the denominator would shrink it to about 0.01), so the drop is scale-invariant."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 3, 16, 16, generator=g)
    maps = torch.rand(3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 2])
    big = run(tiny_model, x, maps, t, mult_normalize=normalize)
    tiny = run(tiny_model, x, 1e-9 * maps, t, mult_normalize=normalize)
    for key in ("average_drop", "confidence_masked"):
        torch.testing.assert_close(tiny[key], big[key], atol=1e-5, rtol=0)
    s = scale_map(1e-9 * maps, "relu", normalize)
    assert s.flatten(1).amax(1).tolist() == pytest.approx([1.0] * 3)
    assert torch.equal(scale_map(torch.zeros(1, 3, 3), "relu", normalize), torch.zeros(1, 3, 3))


def test_a_map_of_ones_cannot_fake_an_increase_through_batch_noise(tiny_model):
    """Forwards whose logits shift with the chunk size (like non-deterministic GPU kernels):
    the clean and the explanation image of a map of ones land in chunks of different sizes,
    yet O = Y exactly, so neither a drop nor an increase appears."""

    def noisy(z):
        logits = tiny_model(z)
        return logits + 1e-3 * z.shape[0] * torch.arange(logits.shape[1])

    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 1, 2])
    out = compute_model_metrics(NAMES, noisy, x, torch.ones(3, 4, 4), t,
                                {"mult_normalize": "none"}, MEAN, STD, max_batch=4)
    assert torch.equal(out["confidence_masked"], out["confidence_clean"])
    assert torch.equal(out["average_drop"], torch.zeros(3))
    assert torch.equal(out["confidence_increase"], torch.zeros(3))
    part = torch.ones(3, 4, 4)
    part[2, 0, 0] = 0.999  # not all ones: the measured O stands
    other = compute_model_metrics(NAMES, noisy, x, part, t, {"mult_normalize": "none"}, MEAN,
                                  STD, max_batch=4)
    assert not torch.equal(other["confidence_masked"][2], other["confidence_clean"][2])
