"""DMBP: the masked-backprop framework properties of specs/methods/dmbp.md §5 (hold for any loss),
the decomposition of the output (identity, signs, bias term), the earlier region fit kept as
DMBPFit, batch independence, determinism, model hygiene."""

from __future__ import annotations

import pytest
import torch
from conftest import bias_free_relu_net
from method_checks import assert_restored, mixed_state, snapshot
from salmap.workers.methods import MethodError, build
from salmap.workers.methods.dmbp import DMBP, DMBPFit, display_map
from torch import nn
from torch.nn import functional as F


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    score = model(x).gather(1, targets.view(-1, 1)).sum()
    return torch.autograd.grad(score, x)[0]


def random_masks(d: DMBP, b: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(b, c, generator=g) for n, c in d.mask_shapes.items()}


@pytest.mark.parametrize("arch", ["tiny_model", "resnet18", "mobilenet_v2", "vgg16_small"])
def test_all_ones_masks_give_the_gradient(arch, request):
    """§5.1: masks of 1 (or no mask) reproduce dS_t/dx; VGG has in-place ReLUs right after convs."""
    model = request.getfixturevalue(arch)
    x, t = images(2), torch.tensor([1, 3])
    d = DMBP(model)
    ones = {n: torch.ones(2, c) for n, c in d.mask_shapes.items()}
    w_none, w_ones = d.mappings(x, t, [None, ones])
    expected = gradient(model, x, t)
    assert expected.abs().max() > 0
    torch.testing.assert_close(w_none, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w_ones, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch,stem,branch", [
    ("resnet18", "conv1", "layer1.0.conv1"),
    ("tiny_model", "stem.0", "conv1"),
])
def test_zero_mask_on_a_cut_layer_gives_zero(arch, stem, branch, request):
    """§5.2: zeroing every filter of a layer all paths cross kills the mapping; a conv inside a
    residual branch does not (the skip path carries no mask), so masks act per layer."""
    model = request.getfixturevalue(arch)
    d = DMBP(model)
    x, t = images(2), torch.tensor([0, 2])
    base = random_masks(d, 2, seed=1)
    cut = {**base, stem: torch.zeros_like(base[stem])}
    skip = {**base, branch: torch.zeros_like(base[branch])}
    w_base, w_cut, w_skip = d.mappings(x, t, [base, cut, skip])
    assert w_base.abs().max() > 0
    assert torch.count_nonzero(w_cut) == 0
    assert w_skip.abs().max() > 0.01 * w_base.abs().max()
    assert not torch.allclose(w_skip, w_base)


@pytest.mark.parametrize("arch,layer", [("resnet18", "conv1"), ("mobilenet_v2", "features.0.0")])
def test_mapping_is_linear_in_one_layers_masks(arch, layer, request):
    """§5.3: W_m is linear in a layer's mask vector: W(c*a) = c*W(a), W(a+b) = W(a)+W(b)."""
    model = request.getfixturevalue(arch)
    d = DMBP(model)
    x, t = images(2, seed=2), torch.tensor([4, 7])
    m = random_masks(d, 2, seed=3)
    a, b = m[layer], random_masks(d, 2, seed=4)[layer]
    w_a, w_b, w_scaled, w_sum = d.mappings(
        x, t, [m, {**m, layer: b}, {**m, layer: 0.37 * a}, {**m, layer: a + b}]
    )
    scale = w_a.abs().max()
    torch.testing.assert_close(w_scaled, 0.37 * w_a, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(w_sum, w_a + w_b, rtol=0, atol=1e-5 * scale)


def masked_surrogate(net: nn.Module, x: torch.Tensor, masks: dict[str, torch.Tensor]):
    """TinyNet as a gated-linear network: ReLU gates from the plain forward, each conv's output
    multiplied per channel by its mask in the FORWARD pass (test-side, written independently)."""

    def m(name: str, y: torch.Tensor) -> torch.Tensor:
        return y * masks[name][:, :, None, None]

    z0 = net.stem[1](net.stem[0](x))
    h0 = F.relu(z0)
    z1 = net.bn1(net.conv1(h0))
    z2 = net.conv2(h0 + F.relu(z1))
    z4 = net.layer4[0](F.relu(z2))
    u0 = net.stem[1](m("stem.0", net.stem[0](x))) * (z0 > 0)
    u1 = net.bn1(m("conv1", net.conv1(u0))) * (z1 > 0)
    u2 = m("conv2", net.conv2(u0 + u1)) * (z2 > 0)
    u4 = m("layer4.0", net.layer4[0](u2)) * (z4 > 0)
    return net.fc(net.pool(u4).flatten(1))


def test_bias_free_surrogate_matches_the_attribution_sum(tiny_model):
    """§5.4: without biases, sum(x * W_m) equals the gated-linear masked surrogate's output."""
    net = tiny_model
    with torch.no_grad():
        for mod in net.modules():
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.zero_()
    d = DMBP(net)
    x, t = images(3, seed=5), torch.tensor([0, 4, 2])
    masks = random_masks(d, 3, seed=6)
    (w,) = d.mappings(x, t, [masks])
    with torch.no_grad():
        g = masked_surrogate(net, x, masks).gather(1, t.view(-1, 1))[:, 0]
        plain = net(x).gather(1, t.view(-1, 1))[:, 0]
    attribution_sum = (x * w).flatten(1).sum(1)
    torch.testing.assert_close(attribution_sum, g, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(g, plain, rtol=1e-2)  # the masks really changed the mapping


def test_outputs_shapes_and_display(tiny_model):
    """§5.5: input-shaped attributions; the returned maps are channel means; display in [-1, 1]."""
    x, t = images(2, seed=7), torch.tensor([1, 2])
    res = DMBP(tiny_model, steps=2).explain(x, t)
    for a in (res.pos_attribution, res.neg_attribution, res.pos_mapping, res.neg_mapping):
        assert a.shape == x.shape and torch.isfinite(a).all()
    torch.testing.assert_close(res.pos_attribution, x * res.pos_mapping)
    net = build("dmbp", tiny_model, steps=2)(x, t)
    pos = build("dmbp", tiny_model, steps=2, output="positive")(x, t)
    neg = build("dmbp", tiny_model, steps=2, output="negative")(x, t)
    assert net.shape == (2, 32, 32) and net.dtype == torch.float32
    torch.testing.assert_close(pos, res.pos_attribution.mean(1))
    torch.testing.assert_close(net, pos + neg)
    shown = display_map(res.pos_attribution, res.neg_attribution)
    assert shown.shape == (2, 32, 32)
    assert shown.min() >= -1 and shown.max() <= 1
    torch.testing.assert_close(shown.abs().flatten(1).amax(1), torch.ones(2))


def pooled(a: torch.Tensor, k: int) -> torch.Tensor:
    """Channel sum average-pooled over k x k regions (written here, not taken from dmbp.py)."""
    return F.avg_pool2d(a.sum(1, keepdim=True), k, ceil_mode=True)


def positive_share(a: torch.Tensor) -> torch.Tensor:
    """Per sample: the share of the L1 mass that is positive."""
    return a.clamp(min=0).flatten(1).sum(1) / a.abs().flatten(1).sum(1)


def test_fit_loss_has_no_trivial_minimiser(tiny_model):
    """The [R2] loss: all-zero masks (A+ = A- = 0) cost exactly 1, halving the gradient
    (A+ = A- = A/2) exactly 0.5, the best uniform scalings (A+ = p/(p+n) A, A- = n/(p+n) A
    with p, n the squared pooled positive / negative evidence) 2pn/(p+n)^2 <= 0.5, an exact
    split of the regions' evidence 0."""
    d = DMBPFit(tiny_model, fit_pool=4, sparsity_weight=0.0)
    a = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ones = {n: torch.ones(2, c) for n, c in d.mask_shapes.items()}
    zero = torch.zeros_like(a)
    torch.testing.assert_close(d.loss(a, zero, zero, ones, ones), torch.ones(2))
    p = pooled(a, 4)
    pp, nn_ = p.clamp(min=0).square().flatten(1).sum(1), p.clamp(max=0).square().flatten(1).sum(1)
    torch.testing.assert_close(d.loss(a, a / 2, a / 2, ones, ones), torch.full((2,), 0.5))
    cp, cn = (pp / (pp + nn_)).view(2, 1, 1, 1), (nn_ / (pp + nn_)).view(2, 1, 1, 1)
    best = d.loss(a, cp * a, cn * a, ones, ones)
    torch.testing.assert_close(best, 2 * pp * nn_ / (pp + nn_).square())
    assert (best < 0.5).all()
    # a split whose regions carry exactly the positive / negative evidence: loss 0
    up = lambda t: t.repeat_interleave(4, 2).repeat_interleave(4, 3) / 3  # noqa: E731
    split = d.loss(a, up(p.clamp(min=0)).expand_as(a), up(p.clamp(max=0)).expand_as(a), ones, ones)
    torch.testing.assert_close(split, torch.zeros(2), rtol=0, atol=1e-6)
    # sparsity: mean(m+) + mean(m-), times its weight
    sparse = DMBPFit(tiny_model, fit_pool=4, sparsity_weight=0.3)
    torch.testing.assert_close(sparse.loss(a, zero, zero, ones, ones), torch.full((2,), 1.6))


def test_fit_separates_positive_and_negative_evidence_without_collapsing(tiny_model):
    """Optimising the [R2] loss: the regions of A+ become positive and those of A- negative,
    each keeping a real share of |gradient x input| (the [R1] loss drove both to ~0)."""
    x, t = images(2, seed=8), torch.tensor([0, 4])
    res = DMBPFit(tiny_model, fit_pool=4, steps=60).explain(x, t)
    a = res.gradient_x_input
    assert ((positive_share(pooled(a, 4)) - 0.5).abs() < 0.2).all()  # both signs present
    assert (positive_share(pooled(res.pos_attribution, 4)) > 0.9).all()
    assert (positive_share(pooled(res.neg_attribution, 4)) < 0.1).all()
    mass = a.abs().flatten(1).sum(1)
    assert (res.pos_attribution.abs().flatten(1).sum(1) > 0.2 * mass).all()
    assert (res.neg_attribution.abs().flatten(1).sum(1) > 0.2 * mass).all()
    torch.testing.assert_close(res.nuisance_attribution,
                               a - res.pos_attribution - res.neg_attribution)
    assert res.losses[-1] < 0.5 * res.losses[0]
    masks = torch.cat([*res.pos_masks.values(), *res.neg_masks.values()], 1)
    assert masks.min() >= 0 and masks.max() <= 1 and masks.mean() < 0.9


def test_completeness_objective_is_kept_with_a_warning(tiny_model):
    with pytest.warns(UserWarning, match="all-zero masks"):
        d = DMBPFit(tiny_model, objective="completeness", steps=2)
    assert d.sign_weight == 1.0 and DMBPFit(tiny_model).sign_weight == 0.0
    x, t = images(2, seed=8), torch.tensor([0, 3])
    assert not torch.allclose(d(x, t), DMBPFit(tiny_model, steps=2)(x, t))


def test_dmbp_is_the_decomposition_and_the_fit_has_its_own_name(tiny_model):
    """The registry's dmbp decomposes the output; the region fit is refused there (it re-splits
    gradient x input) and lives on as DMBPFit ("dmbp_fit")."""
    assert DMBP(tiny_model).objective == "decompose"
    assert DMBPFit(tiny_model).objective == "fit" and DMBPFit.name == "dmbp_fit"
    with pytest.raises(MethodError, match="DMBPFit"):
        build("dmbp", tiny_model, objective="fit")
    with pytest.raises(MethodError, match="objective"):
        DMBPFit(tiny_model, objective="decompose")


def sums(res) -> tuple[torch.Tensor, ...]:
    """Per image: <W+,x>, <W-,x>, <W,x>, S = sum |x * W|."""
    s = lambda t: t.flatten(1).sum(1)  # noqa: E731
    a = res.gradient_x_input
    return s(res.pos_attribution), s(res.neg_attribution), s(a), s(a.abs())


def test_decomposition_of_the_output_on_a_bias_free_relu_net():
    """F(x) = W(x) x holds exactly for a ReLU net without biases: at all-ones masks (no
    optimisation) the bias term is 0 and the logit is <W,x>; after optimisation the parts
    still add up to the logit exactly (by the nuisance's definition), the positive and
    negative mappings alone reproduce it (the nuisance carries < 3 % of S), <W+,x> >= 0 >=
    <W-,x>, and the two sets of masks have parted (the mappings differ)."""
    net = bias_free_relu_net()
    x, t = images(3, size=16, seed=0), torch.tensor([0, 1, 2])
    start = DMBP(net, steps=0).explain(x, t)
    p0, n0, lin0, s0 = sums(start)
    assert (start.bias_term.abs() <= 1e-5 * s0).all()
    torch.testing.assert_close(start.target_score, lin0, rtol=1e-5, atol=1e-6)
    res = DMBP(net, steps=80).explain(x, t)
    pos, neg, lin, s = sums(res)
    identity = pos + neg + res.nuisance_attribution.flatten(1).sum(1) + res.bias_term
    torch.testing.assert_close(identity, res.target_score, rtol=1e-5, atol=1e-6)
    assert (res.bias_term.abs() <= 1e-5 * s).all()
    assert ((pos + neg - res.target_score).abs() < 0.03 * s).all()
    assert (pos >= -0.05 * s).all() and (neg <= 0.05 * s).all()  # penalties, not hard bounds
    assert ((res.pos_mapping - res.neg_mapping).flatten(1).norm(dim=1)
            > 0.1 * res.pos_mapping.flatten(1).norm(dim=1)).all()
    assert res.losses[-1] < res.losses[0]


def test_the_bias_term_is_counted_on_its_own(tiny_model):
    """With biases and BatchNorm shifts the logit is <W,x> + beta(x): beta is reported (the
    test computes it with plain autograd), it is not 0, and the decomposition targets <W,x>."""
    x, t = images(2, seed=3), torch.tensor([1, 4])
    res = DMBP(tiny_model, steps=5).explain(x, t)
    g = gradient(tiny_model, x, t)
    with torch.no_grad():
        logit = tiny_model(x).gather(1, t.view(-1, 1))[:, 0]
    torch.testing.assert_close(res.target_score, logit)
    torch.testing.assert_close(res.bias_term, logit - (x * g).flatten(1).sum(1),
                               rtol=1e-4, atol=1e-5)
    assert (res.bias_term.abs() > 1e-3).all()


def test_the_loss_terms(tiny_model):
    """The decomposition loss on given attributions: an exact split of the output with the
    right signs costs only its evidence reward and sparsity; a wrong sign or a split that
    misses the output costs reconstruction_weight times the squared miss (in units of S)."""
    d = DMBP(tiny_model, sign_weight=0.0, sparsity_weight=0.0, evidence_weight=1.0,
             reconstruction_weight=10.0)
    a = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ones = {n: torch.ones(2, c) for n, c in d.mask_shapes.items()}
    s = a.abs().flatten(1).sum(1)
    pos, neg = a.clamp(min=0), a.clamp(max=0)  # pixel-exact split: evidence = S
    torch.testing.assert_close(d.loss(a, pos, neg, ones, ones), -torch.ones(2))
    zero = torch.zeros_like(a)
    lin = a.flatten(1).sum(1)
    torch.testing.assert_close(d.loss(a, zero, zero, ones, ones), 10 * (lin / s).square())
    # <W-,x> > 0 is penalised, like <W+,x> < 0
    wrong = d.loss(a, zero, a.abs(), ones, ones)  # <W-,x> = S: miss, sign 1, evidence -S
    torch.testing.assert_close(wrong, 10 * (((s - lin) / s).square() + 1) + 1)


def test_batch_equals_one_by_one_and_chunks(tiny_model):
    """Per-image masks and a summed loss: batch, one-by-one and chunked runs agree."""
    x, t = images(3, seed=9), torch.tensor([4, 0, 2])
    d = build("dmbp", tiny_model, steps=6, lr=0.1, init_noise=0.3)
    batch = d(x, t)
    single = torch.cat([d(x[i : i + 1], t[i : i + 1]) for i in range(3)])
    chunked = build("dmbp", tiny_model, steps=6, lr=0.1, init_noise=0.3, inner_batch_size=2)(x, t)
    scale = batch.abs().max()
    torch.testing.assert_close(single, batch, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(chunked, batch, rtol=0, atol=1e-4 * scale)
    other = d(x, torch.tensor([1, 0, 2]))  # the target matters
    assert not torch.allclose(other[0], batch[0])


def test_deterministic_for_a_seed(tiny_model):
    x, t = images(2, seed=10), torch.tensor([1, 1])
    run = lambda seed: build("dmbp", tiny_model, steps=3, init_noise=0.5, seed=seed)(x, t)  # noqa: E731
    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.allclose(first, run(1))
    # without init noise the start is all-equal masks and the seed has no effect
    plain = lambda seed: build("dmbp", tiny_model, steps=3, seed=seed)(x, t)  # noqa: E731
    assert torch.equal(plain(0), plain(1))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_model_left_as_found_also_after_an_error(arch, request):
    model = mixed_state(request.getfixturevalue(arch))
    x = images(2)
    before = snapshot(model, x)
    maps = build("dmbp", model, steps=2)(x, torch.tensor([1, 9]))
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all()
    assert_restored(model, before, x)
    with pytest.raises((IndexError, RuntimeError)):  # class 99: fails with the hooks in place
        build("dmbp", model, steps=2)(x, torch.tensor([1, 99]))
    assert_restored(model, before, x)


class FoldedBatch(nn.Module):
    """Runs its conv on the colour planes as separate samples: batch 3B inside the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.planes = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.planes(x.reshape(b * c, 1, h, w)).mean((2, 3))
        return self.fc(y.reshape(b, c * 4))


def test_clear_errors(tiny_model):
    with pytest.raises(MethodError, match="layer 'planes'.*per-filter masks need"):
        DMBP(FoldedBatch(), steps=1)(images(2), [0, 1])
    with pytest.raises(MethodError, match="'fc' is a Linear"):
        DMBP(tiny_model, masked_layers=["fc"])
    with pytest.raises(MethodError, match="no nn.Conv2d"):
        DMBP(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))
    with pytest.raises(MethodError, match="output"):
        DMBP(tiny_model, output="max")


def test_pretrained_lite0_all_ones_masks_give_the_gradient(lite0, photo_batch):
    """EfficientNet-Lite0 (one shared ReLU6 module, SAME-padding convs, depthwise convs): the
    masked backward reproduces autograd's gradient (the maps' faithfulness on photos:
    test_methods_faithfulness.py)."""
    model, x = lite0.model, photo_batch[:2]
    d = DMBP(model)
    ones = {n: torch.ones(2, c) for n, c in d.mask_shapes.items()}
    w_none, w_ones = d.mappings(x, [281, 967], [None, ones])
    want = gradient(model, x, torch.tensor([281, 967]))
    torch.testing.assert_close(w_none, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_ones, want, rtol=1e-4, atol=1e-6)
