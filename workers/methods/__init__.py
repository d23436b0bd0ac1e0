"""The method registry: one file per method, one entry per name here.

    >>> from salmap.workers.methods import build
    >>> gradcam = build("gradcam", model)            # target layer: the architecture's default
    >>> maps = gradcam(images, targets)              # [B, h, w] float32, raw values
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from torch import nn

from .base import PRECISIONS, Method, MethodError

# name -> "module:class" (imported on first use, so a broken optional method never blocks the rest)
REGISTRY: dict[str, str] = {
    "gradient": "salmap.workers.methods.gradient:Gradient",
    "gradient_x_input": "salmap.workers.methods.gradient_x_input:GradientXInput",
    "smoothgrad": "salmap.workers.methods.smoothgrad:SmoothGrad",
    "integrated_gradients": "salmap.workers.methods.integrated_gradients:IntegratedGradients",
    "guided_backprop": "salmap.workers.methods.guided_backprop:GuidedBackprop",
    "gradcam": "salmap.workers.methods.gradcam:GradCAM",
    "gradcam_pp": "salmap.workers.methods.gradcam_pp:GradCAMPlusPlus",
    "scorecam": "salmap.workers.methods.scorecam:ScoreCAM",
    "layercam": "salmap.workers.methods.layercam:LayerCAM",
    "rectgrad": "salmap.workers.methods.rectgrad:RectGrad",
    "nobias_rectgrad": "salmap.workers.methods.nobias_rectgrad:NoBiasRectGrad",
    "tsgb": "salmap.workers.methods.tsgb:TSGB",
    "dmbp": "salmap.workers.methods.dmbp:DMBP",
    "hdm": "salmap.workers.methods.hdm:HDM",
}

COMMON_OPTIONS = ("precision", "inner_batch_size")

__all__ = ["REGISTRY", "Method", "MethodError", "build", "get_class", "names", "check_params"]


def names() -> list[str]:
    """Every registered method name."""
    return list(REGISTRY)


def unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name, names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown method {name!r}{hint}; known methods: {', '.join(names())}"


def get_class(name: str) -> type[Method]:
    """The class behind a registry name."""
    if name not in REGISTRY:
        raise MethodError(unknown_name_message(name))
    module_name, cls_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def check_params(name: str, params: dict[str, Any]) -> None:
    """Fail early, naming the parameter, when ``params`` do not fit the method's signature."""
    cls = get_class(name)
    sig = inspect.signature(cls.__init__)
    accepted = [p for p in sig.parameters if p not in ("self", "model")]
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for key in params:
        if key in COMMON_OPTIONS or takes_kwargs or key in accepted:
            continue
        options = accepted + list(COMMON_OPTIONS)
        close = difflib.get_close_matches(key, options, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MethodError(
            f"method {name!r} has no parameter {key!r}{hint}; its parameters: {', '.join(options)}"
        )
    precision = params.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise MethodError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def build(name: str, model: nn.Module, **params: Any) -> Method:
    """Bind method ``name`` to ``model``; ``params`` are the method's own plus the common options."""
    check_params(name, params)
    common = {k: params.pop(k) for k in COMMON_OPTIONS if k in params}
    method = get_class(name)(model, **params)
    for key, value in common.items():
        setattr(method, key, value)
    return method
