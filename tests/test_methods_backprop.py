"""Guided Backprop, RectGrad and NoBias-RectGrad: rule properties and the method contract.

Properties from baselines.md section 5, rectgrad.md section 5 and nobias_rectgrad.md
section 5; the contract (batch equals one-by-one with a different target per sample, the
model left exactly as found, also after an error) on three architectures; parity of
Guided Backprop with Captum.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import bias_free_relu_net
from method_checks import assert_restored, mixed_state, snapshot
from salmap.workers.methods import MethodError, build
from torch import nn

METHODS = ["guided_backprop", "rectgrad", "nobias_rectgrad"]


# -- helpers -----------------------------------------------------------------------------------
def not_inplace(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return model


def activation_input_grads(model: nn.Module, method, x, targets) -> list[torch.Tensor]:
    """The gradient each ReLU/ReLU6 module call sent to its input (one entry per call)."""
    grads, handles = [], []

    def pre(_m, args):
        args[0].register_hook(lambda g: grads.append(g.detach().clone()))

    for m in model.modules():
        if isinstance(m, nn.ReLU | nn.ReLU6):
            handles.append(m.register_forward_pre_hook(pre))
    try:
        method(x, targets)
    finally:
        for h in handles:
            h.remove()
    return grads


class ActNet(nn.Module):
    """The same net with functional activations (every flavour) or with activation modules."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.functional = functional
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(6))
        self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU(inplace=True),
                                   nn.ReLU6()])
        self.shared = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        c = self.convs
        if self.functional:
            y = F.relu(c[0](x))
            y = torch.relu(c[1](y))
            y = c[2](y).relu()
            y = c[3](y)
            F.relu_(y)  # in-place, result ignored: the caller keeps using ``y``
            y = F.relu6(c[4](y) * 4)
        else:
            y = self.acts[0](c[0](x))
            y = self.acts[1](c[1](y))
            y = self.acts[2](c[2](y))
            y = self.acts[3](c[3](y))
            y = self.acts[4](c[4](y) * 4)
        y = self.shared(self.shared(c[5](y)) - 0.1)  # one module, two calls
        return self.fc(y.mean((2, 3)))


# -- Guided Backprop -------------------------------------------------------------------------
def test_guided_backprop_matches_captum(resnet18, tiny_model):
    """Captum's GuidedBackprop (hooks on nn.ReLU modules) on the same model, input, targets.

    Recorded max abs difference: 0.0 on both (ResNet-18 at 48 px, TinyNet at 32 px).
    """
    from captum.attr import GuidedBackprop as CaptumGBP

    for model, px in ((resnet18, 48), (tiny_model, 32)):
        torch.manual_seed(0)
        x = torch.randn(3, 3, px, px)
        targets = torch.tensor([1, 4, 2])
        ours = build("guided_backprop", model).attribute_channels(x, targets)
        with pytest.warns(UserWarning):
            ref = CaptumGBP(not_inplace(model)).attribute(x.clone().requires_grad_(True),
                                                          target=targets)
        assert ref.abs().max() > 0
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_guided_backprop_closed_form_on_one_activation(act):
    """x -> act -> linear: g = w_t * 1[w_t > 0] * 1[0 < x (< 6)]; ReLU6 saturated units pass 0."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), act(), nn.Linear(3 * 4 * 4, 5)).eval()
    x = torch.rand(2, 3, 4, 4) * 12 - 3  # covers negative, active and saturated (> 6) inputs
    targets = torch.tensor([1, 3])
    got = build("guided_backprop", model).attribute_channels(x, targets)
    w = model[2].weight[targets].view(2, 3, 4, 4)
    live = (x > 0) & (x < 6) if act is nn.ReLU6 else x > 0
    assert torch.equal(got, torch.where(live & (w > 0), w, torch.zeros_like(w)))
    if act is nn.ReLU6:
        assert ((x > 6) & (w > 0)).any()  # saturation really was exercised


def test_guided_backprop_passes_only_positive_signals(resnet18, mobilenet_v2):
    for model, n_calls in ((not_inplace(resnet18), 17), (not_inplace(mobilenet_v2), 35)):
        torch.manual_seed(1)
        x = torch.randn(2, 3, 32, 32)
        grads = activation_input_grads(model, build("guided_backprop", model), x, [3, 7])
        assert len(grads) == n_calls
        assert all((g >= 0).all() for g in grads)
        assert sum(int((g > 0).sum()) for g in grads) > 0


def test_guided_backprop_maps_and_reductions(tiny_model):
    x = torch.randn(2, 3, 32, 32)
    raw = build("guided_backprop", tiny_model).attribute_channels(x, [0, 2])
    default = build("guided_backprop", tiny_model)(x, [0, 2])
    torch.testing.assert_close(default, raw.abs().amax(1))
    summed = build("guided_backprop", tiny_model, reduction="sum")(x, [0, 2])
    torch.testing.assert_close(summed, raw.sum(1))
    with pytest.raises(MethodError, match="reduction"):
        build("guided_backprop", tiny_model, reduction="mean")


# -- every activation call gets the rule ----------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_functional_inplace_and_reused_activations_get_the_rule(name):
    functional, modules = ActNet(functional=True).eval(), ActNet(functional=False).eval()
    modules.load_state_dict(functional.state_dict())
    x = torch.randn(2, 3, 16, 16)
    params = {} if name == "guided_backprop" else {"padding_trick": "none"}
    m_fun, m_mod = build(name, functional, **params), build(name, modules, **params)
    got, want = m_fun(x, [1, 2]), m_mod(x, [1, 2])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert sum(m_fun.last_trace.touched.values()) == 7
    assert m_mod.last_trace.touched["shared"] == 2  # the re-used module, once per call
    # and the rule matters: the plain gradient of the same net differs
    assert not torch.allclose(got, build("gradient", functional)(x, [1, 2]))


def test_touched_activation_counts_on_torchvision_models(resnet18, mobilenet_v2):
    x = torch.randn(1, 3, 32, 32)
    gbp = build("guided_backprop", resnet18)
    gbp(x, [0])
    assert gbp.last_trace.touched["relu"] == 1  # the stem
    assert gbp.last_trace.touched["layer1.0.relu"] == 2  # re-used in the block
    assert sum(gbp.last_trace.touched.values()) == 17
    gbp = build("guided_backprop", mobilenet_v2)
    gbp(x, [0])
    assert sum(gbp.last_trace.touched.values()) == 35  # every ReLU6 (hardtanh) call


# -- RectGrad / NoBias-RectGrad ---------------------------------------------------------------
def test_rectgrad_tau0_is_guided_backprop_times_input(resnet18):
    torch.manual_seed(6)
    for model, px in ((bias_free_relu_net(), 16), (resnet18, 48)):
        x = torch.randn(3, 3, px, px)
        targets = [0, 3, 1]
        gbp = build("guided_backprop", model).attribute_channels(x, targets)
        rect = build("rectgrad", model, tau=0.0, padding_trick="none").attribute_channels(
            x, targets)
        assert gbp.abs().max() > 0
        torch.testing.assert_close(rect, gbp * x, rtol=0, atol=0)
        nobias = build("nobias_rectgrad", model, tau=0.0, padding_trick="none")
        torch.testing.assert_close(nobias.attribute_channels(x, targets), gbp, rtol=0, atol=0)


def test_rectgrad_q0_is_not_guided_backprop_tau0_is():
    """The GBP identity is for the constant threshold tau = 0 (rectgrad.md 5.2), not q = 0.

    q = 0 puts tau at each layer's minimum score; where that is negative (an active unit with
    a negative gradient), inactive units (a = 0, score 0 > tau) let the gradient through.
    """
    model = bias_free_relu_net()
    torch.manual_seed(12)
    x = torch.randn(2, 3, 16, 16)
    gbp = build("guided_backprop", model).attribute_channels(x, [0, 1])
    tau0 = build("nobias_rectgrad", model, tau=0.0, padding_trick="none")
    q0 = build("nobias_rectgrad", model, q=0.0, padding_trick="none")
    torch.testing.assert_close(tau0.attribute_channels(x, [0, 1]), gbp, rtol=0, atol=0)
    assert not torch.allclose(q0.attribute_channels(x, [0, 1]), gbp)


def test_nobias_is_invariant_to_an_input_shift_moved_into_the_first_bias():
    """nobias_rectgrad.md 5.6: f'(y) = f(y - x0) with b1' = b1 - W1 x0 (dense first layer).

    At y = x + x0 every activation, score and threshold is that of f at x, so
    NoBias_f'(x + x0) = NoBias_f(x), while RectGrad_f'(x + x0) = NoBias_f(x) * (x + x0).
    """
    torch.manual_seed(13)
    f = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                      nn.Linear(16, 4)).eval()
    x, x0 = torch.randn(2, 3, 4, 4), torch.randn(1, 3, 4, 4)
    g = copy.deepcopy(f)
    with torch.no_grad():
        g[1].bias.sub_(g[1].weight @ x0.flatten())
    y = x + x0
    with torch.no_grad():
        torch.testing.assert_close(g(y), f(x), rtol=1e-5, atol=1e-5)
    nb_f = build("nobias_rectgrad", f, q=80).attribute_channels(x, [0, 2])
    nb_g = build("nobias_rectgrad", g, q=80).attribute_channels(y, [0, 2])
    rect_f = build("rectgrad", f, q=80).attribute_channels(x, [0, 2])
    rect_g = build("rectgrad", g, q=80).attribute_channels(y, [0, 2])
    assert nb_f.abs().max() > 0
    torch.testing.assert_close(nb_g, nb_f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rect_g, nb_f * y, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(rect_g, rect_f, atol=1e-3)


@pytest.mark.parametrize("q", [90.0, 98.0])
def test_rectgrad_passes_at_most_the_top_percent_per_sample_and_layer(q, resnet18):
    model = not_inplace(resnet18)
    torch.manual_seed(8)
    x = torch.randn(2, 3, 32, 32)
    grads = activation_input_grads(model, build("rectgrad", model, q=q, padding_trick="none"),
                                   x, [1, 6])
    assert len(grads) == 17
    for g in grads:
        n = g[0].numel()
        k = math.floor(q / 100 * (n - 1) + 0.5) + 1  # the threshold's rank
        passed = (g != 0).flatten(1).sum(1)
        assert (passed <= n - k).all(), (passed, n, k)  # strict > the k-th value, per sample
    assert sum(int((g != 0).sum()) for g in grads) > 0
    # rectgrad.md 5.3: with tau >= 0 (here, as in practice, the 90th/98th percentile is > 0)
    # every passed signal is positive: a * g > tau >= 0 with a >= 0 needs g > 0
    assert all((g >= 0).all() for g in grads)
    # only the top of a*g passes, so a higher q passes fewer units overall
    fewer = activation_input_grads(model, build("rectgrad", model, q=99.5, padding_trick="none"),
                                   x, [1, 6])
    assert sum(int((g != 0).sum()) for g in fewer) < sum(int((g != 0).sum()) for g in grads)


def test_rectgrad_and_nobias_on_a_linear_model():
    """No activation: RectGrad = x * w_t, NoBias = w_t; inputs at 0 get 0 only from RectGrad."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    x = torch.randn(2, 3, 4, 4)
    x[:, :, :2, :2] = 0  # the normalised mean colour: RectGrad's "brightness bias"
    w = model[1].weight[[2, 0]].view(2, 3, 4, 4)
    rect = build("rectgrad", model).attribute_channels(x, [2, 0])
    nobias = build("nobias_rectgrad", model).attribute_channels(x, [2, 0])
    torch.testing.assert_close(rect, x * w)
    torch.testing.assert_close(nobias, w)
    assert torch.equal(rect[:, :, :2, :2], torch.zeros(2, 3, 2, 2))
    assert (nobias[:, :, :2, :2] != 0).all()


def test_rectgrad_scaling_on_a_bias_free_relu_net():
    """Scores and thresholds scale with c > 0: RectGrad(cx) = c RectGrad(x), NoBias invariant."""
    model = bias_free_relu_net()
    torch.manual_seed(10)
    x = torch.randn(2, 3, 16, 16)
    rect, nobias = build("rectgrad", model, q=80), build("nobias_rectgrad", model, q=80)
    base_r, base_n = rect.attribute_channels(x, [0, 1]), nobias.attribute_channels(x, [0, 1])
    assert base_r.abs().max() > 0
    for c in (0.5, 3.0):
        torch.testing.assert_close(rect.attribute_channels(c * x, [0, 1]), c * base_r,
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(nobias.attribute_channels(c * x, [0, 1]), base_n,
                                   rtol=1e-5, atol=1e-7)


def test_padding_trick_zeroes_the_border_of_padded_conv_outputs():
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    torch.manual_seed(11)
    x = torch.randn(2, 3, 8, 8)
    for conv in (nn.Conv2d(3, 4, 3, padding=1),
                 Conv2dStaticSamePadding(3, 4, 3, stride=1, image_size=8)):
        model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
        ring = torch.ones(8, 8)
        ring[1:-1, 1:-1] = 0
        w = model[2].weight.view(3, 4, 8, 8)
        xr = x.clone().requires_grad_(True)
        score = (conv(xr) * w[[0, 2]] * (1 - ring)).sum()  # output gradient, border zeroed
        (want,) = torch.autograd.grad(score, xr)
        got = build("nobias_rectgrad", model).attribute_channels(x, [0, 2])
        torch.testing.assert_close(got, want)
        plain = build("nobias_rectgrad", model, padding_trick="none").attribute_channels(x, [0, 2])
        (want_plain,) = torch.autograd.grad((conv(xr) * w[[0, 2]]).sum(), xr)
        torch.testing.assert_close(plain, want_plain)
        assert not torch.allclose(plain, got)
    # scope: 1x1 SAME convs do not pad, so only "all" (the TF-slim behaviour) touches them
    one = Conv2dStaticSamePadding(4, 4, 1, image_size=8)
    model = nn.Sequential(Conv2dStaticSamePadding(3, 4, 3, image_size=8), one,
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    for scope, touched in (("padded", {"0": 1}), ("all", {"0": 1, "1": 1}), ("none", {})):
        method = build("rectgrad", model, padding_trick=scope)
        method(x, [0, 1])
        assert dict(method.last_trace.touched) == touched


def test_rectgrad_rejects_bad_parameters(tiny_model):
    with pytest.raises(MethodError, match="q"):
        build("rectgrad", tiny_model, q=101)
    with pytest.raises(MethodError, match="padding_trick"):
        build("nobias_rectgrad", tiny_model, padding_trick="same")
    with pytest.raises(MethodError, match="reduction"):
        build("rectgrad", tiny_model, reduction="l2")


# -- unsupported layers, the contract ----------------------------------------------------------
class FunctionalSiLU(nn.Module):
    """SiLU as a function call: no nn.SiLU module for the bind-time check to see, so the
    rules meet it inside the forward (an nn.SiLU is refused when the method is built)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


@pytest.mark.parametrize("name", METHODS)
def test_unsupported_activations_raise_naming_the_layer_and_restore_the_model(name, resnet18):
    model = mixed_state(resnet18)
    model.layer3[0].relu = FunctionalSiLU()
    x = torch.randn(2, 3, 32, 32)
    before = snapshot(model, x)
    with pytest.raises(MethodError, match=r"silu.*'layer3\.0\.relu'"):
        build(name, model)(x, [0, 1])
    assert_restored(model, before, x)
    hard = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardtanh(), nn.Flatten(), nn.LazyLinear(2))
    hard(x)
    with pytest.raises(MethodError, match=r"hardtanh.*'1'"):
        build(name, hard.eval())(x, [0, 1])


@pytest.mark.parametrize("name", METHODS)
def test_model_restored_when_the_method_raises_after_the_forward(name, tiny_model):
    model = mixed_state(tiny_model)
    x = torch.randn(2, 3, 16, 16)
    before = snapshot(model, x)
    with pytest.raises((RuntimeError, IndexError)):
        build(name, model)(x, [0, 99])  # class 99 does not exist
    assert_restored(model, before, x)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("arch,px", [("tiny_model", 32), ("resnet18", 96)])
def test_batch_equals_one_by_one_and_model_is_restored(name, arch, px, request):
    model = mixed_state(request.getfixturevalue(arch))
    torch.manual_seed(5)
    x = torch.randn(3, 3, px, px)
    before = snapshot(model, x)
    targets = torch.tensor([0, 3, 1])
    method = build(name, model)
    maps = method(x, targets)
    assert maps.shape == (3, px, px) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps.flatten(1).abs().amax(1) > 0).all()
    singles = torch.cat([method(x[i:i + 1], targets[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(maps, singles, rtol=1e-4, atol=1e-5 * float(maps.abs().max()))
    other = method(x[:1], [2])
    assert (other - maps[:1]).abs().max() > 1e-3 * maps[:1].abs().max()  # the target matters
    assert not x.requires_grad and x.grad is None
    assert_restored(model, before, x)


@pytest.fixture(scope="module")
def lite0_targets(lite0, photo_batch) -> torch.Tensor:
    with torch.no_grad():
        return lite0.model(photo_batch).argmax(1)


def relu6_calls(model: nn.Module, method, x, targets) -> list[dict[str, torch.Tensor]]:
    """Per ReLU6 call: its input ``z``, the gradient arriving at its output ``g_out`` and the
    one the rule sends to its input ``g_in`` (all under the method's rules)."""
    calls: list[dict[str, torch.Tensor]] = []

    def hook(_m, args, out):
        call = {"z": args[0].detach().clone()}
        calls.append(call)
        out.register_hook(lambda g: call.__setitem__("g_out", g.detach().clone()))
        args[0].register_hook(lambda g: call.__setitem__("g_in", g.detach().clone()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU6)]
    try:
        method(x, targets)
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize("name", METHODS)
def test_pretrained_lite0_relu6_rules(name, lite0, photo_batch, lite0_targets):
    """EfficientNet-Lite0 on photos: every ReLU6 call (33) gets the rule, the padding trick
    reaches the stem and the 16 depthwise convs, and saturated units (z > 6, which occur)
    behave as documented: Guided Backprop passes exactly ``relu(g) * 1[0 < z < 6]`` (nothing
    through saturation), RectGrad lets a top-percentile signal through saturated units too
    (``and_relu_mask=False``, the reference) and passes at most the top 2 % per sample."""
    x, targets = photo_batch[:2], lite0_targets[:2]
    method = build(name, lite0.model)
    calls = relu6_calls(lite0.model, method, x, targets)
    touched = method.last_trace.touched
    assert touched["_swish"] == 2  # the model-level ReLU6: stem and head
    assert sum(v for k, v in touched.items() if k.endswith("_swish")) == len(calls) == 33
    if name != "guided_backprop":  # padding trick: the stem and the 16 depthwise 3x3/5x5 convs
        assert sum(v for k, v in touched.items() if not k.endswith("_swish")) == 17
    saturated = [(c["z"] > 6) & (c["g_out"] != 0) for c in calls]
    assert sum(int(s.sum()) for s in saturated) > 100
    if name == "guided_backprop":
        for c in calls:
            live = (c["z"] > 0) & (c["z"] < 6)
            assert torch.equal(c["g_in"], torch.where(live, c["g_out"].clamp(min=0), 0.0))
        return
    passed_saturated = 0
    for c, sat in zip(calls, saturated, strict=True):
        n = c["z"][0].numel()
        k = math.floor(0.98 * (n - 1) + 0.5) + 1
        assert ((c["g_in"] != 0).flatten(1).sum(1) <= n - k).all()
        kept = c["g_in"] != 0
        assert torch.equal(c["g_in"][kept], c["g_out"][kept])  # passed as is, never scaled
        passed_saturated += int((kept & sat).sum())
    assert passed_saturated > 0


def test_rectgrad_percentile_defaults_and_range():
    """q = 98 by default (the authors'); any percentile in [0, 100] is accepted, ends included."""
    model = bias_free_relu_net()
    assert build("rectgrad", model).q == 98.0
    for q in (0.0, 100.0):
        assert build("rectgrad", model, q=q).q == q
    for q in (-0.5, 100.5):
        with pytest.raises(MethodError, match="q must be a percentile in"):
            build("rectgrad", model, q=q)


@pytest.mark.parametrize("name", ["rectgrad", "nobias_rectgrad"])
def test_rectgrad_thresholds_are_per_sample_without_tau(name):
    """Without a fixed tau each sample's threshold is its own percentile: an image's map does
    not change when a much brighter image shares its batch."""
    torch.manual_seed(0)
    model = not_inplace(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval())
    x = torch.randn(2, 3, 8, 8)
    x[1] *= 50.0
    targets = torch.tensor([0, 1])
    alone = build(name, model)(x[:1], targets[:1])
    together = build(name, model)(x, targets)[:1]
    assert torch.allclose(alone, together, rtol=1e-5, atol=1e-7)
    # a shared threshold (a fixed tau) is what couples samples; the check above would see it
    shared = build(name, model, tau=float(x[1].abs().max()))(x, targets)[:1]
    assert not torch.allclose(alone, shared, rtol=1e-5, atol=1e-7)


def test_rectgrad_refuses_an_activation_that_does_not_lead_with_the_batch():
    """Per-sample percentiles need the batch on dim 0; a fixed tau needs no statistics."""

    class Folded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x)
            h = F.relu(h.reshape(-1, *h.shape[2:])).reshape(h.shape)  # [B*C, H, W] at the ReLU
            return self.fc(h.mean(dim=(2, 3)))

    model, x = Folded().eval(), torch.randn(2, 3, 6, 6)
    with pytest.raises(MethodError, match="does not lead with the batch"):
        build("rectgrad", model)(x, [0, 1])
    assert build("rectgrad", model, tau=0.0)(x, [0, 1]).shape == (2, 6, 6)
