"""The method registry: one file per method, each class named by ``@register("name")`` next
to it (:mod:`.registry`); this package builds a method from its name and parameters.

    >>> from salmap.workers.methods import build
    >>> gradcam = build("gradcam", model)            # target layer: the architecture's default
    >>> maps = gradcam(images, targets)              # [B, h, w] float32, raw values
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from .base import PRECISIONS, Method
from .errors import MethodError
from .registry import classes, get_class, names, register, unknown_name_message

COMMON_OPTIONS = ("precision", "inner_batch_size")

__all__ = ["REGISTRY", "Method", "MethodError", "build", "get_class", "names", "check_params",
           "register", "unknown_name_message"]


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


def __getattr__(name: str) -> Any:
    """``REGISTRY``: name -> ``"module:class"`` of every method, built on first use (importing
    the method modules), in :func:`names` order."""
    if name == "REGISTRY":
        return {n: f"{c.__module__}:{c.__qualname__}" for n, c in classes().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
