"""Target layers: finding them by name, sensible defaults per architecture, capturing them."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator

from torch import Tensor, nn

from .errors import MethodError


def default_target_layer_name(model: nn.Module) -> str:
    """The CAM target layer used when the config names none.

    The last convolutional block's activated output, at the resolution the papers use:
    ResNet ``layer4``; VGG ``features.29`` (ReLU after conv5_3, 14x14 at 224 px, as in the
    Grad-CAM and Grad-CAM++ papers); MobileNetV2/V3 and torchvision EfficientNet (V1 and V2)
    the last ``features`` block; EfficientNet-Lite (efficientnet-lite-pytorch) ``_swish``,
    whose last call is the head activation (the module is re-used, and a capture keeps the
    last call); ConvNeXt and MaxViT the last stage (``features.7``, ``blocks.3``); RegNet
    ``trunk_output``; DenseNet ``features`` (its final BatchNorm: the ReLU after it is
    functional, so it has no module; pytorch-grad-cam's choice too).

    Transformers (torchvision), on the patch grid: ViT the last encoder block's ``ln_1``
    (tokens; the block's own output reaches the head only through the class token, so its
    patch tokens get no gradient; pytorch-grad-cam's choice); Swin the final ``norm``
    (channels-last, the map the head pools). Otherwise the last ``nn.Conv2d``.
    """
    cls = type(model).__name__
    names = dict(model.named_modules())
    if cls == "ResNet" and "layer4" in names:
        return "layer4"
    if cls == "VisionTransformer" and isinstance(names.get("encoder.layers"), nn.Sequential):
        blocks = list(names["encoder.layers"].named_children())
        if blocks and f"encoder.layers.{blocks[-1][0]}.ln_1" in names:
            return f"encoder.layers.{blocks[-1][0]}.ln_1"
    if cls.startswith("SwinTransformer") and "norm" in names:
        return "norm"
    if cls == "RegNet" and "trunk_output" in names:
        return "trunk_output"
    if cls == "DenseNet" and "features" in names:
        return "features"
    if cls == "MaxVit" and isinstance(names.get("blocks"), nn.ModuleList):
        return f"blocks.{len(names['blocks']) - 1}"
    if cls == "VGG" and "features" in names:
        feats = names["features"]
        convs = [i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]
        last = convs[-1]
        if last + 1 < len(feats) and isinstance(feats[last + 1], nn.ReLU):
            last += 1
        return f"features.{last}"
    if cls in {"MobileNetV2", "MobileNetV3", "EfficientNet", "ConvNeXt"} and "features" in names:
        feats = names["features"]
        if isinstance(feats, nn.Sequential):
            return f"features.{len(feats) - 1}"
    if "_conv_head" in names and "_swish" in names:
        return "_swish"
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise MethodError(f"{cls} has no Conv2d layer: name a target_layer for CAM methods")
    return convs[-1]


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` for a layer given by name, by module, or None (the default)."""
    if isinstance(layer, nn.Module):
        for name, m in model.named_modules():
            if m is layer:
                return name, m
        raise MethodError("target_layer module is not part of the model")
    name = layer or default_target_layer_name(model)
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise MethodError(f"target_layer {name!r} is not a module of {type(model).__name__}{hint}")
    return name, modules[name]


class Capture:
    """The output of a layer's last call during a forward pass."""

    activation: Tensor | None = None
    calls: int = 0


@contextlib.contextmanager
def capture_output(layer: nn.Module, *, cut_graph: bool = False,
                   cut_call: int | None = None) -> Iterator[Capture]:
    """Record ``layer``'s output (its last call) while inside; the hook is always removed.

    With ``cut_graph=True`` the output is replaced by a detached copy that requires grad,
    so a backward from the logits stops at this layer (CAM methods never backpropagate
    below their target layer, and need no input gradient). ``cut_call`` (1-based) cuts only
    that call of a module the forward re-uses (EfficientNet-Lite's ``_swish`` runs at the
    stem and at the head): cutting every call would record a graph from the first one on.
    """
    cap = Capture()

    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor | None:
        if not isinstance(output, Tensor):
            raise MethodError(f"target layer {type(_module).__name__} does not output a tensor")
        cap.calls += 1
        if cut_graph and (cut_call is None or cap.calls == cut_call):
            output = output.detach().requires_grad_(True)
            cap.activation = output
            return output
        cap.activation = output
        return None

    handle = layer.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()
