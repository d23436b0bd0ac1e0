"""The method contract, for all fourteen registered methods on two architectures.

For every method, on TinyNet (residual add, in-place ReLUs, BN) and torchvision ResNet-18:
  * a batch gives the maps its images give one by one, each for its own target, and another
    target gives another map;
  * the model is left exactly as found, after a normal call and after a call that raises:
    same module objects, ``inplace`` flags, train/eval mode, ``requires_grad`` flags, hooks,
    parameters and buffers, outputs; no parameter requires grad while the method runs and
    nothing is accumulated in ``.grad`` (a ``.grad`` left by a training loop stays as it was);
  * the input tensor is not modified and gets no gradient.
Also: every method runs on ResNet-50, VGG-16 and MobileNetV2 (the CAM methods at each
architecture's default target layer), and the iterative methods never put more than
``inner_batch_size`` images through one forward, with the same result as one big chunk.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_bn
from method_checks import assert_restored, mixed_state, snapshot
from salmap.workers.methods import MethodError, build, get_class, names
from salmap.workers.methods.layers import default_target_layer_name
from tolerance import reorder_atol
from torch import nn

# cheap parameters per method, and per (method, arch) overrides with the input size
PARAMS: dict[str, dict] = {
    "smoothgrad": {"nsamples": 4, "inner_batch_size": 3},
    "integrated_gradients": {"steps": 6, "inner_batch_size": 4},
    "dmbp": {"steps": 3, "init_noise": 0.3, "inner_batch_size": 2},
    "hdm": {"benchmark_sizes": (2, 4), "auxiliary_sizes": (8,), "steps": 3, "stages": 2,
            "init_noise": 0.2, "inner_batch_size": 4},
}
ARCH_PX = {"tiny_model": 32, "resnet18": 64}
# methods whose forwards have one shape whatever the batch (hdm.py): maps are bit-identical
EXACT = {"hdm"}
OVERRIDES: dict[tuple[str, str], tuple[dict, int]] = {
    # TinyNet's last conv feeds an in-place ReLU: its block output is the CAM layer
    **{(cam, "tiny_model"): ({"target_layer": "layer4"}, 32)
       for cam in ("gradcam", "gradcam_pp", "scorecam", "layercam")},
    # one masked forward per channel: layer2's 128 channels at 32 px, not layer4's 512
    ("scorecam", "resnet18"): ({"target_layer": "layer2", "inner_batch_size": 128}, 32),
    # the padding trick zeroes 2x2 maps entirely: layer4 needs 3x3 (96 px) for a non-zero map
    ("rectgrad", "resnet18"): ({}, 96),
    ("nobias_rectgrad", "resnet18"): ({}, 96),
    # the optimisation methods: many passes per image
    ("dmbp", "resnet18"): ({}, 32),
    ("hdm", "resnet18"): ({}, 32),
}


def case(name: str, arch: str) -> tuple[dict, int]:
    extra, px = OVERRIDES.get((name, arch), ({}, ARCH_PX[arch]))
    return {**PARAMS.get(name, {}), **extra}, px


# -- the model state a method must leave as found ----------------------------------------------
class GradWatch:
    """Records, at every forward call of the model, whether any parameter requires grad."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: list[bool] = []
        params = list(model.parameters())
        self.handle = model.register_forward_pre_hook(
            lambda _m, _a: self.seen.append(any(p.requires_grad for p in params)))


# -- the contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCH_PX))
@pytest.mark.parametrize("name", names())
def test_batch_equals_one_by_one_and_the_model_is_left_as_found(name, arch, request):
    params, px = case(name, arch)
    model = mixed_state(request.getfixturevalue(arch), leftover_grads=True)
    torch.manual_seed(5)
    x = torch.randn(3, 3, px, px)
    x0 = x.clone()
    targets = torch.tensor([0, 3, 1])
    before = snapshot(model, x)
    watch = GradWatch(model)
    method = build(name, model, **params)

    maps = method(x, targets)
    assert maps.dim() == 3 and maps.shape[0] == 3 and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps.flatten(1).abs().amax(1) > 0).all()
    singles = torch.cat([method(x[i:i + 1], targets[i:i + 1]) for i in range(3)])
    scale = float(maps.abs().max())
    if name in EXACT:
        assert torch.equal(maps, singles)
    # the optimisation methods add the float noise of another batch composition at each step
    atol = reorder_atol(model, scale, steps=params.get("steps", 0) if name == "dmbp" else 0)
    torch.testing.assert_close(maps, singles, rtol=0, atol=atol)
    other = method(x[:1], [2])
    assert (other - maps[:1]).abs().max() > 1e-4 * scale, "the target does not matter"

    assert torch.equal(x, x0) and not x.requires_grad and x.grad is None
    assert watch.seen and not any(watch.seen), "parameters required grad during the method"
    watch.handle.remove()
    assert_restored(model, before, x)


# at the defaults, only the CAM layer chosen: TinyNet's last conv feeds an in-place ReLU
DEFAULTS_ON_TINY = {cam: {"target_layer": "layer4"}
                    for cam in ("gradcam", "gradcam_pp", "scorecam", "layercam")}


@pytest.mark.parametrize("name", names())
def test_default_parameters_give_batch_independent_maps(name, tiny_model):
    """Every method at its DEFAULT parameters (iterative ones included: DMBP's 200 steps, HDM's
    full hierarchy): an image's map is the same alone, in a batch of three, or as the first of
    a pair, to float tolerance; a dataset job's maps do not depend on how it was cut."""
    torch.manual_seed(6)
    x = torch.randn(3, 3, 32, 32)
    targets = torch.tensor([2, 0, 4])
    method = build(name, tiny_model, **DEFAULTS_ON_TINY.get(name, {}))
    maps = method(x, targets)
    singles = torch.cat([method(x[i:i + 1], targets[i:i + 1]) for i in range(3)])
    pair = method(x[1:], targets[1:])
    scale = float(maps.abs().max())
    assert scale > 0 and torch.isfinite(maps).all()
    if name in EXACT:
        assert torch.equal(singles, maps) and torch.equal(pair, maps[1:])
    torch.testing.assert_close(singles, maps, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(pair, maps[1:], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("arch", list(ARCH_PX))
@pytest.mark.parametrize("name", names())
def test_the_model_is_left_as_found_when_the_method_raises(name, arch, request):
    params, px = case(name, arch)
    model = mixed_state(request.getfixturevalue(arch), leftover_grads=True)
    x = torch.randn(2, 3, px, px)
    before = snapshot(model, x)
    with pytest.raises((RuntimeError, IndexError, MethodError)):
        build(name, model, **params)(x, [0, 99])  # class 99 does not exist
    assert_restored(model, before, x)


# -- architectures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet50(weights=None, num_classes=10)).eval()


DEFAULT_LAYERS = {"resnet50": "layer4", "vgg16_small": "features.29",
                  "mobilenet_v2": "features.18"}
# Score-CAM forwards once per channel: a shallow layer keeps this smoke test cheap (the
# default layers are exercised by the gradient CAMs above and on EfficientNet-Lite0 photos)
SCORECAM_LAYERS = {"resnet50": "layer1.0.conv1", "vgg16_small": "features.1",
                   "mobilenet_v2": "features.1"}
SMOKE = {"dmbp": {"steps": 2}, "hdm": {"benchmark_sizes": (2,), "auxiliary_sizes": (4,),
                                       "steps": 1, "stages": 2},
         "smoothgrad": {"nsamples": 2}, "integrated_gradients": {"steps": 3}}


@pytest.mark.parametrize("arch", list(DEFAULT_LAYERS))
def test_every_method_runs_on_the_architecture(arch, request):
    model = request.getfixturevalue(arch)
    assert default_target_layer_name(model) == DEFAULT_LAYERS[arch]
    x = torch.randn(1, 3, 32, 32)
    for name in names():
        params = dict(SMOKE.get(name, {}))
        if name == "scorecam":
            params["target_layer"] = SCORECAM_LAYERS[arch]
        maps = build(name, model, **params)(x, [1])
        assert maps.dim() == 3 and torch.isfinite(maps).all(), name
        if not get_class(name).uses_target_layer:
            assert maps.shape[-2:] == (32, 32), name
    assert all(p.grad is None for p in model.parameters())


# -- memory budget and determinism of the iterative methods -----------------------------------
ITERATIVE = {
    "smoothgrad": {"nsamples": 5},
    "integrated_gradients": {"steps": 5},
    "scorecam": {"target_layer": "layer4"},
    "dmbp": {"steps": 2, "init_noise": 0.3},
    "hdm": {"benchmark_sizes": (2, 3), "auxiliary_sizes": (4,), "steps": 2, "stages": 2,
            "init_noise": 0.2, "forward_images": 3},
}
# HDM's forward shape is part of its configuration (hdm.py: every forward has
# min(inner_batch_size, forward_images * masks) rows, so that a map does not depend on its
# batch); another shape changes the logits by float noise, which its Adam steps through ReLU
# gates amplify without bound. So its maps are bit-identical across batches at one budget,
# not equal across budgets.
SHAPE_IS_CONFIG = {"hdm"}


@pytest.mark.parametrize("name", list(ITERATIVE))
def test_iterative_methods_keep_to_the_inner_batch_size(name, tiny_model):
    x = torch.randn(3, 3, 16, 16)
    targets = [0, 2, 4]
    sizes: list[int] = []
    handle = tiny_model.register_forward_pre_hook(lambda _m, a: sizes.append(a[0].shape[0]))
    try:
        budget = 2
        small = build(name, tiny_model, inner_batch_size=budget, **ITERATIVE[name])(x, targets)
        small_sizes, sizes[:] = list(sizes), []
        again = build(name, tiny_model, inner_batch_size=budget, **ITERATIVE[name])(x, targets)
        big = build(name, tiny_model, inner_batch_size=10_000, **ITERATIVE[name])(x, targets)
    finally:
        handle.remove()
    # Score-CAM's first forward (the activations) takes the caller's batch as it comes
    chunked = small_sizes[1:] if name == "scorecam" else small_sizes
    assert max(chunked) <= budget and len(chunked) >= 2
    assert max(sizes) > budget  # the big budget really batches more
    assert torch.equal(small, again)  # deterministic (seeded noise, fixed inits)
    if name in SHAPE_IS_CONFIG:
        method = build(name, tiny_model, inner_batch_size=budget, **ITERATIVE[name])
        assert torch.equal(torch.cat([method(x[i:i + 1], targets[i:i + 1]) for i in range(3)]),
                           small)
        return
    torch.testing.assert_close(small, big, rtol=1e-4, atol=1e-5 * float(big.abs().max()))
