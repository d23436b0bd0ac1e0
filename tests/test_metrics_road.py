"""ROAD: the conjugate-gradient imputer against a direct sparse solve, imputer invariants,
antisymmetry and the random-map expectation of ROAD Combined."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from salmap.workers.metrics import compute_model_metrics
from salmap.workers.metrics.road import impute, keep_counts

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def neighbour_system(img: np.ndarray, keep: np.ndarray):
    """The imputation's linear system A v = b over the removed pixels: each = weighted mean of
    its in-image 8-neighbours (1/6 direct, 1/12 diagonal). Returns (A as CSR, b, removed)."""
    from scipy.sparse import lil_matrix

    c, h, w = img.shape
    removed = np.argwhere(~keep)
    index = {tuple(p): i for i, p in enumerate(removed)}
    a = lil_matrix((len(removed), len(removed)))
    rhs = np.zeros((len(removed), c))
    for i, (r, q) in enumerate(removed):
        for dr in (-1, 0, 1):
            for dq in (-1, 0, 1):
                rr, qq = r + dr, q + dq
                if (dr, dq) == (0, 0) or not (0 <= rr < h and 0 <= qq < w):
                    continue
                wt = 1 / 6 if dr == 0 or dq == 0 else 1 / 12
                a[i, i] += wt
                if keep[rr, qq]:
                    rhs[i] += wt * img[:, rr, qq]
                else:
                    a[i, index[(rr, qq)]] -= wt
    return a.tocsr(), rhs, removed


def direct_solve(img: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Reference: the neighbour system solved directly."""
    from scipy.sparse.linalg import spsolve

    a, rhs, removed = neighbour_system(img, keep)
    sol = spsolve(a, rhs)
    out = img.copy()
    out[:, removed[:, 0], removed[:, 1]] = np.asarray(sol).reshape(len(removed), img.shape[0]).T
    return out


@pytest.mark.parametrize("frac_removed", [0.1, 0.5, 0.9])
def test_imputer_matches_direct_sparse_solve(frac_removed):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(3, 14, 12))
    keep = rng.random((14, 12)) >= frac_removed
    got = impute(torch.tensor(img[None]), torch.tensor(keep)[None, None], tol=1e-7)[0].numpy()
    np.testing.assert_allclose(got, direct_solve(img, keep), atol=1e-3)


def test_imputer_invariants():
    h, w = 12, 12
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    ramp = (0.3 * yy - 0.2 * xx + 1).expand(1, 3, h, w).clone()
    keep = torch.ones(1, 1, h, w, dtype=torch.bool)
    keep[..., 4:8, 3:9] = False  # an interior hole: linear data is harmonic
    torch.testing.assert_close(impute(ramp, keep, tol=1e-7), ramp, atol=1e-4, rtol=0)
    const = torch.full((2, 3, h, w), 0.7)
    rnd = torch.rand(2, 1, h, w) > 0.6
    torch.testing.assert_close(impute(const, rnd), const, atol=1e-5, rtol=0)
    x = torch.randn(2, 3, h, w)
    out = impute(x, rnd)
    assert torch.equal(out[rnd.expand_as(x)], x[rnd.expand_as(x)])  # kept pixels untouched
    none_kept = impute(x, torch.zeros(2, 1, h, w, dtype=torch.bool))
    assert torch.isfinite(none_kept).all()


def test_keep_counts_are_exact():
    assert keep_counts(224 * 224, [10, 50, 90]) == [5018, 25088, 45158]
    assert keep_counts(100, [0, 100]) == [0, 100]


def test_road_is_antisymmetric_under_map_reversal(tiny_model):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    s = torch.randn(3, 16, 16)  # tie-free, input resolution
    t = torch.tensor([0, 2, 4])
    kw = {"road_noise": 0.0, "road_percentiles": (20, 50, 80)}
    a = compute_model_metrics(["road"], tiny_model, x, s, t, kw, MEAN, STD)["road"]
    b = compute_model_metrics(["road"], tiny_model, x, -s, t, kw, MEAN, STD)["road"]
    torch.testing.assert_close(b, -a, atol=1e-6, rtol=0)
    assert a.abs().max() > 1e-5


def test_road_of_random_maps_averages_to_zero(tiny_model):
    torch.manual_seed(1)
    n = 40
    x = torch.randn(1, 3, 16, 16).expand(n, 3, 16, 16).contiguous()
    maps = torch.rand(n, 16, 16)
    out = compute_model_metrics(["road"], tiny_model, x, maps, torch.zeros(n, dtype=torch.long),
                                {"road_percentiles": (30, 70)}, MEAN, STD)["road"].numpy()
    assert out.std() > 0
    assert abs(out.mean()) < 4 * out.std() / np.sqrt(n)


def test_road_rewards_keeping_the_evidence_on_a_linear_model():
    """Class-0 evidence is one bright blob; keeping it (LeRF of the blob map) keeps the score,
    removing it (MoRF) lets the imputer fill it from the dark surround: ROAD > 0, and the
    reversed map scores the opposite."""
    from torch import nn

    class Blob(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = nn.Parameter(w, requires_grad=False)

        def forward(self, x):
            z = (x * self.w).flatten(1).sum(1) / 20 - 3
            return torch.stack([z, torch.zeros_like(z)], 1)

    x = torch.zeros(1, 3, 16, 16)
    x[..., 4:11, 4:11] = 1.0
    model = Blob(x.clone())
    s = x[:, 0] + 1e-3 * torch.rand(1, 16, 16)
    kw = {"road_noise": 0.0, "road_percentiles": (30, 60)}
    t = torch.tensor([0])
    good = compute_model_metrics(["road"], model, x, s, t, kw, MEAN, STD)["road"].item()
    bad = compute_model_metrics(["road"], model, x, -s, t, kw, MEAN, STD)["road"].item()
    assert good > 0.3 and bad == pytest.approx(-good, abs=1e-6)


class PixelProbe(torch.nn.Module):
    """logits = the input's values (all channels, flattened): with ``score="logit"`` the score
    of target k is value k of the image the metric rendered, so every rendered image can be
    read back exactly."""

    def forward(self, x):
        return x.flatten(1)


def probe_road(x, s, percentiles, **params):
    """ROAD of every (channel, pixel) of x as the probe's target: [C*H*W]."""
    n = x[0].numel()
    xs = x.expand(n, *x.shape[1:]).contiguous()
    maps = s.expand(n, *s.shape[1:]).contiguous()
    return compute_model_metrics(["road"], PixelProbe(), xs, maps, torch.arange(n),
                                 {"score": "logit", "road_percentiles": percentiles, **params},
                                 MEAN, STD, max_batch=128)["road"].view(x.shape[1:])


def test_road_is_half_the_lerf_minus_morf_gap_of_exactly_imputed_images():
    """Without noise, ROAD of probe target k is (LeRF_k - MoRF_k) / 2 where LeRF keeps the
    top 70% of the map and MoRF the bottom 70%, the rest imputed (checked against a direct
    sparse solve at the default CG tolerance)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, 10, 10, generator=g, dtype=torch.float64).float()
    s = torch.rand(1, 10, 10, generator=g)
    order = s.flatten().argsort(descending=True)
    keep_top = torch.zeros(100, dtype=torch.bool)
    keep_top[order[:70]] = True
    keep_bottom = torch.zeros(100, dtype=torch.bool)
    keep_bottom[order[30:]] = True
    img = x[0].double().numpy()
    lerf = direct_solve(img, keep_top.view(10, 10).numpy())
    morf = direct_solve(img, keep_bottom.view(10, 10).numpy())
    got = probe_road(x, s, (70,), road_noise=0.0).double().numpy()
    np.testing.assert_allclose(got, (lerf - morf) / 2, atol=2e-5)
    both = (keep_top & keep_bottom).view(10, 10).numpy()
    assert np.abs(got[:, both]).max() == 0  # kept in both: untouched in both
    assert np.abs(got[:, ~both]).min() > 1e-3  # the gap is not trivially small


def test_road_noise_touches_only_imputed_pixels_with_the_default_spread():
    """The default noise (std 0.01, model-input space) lands on the imputed pixels only: the
    difference to a noise-free run is 0 where both images keep the pixel and +-noise/2 where
    one of them imputes it."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 3, 10, 10, generator=g)
    s = torch.rand(1, 10, 10, generator=g)
    order = s.flatten().argsort(descending=True)
    both = torch.zeros(100, dtype=torch.bool)
    both[order[30:70]] = True
    both = both.view(10, 10)
    diff = (probe_road(x, s, (70,)) - probe_road(x, s, (70,), road_noise=0.0)).numpy()
    assert np.abs(diff[:, both.numpy()]).max() < 1e-6
    noise = 2 * diff[:, ~both.numpy()]
    assert noise.std() == pytest.approx(0.01, rel=0.2)
    assert abs(noise.mean()) < 4 * 0.01 / np.sqrt(noise.size)


def test_imputation_runs_in_float32_whatever_the_input_dtype():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 12, 12, generator=g)
    keep = torch.rand(1, 1, 12, 12, generator=g) > 0.7
    half = impute(x.half(), keep)
    assert half.dtype == torch.float32
    assert torch.equal(half, impute(x.half().float(), keep))


def residual(img: np.ndarray, keep: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """Relative residual ||A v - b|| / ||b|| of the imputed values (per channel, worst)."""
    a, rhs, removed = neighbour_system(img, keep)
    v = out[:, removed[:, 0], removed[:, 1]].T
    res = a @ v - rhs
    c = img.shape[0]
    return float(max(np.linalg.norm(res[:, k]) / np.linalg.norm(rhs[:, k]) for k in range(c))), \
        float(min(np.linalg.norm(rhs[:, k]) for k in range(c)))


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_cg_stops_at_the_relative_tolerance_whatever_the_image_scale(scale):
    """A large hole needs many CG iterations: the result meets ||A v - b|| <= tol ||b|| at
    any brightness scale, and scales with the image (the stop rule is relative)."""
    g = torch.Generator().manual_seed(6)
    x = torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64).float()
    keep = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    keep[..., 3:29, 2:30] = False
    for tol in (1e-3, 1e-5):
        out = impute(scale * x, keep, tol=tol)
        rel, _ = residual((scale * x)[0].double().numpy(), keep[0, 0].numpy(),
                          out[0].double().numpy())
        assert rel <= tol * 1.01
    np.testing.assert_allclose(impute(scale * x, keep, tol=1e-5).numpy() / scale,
                               impute(x, keep, tol=1e-5).numpy(), rtol=1e-4, atol=1e-5)


def test_imputation_of_one_image_does_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(10)
    x = torch.rand(3, 3, 20, 20, generator=g)
    keep = torch.rand(3, 1, 20, 20, generator=g) > torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1, 1)
    both = impute(x, keep)
    for i in range(3):
        assert torch.equal(both[i:i + 1], impute(x[i:i + 1], keep[i:i + 1])), i


def test_percentiles_must_lie_in_0_to_100():
    from salmap.workers.metrics import MetricError

    assert keep_counts(10, [0.0, 100.0]) == [0, 10]
    for bad in (100.5, -0.5):
        with pytest.raises(MetricError, match="road_percentiles"):
            keep_counts(10, [bad])


def test_max_iter_caps_the_conjugate_gradient_iterations():
    g = torch.Generator().manual_seed(14)
    x = torch.rand(1, 3, 24, 24, generator=g)
    keep = torch.ones(1, 1, 24, 24, dtype=torch.bool)
    keep[..., 2:22, 2:22] = False
    runs = [impute(x, keep, tol=0.0, max_iter=k) for k in (0, 1, 2, 3)]
    start = x[..., 2:22, 2:22]
    assert torch.equal(runs[0][..., 2:22, 2:22],
                       (x * keep).sum((2, 3), keepdim=True).expand_as(x)[..., 2:22, 2:22]
                       / keep.sum())  # 0 iterations: the start value, the kept pixels' mean
    for a, b in zip(runs, runs[1:]):
        assert not torch.equal(a, b)  # every iteration counts
    assert not torch.equal(runs[-1][..., 2:22, 2:22], start)


def probe_road_columns(x, s, percentiles, **params):
    """All four ROAD columns of every (channel, pixel) of x as the probe's target."""
    n = x[0].numel()
    xs = x.expand(n, *x.shape[1:]).contiguous()
    maps = s.expand(n, *s.shape[1:]).contiguous()
    out = compute_model_metrics(["road"], PixelProbe(), xs, maps, torch.arange(n),
                                {"score": "logit", "road_percentiles": percentiles, **params},
                                MEAN, STD, max_batch=128)
    return {k: out[k].view(x.shape[1:]) for k in ("road", "road_morf", "road_lerf", "road_gap")}


def test_road_morf_and_lerf_are_the_two_imputed_images_and_the_gap_is_twice_road():
    """Without noise, on the probe: road_lerf is the image with the top 70% of the map kept,
    road_morf the image with the bottom 70% kept (rest imputed, checked against a direct
    sparse solve), road_gap their difference and road half of it."""
    g = torch.Generator().manual_seed(17)
    x = torch.randn(1, 3, 10, 10, generator=g)
    s = torch.rand(1, 10, 10, generator=g)
    order = s.flatten().argsort(descending=True)
    keep_top = torch.zeros(100, dtype=torch.bool)
    keep_top[order[:70]] = True
    keep_bottom = torch.zeros(100, dtype=torch.bool)
    keep_bottom[order[30:]] = True
    img = x[0].double().numpy()
    lerf = direct_solve(img, keep_top.view(10, 10).numpy())
    morf = direct_solve(img, keep_bottom.view(10, 10).numpy())
    got = probe_road_columns(x, s, (70,), road_noise=0.0)
    np.testing.assert_allclose(got["road_lerf"].double().numpy(), lerf, atol=2e-5)
    np.testing.assert_allclose(got["road_morf"].double().numpy(), morf, atol=2e-5)
    torch.testing.assert_close(got["road_gap"], got["road_lerf"] - got["road_morf"])
    torch.testing.assert_close(got["road"], got["road_gap"] / 2)


def test_lerf_keeps_the_most_relevant_pixels_and_morf_removes_them():
    """At every percentile (10 and 90) the top 10% of the map is kept by LeRF and removed by
    MoRF, the bottom 10% the other way round: on the probe, road_lerf equals the image exactly
    on the most relevant pixels and road_morf on the least relevant, never the reverse (with
    the default noise on)."""
    g = torch.Generator().manual_seed(18)
    x = torch.randn(1, 3, 8, 8, generator=g)
    s = torch.rand(1, 8, 8, generator=g)
    order = s.flatten().argsort(descending=True)
    top, bottom = order[:6], order[-6:]  # round(10% of 64) = 6
    got = probe_road_columns(x, s, (10, 90))
    flat = {k: v.flatten(1) for k, v in got.items()}
    img = x[0].flatten(1)
    torch.testing.assert_close(flat["road_lerf"][:, top], img[:, top], atol=1e-6, rtol=0)
    torch.testing.assert_close(flat["road_morf"][:, bottom], img[:, bottom], atol=1e-6, rtol=0)
    assert (flat["road_morf"][:, top] - img[:, top]).abs().min() > 1e-4
    assert (flat["road_lerf"][:, bottom] - img[:, bottom]).abs().min() > 1e-4


def test_reversing_the_map_swaps_morf_and_lerf():
    """Without noise, the reversed map's LeRF is the map's MoRF and vice versa (the gap flips
    sign); a map whose evidence is one bright blob has a high LeRF and a low MoRF."""
    from torch import nn

    class Blob(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = nn.Parameter(w, requires_grad=False)

        def forward(self, x):
            z = (x * self.w).flatten(1).sum(1) / 20 - 3
            return torch.stack([z, torch.zeros_like(z)], 1)

    x = torch.zeros(1, 3, 16, 16)
    x[..., 4:11, 4:11] = 1.0
    model = Blob(x.clone())
    s = x[:, 0] + 1e-3 * torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(3))
    kw = {"road_noise": 0.0, "road_percentiles": (30, 60)}
    t = torch.tensor([0])
    good = compute_model_metrics(["road"], model, x, s, t, kw, MEAN, STD)
    bad = compute_model_metrics(["road"], model, x, -s, t, kw, MEAN, STD)
    assert good["road_lerf"].item() > 0.9 and good["road_morf"].item() < 0.5
    torch.testing.assert_close(bad["road_lerf"], good["road_morf"], atol=1e-6, rtol=0)
    torch.testing.assert_close(bad["road_morf"], good["road_lerf"], atol=1e-6, rtol=0)
    torch.testing.assert_close(bad["road_gap"], -good["road_gap"], atol=1e-6, rtol=0)
