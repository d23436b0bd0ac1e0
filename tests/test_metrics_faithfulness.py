"""Deletion / insertion AUC: arithmetic, end points, invariances, exact optimality on a
linear model, tie breaking, batch independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from salmap.workers.metrics import MetricError, compute_model_metrics
from salmap.workers.metrics.faithfulness import auc, blur, gaussian_kernel, pixel_ranks, step_counts
from torch import nn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class LinearTwoClass(nn.Module):
    """logits = [w . x + b, 0]: the class-0 probability is sigmoid(w . x + b)."""

    def __init__(self, w: torch.Tensor, b: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(w, requires_grad=False)
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.double() * self.w.double()).flatten(1).sum(1) + self.b
        return torch.stack([z, torch.zeros_like(z)], 1).float()


def run(names, model, x, maps, targets, **params):
    return compute_model_metrics(names, model, x, maps, targets, params, MEAN, STD, max_batch=64)


def test_auc_arithmetic_on_known_curves():
    assert auc(torch.full((9,), 0.3)).item() == pytest.approx(0.3)
    assert auc(torch.linspace(1, 0, 29)).item() == pytest.approx(0.5)
    for n in (1, 4, 28):
        curve = torch.zeros(n + 1, dtype=torch.float64)
        curve[0] = 1
        assert auc(curve).item() == pytest.approx(1 / (2 * n))
    # batched over leading axes
    curves = torch.stack([torch.linspace(0, 1, 5), torch.ones(5)])
    assert auc(curves).tolist() == pytest.approx([0.5, 1.0])


def test_step_counts_cover_all_pixels_in_equal_steps():
    assert step_counts(224 * 224, 28) == [1792 * i for i in range(29)]
    c = step_counts(100, 7)
    assert c[0] == 0 and c[-1] == 100 and all(b >= a for a, b in zip(c, c[1:]))


def test_gaussian_kernel_matches_rise_gkern_construction():
    from scipy.ndimage import gaussian_filter

    for size, sigma in ((11, 5.0), (7, 1.5), (5, 3.0)):
        delta = np.zeros((size, size))
        delta[size // 2, size // 2] = 1
        ref = gaussian_filter(delta, sigma)
        np.testing.assert_allclose(gaussian_kernel(size, sigma), ref, atol=1e-12)
    assert gaussian_kernel(11, 5.0).sum() == pytest.approx(1.0)


def test_blur_is_depthwise_with_zero_padding():
    x = torch.zeros(1, 3, 21, 21)
    x[0, 1, 10, 10] = 1.0
    y = blur(x, 11, 5.0)
    assert y[0, 0].abs().max() == 0 and y[0, 2].abs().max() == 0  # channels not mixed
    np.testing.assert_allclose(y[0, 1, 5:16, 5:16].numpy(), gaussian_kernel(11, 5.0), atol=1e-6)
    ones = blur(torch.ones(1, 3, 21, 21), 11, 5.0)
    assert ones[0, 0, 10, 10] == pytest.approx(1.0, abs=1e-5) and ones[0, 0, 0, 0] < 0.5


def test_end_points_are_clean_image_and_substrate(tiny_model):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 16, 16)
    maps = torch.rand(3, 4, 4)
    t = torch.tensor([0, 3, 4])
    out = run(["deletion_auc", "insertion_auc"], tiny_model, x, maps, t, steps=4, curves=True)
    with torch.no_grad():
        p_clean = torch.softmax(tiny_model(x), 1)[torch.arange(3), t]
        p_zero = torch.softmax(tiny_model(torch.zeros_like(x)), 1)[torch.arange(3), t]
        p_blur = torch.softmax(tiny_model(blur(x, 11, 5.0)), 1)[torch.arange(3), t]
    dele = torch.tensor(out["deletion_curve"])
    ins = torch.tensor(out["insertion_curve"])
    assert dele.shape == ins.shape == (3, 5)
    torch.testing.assert_close(dele[:, 0], p_clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(dele[:, -1], p_zero, atol=1e-5, rtol=0)
    torch.testing.assert_close(ins[:, 0], p_blur, atol=1e-5, rtol=0)
    torch.testing.assert_close(ins[:, -1], p_clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["deletion_auc"], auc(dele), atol=1e-6, rtol=0)


def test_black_substrate_is_zero_in_pixel_space(tiny_model):
    x = torch.randn(2, 3, 16, 16)
    out = run(["deletion_auc"], tiny_model, x, torch.rand(2, 16, 16), torch.tensor([1, 2]),
              steps=2, curves=True, deletion_substrate="black")
    black = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1).expand_as(x)
    with torch.no_grad():
        p = torch.softmax(tiny_model(black), 1)[torch.arange(2), torch.tensor([1, 2])]
    torch.testing.assert_close(torch.tensor(out["deletion_curve"])[:, -1], p, atol=1e-5, rtol=0)


def test_rank_invariance_under_increasing_transform(tiny_model):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16)
    s = torch.randn(2, 16, 16)  # input resolution: no upsampling between the transforms
    t = torch.tensor([1, 2])
    names = ["deletion_auc", "insertion_auc", "road"]
    base = run(names, tiny_model, x, s, t, steps=8, curves=True, road_percentiles=(25, 75))
    for g in (3 * s + 1, torch.exp(s)):
        other = run(names, tiny_model, x, g, t, steps=8, curves=True, road_percentiles=(25, 75))
        for key in names + ["deletion_curve", "insertion_curve"]:
            np.testing.assert_allclose(np.asarray(other[key]), np.asarray(base[key]), atol=1e-6)


@pytest.mark.parametrize("sub", ["blur", "zero"])
def test_deletion_of_map_equals_insertion_of_negated_map(tiny_model, sub):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 16, 16)
    s = torch.randn(2, 16, 16)
    t = torch.tensor([0, 1])
    common = {"steps": 8, "curves": True, "deletion_substrate": sub, "insertion_substrate": sub}
    d = run(["deletion_auc"], tiny_model, x, s, t, **common)
    i = run(["insertion_auc"], tiny_model, x, -s, t, **common)
    np.testing.assert_allclose(np.asarray(d["deletion_curve"]),
                               np.asarray(i["insertion_curve"])[:, ::-1], atol=1e-6)
    torch.testing.assert_close(d["deletion_auc"], i["insertion_auc"], atol=1e-6, rtol=0)


def test_exact_contribution_map_is_optimal_on_a_linear_model():
    g = torch.Generator().manual_seed(4)
    h = w = 12
    weight = torch.randn(1, 3, h, w, generator=g)
    model = LinearTwoClass(weight, b=0.5)
    x = torch.randn(1, 3, h, w, generator=g)
    t = torch.tensor([0])
    r_del = (weight * x).sum(1)  # substrate 0: contribution w (x - 0)
    r_ins = (weight * (x - blur(x, 11, 5.0))).sum(1)  # blur substrate
    others = [torch.rand(1, h, w, generator=g) for _ in range(12)]
    others += [blur(r_del[None].expand(1, 3, h, w), 5, 1.0)[:, 0], r_del.abs(), r_ins, r_del]

    def score(kind, m):
        return run([f"{kind}_auc"], model, x, m, t, steps=9)[f"{kind}_auc"].item()

    best_del, worst_del = score("deletion", r_del), score("deletion", -r_del)
    best_ins, worst_ins = score("insertion", r_ins), score("insertion", -r_ins)
    assert best_del < worst_del and best_ins > worst_ins
    for m in others + [r_ins]:
        assert best_del <= score("deletion", m) + 1e-6 <= worst_del + 2e-6
    for m in others:
        assert worst_ins - 1e-6 <= score("insertion", m) <= best_ins + 1e-6


def test_constant_map_ties_follow_a_random_order_not_raster_order():
    """Linear model whose top rows push the logit up: raster-order deletion of a constant map
    would be far from the expectation (l(x) + l(s)) / 2 that a random order gives."""
    h = w = 8
    weight = torch.zeros(1, 3, h, w)
    weight[:, :, : h // 2] = 1.0
    weight[:, :, h // 2:] = -0.2
    model = LinearTwoClass(weight)
    x = torch.ones(1, 3, h, w)
    logit_x = float((weight * x).sum())
    expected = (logit_x + 0.0) / 2  # substrate 0 -> logit 0
    aucs = []
    for seed in range(60):
        out = run(["deletion_auc"], model, x, torch.ones(1, h, w), torch.tensor([0]),
                  steps=8, score="logit", tie_seed=seed)
        aucs.append(out["deletion_auc"].item())
    aucs = np.array(aucs)
    assert aucs.std() > 0  # the seed changes the order
    assert abs(aucs.mean() - expected) < 4 * aucs.std() / np.sqrt(len(aucs))
    raster = np.array([logit_x - (weight * x).flatten(2).sum(1)[0, :c].sum().item()
                       for c in step_counts(h * w, 8)])
    assert abs(float(auc(torch.tensor(raster))) - expected) > 8 * aucs.std() / np.sqrt(len(aucs))


def test_pixel_ranks_break_ties_by_a_fixed_permutation():
    s = torch.zeros(2, 4, 4)
    s[:, 0, 0] = 1.0
    s[1, 3, 3] = -1.0
    r = pixel_ranks(s, tie_seed=7)
    assert r[0, 0] == 0 and r[1, 0] == 0  # the maximum first
    assert r[1, 15] == 15  # the minimum last
    assert sorted(r[0].tolist()) == list(range(16))
    # the tied pixels are ordered the same way in both samples (same permutation)
    tied = torch.arange(1, 15)
    assert torch.equal(r[0, tied].argsort(), r[1, tied].argsort())
    assert not torch.equal(pixel_ranks(s, 8), r)


def test_batched_equals_per_image_loop(tiny_model):
    torch.manual_seed(5)
    x = torch.randn(4, 3, 16, 16)
    maps = torch.rand(4, 4, 4)
    maps[2] = 0.5  # a constant map: ties
    t = torch.tensor([0, 4, 2, 4])
    names = ["deletion_auc", "insertion_auc", "average_drop", "confidence_increase", "road"]
    params = {"steps": 5, "curves": True, "road_percentiles": (30, 70)}
    batched = compute_model_metrics(names, tiny_model, x, maps, t, params, MEAN, STD, max_batch=7)
    for i in range(4):
        one = compute_model_metrics(names, tiny_model, x[i:i + 1], maps[i:i + 1], t[i:i + 1],
                                    params, MEAN, STD, max_batch=64)
        for key, value in one.items():
            if key == "_notes":
                assert batched[key][i] == value[0]
                continue
            np.testing.assert_allclose(np.asarray(batched[key][i]), np.asarray(value[0]),
                                       atol=1e-5, err_msg=key)
        assert bool(batched["_notes"][i]) == (i == 2)  # the constant map


def test_non_finite_map_gives_nan_and_unknown_options_fail(tiny_model):
    x = torch.randn(2, 3, 16, 16)
    maps = torch.rand(2, 4, 4)
    maps[1, 0, 0] = float("nan")
    out = run(["deletion_auc", "average_drop"], tiny_model, x, maps, torch.tensor([0, 1]),
              steps=2, curves=True)
    assert np.isfinite(out["deletion_auc"][0].item()) and np.isnan(out["deletion_auc"][1].item())
    assert out["deletion_curve"][1] is None and len(out["deletion_curve"][0]) == 3
    assert np.isnan(out["average_drop"][1].item())
    with pytest.raises(MetricError, match="substrate"):
        run(["deletion_auc"], tiny_model, x, maps, torch.tensor([0, 1]), deletion_substrate="grey")
    with pytest.raises(MetricError, match="steps"):
        run(["deletion_auc"], tiny_model, x, maps, torch.tensor([0, 1]), step=3)
    with pytest.raises(MetricError, match="post"):
        run(["gini"], tiny_model, x, maps, torch.tensor([0, 1]))


class PixelProbe(nn.Module):
    """logits = channel 0 of the input, flattened: with ``score="logit"`` the deletion curve
    of target k reads pixel k of each rendered image (1 until the pixel is replaced by the
    zero substrate)."""

    def forward(self, x):
        return x[:, 0].flatten(1)


def test_pixels_are_ranked_on_the_bilinearly_upsampled_map():
    """A 2x2 map on an 8x8 input: the deletion order is the order of the bilinear
    (align_corners=False) upsampling, read pixel by pixel through the probe."""
    m = np.array([[0.1, 0.9], [0.45, 0.2]])
    w = np.clip((np.arange(8) + 0.5) / 4 - 0.5, 0, 1)  # source coordinate of each output
    rows = (1 - w)[:, None] * m[0] + w[:, None] * m[1]
    up = (1 - w)[None, :] * rows[:, :1] + w[None, :] * rows[:, 1:]
    # (ties where the border clamps the source coordinate; they follow the tie permutation)
    x = torch.ones(64, 3, 8, 8)
    maps = torch.tensor(m, dtype=torch.float32).expand(64, 2, 2).contiguous()
    for kind in ("deletion", "insertion"):
        out = run([f"{kind}_auc"], PixelProbe(), x, maps, torch.arange(64), steps=64,
                  curves=True, score="logit", insertion_substrate="zero")
        curves = np.asarray(out[f"{kind}_curve"])
        # point i has the first i pixels replaced: pixel k of rank r changes at point r + 1
        rank = (curves != curves[:, :1]).argmax(1) - 1
        assert sorted(rank.tolist()) == list(range(64))
        values = up.ravel()
        assert (np.diff(values[np.argsort(rank)]) <= 1e-7).all()  # most salient first


def test_one_step_and_blur_kernel_bounds():
    assert step_counts(10, 1) == [0, 10]
    with pytest.raises(MetricError, match="steps"):
        step_counts(10, 0)
    np.testing.assert_allclose(gaussian_kernel(1, 5.0), [[1.0]])
    assert gaussian_kernel(3, 1e-3)[1, 1] == pytest.approx(1.0)  # a tiny sigma is a delta
    for size, sigma in ((0, 5.0), (11, 0.0), (11, -1.0)):
        with pytest.raises(MetricError, match="blur kernel"):
            gaussian_kernel(size, sigma)


def test_helper_defaults_are_the_registry_defaults():
    """blur(), pixel_ranks() and impute() used without options follow the RISE / ROAD
    defaults of the registry."""
    from salmap.workers.metrics import METRICS
    from salmap.workers.metrics.road import impute

    ins, road = METRICS["insertion_auc"].defaults, METRICS["road"].defaults
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(blur(x), blur(x, ins["blur_kernel"], ins["blur_sigma"]))
    assert np.array_equal(gaussian_kernel(), gaussian_kernel(ins["blur_kernel"], ins["blur_sigma"]))
    s = torch.zeros(2, 5, 5)
    assert torch.equal(pixel_ranks(s), pixel_ranks(s, ins["tie_seed"]))
    keep = torch.rand(1, 1, 16, 16) > 0.5
    assert torch.equal(impute(x, keep), impute(x, keep, road["road_tol"], road["road_max_iter"]))


def test_nan_ranks_last_and_double_maps_rank_exactly():
    s = torch.tensor([[[0.5, float("nan")], [2.0, -1.0]]])
    assert pixel_ranks(s, 0).tolist() == [[1, 3, 0, 2]]
    d = torch.tensor([[[1.0, 1.0 + 1e-12], [1.0 + 2e-12, 0.0]]], dtype=torch.float64)
    assert pixel_ranks(d, 0).tolist() == [[2, 1, 0, 3]]  # not ties in float32
    with pytest.raises(MetricError, match="map_sign"):
        run(["deletion_auc"], nn.Identity(), torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4),
            torch.tensor([0]), map_sign="square")


def test_two_blur_substrates_in_one_call_do_not_share_a_cache_entry(tiny_model):
    torch.manual_seed(9)
    x = torch.randn(2, 3, 16, 16)
    maps = torch.rand(2, 16, 16)
    t = torch.tensor([0, 1])
    params = {"deletion_auc": {"deletion_substrate": "blur", "blur_kernel": 5, "blur_sigma": 1.0,
                               "steps": 4},
              "insertion_auc": {"steps": 4}}
    both = run(["deletion_auc", "insertion_auc"], tiny_model, x, maps, t, **params)
    alone_del = run(["deletion_auc"], tiny_model, x, maps, t, **params)
    alone_ins = run(["insertion_auc"], tiny_model, x, maps, t, **params)
    torch.testing.assert_close(both["deletion_auc"], alone_del["deletion_auc"])
    torch.testing.assert_close(both["insertion_auc"], alone_ins["insertion_auc"])
    assert not torch.allclose(alone_del["deletion_auc"],
                              run(["deletion_auc"], tiny_model, x, maps, t,
                                  deletion_substrate="blur", steps=4)["deletion_auc"])


@pytest.mark.parametrize("sign", ["signed", "abs", "relu"])
def test_map_sign_decides_the_order(sign):
    """Through the pixel probe: signed ranks -3 last, abs ranks it first, relu ties it with 0."""
    m = torch.tensor([[[1.0, -3.0], [0.5, 0.0]]])
    x = torch.ones(4, 3, 2, 2)
    out = run(["deletion_auc"], PixelProbe(), x, m.expand(4, 2, 2).contiguous(),
              torch.arange(4), steps=4, curves=True, score="logit", map_sign=sign)
    curves = np.asarray(out["deletion_curve"])
    rank = ((curves != curves[:, :1]).argmax(1) - 1).tolist()
    expected = {"signed": [[0, 3, 1, 2]], "abs": [[1, 0, 2, 3]],
                "relu": [[0, 2, 1, 3], [0, 3, 1, 2]]}[sign]  # relu: -3 and 0 tie
    assert rank in expected


def test_ties_follow_the_seeded_permutation_exactly():
    from salmap.workers.metrics.faithfulness import tie_permutation

    n = 64 * 64
    perm = tie_permutation(n, 3, torch.device("cpu"))
    ranks = pixel_ranks(torch.zeros(1, 64, 64), 3)[0]
    assert torch.equal(ranks[perm], torch.arange(n))  # the k-th pixel of perm is deleted k-th


def test_scores_are_float32_softmax_of_half_precision_logits(tiny_model):
    """A model returning float16 logits (autocast) is scored in float32, as float32 tensors."""
    torch.manual_seed(4)
    x = torch.randn(3, 3, 16, 16)
    maps = torch.rand(3, 16, 16)
    t = torch.tensor([0, 1, 2])

    def half(z):
        return (50 * tiny_model(z)).half()

    out = run(["deletion_auc", "average_drop"], half, x, maps, t, steps=4, curves=True)
    with torch.no_grad():
        ref = torch.softmax(half(x).float(), 1)[torch.arange(3), t]
    assert out["deletion_auc"].dtype == out["confidence_clean"].dtype == torch.float32
    torch.testing.assert_close(out["confidence_clean"], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(out["deletion_curve"])[:, 0], ref, atol=1e-6, rtol=0)
