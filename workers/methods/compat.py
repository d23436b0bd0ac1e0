"""Which methods run on which model family, decided before any image is explained.

The modified-backpropagation methods (Guided Backprop, RectGrad, NoBias-RectGrad, TSGB) have
backward rules for ReLU convolutional networks only: none for GELU / SiLU-type activations,
LayerNorm or attention (TSGB also needs an ``nn.Linear`` classifier). DMBP's masks cover
``nn.Conv2d`` filters only (LayerNorm models mix channels in ``nn.Linear`` layers, attention
has no filters) and it differentiates the backward pass twice, which PyTorch cannot do through
hardswish / hardsigmoid. Rather than fail on every sample inside an actor, they are refused:

* at config time, from the model's name alone (nothing is built or downloaded):
  ``torchvision:<name>``, ``file:<path>`` with ``arch``, ``efficientnet_lite0``; see
  :data:`FAMILIES` and :func:`job_conflict`;
* when the method is bound to a model (the actor's start), from the modules the model
  contains, for models the config cannot name (``package.module:callable``); see
  :func:`check_model`. Activations applied as functions without a module (``F.gelu`` in a
  ``forward``) are not seen here; the rules still refuse them at the first batch.

Gradient, CAM and mask-optimisation (HDM) methods run on every family. Each method class
declares what it has no rule for (``no_rule``, with ``no_rule_why``); this module finds those
features in a model or an architecture name and decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import MethodError
from .features import ATTENTION, CONV_HEAD, FEATURES, HARD, LAYER_NORM, SMOOTH
from .registry import classes, lookup


def no_rule(method: str) -> frozenset[str]:
    """The model features ``method`` has no rule for (its class's ``no_rule``; an unknown
    name has none: the name check is the registry's)."""
    cls = lookup(method)
    return cls.no_rule if cls is not None else frozenset()


#: activation modules none of the rules covers (mirrors backprop_rules.SMOOTH_NONLINEARITIES)
SMOOTH_MODULES: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Mish, nn.ELU, nn.CELU, nn.SELU, nn.LeakyReLU,
    nn.PReLU, nn.RReLU, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.GLU, nn.Tanhshrink,
    nn.Softshrink, nn.Hardshrink,
)
HARD_MODULES: tuple[type[nn.Module], ...] = (nn.Hardswish, nn.Hardsigmoid)


@dataclass(frozen=True)
class Family:
    """A group of architectures with the same nonlinearities, named by torchvision prefix."""

    name: str
    prefixes: tuple[str, ...]
    features: frozenset[str]
    #: takes only the input size it was built for (position embeddings / fixed partitions)
    fixed_input: bool = False


_TRANSFORMER = frozenset({SMOOTH, LAYER_NORM, ATTENTION})
FAMILIES: tuple[Family, ...] = (
    Family("ViT", ("vit_",), _TRANSFORMER, fixed_input=True),
    Family("Swin", ("swin_",), _TRANSFORMER),
    Family("MaxViT", ("maxvit_",), _TRANSFORMER, fixed_input=True),
    Family("ConvNeXt", ("convnext_",), frozenset({SMOOTH, LAYER_NORM})),
    Family("EfficientNet V2", ("efficientnet_v2_",), frozenset({SMOOTH})),
    Family("EfficientNet", ("efficientnet_b",), frozenset({SMOOTH})),
    Family("RegNetY", ("regnet_y_",), frozenset({SMOOTH})),  # sigmoid squeeze-excitation
    Family("MobileNetV3", ("mobilenet_v3_",), frozenset({HARD})),
    Family("SqueezeNet", ("squeezenet",), frozenset({CONV_HEAD})),
    Family("RegNetX", ("regnet_x_",), frozenset()),
    Family("EfficientNet-Lite", ("efficientnet_lite",), frozenset()),  # ReLU6
    Family("MobileNetV2", ("mobilenet_v2",), frozenset()),
    Family("ResNet, ResNeXt, Wide ResNet", ("resnet", "resnext", "wide_resnet"), frozenset()),
    Family("VGG", ("vgg",), frozenset()),
    Family("DenseNet", ("densenet",), frozenset()),
    Family("AlexNet, GoogLeNet, Inception v3, MNASNet, ShuffleNetV2",
           ("alexnet", "googlenet", "inception_v3", "mnasnet", "shufflenet_v2"), frozenset()),
)


def family_of(arch: str) -> Family | None:
    """The family of a torchvision architecture name (or ``efficientnet_lite0``), or None."""
    for family in FAMILIES:
        if arch.startswith(family.prefixes):
            return family
    return None


def model_features(model: nn.Module) -> dict[str, str]:
    """The features of a built model that some methods have no rule for: feature -> the
    first module showing it (``"GELU at 'encoder.layers.encoder_layer_0.mlp.1'"``)."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        kind = None
        if isinstance(module, SMOOTH_MODULES):
            kind = SMOOTH
        elif isinstance(module, HARD_MODULES):
            kind = HARD
        elif isinstance(module, nn.LayerNorm):
            kind = LAYER_NORM
        elif isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__:
            kind = ATTENTION
        if kind and kind not in found:
            found[kind] = f"{type(module).__name__} at {name or '<model>'!r}"
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        found[CONV_HEAD] = f"no nn.Linear in {type(model).__name__}"
    return found


def runs_on(features: Iterable[str]) -> list[str]:
    """The registered methods that have a rule for every one of ``features``."""
    features = set(features)
    return [m for m, cls in classes().items() if not cls.no_rule & features]


def refusal(method: str, features: Iterable[str], architecture: str) -> str | None:
    """Why ``method`` cannot run on ``architecture`` with ``features``, or None if it can."""
    features = set(features)
    missing = [f for f in FEATURES if f in no_rule(method) & features]
    if not missing:
        return None
    return (f"{method} has no rule for {', '.join(missing)}, which {architecture} uses; "
            f"methods that run on it: {', '.join(runs_on(features))}")


def check_model(method: str, model: nn.Module) -> None:
    """Raise :class:`MethodError` when ``method`` has no rule for something ``model`` uses."""
    if not no_rule(method):
        return
    found = model_features(model)
    why = refusal(method, found, type(model).__name__)
    if why:
        where = ", ".join(found[f] for f in FEATURES if f in found)
        raise MethodError(f"{why} (found {where})")


def source_arch(source: str, arch: str | None) -> str | None:
    """The torchvision-style architecture name a model source gives away, if any."""
    if source.startswith("torchvision:"):
        return source.split(":", 1)[1]
    if source.startswith("file:"):
        return arch
    if source in ("efficientnet_lite0", "efficientnet-lite0"):
        return "efficientnet_lite0"
    return None  # package.module:callable: known once built (check_model)


def native_size(arch: str, weights: str | None) -> int:
    """The input size a fixed-input torchvision model is built for with ``weights``."""
    if weights in (None, "", "none", "None"):
        return 224  # every torchvision ViT / MaxViT builder's default image_size
    import torchvision.models as tvm

    enum = tvm.get_model_weights(arch)
    w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    return int(w.transforms().crop_size[0])


def job_conflict(models: Sequence[Any], methods: Sequence[Any]) -> str | None:
    """The first (model, method) pair of a job that cannot run, as a config error message.

    ``models``: objects with ``source``, ``arch``, ``weights``, ``input_size``, ``reshape``
    (the config's model sections); ``methods``: objects with ``name``. Decided from names
    only: nothing is built or downloaded.
    """
    from .reshape import check_reshape

    for j, method in enumerate(methods):
        if "reshape" in (getattr(method, "params", None) or {}):
            try:
                check_reshape(method.params["reshape"])
            except MethodError as err:
                return f"methods[{j}].params.reshape: {err}"
    for i, model in enumerate(models):
        try:
            check_reshape(getattr(model, "reshape", None))
        except MethodError as err:
            return f"models[{i}].reshape: {err}"
        arch = source_arch(model.source, getattr(model, "arch", None))
        family = family_of(arch) if arch else None
        if family is None:
            continue
        size = getattr(model, "input_size", None)
        if family.fixed_input and size:
            # file:<path> models are built without weights, as torchvision's default
            weights = None if model.source.startswith("file:") else getattr(model, "weights", None)
            native = native_size(arch, weights)
            if int(size) != native:
                return (f"models[{i}].input_size: {arch} ({family.name}) takes only the "
                        f"{native} px input it was built for, not {size}; leave input_size null")
        for j, method in enumerate(methods):
            why = refusal(method.name, family.features, f"{arch} ({family.name})")
            if why:
                return f"methods[{j}] {method.name!r} on models[{i}] ({model.source}): {why}"
    return None
