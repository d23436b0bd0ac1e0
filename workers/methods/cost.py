"""Expected work per image of a method, from its parameters: what the driver uses to give each
unit a share of the devices in proportion to its work (:mod:`salmap.pipeline.cluster`).

The unit is one forward + one backward pass of the model (``F+B``); a forward alone counts
:data:`FORWARD` (a backward costs about two forwards). The formulas follow each method's
declared ``cost`` (``Method.cost``, README "Methods"); the parameter values come from the
job's ``params`` over the defaults of the method's constructor, read from its signature, so a
changed default changes the estimate with it. These are estimates for sharing devices, not
timings: the driver refines them with the rates measured in earlier drivers of the run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

FORWARD = 1.0 / 3.0  # one forward pass, in F+B units
#: Score-CAM does one forward per channel of its target layer; the driver does not build the
#: model to count them, so it assumes this many (ResNet-18/34 layer4; ResNet-50 has 2048)
ASSUMED_CHANNELS = 512


def defaults(name: str) -> dict[str, Any]:
    """The method's constructor defaults (name -> value), from its signature."""
    from . import get_class

    sig = inspect.signature(get_class(name).__init__)
    return {k: p.default for k, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty}


def _n(value: Any) -> int:
    return len(value) if value is not None and hasattr(value, "__len__") else 0


# name -> work per image in F+B units, given the resolved parameters
FORMULAS: dict[str, Callable[[dict[str, Any]], float]] = {
    "gradient": lambda p: 1.0,
    "gradient_x_input": lambda p: 1.0,
    "guided_backprop": lambda p: 1.0,
    # the k-th value per activation call adds about a fifth of a backward (measured order)
    "rectgrad": lambda p: 1.2,
    "nobias_rectgrad": lambda p: 1.2,
    # each conv backward recomputes its forward and runs two all-ones convs: ~2 backwards
    "tsgb": lambda p: FORWARD + 2 * (1 - FORWARD),
    # CAM family: a forward and a backward that stops at the target layer (~ a forward)
    "gradcam": lambda p: FORWARD,
    "gradcam_pp": lambda p: FORWARD,
    "layercam": lambda p: FORWARD,
    "scorecam": lambda p: (1 + int(p.get("channels", ASSUMED_CHANNELS))) * FORWARD,
    "smoothgrad": lambda p: float(p["nsamples"]),
    "integrated_gradients": lambda p: float(p["steps"]),
    # 1 F + steps x (2 masked backwards with create_graph + 1 double backward ~ 2 B) + 3 B
    "dmbp": lambda p: FORWARD + (1 - FORWARD) * (4 * int(p["steps"]) + 3),
    # stages x (1 F + steps x (#benchmark + #auxiliary masks) x (F + B)) + 2 F
    "hdm": lambda p: int(p["stages"]) * (
        FORWARD + int(p["steps"]) * (_n(p["benchmark_sizes"]) + _n(p["auxiliary_sizes"])))
    + 2 * FORWARD,
}


def method_cost(name: str, params: dict[str, Any] | None = None, **known: Any) -> float:
    """Work per image and target of method ``name`` with ``params``, in F+B units.

    ``known``: facts about the model the formula may use (``channels``: the target layer's
    channel count, for Score-CAM)."""
    if name not in FORMULAS:
        raise KeyError(f"no cost formula for method {name!r}")
    resolved = {**defaults(name), **dict(params or {}), **known}
    return float(FORMULAS[name](resolved))


def metric_cost(specs: dict[str, dict]) -> float:
    """Work per image of the model-side metrics (``{name: params}``), in F+B units: forward
    passes only (deletion and insertion ``steps + 1`` each, ROAD two per percentile, Average
    Drop and Increase in Confidence one masked forward together)."""
    from salmap.workers.metrics import METRICS

    forwards = 0
    masked = False
    for name, params in specs.items():
        spec = METRICS.get(name)
        if spec is None or spec.kind != "model":
            continue
        p = {**spec.defaults, **dict(params or {})}
        if name in ("deletion_auc", "insertion_auc"):
            forwards += int(p["steps"]) + 1
        elif name in ("region_deletion_auc", "region_insertion_auc"):
            forwards += int(p["region_steps"]) + 1
        elif name == "road":
            forwards += 2 * len(p["road_percentiles"])
        elif name in ("average_drop", "confidence_increase"):
            masked = True
    return (forwards + masked) * FORWARD


def unit_cost(method: str, params: dict[str, Any] | None, metrics: dict[str, dict] | None = None,
              **known: Any) -> float:
    """Work per image of a unit: the prediction forward, the method and the model metrics."""
    return FORWARD + method_cost(method, params, **known) + metric_cost(metrics or {})
