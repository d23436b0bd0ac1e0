"""The method registry: a method class is named by a decorator next to its definition.

    @register("gradcam")
    class GradCAM(CAMMethod): ...

:data:`MODULES` lists the files that hold methods, in the order :func:`names` lists them;
they are imported on first use, each on its own, so a method whose module fails to import
(a missing optional dependency) never blocks the rest. This module imports no method module
at the top, so any method file, ``compat`` and ``cost`` can import it.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .errors import MethodError

if TYPE_CHECKING:
    from .base import Method

T = TypeVar("T", bound=type)

#: the modules of salmap.workers.methods that register methods, in listing order
MODULES = (
    "gradient", "gradient_x_input", "smoothgrad", "integrated_gradients", "guided_backprop",
    "gradcam", "gradcam_pp", "scorecam", "layercam", "rectgrad", "nobias_rectgrad", "tsgb",
    "dmbp", "hdm",
)

_CLASSES: dict[str, type[Method]] = {}  # name -> class, as registered
_BROKEN: dict[str, str] = {}  # module -> why it did not import
_loaded = False


def register(name: str) -> Callable[[T], T]:
    """Register the decorated method class under ``name`` (and set its ``name``)."""

    def decorate(cls: T) -> T:
        known = _CLASSES.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is taken by {known.__qualname__}")
        cls.name = name  # type: ignore[attr-defined]
        _CLASSES[name] = cls  # type: ignore[assignment]
        return cls

    return decorate


def _import(module: str) -> None:
    try:
        importlib.import_module(f"{__package__}.{module}")
    except Exception as err:  # noqa: BLE001 - one broken method must not hide the rest
        _BROKEN[module] = f"{type(err).__name__}: {err}"


def classes() -> dict[str, type[Method]]:
    """Every registered method class by name, in :data:`MODULES` order (imports them once)."""
    global _loaded
    if not _loaded:
        for module in MODULES:
            _import(module)
        _loaded = True
    order = {f"{__package__}.{m}": i for i, m in enumerate(MODULES)}
    ranked = sorted(_CLASSES.items(), key=lambda kv: order.get(kv[1].__module__, len(order)))
    return dict(ranked)


def names() -> list[str]:
    """Every registered method name."""
    return list(classes())


def unknown_name_message(name: str) -> str:
    """Why ``name`` is no method, with the nearest known name (and modules that failed)."""
    close = difflib.get_close_matches(name, names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    broken = "".join(f"; module {m} did not import ({why})" for m, why in _BROKEN.items())
    return f"unknown method {name!r}{hint}; known methods: {', '.join(names())}{broken}"


def lookup(name: str) -> type[Method] | None:
    """The class registered under ``name``, or None. A method's module is named as the method,
    so that module is imported first: an actor imports its own method, not all of them."""
    if name not in _CLASSES and name in MODULES:
        _import(name)
    return _CLASSES.get(name) or classes().get(name)


def get_class(name: str) -> type[Method]:
    """The class registered under ``name``."""
    found = lookup(name)
    if found is None:
        raise MethodError(unknown_name_message(name))
    return found
