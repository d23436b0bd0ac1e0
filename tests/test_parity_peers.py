"""Parity with the peer libraries (test-only references): pytorch-grad-cam and Captum.

Same model (torchvision ResNet-18, random weights, 10 classes), same inputs, a different
target per sample. The gradient methods are also compared on small instances of torchvision's
ViT, Swin and ConvNeXt classes (tests/family_models.py), and the gradient CAMs and Score-CAM on
ViT and Swin with pytorch-grad-cam's documented ``reshape_transform`` for them.
pytorch-grad-cam returns per-image min-max scaled maps upsampled to the input size
(``scale_cam_image``: ``(L - min) / (max + 1e-7)``, cv2 bilinear resize, then the same
scaling again); ours are raw at the layer's resolution, so they are compared after
:func:`as_grad_cam` applies that convention (``F.interpolate`` bilinear with
``align_corners=False`` has the same pixel centres as ``cv2.resize``).

Max abs differences measured here (CPU, float32, a scratch run of these exact cases):
  pytorch-grad-cam, on [0, 1] maps: Grad-CAM 3.6e-7, Grad-CAM++ (``epsilon=1e-6``, their
  guard) 8.9e-7, LayerCAM 3.3e-7, Score-CAM (``variant="jacobgil"``) 4.8e-7. With its
  ``reshape_transform`` on the small ViT / Swin: Grad-CAM 6.6e-7 / 2.4e-7, Grad-CAM++
  4.5e-7 / 2.4e-7, LayerCAM 8.3e-7 / 2.4e-7, Score-CAM 3.1e-6 / 8.0e-6.
  Captum on the small ViT / Swin / ConvNeXt: Saliency 2.2e-7 (of a 0.38 maximum) / 0 / 0,
  InputXGradient 5.4e-7 (of 0.75) / 0 / 0, IntegratedGradients (16 steps) 0 / 0 / 0.
  Captum, raw maps: LayerGradCam 0, Saliency 0, InputXGradient 0, IntegratedGradients
  Gauss-Legendre 0 and right Riemann 0, NoiseTunnel smoothgrad 0 and smoothgrad_sq 0 (same
  noise); IG ``riemann_trapezoid`` 8.9e-5 on maps of scale 4e-2 after the weight factor below.
Known convention differences:
  * Captum's ``riemann_trapezoid`` weights are ``1/n`` (ends halved), summing to ``1 - 1/n``;
    ours are ``1/(n-1)``, so theirs are rescaled by ``n/(n-1)``. Its nodes come from float32
    ``torch.linspace`` and differ from ours (correctly rounded ``k/(n-1)``) by one ulp at some
    steps, which flips ReLU kinks of this random network: hence the looser tolerance there.
  * Grad-CAM++ at our default ``epsilon=0`` differs from pytorch-grad-cam by 1.3e-2 (their
    1e-6 guard is not negligible at gradient scales ~1e-3).
  * Score-CAM ``variant="official"`` differs from pytorch-grad-cam's by 1.8e-2 (another
    algorithm: softmax probabilities, align_corners=False masks, no softmax across channels).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from family_models import PX, tiny_convnext, tiny_swin, tiny_vit
from salmap.workers.methods import build
from salmap.workers.methods.smoothgrad import unit_noise

pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("captum")

from captum.attr import (  # noqa: E402
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

FAMILIES = {"vit": tiny_vit, "swin": tiny_swin, "convnext": tiny_convnext}


@pytest.fixture(params=["resnet18", *FAMILIES])
def small_case(request):
    """32 px images (the iterative input-space methods are costly): ResNet-18's ``case``
    cropped, or a transformer family's small model with the same kind of targets."""
    if request.param == "resnet18":
        model, x, targets = request.getfixturevalue("case")
        return model, x[:, :, :32, :32].contiguous(), targets
    torch.manual_seed(11)
    return ranked(FAMILIES[request.param](), torch.randn(3, 3, PX, PX))


def ranked(model, x):
    """Model, images and targets: the 1st, 2nd and 3rd ranked class of images 0, 1, 2."""
    with torch.no_grad():
        order = model(x).argsort(dim=1, descending=True)
    return model, x, order[torch.arange(3), torch.arange(3)]


@pytest.fixture
def case(resnet18):
    """Model, 3 images, and targets: the 1st, 2nd and 3rd ranked class of images 0, 1, 2.

    Ranked classes rather than arbitrary ones: on this random-weight model an arbitrary
    class often has only negative evidence, and Grad-CAM's map is then all zero.
    """
    torch.manual_seed(11)
    return ranked(copy.deepcopy(resnet18), torch.randn(3, 3, 64, 64))


def float_noise(reference: torch.Tensor) -> float:
    """Absolute tolerance for float32 maps: 1e-5 of their scale. ResNet-18's agree exactly;
    on ViT, Captum's backward seed (one per sample) takes other matmul paths than ours (one
    sum), which moves values by ~1e-6 of the map's maximum."""
    return max(1e-9, 1e-5 * float(reference.abs().max()))


def as_grad_cam(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """pytorch-grad-cam's output convention applied to our raw native-resolution maps."""

    def scale(m):
        m = m - m.amin(dim=(1, 2), keepdim=True)
        return m / (m.amax(dim=(1, 2), keepdim=True) + 1e-7)

    up = F.interpolate(scale(maps)[:, None], size=size, mode="bilinear", align_corners=False)
    return scale(up[:, 0])


def grad_cam_lib(cls, model, layer, x, targets):
    with cls(model=model, target_layers=[layer]) as explainer:
        out = explainer(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return torch.from_numpy(out)


@pytest.mark.parametrize(
    ("name", "cls", "params"),
    [
        ("gradcam", GradCAM, {}),
        ("gradcam_pp", GradCAMPlusPlus, {"epsilon": 1e-6}),
        ("layercam", LayerCAM, {}),
    ],
)
def test_gradient_cams_match_pytorch_grad_cam(case, name, cls, params):
    model, x, targets = case
    ours = build(name, model, target_layer="layer3", **params)(x, targets)  # 4x4 at 64 px
    theirs = grad_cam_lib(cls, model, model.layer3, x, targets)
    assert theirs.flatten(1).std(1).min() > 0.05  # non-trivial maps
    torch.testing.assert_close(as_grad_cam(ours, x.shape[-2:]), theirs, rtol=0, atol=1e-4)


def test_scorecam_jacobgil_variant_matches_pytorch_grad_cam(case):
    model, x, targets = case
    x, targets = x[:2, :, :32, :32], targets[:2]  # layer1 (64 channels): 128 masked forwards
    ours = build("scorecam", model, target_layer="layer1", variant="jacobgil")(x, targets)
    theirs = grad_cam_lib(ScoreCAM, model, model.layer1, x, targets)
    assert theirs.flatten(1).std(1).min() > 0.05
    torch.testing.assert_close(as_grad_cam(ours, x.shape[-2:]), theirs, rtol=0, atol=1e-4)


def test_gradcam_matches_captum_layer_gradcam_raw(case):
    model, x, targets = case
    ours = build("gradcam", model, target_layer="layer3")(x, targets)
    theirs = LayerGradCam(model, model.layer3).attribute(x, target=targets, relu_attributions=True)
    torch.testing.assert_close(ours, theirs.detach()[:, 0], rtol=1e-5, atol=1e-7)


def test_gradient_matches_captum_saliency(small_case):
    model, x, targets = small_case
    ours = build("gradient", model)(x, targets)
    xg = x.clone().requires_grad_()
    theirs = Saliency(model).attribute(xg, target=targets, abs=True).amax(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=float_noise(theirs))


def test_gradient_x_input_matches_captum(small_case):
    model, x, targets = small_case
    ours = build("gradient_x_input", model)(x, targets)
    xg = x.clone().requires_grad_()
    theirs = InputXGradient(model).attribute(xg, target=targets).detach().sum(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=float_noise(theirs))


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_right", "riemann_trapezoid"])
def test_integrated_gradients_matches_captum(small_case, method):
    model, x, targets = small_case
    steps = 16
    ours = build("integrated_gradients", model, steps=steps, method=method)(x, targets)
    theirs = IntegratedGradients(model).attribute(
        x.clone().requires_grad_(), target=targets, n_steps=steps, method=method
    ).detach().sum(1)
    atol = 1e-7
    if method == "riemann_trapezoid":
        theirs = theirs * steps / (steps - 1)  # Captum's trapezoid weights sum to 1 - 1/n
        atol = 1e-2 * float(theirs.abs().max())  # one-ulp node differences (module docstring)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=atol)


@pytest.mark.parametrize(("magnitude", "nt_type"), [(False, "smoothgrad"), (True, "smoothgrad_sq")])
def test_smoothgrad_matches_captum_noise_tunnel_with_the_same_noise(small_case, monkeypatch,
                                                                     magnitude, nt_type):
    model, x, targets = small_case
    n, stdev, seed = 4, 0.3, 5
    ours = build("smoothgrad", model, nsamples=n, stdev=stdev, magnitude=magnitude,
                 seed=seed)(x, targets)
    noise = unit_noise(seed, n, tuple(x.shape[1:]))

    def fixed_normal(mean, std):  # Captum draws torch.normal(0, std[B*n, ...]), rows b*n + i
        return mean + std * noise.repeat(x.shape[0], 1, 1, 1)

    monkeypatch.setattr(torch, "normal", fixed_normal)
    theirs = NoiseTunnel(Saliency(model)).attribute(
        x.clone().requires_grad_(), nt_type=nt_type, nt_samples=n, stdevs=stdev,
        target=targets, abs=False,
    )
    monkeypatch.undo()
    theirs = theirs.detach().abs().amax(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6 * float(theirs.max()))


# -- transformers: pytorch-grad-cam with its reshape_transform ----------------------------------
def vit_tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's documented ViT transform: drop the class token, square grid, NCHW."""
    side = int((t.shape[1] - 1) ** 0.5)
    return t[:, 1:, :].reshape(t.shape[0], side, side, t.shape[2]).transpose(2, 3).transpose(1, 2)


def swin_to_nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


TRANSFORMERS = {  # our default layer and reshape; their module and reshape_transform
    "vit": (tiny_vit, lambda m: m.encoder.layers[-1].ln_1, vit_tokens_to_grid),
    "swin": (tiny_swin, lambda m: m.norm, swin_to_nchw),
}


@pytest.mark.parametrize("family", list(TRANSFORMERS))
@pytest.mark.parametrize(
    ("name", "cls", "params"),
    [
        ("gradcam", GradCAM, {}),
        ("gradcam_pp", GradCAMPlusPlus, {"epsilon": 1e-6}),
        ("layercam", LayerCAM, {}),
        ("scorecam", ScoreCAM, {"variant": "jacobgil"}),
    ],
)
def test_cams_on_transformers_match_pytorch_grad_cam(family, name, cls, params):
    builder, layer, transform = TRANSFORMERS[family]
    torch.manual_seed(11)
    model, x, targets = ranked(builder(), torch.randn(3, 3, PX, PX))
    ours = build(name, model, **params)(x, targets)  # default layer, reshape auto
    with cls(model=model, target_layers=[layer(model)], reshape_transform=transform) as explainer:
        theirs = torch.from_numpy(explainer(
            input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets]))
    assert theirs.flatten(1).std(1).min() > 0.05
    torch.testing.assert_close(as_grad_cam(ours, x.shape[-2:]), theirs, rtol=0, atol=1e-4)
