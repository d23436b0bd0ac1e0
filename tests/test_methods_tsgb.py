"""TSGB: the properties of tsgb.md section 5 and the method contract.

Zero-sum at the classifier and layer-wise relevance conservation, the TSGB-FC closed form,
the conv rule against independent formulations of the reference's "full" and "slim" code,
channel-agnostic input gradients, BN transparency via BN folding, the avg-pool rule,
refusals naming the layer, batch equals one-by-one and the model left exactly as found.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from method_checks import assert_restored, mixed_state, snapshot
from salmap.workers.methods import MethodError, build
from salmap.workers.methods.tsgb import TSGBConv
from torch import nn


# -- helpers -----------------------------------------------------------------------------------
def fold_bn(model: nn.Module) -> nn.Module:
    """A copy with every BatchNorm folded into the conv before it (``convK``/``bnK`` or
    ``seq[i-1]``/``seq[i]``) and replaced by ``nn.Identity``."""
    model = copy.deepcopy(model)
    for name, bn in list(model.named_modules()):
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if attr.isdigit():
            conv = parent[int(attr) - 1]
        else:
            conv = getattr(parent, "conv" + attr.removeprefix("bn"))
        assert isinstance(conv, nn.Conv2d), name
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
        with torch.no_grad():
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
        if attr.isdigit():
            parent[int(attr)] = nn.Identity()
        else:
            setattr(parent, attr, nn.Identity())
    return model


def relevance_at(model, names, method, x, targets) -> dict[str, torch.Tensor]:
    """Per-sample sum of gradient x activation at the outputs of ``names`` and at the input
    of ``fc`` (key ``"fc_in"``, with ``"fc_h"`` the features), captured during the method."""
    store, handles = {}, []

    def at_output(name):
        def hook(_m, _args, out):
            a = out.detach().clone()
            out.register_hook(lambda g: store.__setitem__(name, (g * a).flatten(1).sum(1)))
        return hook

    def at_fc(_m, args):
        h = args[0].detach().clone()
        store["fc_h"] = h
        args[0].register_hook(lambda g: store.__setitem__("fc_in", (g * h).sum(1)))

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(at_output(n)) for n in names]
    handles.append(model.fc.register_forward_pre_hook(at_fc))
    try:
        store["map"] = method(x, targets).flatten(1).sum(1)
    finally:
        for h in handles:
            h.remove()
    return store


# -- TSGB-FC -----------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.0])
def test_fc_rule_closed_form_and_zero_sum(gamma):
    """s = W h (h >= 0): M = h (W+_t + gamma beta_t W-_t), sum M = (1 - gamma) h.W+_t."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    h = torch.rand(3, 3, 4, 4)
    targets = torch.tensor([4, 0, 2])
    got = build("tsgb", model, gamma=gamma).attribute_channels(h, targets)
    w = model[1].weight.detach()[targets]
    w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)
    hf = h.flatten(1)
    beta = (hf * w_pos).sum(1, keepdim=True) / (hf * w_neg).sum(1, keepdim=True).abs()
    want = hf * (w_pos + gamma * beta * w_neg)
    torch.testing.assert_close(got.flatten(1), want)
    total = (hf * w_pos).sum(1)
    torch.testing.assert_close(got.flatten(1).sum(1), (1 - gamma) * total,
                               rtol=1e-5, atol=1e-5 * float(total.max()))


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_relevance_is_conserved_layer_by_layer(gamma, resnet18):
    """ResNet (one linear layer): sum(g * a) is (1 - gamma) P_t at every block boundary."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    targets = torch.tensor([3, 8])
    names = ["relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    rel = relevance_at(resnet18, names, build("tsgb", resnet18, gamma=gamma), x, targets)
    w = resnet18.fc.weight.detach()[targets]
    p_t = (rel["fc_h"] * w.clamp(min=0)).sum(1)
    want = (1 - gamma) * p_t
    for key in ["fc_in", *names, "map"]:
        torch.testing.assert_close(rel[key], want, rtol=1e-4, atol=2e-5 * float(p_t.max()),
                                   msg=key)


class ReLU6Net(nn.Module):
    """EfficientNet-Lite's pattern at toy size: bias-free convs + BN + ReLU6, a depthwise conv,
    a linear-bottleneck residual block, GAP and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(10)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16),
                                    nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
                                nn.BatchNorm2d(16), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU6())
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.project(self.dw(self.expand(h)))
        return self.fc(F.adaptive_avg_pool2d(self.head(h), 1).flatten(1))


def relevance_dropped(model: nn.Module, method, x, targets) -> tuple[torch.Tensor, dict]:
    """The method's maps and, per sample, the relevance ``g * out`` (gradient under the rules
    times the layer output) that the two leaks of tsgb.py's docstring drop: at ReLU6 units
    saturated at 6 (key ``"relu6"``) and at BatchNorm units whose input is exactly 0
    (``"bn"``)."""
    store: dict[str, list] = {"relu6": [], "bn": []}

    def capture(key: str, where):
        def hook(_m, args, out):
            mask, o = where(args[0]).detach(), out.detach().clone()
            out.register_hook(lambda g: store[key].append((g * o * mask).flatten(1).sum(1)))
        return hook

    handles = []
    for m in model.modules():
        if isinstance(m, nn.ReLU6):
            handles.append(m.register_forward_hook(capture("relu6", lambda a: a > 6)))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_hook(capture("bn", lambda a: a == 0)))
    try:
        maps = method(x, targets)
    finally:
        for h in handles:
            h.remove()
    zero = torch.zeros(x.shape[0])
    return maps, {k: torch.stack(v).sum(0) if v else zero for k, v in store.items()}


def test_relu6_net_loses_exactly_the_saturated_and_zero_input_bn_relevance():
    """On a ReLU6 net the map sums to minus the relevance dropped at saturated ReLU6 units and
    at BN units with an all-zero input (tsgb.py), not to 0; both leaks really occur here."""
    model = randomize_bn(ReLU6Net()).eval()
    with torch.no_grad():
        model.expand[1].bias.fill_(-2.0)  # sparse expansion: some all-zero depthwise windows
    torch.manual_seed(11)
    x = 4 * torch.randn(3, 3, 16, 16)
    maps, dropped = relevance_dropped(model, build("tsgb", model), x, [0, 2, 4])
    total, mass = maps.flatten(1).sum(1), maps.flatten(1).abs().sum(1)
    torch.testing.assert_close(total, -(dropped["relu6"] + dropped["bn"]), rtol=0,
                               atol=1e-4 * float(mass.max()))
    assert dropped["relu6"].abs().sum() > 0.01 * mass.sum()  # saturation happens
    assert dropped["bn"].abs().sum() > 0.01 * mass.sum()  # all-zero depthwise windows happen
    assert (total.abs() > 0.01 * mass).all()  # so the map is not zero-sum


def test_zero_sum_map_with_gamma_one(resnet18, tiny_model):
    torch.manual_seed(2)
    for model, px in ((resnet18, 48), (tiny_model, 32)):
        x = torch.randn(2, 3, px, px)
        maps = build("tsgb", model)(x, [1, 4])
        assert (maps.flatten(1).sum(1).abs() < 1e-4 * maps.flatten(1).abs().sum(1)).all()
        assert (maps > 0).any() and (maps < 0).any()


# -- TSGB-Conv ---------------------------------------------------------------------------------
def full_rule(a, w, b, g, stride, padding, dilation, groups, eps=1e-10):
    """The reference's commented-out "full" conv rule: all-ones kernels of the weight's shape."""
    ones = torch.ones_like(w)
    z = F.conv2d(a, w, b, stride, padding, dilation, groups)
    m = F.conv2d(a.abs(), ones, None, stride, padding, dilation, groups)
    v = torch.nn.grad.conv2d_input(a.shape, ones, g * z / (m + eps), stride, padding, dilation,
                                   groups)
    return v * a.sign()


def slim_rule(a, w, b, g, stride, padding, dilation, groups, eps=1e-10):
    """The reference's shipped "slim" rule: channel sums, groups ignored."""
    ones = torch.ones(1, a.shape[1], *w.shape[-2:])
    z = F.conv2d(a, w, b, stride, padding, dilation, groups)
    m = F.conv2d(a.abs(), ones, None, stride, padding, dilation)
    r = (g * z).sum(1, keepdim=True)
    return torch.nn.grad.conv2d_input(a.shape, ones, r / (m + eps), stride, padding,
                                      dilation) * a.sign()


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (2, 0, 2)])
def test_conv_rule_matches_the_reference_formulations(groups, stride, padding, dilation):
    torch.manual_seed(3)
    a = torch.randn(2, 6, 9, 9).relu()
    w, b = torch.randn(12, 6 // groups, 3, 3), torch.randn(12)
    conf = ((stride,) * 2, (padding,) * 2, (dilation,) * 2, groups)
    g = torch.randn_like(F.conv2d(a, w, b, *conf))

    def ours(rule_groups, a=a):
        leaf = a.clone().requires_grad_(True)
        out = TSGBConv.apply(leaf, w, b, *conf, rule_groups, 1e-10)
        return torch.autograd.grad(out, leaf, g)[0]

    torch.testing.assert_close(ours(groups), full_rule(a, w, b, g, stride, padding, dilation,
                                                       groups))
    torch.testing.assert_close(ours(1), slim_rule(a, w, b, g, stride, padding, dilation, groups))
    # relevance is conserved in total, and per group with the group rule (signed input with
    # no all-zero receptive field, whose relevance the rule drops by design)
    a = torch.randn_like(a)
    r_out = (g * F.conv2d(a, w, b, *conf)).unflatten(1, (groups, -1)).sum((2, 3, 4))
    r_in = (ours(groups, a) * a).unflatten(1, (groups, -1)).sum((2, 3, 4))
    torch.testing.assert_close(r_in, r_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((ours(1, a) * a).sum((1, 2, 3)), r_out.sum(1), rtol=1e-4,
                               atol=1e-4)
    if groups > 1:
        assert not torch.allclose(ours(1, a), ours(groups, a))


def test_conv_backward_ignores_the_weights():
    """tsgb.md 5.3: the rule sees only r = sum_k g_k z_k and |a|, never the weights.

    Two convs with different weights (and output channels) whose output gradients give the
    same r(p) send the same gradient to the input; the plain conv gradients differ.
    """
    torch.manual_seed(9)
    a = torch.randn(2, 4, 7, 7)
    conf = ((1, 1), (1, 1), (1, 1), 1)
    w1, b1 = torch.randn(6, 4, 3, 3), torch.randn(6)
    w2, b2 = torch.randn(5, 4, 3, 3), torch.randn(5)
    z1, z2 = F.conv2d(a, w1, b1, *conf), F.conv2d(a, w2, b2, *conf)
    g1 = torch.randn_like(z1)
    r = (g1 * z1).sum(1, keepdim=True)
    g2 = r / (5 * z2)  # sum_k g2_k z2_k = r at every position

    def rule(w, b, g):
        leaf = a.clone().requires_grad_(True)
        return torch.autograd.grad(TSGBConv.apply(leaf, w, b, *conf, 1, 1e-10), leaf, g)[0]

    def plain(w, b, g):
        leaf = a.clone().requires_grad_(True)
        return torch.autograd.grad(F.conv2d(leaf, w, b, *conf), leaf, g)[0]

    torch.testing.assert_close(rule(w2, b2, g2), rule(w1, b1, g1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain(w2, b2, g2), plain(w1, b1, g1), atol=1e-2)


def test_bn_passes_relevance_element_wise(tiny_model):
    """tsgb.md 5.9: R = g * tensor just below a BN equals R just above it, element-wise."""
    store = {}

    def hook(_m, args, out):
        a, o = args[0].detach().clone(), out.detach().clone()
        args[0].register_hook(lambda g: store.__setitem__("below", g * a))
        out.register_hook(lambda g: store.__setitem__("above", g * o))

    handle = tiny_model.bn1.register_forward_hook(hook)
    try:
        build("tsgb", tiny_model, gamma=0.5)(torch.randn(2, 3, 16, 16), [0, 3])
    finally:
        handle.remove()
    assert store["above"].abs().max() > 0
    torch.testing.assert_close(store["below"], store["above"], rtol=1e-5, atol=1e-7)


def test_slim_and_group_rules_on_models(resnet18, mobilenet_v2):
    x = torch.randn(2, 3, 32, 32)
    same = [build("tsgb", resnet18, grouped_rule=r)(x, [0, 1]) for r in ("group", "slim")]
    torch.testing.assert_close(same[0], same[1])  # no grouped conv in a ResNet-18
    torch.manual_seed(8)
    depthwise = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()
    diff = [build("tsgb", depthwise, grouped_rule=r)(x, [0, 1]) for r in ("group", "slim")]
    assert (diff[0] - diff[1]).abs().max() > 1e-3 * diff[0].abs().max()
    # MobileNetV2: the rule reaches every conv and BN (depthwise ones included) and the head
    method = build("tsgb", mobilenet_v2)
    method(x, [0, 1])
    touched = method.last_trace.touched
    assert sum(touched.values()) == 52 + 52 + 1 and touched["classifier.1"] == 1
    with pytest.raises(MethodError, match="grouped_rule"):
        build("tsgb", resnet18, grouped_rule="full")


def test_input_gradient_is_the_same_for_every_channel(resnet18):
    """TSGB-Conv sends |g_in,c(q)| = v(q) to every channel with a_c(q) != 0 (conv weights unused)."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 32)
    grad = build("tsgb", resnet18).attribute_channels(x, [2, 7]) / x
    spread = grad.abs().amax(1) - grad.abs().amin(1)
    assert grad.abs().max() > 0
    assert (spread <= 1e-4 * grad.abs().amax(1)).all()


def test_bn_folding_leaves_the_map_unchanged(resnet18, tiny_model):
    torch.manual_seed(5)
    for model, px in ((resnet18, 48), (tiny_model, 32)):
        folded = fold_bn(model)
        x = torch.randn(2, 3, px, px)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        want = build("tsgb", model, gamma=0.5)(x, [1, 3])
        got = build("tsgb", folded, gamma=0.5)(x, [1, 3])
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_avg_pool_spreads_window_relevance_uniformly():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    store = {}

    def pool_hook(_m, args, out):
        a, o = args[0].detach().clone(), out.detach().clone()
        args[0].register_hook(lambda g: store.__setitem__("in", g * a))
        out.register_hook(lambda g: store.__setitem__("out", g * o))

    handle = model[2].register_forward_hook(pool_hook)
    try:
        build("tsgb", model, gamma=0.5)(torch.randn(2, 3, 8, 8), [0, 2])
    finally:
        handle.remove()
    r_in, r_out = store["in"], store["out"]
    live = F.max_pool2d((r_in != 0).float(), 2) == 1  # windows with a non-zero input
    even = F.avg_pool2d((r_in != 0).float(), 2) == 1  # windows with every input non-zero
    assert even.any()
    per_unit = torch.repeat_interleave(torch.repeat_interleave(r_out / 4, 2, 2), 2, 3)
    mask = torch.repeat_interleave(torch.repeat_interleave(even, 2, 2), 2, 3)
    torch.testing.assert_close(r_in[mask], per_unit[mask], rtol=1e-4, atol=1e-7)
    assert live.any()


# -- refusals ----------------------------------------------------------------------------------
def test_refusals_name_the_layer():
    x = torch.randn(2, 3, 8, 8)
    gn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(),
                       nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    with pytest.raises(MethodError, match=r"group_norm.*'1'"):
        build("tsgb", gn)(x, [0, 1])
    no_fc = nn.Sequential(nn.Conv2d(3, 2, 8), nn.Flatten()).eval()
    with pytest.raises(MethodError, match="nn.Linear"):
        build("tsgb", no_fc)(x, [0, 1])
    signed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    with pytest.raises(MethodError, match=r"non-negative.*'2'"):
        build("tsgb", signed)(x, [0, 1])

    class LateHead(nn.Module):  # the last-registered Linear is not the last one called
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 8)
            self.out = nn.Linear(4, 2)
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.out(self.proj(self.conv(x).relu().flatten(1)).relu())

    with pytest.raises(MethodError, match="'proj'"):
        build("tsgb", LateHead().eval())(x, [0, 1])


def test_vgg_fc_rule_only_on_the_last_linear(vgg16_small):
    method = build("tsgb", vgg16_small)
    x = torch.randn(1, 3, 32, 32)
    before = snapshot(vgg16_small, x)
    maps = method(x, [3])
    touched = method.last_trace.touched
    assert touched["classifier.6"] == 1 and "classifier.0" not in touched
    assert sum(v for k, v in touched.items() if k.startswith("features")) == 13  # every conv
    assert torch.isfinite(maps).all() and maps.abs().max() > 0
    assert_restored(vgg16_small, before, x)


# -- the contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["tiny_model", "resnet18"])
def test_batch_equals_one_by_one_and_model_is_restored(arch, request):
    model = mixed_state(request.getfixturevalue(arch))
    torch.manual_seed(7)
    x = torch.randn(3, 3, 32, 32)
    before = snapshot(model, x)
    targets = torch.tensor([0, 3, 1])
    method = build("tsgb", model)
    maps = method(x, targets)
    assert maps.shape == (3, 32, 32) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps.flatten(1).abs().amax(1) > 0).all()
    singles = torch.cat([method(x[i:i + 1], targets[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(maps, singles, rtol=1e-4, atol=1e-5 * float(maps.abs().max()))
    other = method(x[:1], [2])
    assert (other - maps[:1]).abs().max() > 1e-3 * maps[:1].abs().max()  # the target matters
    assert_restored(model, before, x)


class FunctionalGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


def test_model_restored_when_tsgb_raises(tiny_model, resnet18):
    x = torch.randn(2, 3, 16, 16)
    model = mixed_state(tiny_model)
    before = snapshot(model, x)
    with pytest.raises((RuntimeError, IndexError)):
        build("tsgb", model)(x, [0, 99])  # after the forward: class 99 does not exist
    assert_restored(model, before, x)
    model = mixed_state(resnet18)
    model.layer2[1].relu = FunctionalGELU()  # an nn.GELU is refused before, when binding
    before = snapshot(model, x)
    with pytest.raises(MethodError, match=r"gelu.*'layer2\.1\.relu'"):  # inside the forward
        build("tsgb", model)(x, [0, 1])
    assert_restored(model, before, x)


def test_pretrained_lite0_relevance_balance(lite0, photo_batch):
    """EfficientNet-Lite0 (ReLU6, depthwise convs): every conv, BN and the head get the rules,
    and the map's sum is exactly minus the relevance its saturated ReLU6 units and zero-input BN
    units drop, a real share of the map's mass on real photos (the Lite0 map is not
    zero-sum; figures: BENCHMARKS.md, method quality)."""
    model, x = lite0.model, photo_batch[:2]
    with torch.no_grad():
        targets = model(x).argmax(1)
    method = build("tsgb", model)
    maps, dropped = relevance_dropped(model, method, x, targets)
    total, mass = maps.flatten(1).sum(1), maps.flatten(1).abs().sum(1)
    torch.testing.assert_close(total, -(dropped["relu6"] + dropped["bn"]), rtol=0,
                               atol=1e-4 * float(mass.max()))
    assert (dropped["relu6"].abs() > 0.1 * mass).all() and (dropped["bn"].abs() > 0.1 * mass).all()
    touched = method.last_trace.touched
    convs = sum(1 for m in lite0.model.modules() if isinstance(m, nn.Conv2d))
    bns = sum(1 for m in lite0.model.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(touched.values()) == convs + bns + 1 and touched["_fc"] == 1


def test_stabilize_moves_every_value_away_from_zero_and_zero_up():
    from salmap.workers.methods.tsgb import stabilize

    a = torch.tensor([-2e-3, -1e-4, 0.0, 1e-4, 0.5], dtype=torch.float64)
    expected = torch.tensor([-3e-3, -1.1e-3, 1e-3, 1.1e-3, 0.501], dtype=torch.float64)
    torch.testing.assert_close(stabilize(a, 1e-3), expected)


def test_group_rule_keeps_each_groups_relevance_inside_it():
    """A depthwise conv whose channel-1 filter is zero: channel 1 is no evidence, so under the
    'group' rule it gets no relevance (the map ignores what it holds); the 'slim' rule spreads
    every group's relevance over all channels, channel 1 included."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].weight[1].zero_()
        model[4].weight.copy_(torch.tensor([[1.0, 0.5, 2.0], [-1.0, 0.3, -0.5]]))
    x = torch.rand(1, 3, 6, 6)
    x_without_1 = x.clone()
    x_without_1[:, 1] = 0.0
    group = build("tsgb", model, grouped_rule="group")
    torch.testing.assert_close(group(x, [0]), group(x_without_1, [0]))
    slim = build("tsgb", model, grouped_rule="slim")
    assert (slim(x, [0]) - slim(x_without_1, [0])).abs().max() > 1e-3 * slim(x, [0]).abs().max()


def test_functional_avg_pool_uses_torchs_defaults():
    """``F.avg_pool2d(x, 2)`` in a forward (no stride, padding or ceil_mode given): the rule
    pools as torch does, so the map equals that of the ``nn.AvgPool2d(2)`` model."""

    class Functional(nn.Module):
        def __init__(self, conv: nn.Conv2d, fc: nn.Linear) -> None:
            super().__init__()
            self.conv, self.fc = conv, fc

        def forward(self, x):
            return self.fc(F.avg_pool2d(self.conv(x).relu(), 2).flatten(1))

    torch.manual_seed(4)
    conv, fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 3 * 3, 2)
    modular = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), fc).eval()
    x = torch.randn(2, 3, 7, 7)  # odd: ceil_mode or padding would change the pooled size
    expected = build("tsgb", modular)(x, [0, 1])
    torch.testing.assert_close(build("tsgb", Functional(conv, fc).eval())(x, [0, 1]), expected)


def test_batchnorm_without_running_statistics_and_a_zero_epsilon_are_refused(tiny_model):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(MethodError, match="BatchNorm without running statistics"):
        build("tsgb", model)(torch.randn(2, 3, 8, 8), [0, 1])
    with pytest.raises(MethodError, match="epsilon must be > 0"):
        build("tsgb", tiny_model, epsilon=0.0)


def test_functional_batch_norm_uses_torchs_defaults():
    """``F.batch_norm(x, mean, var)`` in a forward (training, momentum and eps not given): the
    rule normalises as torch does (eval statistics, eps 1e-5), so the map equals that of the
    ``nn.BatchNorm2d`` model with the same statistics."""

    class Functional(nn.Module):
        def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, fc: nn.Linear) -> None:
            super().__init__()
            self.conv, self.fc = conv, fc
            self.register_buffer("mean", bn.running_mean.clone())
            self.register_buffer("var", bn.running_var.clone())

        def forward(self, x):
            h = F.batch_norm(self.conv(x), self.mean, self.var).relu()
            return self.fc(h.mean(dim=(2, 3)))

    torch.manual_seed(5)
    conv, bn, fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.Linear(4, 2)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.01, 0.05)  # small: eps 1e-5 vs 1 would change everything
    modular = nn.Sequential(conv, bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = build("tsgb", modular)(x, [0, 1])
    torch.testing.assert_close(build("tsgb", Functional(conv, bn, fc).eval())(x, [0, 1]), expected)
