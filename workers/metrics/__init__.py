"""Saliency-map metrics: a registry (:data:`METRICS`: name -> kind, columns, defaults) and two
entry points.

* ``kind == "model"`` (forward passes, run in the model actor on its device):
  :func:`compute_model_metrics` ``(names, forward, images, maps, targets, params, mean, std,
  max_batch) -> {column: Tensor[B] | list}``; deletion/insertion AUC, average drop,
  confidence increase, ROAD.
* ``kind == "post"`` (CPU, numpy, one row at a time, map already in original pixels):
  :func:`compute_post_metrics` ``(names, saliency_orig, boxes, params) -> {column: value}``;
  pointing game, energy pointing game, Gini, pseudo box / mask, box IoU.

Helpers: :mod:`.geometry` (maps and boxes between original pixels and the model input),
:mod:`.randomization` (model-parameter randomization sanity check, tie-aware Spearman),
:mod:`.summary` (bootstrap intervals, class-mean pointing accuracy, Win %).
"""

from __future__ import annotations

from .engine import compute_model_metrics
from .post import compute_post_metrics
from .registry import (
    METRICS,
    MetricError,
    MetricSpec,
    check_params,
    get_spec,
    names,
    protocol,
    resolve_params,
)

__all__ = [
    "METRICS",
    "MetricError",
    "MetricSpec",
    "check_params",
    "compute_model_metrics",
    "compute_post_metrics",
    "get_spec",
    "names",
    "protocol",
    "resolve_params",
]
