"""Print how far salmap's methods are from the peer libraries on the same model, input, target.

    .venv/bin/python scripts/method_parity.py

Two settings: torchvision ResNet-18 (random weights, 10 classes, 3 random 64-px inputs, the
1st/2nd/3rd ranked class as targets; the cases of tests/test_parity_peers.py) and the
pretrained EfficientNet-Lite0 on 4 real photos at 224 px (predicted class). CAM maps are
compared after pytorch-grad-cam's convention (min-max per image, bilinear upsampling to the
input, min-max again; maps in [0, 1]); input-space maps raw, reported as max |diff| relative
to max |map|, with the Pearson correlation. Each line says which convention was used.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from captum.attr import (  # noqa: E402
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    NoiseTunnel,
    Saliency,
)
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from salmap.workers.methods import build  # noqa: E402
from salmap.workers.methods.smoothgrad import unit_noise  # noqa: E402


def as_grad_cam(maps: torch.Tensor, size) -> torch.Tensor:
    def scale(m):
        m = m - m.amin(dim=(1, 2), keepdim=True)
        return m / (m.amax(dim=(1, 2), keepdim=True) + 1e-7)

    up = F.interpolate(scale(maps)[:, None], size=size, mode="bilinear", align_corners=False)
    return scale(up[:, 0])


def lib_cam(cls, model, layer, x, targets):
    with cls(model=model, target_layers=[layer]) as explainer:
        out = explainer(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return torch.from_numpy(out)


def report(setting: str, what: str, ours: torch.Tensor, theirs: torch.Tensor, rel: bool) -> None:
    a, b = ours.double().flatten(), theirs.double().flatten()
    diff = float((a - b).abs().max())
    if rel:
        diff /= float(b.abs().max())
    corr = float(np.corrcoef(a.numpy(), b.numpy())[0, 1])
    kind = "rel" if rel else "abs"
    print(f"{setting:9s} {what:62s} max|diff| {kind} {diff:9.2e}   corr {corr:.6f}")


def not_inplace(model):
    model = copy.deepcopy(model)
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return model


def run(setting: str, model: nn.Module, x: torch.Tensor, targets: torch.Tensor, cam_layer: str,
        score_layer: str, score_n: int) -> None:
    if "--gbp-only" in sys.argv:
        return run_gbp(setting, model, x, targets)
    layer = model.get_submodule(cam_layer)
    size = x.shape[-2:]
    for name, cls, params, note in (
        ("gradcam", GradCAM, {}, ""),
        ("gradcam_pp", GradCAMPlusPlus, {"epsilon": 1e-6}, " epsilon=1e-6 (their guard)"),
        ("gradcam_pp", GradCAMPlusPlus, {}, " default epsilon=0"),
        ("layercam", LayerCAM, {}, ""),
    ):
        ours = build(name, model, target_layer=cam_layer, **params)(x, targets)
        report(setting, f"{name} vs pytorch-grad-cam @{cam_layer}{note}",
               as_grad_cam(ours, size), lib_cam(cls, model, layer, x, targets), rel=False)
    xs, ts = x[:score_n], targets[:score_n]
    slayer = model.get_submodule(score_layer)
    theirs = lib_cam(ScoreCAM, model, slayer, xs, ts)
    for variant in ("jacobgil", "official"):
        ours = build("scorecam", model, target_layer=score_layer, variant=variant)(xs, ts)
        report(setting, f"scorecam variant={variant} vs pytorch-grad-cam @{score_layer}",
               as_grad_cam(ours, size), theirs, rel=False)

    run_inputs(setting, model, x, targets)
    run_gbp(setting, model, x, targets)


def run_inputs(setting: str, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> None:
    xg = x.clone().requires_grad_(True)
    report(setting, "gradient (max_c|g|) vs Captum Saliency(abs).amax(1)",
           build("gradient", model)(x, targets),
           Saliency(model).attribute(xg, target=targets, abs=True).detach().amax(1), rel=True)
    report(setting, "gradient_x_input (sum_c) vs Captum InputXGradient.sum(1)",
           build("gradient_x_input", model)(x, targets),
           InputXGradient(model).attribute(xg, target=targets).detach().sum(1), rel=True)
    steps = 16
    report(setting, f"integrated_gradients gausslegendre {steps} steps vs Captum IG",
           build("integrated_gradients", model, steps=steps)(x, targets),
           IntegratedGradients(model).attribute(xg, target=targets, n_steps=steps,
                                                internal_batch_size=16).detach().sum(1),
           rel=True)
    n, stdev, seed = 4, 0.3, 5
    noise = unit_noise(seed, n, tuple(x.shape[1:]))
    real_normal = torch.normal
    torch.normal = lambda mean, std: mean + std * noise.repeat(x.shape[0], 1, 1, 1)
    try:
        theirs = NoiseTunnel(Saliency(model)).attribute(
            xg, nt_type="smoothgrad_sq", nt_samples=n, stdevs=stdev, target=targets, abs=False)
    finally:
        torch.normal = real_normal
    report(setting, f"smoothgrad (n={n}, abs sigma {stdev}, same noise) vs NoiseTunnel sq",
           build("smoothgrad", model, nsamples=n, stdev=stdev, seed=seed)(x, targets),
           theirs.detach().abs().amax(1), rel=True)


def run_gbp(setting: str, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> None:
    import warnings

    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = GuidedBackprop(not_inplace(model)).attribute(xg, target=targets).detach()
    report(setting, "guided_backprop raw [B,3,H,W] vs Captum GuidedBackprop",
           build("guided_backprop", model).attribute_channels(x, targets), theirs, rel=True)
    if any(isinstance(m, nn.ReLU6) for m in model.modules()):
        # Captum guides nn.ReLU modules only: on a ReLU6 net its GBP is the plain gradient
        grad = torch.autograd.grad(model(xg).gather(1, targets[:, None]).sum(), xg)[0]
        report(setting, "  Captum GuidedBackprop vs the plain input gradient (ReLU6 net)",
               theirs, grad.detach(), rel=True)
        relu = not_inplace(model)
        for m in list(relu.modules()):
            for child_name, child in list(m.named_children()):
                if isinstance(child, nn.ReLU6):
                    setattr(m, child_name, nn.ReLU())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = GuidedBackprop(relu).attribute(xg, target=targets).detach()
        report(setting, "  same with every ReLU6 module made a ReLU (both libraries)",
               build("guided_backprop", relu).attribute_channels(x, targets), theirs, rel=True)


def main() -> None:
    torch.set_num_threads(2)
    import torchvision
    from conftest import randomize_bn

    torch.manual_seed(0)
    r18 = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    torch.manual_seed(11)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ranked = r18(x).argsort(dim=1, descending=True)
    run("resnet18", r18, x, ranked[torch.arange(3), torch.arange(3)], "layer3", "layer1", 2)

    from lite0_photos import photos
    from salmap.workers.models import load_model

    lite = load_model("efficientnet_lite0")
    x = photos(lite)
    model = copy.deepcopy(lite.model)
    # the head activation is one re-used ReLU6 module (``_swish``), which pytorch-grad-cam
    # would capture at every call: wrap the head BN with its own (idempotent) ReLU6 so that
    # ``_bn1`` outputs the head features, the tensor our default layer captures
    model._bn1 = nn.Sequential(model._bn1, nn.ReLU6())
    model.eval().requires_grad_(True)  # pytorch-grad-cam needs a graph from the weights
    with torch.no_grad():
        targets = model(x).argmax(1)
        assert torch.equal(targets, lite.model(x).argmax(1))
    run("lite0", model, x, targets, "_bn1", "_blocks.0", 1)


if __name__ == "__main__":
    main()
