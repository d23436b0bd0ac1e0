"""Expected work per image of a method, from its parameters: what the driver uses to give each
unit a share of the devices in proportion to its work (:mod:`salmap.pipeline.cluster`).

The unit is one forward + one backward pass of the model (``F+B``); a forward alone counts
:data:`FORWARD` (a backward costs about two forwards). Each method class carries its formula
(``Method.work_per_image``, following its declared ``cost``, README "Methods"); the parameter
values come from the job's ``params`` over the defaults of the method's constructor, read from
its signature, so a changed default changes the estimate with it. These are estimates for
sharing devices, not timings: the driver refines them with the rates measured in earlier
drivers of the run.
"""

from __future__ import annotations

from typing import Any

from .base import FORWARD
from .registry import get_class, lookup

__all__ = ["FORWARD", "defaults", "method_cost", "metric_cost", "unit_cost"]


def defaults(name: str) -> dict[str, Any]:
    """The method's constructor defaults (name -> value), from its signature."""
    return get_class(name).defaults()


def method_cost(name: str, params: dict[str, Any] | None = None, **known: Any) -> float:
    """Work per image and target of method ``name`` with ``params``, in F+B units.

    ``known``: facts about the model the formula may use (``channels``: the target layer's
    channel count, for Score-CAM)."""
    cls = lookup(name)
    if cls is None or cls.work_per_image is None:
        raise KeyError(f"no cost formula for method {name!r}")
    resolved = {**cls.defaults(), **dict(params or {}), **known}
    return float(cls.work_per_image(resolved))


def metric_cost(specs: dict[str, dict]) -> float:
    """Work per image of the model-side metrics (``{name: params}``), in F+B units: forward
    passes only, as each metric's spec counts them (``MetricSpec.forwards``: deletion and
    insertion ``steps + 1`` each, ROAD two per percentile, Average Drop and Increase in
    Confidence one masked forward together)."""
    from salmap.workers.metrics import METRICS

    forwards = 0
    shared: dict[str, int] = {}
    for name, params in specs.items():
        spec = METRICS.get(name)
        if spec is None or spec.kind != "model" or spec.forwards is None:
            continue
        n = spec.forwards({**spec.defaults, **dict(params or {})})
        if spec.shares_forwards:
            shared[spec.shares_forwards] = max(n, shared.get(spec.shares_forwards, 0))
        else:
            forwards += n
    return (forwards + sum(shared.values())) * FORWARD


def unit_cost(method: str, params: dict[str, Any] | None, metrics: dict[str, dict] | None = None,
              **known: Any) -> float:
    """Work per image of a unit: the prediction forward, the method and the model metrics."""
    return FORWARD + method_cost(method, params, **known) + metric_cost(metrics or {})
