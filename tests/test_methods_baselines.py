"""Input-space baselines: vanilla gradient, gradient x input, SmoothGrad, Integrated Gradients.

Checks the properties of baselines.md (sections 1-4) and the method contract: batch equals
one-by-one with a different target per sample, and the model is left exactly as found.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import bias_free_relu_net
from method_checks import assert_restored, mixed_state, snapshot
from salmap.workers.methods import build
from salmap.workers.methods.integrated_gradients import METHODS, path_points
from torch import nn

# small settings for the iterative methods, so the contract tests stay fast
FAST = {
    "gradient": {},
    "gradient_x_input": {},
    "smoothgrad": {"nsamples": 4, "inner_batch_size": 3},
    "integrated_gradients": {"steps": 6, "inner_batch_size": 4},
}


def linear_model(c: int = 3, h: int = 4, w: int = 4, classes: int = 3, bias: bool = True):
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, classes, bias=bias)).eval()


# -- vanilla gradient -------------------------------------------------------------------------
def test_gradient_of_linear_model_is_the_weight():
    model = linear_model()
    x = torch.randn(2, 3, 4, 4)
    targets = torch.tensor([2, 0])
    maps = build("gradient", model)(x, targets)
    w = model[1].weight.detach().view(3, 3, 4, 4)
    expected = w[targets].abs().amax(dim=1)
    torch.testing.assert_close(maps, expected, rtol=0, atol=0)


def test_gradient_matches_finite_differences():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 2)
    ).double().eval()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    maps = build("gradient", model)(x, [1])
    eps = 1e-6
    fd = torch.zeros(3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        for idx in np.ndindex(3, 5, 5):
            e = torch.zeros_like(x)
            e[(0, *idx)] = eps
            fd[idx] = (model(x + e)[0, 1] - model(x - e)[0, 1]) / (2 * eps)
    torch.testing.assert_close(maps[0], fd.abs().amax(0).float(), rtol=1e-4, atol=1e-6)


# -- gradient x input ---------------------------------------------------------------------------
def test_gradient_x_input_is_complete_on_a_bias_free_relu_net():
    model = bias_free_relu_net()
    x = torch.randn(3, 3, 8, 8)
    targets = torch.tensor([0, 3, 1])
    maps = build("gradient_x_input", model)(x, targets)
    logits = model(x).detach()
    torch.testing.assert_close(maps.sum((1, 2)), logits[torch.arange(3), targets], rtol=1e-5, atol=1e-6)


def test_gradient_x_input_gap_is_the_bias_on_a_linear_model():
    model = linear_model(bias=True)
    x = torch.randn(2, 3, 4, 4)
    targets = torch.tensor([1, 2])
    maps = build("gradient_x_input", model)(x, targets)
    logits = model(x).detach()[torch.arange(2), targets]
    bias = model[1].bias.detach()[targets]
    assert bias.abs().min() > 1e-3  # the check below would be vacuous otherwise
    torch.testing.assert_close(maps.sum((1, 2)), logits - bias, rtol=1e-5, atol=1e-6)


# -- SmoothGrad -------------------------------------------------------------------------------
def test_smoothgrad_without_noise_is_the_gradient(tiny_model):
    x = torch.randn(2, 3, 16, 16)
    t = [1, 3]
    grad = build("gradient", tiny_model)(x, t)
    plain = build("smoothgrad", tiny_model, stdev_spread=0.0, nsamples=3, magnitude=False)(x, t)
    squared = build("smoothgrad", tiny_model, stdev_spread=0.0, nsamples=3, magnitude=True)(x, t)
    torch.testing.assert_close(plain, grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(squared, grad.square(), rtol=1e-5, atol=1e-12)


def test_smoothgrad_is_deterministic_per_seed_and_noise_matters(tiny_model):
    x = torch.randn(2, 3, 16, 16)
    t = [0, 4]
    a = build("smoothgrad", tiny_model, nsamples=5, seed=7)(x, t)
    b = build("smoothgrad", tiny_model, nsamples=5, seed=7)(x, t)
    c = build("smoothgrad", tiny_model, nsamples=5, seed=8)(x, t)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, build("gradient", tiny_model)(x, t).square())


def test_smoothgrad_magnitude_dominates_the_squared_mean(tiny_model):
    """mean(g^2) >= mean(g)^2 per channel (Jensen), so the same holds for max_c."""
    x = torch.randn(2, 3, 16, 16)
    t = [2, 1]
    sq = build("smoothgrad", tiny_model, nsamples=6, magnitude=True, seed=1)(x, t)
    plain = build("smoothgrad", tiny_model, nsamples=6, magnitude=False, seed=1)(x, t)
    assert (sq >= 0).all()
    assert (sq >= plain.square() * (1 - 1e-5) - 1e-12).all()
    assert (sq > plain.square() * 1.01).any()  # noise makes it strict somewhere


def test_smoothgrad_sigma_is_relative_to_each_images_range(tiny_model):
    x = torch.randn(2, 3, 16, 16)
    x[1] *= 3
    rel = build("smoothgrad", tiny_model, stdev_spread=0.2)
    sig = rel.sigmas(x)
    torch.testing.assert_close(sig, 0.2 * (x.flatten(1).amax(1) - x.flatten(1).amin(1)))
    one = x[1:]
    absolute = build("smoothgrad", tiny_model, stdev=float(sig[1]), nsamples=4)(one, [3])
    relative = build("smoothgrad", tiny_model, stdev_spread=0.2, nsamples=4)(one, [3])
    torch.testing.assert_close(absolute, relative)


# -- Integrated Gradients ---------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_ig_quadrature_rules(method):
    alphas, weights = path_points(method, 7)
    assert alphas.min() >= 0 and alphas.max() <= 1
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    # the integral of alpha on [0, 1]: exact for the symmetric rules, off by 1/(2m) otherwise
    tol = 1 / 14 + 1e-12 if method in ("riemann_left", "riemann_right") else 1e-12
    assert abs(float((weights * alphas).sum()) - 0.5) <= tol
    if method in ("riemann_left", "riemann_right"):
        assert abs(float((weights * alphas).sum()) - 0.5) > 0.07


def test_ig_gauss_legendre_is_exact_for_high_degree_polynomials():
    alphas, weights = path_points("gausslegendre", 5)
    assert float((weights * alphas**9).sum()) == pytest.approx(0.1, abs=1e-12)  # degree 2m-1


@pytest.mark.parametrize("method", METHODS)
def test_ig_on_a_linear_model_is_input_times_weight(method):
    model = linear_model()
    x = torch.randn(2, 3, 4, 4)
    targets = torch.tensor([0, 2])
    ig = build("integrated_gradients", model, steps=5, method=method)
    attr = ig.attributions(x, targets)
    w = model[1].weight.detach().view(3, 3, 4, 4)[targets]
    torch.testing.assert_close(attr, x * w, rtol=1e-5, atol=1e-7)


def test_ig_completeness(tiny_model):
    """Sum of the map = S_t(x) - S_t(0) within 1 % at 256 steps; coarse paths are worse."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 16)
    targets = torch.tensor([1, 2])
    with torch.no_grad():
        gap = tiny_model(x)[torch.arange(2), targets] - tiny_model(torch.zeros_like(x))[0, targets]
    errors = {}
    for steps in (4, 256):
        maps = build("integrated_gradients", tiny_model, steps=steps, method="riemann_right",
                     inner_batch_size=128)(x, targets)
        errors[steps] = ((maps.sum((1, 2)) - gap).abs() / gap.abs()).max().item()
    assert errors[256] < 0.01
    assert errors[256] < errors[4]
    default = build("integrated_gradients", tiny_model, inner_batch_size=128)(x, targets)
    rel = ((default.sum((1, 2)) - gap).abs() / gap.abs()).max().item()
    assert rel < 0.05  # the paper's guideline, at the default 50 Gauss-Legendre steps


def test_ig_rejects_bad_parameters(tiny_model):
    from salmap.workers.methods import MethodError

    with pytest.raises(MethodError, match="method must be one of"):
        build("integrated_gradients", tiny_model, method="simpson")
    with pytest.raises(MethodError, match="steps"):
        build("integrated_gradients", tiny_model, steps=1)


# -- the contract, for every method on two architectures ----------------------------------------
@pytest.mark.parametrize("name", list(FAST))
@pytest.mark.parametrize("arch", ["tiny_model", "resnet18"])
def test_batch_equals_one_by_one_and_model_is_restored(name, arch, request):
    model = mixed_state(request.getfixturevalue(arch))
    torch.manual_seed(5)
    x = torch.randn(3, 3, 32, 32)
    before = snapshot(model, x)
    targets = torch.tensor([0, 3, 1])
    method = build(name, model, **FAST[name])
    maps = method(x, targets)
    assert maps.shape == (3, 32, 32) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    singles = torch.cat([method(x[i:i + 1], targets[i:i + 1]) for i in range(3)])
    scale = maps.abs().max()
    torch.testing.assert_close(maps, singles, rtol=1e-4, atol=1e-5 * float(scale))
    # targets matter: another target gives another map
    assert not torch.allclose(method(x[:1], [2]), maps[:1])
    assert not x.requires_grad and x.grad is None
    assert_restored(model, before, x)


@pytest.mark.parametrize("name", list(FAST))
def test_model_restored_when_the_method_raises(name, tiny_model):
    model = mixed_state(tiny_model)
    x = torch.randn(2, 3, 16, 16)
    before = snapshot(model, x)
    method = build(name, model, **FAST[name])
    with pytest.raises((RuntimeError, IndexError)):
        method(x, [0, 99])  # class 99 does not exist
    assert_restored(model, before, x)


def test_pretrained_lite0_ig_completeness_and_gradient(lite0, photo_batch):
    """EfficientNet-Lite0 on a photo at the defaults: Integrated Gradients' map sums to
    S_t(x) - S_t(0) within 10 % on the real model (the paper's guideline is 5 %; with 50
    Gauss-Legendre steps this ReLU6 net is off by 5-7 % on the chelsea and coffee photos), and
    the vanilla gradient map is ``max_c |dS_t/dx|`` of autograd."""
    model, x = lite0.model, photo_batch[:1]
    with torch.no_grad():
        logits = model(x)
        targets = logits.argmax(1)
        base = model(torch.zeros_like(x))
    gap = logits[0, targets] - base[0, targets]
    # the 50 path points in forwards of 10: the same sum (inner_batch_size only chunks the
    # points), and with one torch thread small chunks stay in the CPU cache (faster than 50)
    ig = build("integrated_gradients", model, inner_batch_size=10)(x, targets)
    assert ((ig.flatten(1).sum(1) - gap).abs() < 0.1 * gap.abs()).all()
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr)[0, targets].sum(), xr)
    torch.testing.assert_close(build("gradient", model)(x, targets), grad.abs().amax(1),
                               rtol=1e-4, atol=1e-7)
