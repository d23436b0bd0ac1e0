"""The metric registry: name -> kind, the output columns it fills, its default parameters.

``kind`` is ``"model"`` for metrics that need forward passes (run by
:func:`salmap.workers.metrics.engine.compute_model_metrics` inside the model actor) and ``"post"`` for
metrics computed on CPU from the map in original-image pixels
(:func:`salmap.workers.metrics.post.compute_post_metrics`).

Parameter names are unique across metrics unless they mean the same thing everywhere
(``steps``, ``tie_seed``, ``score``, ``curves``), so a caller may pass one flat dict for all
metrics. A per-metric dict ``params[name]`` overrides flat keys for that metric.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Shared by deletion and insertion (RISE protocol, eclique/RISE evaluation.py + Evaluation.ipynb)
_CAUSAL = {
    "steps": 28,  # a count: 1792 px per step at 224*224 (RISE), more on larger inputs
    "score": "softmax",  # "softmax" probability of the target class, or "logit"
    "map_sign": "signed",  # order by the signed map ("signed"), by |map| ("abs") or relu(map)
    "tie_seed": 0,  # ties broken by a fixed random pixel permutation drawn from this seed
    "blur_kernel": 11,  # RISE gkern klen
    "blur_sigma": 5.0,  # RISE gkern nsig
    "curves": False,  # also return the per-sample curves (steps + 1 points)
}

# Region-level deletion / insertion (region.py): patches on a blurred substrate
_REGION = {
    "region_size": 16,  # patch side in input pixels: a 14 x 14 grid at 224 x 224
    "region_steps": 28,  # curve points (7 patches per step at 224 x 224)
    "region_substrate": "blur",  # RISE gkern blur of the image ("zero" / "black" also)
    "score": "softmax",
    "map_sign": "signed",
    "tie_seed": 0,
    "blur_kernel": 11,
    "blur_sigma": 5.0,
    "curves": False,
}

# Grad-CAM++ Average Drop % / Increase in Confidence %
_MULT = {
    "score": "softmax",
    "mult_sign": "relu",  # make the map non-negative: "relu" or "abs"
    "mult_normalize": "minmax",  # "minmax" (pytorch-grad-cam scale_cam_image), "max" or "none"
    "mult_space": "pixel",  # "pixel": E = L * I in [0,1] pixels (paper); "normalized": L * x
}


@dataclass(frozen=True)
class MetricSpec:
    """One metric: how it runs, which output columns it fills and its default parameters."""

    name: str
    kind: str  # "model" | "post"
    columns: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    doc: str = ""
    #: model metrics: forward passes per image from the resolved parameters, for the driver's
    #: cost estimate (:func:`salmap.workers.methods.cost.metric_cost`)
    forwards: Callable[[dict[str, Any]], int] | None = None
    #: metrics with the same non-empty value share their forwards (counted once)
    shares_forwards: str = ""


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "deletion_auc", "model", ("deletion_auc", "deletion_curve"),
            {**_CAUSAL, "deletion_substrate": "zero"},
            "RISE deletion: trapezoid AUC on [0,1] of p_c while the most salient pixels are "
            "replaced by the substrate (lower is better). deletion_curve only with curves=True.",
            forwards=lambda p: int(p["steps"]) + 1,
        ),
        MetricSpec(
            "insertion_auc", "model", ("insertion_auc", "insertion_curve"),
            {**_CAUSAL, "insertion_substrate": "blur"},
            "RISE insertion: AUC of p_c while the most salient pixels are copied from the image "
            "onto the substrate (higher is better).",
            forwards=lambda p: int(p["steps"]) + 1,
        ),
        MetricSpec(
            "region_deletion_auc", "model", ("region_deletion_auc", "region_deletion_curve"),
            dict(_REGION),
            "Region deletion: AUC of p_c while whole patches (region_size px, most salient "
            "mean first) are replaced by the blurred image (lower is better). Compare with a "
            "random patch order, not a per-pixel one (region.py).",
            forwards=lambda p: int(p["region_steps"]) + 1,
        ),
        MetricSpec(
            "region_insertion_auc", "model", ("region_insertion_auc", "region_insertion_curve"),
            dict(_REGION),
            "Region insertion: AUC of p_c while whole patches are copied from the image onto "
            "its blur, most salient first (higher is better).",
            forwards=lambda p: int(p["region_steps"]) + 1,
        ),
        MetricSpec(
            "average_drop", "model", ("average_drop", "confidence_clean", "confidence_masked"),
            dict(_MULT),
            "Grad-CAM++ drop per image, in %: 100*max(0, Y-O)/Y with Y = p_c(image), "
            "O = p_c(map * image); the dataset mean is Average Drop % (lower is better).",
            forwards=lambda p: 1, shares_forwards="masked image",
        ),
        MetricSpec(
            "confidence_increase", "model", ("confidence_increase",),
            dict(_MULT),
            "Grad-CAM++ increase per image: 100 if O > Y else 0; the dataset mean is "
            "Increase in Confidence % (higher is better).",
            forwards=lambda p: 1, shares_forwards="masked image",
        ),
        MetricSpec(
            "road", "model", ("road", "road_morf", "road_lerf", "road_gap"),
            {
                "road_percentiles": (10, 20, 30, 40, 50, 60, 70, 80, 90),
                "road_noise": 0.01,  # std of the noise on imputed values, model-input space
                "road_seed": 0,
                "road_tol": 1e-5,  # relative residual of the conjugate-gradient imputer
                "road_max_iter": 2000,
                "score": "softmax",
                "map_sign": "signed",
                "tie_seed": 0,
            },
            "ROAD Combined (pytorch-grad-cam ROADCombined, exact-count selection): "
            "(mean_p p_c(keep top p%) - mean_p p_c(keep bottom p%)) / 2 with noisy linear "
            "imputation of the removed pixels (higher is better); also its two curves, "
            "road_morf = mean_p p_c(keep bottom p%) (most relevant removed first; lower is "
            "better), road_lerf = mean_p p_c(keep top p%) (higher is better) and road_gap = "
            "road_lerf - road_morf (= 2 road; higher is better). On demand: 2P imputations.",
            forwards=lambda p: 2 * len(p["road_percentiles"]),
        ),
        MetricSpec(
            "pointing_game", "post", ("pointing_hit",),
            {"pointing_tolerance": 15.0},
            "TorchRay pointing game: the map's argmax lies within 15 px (strict) of a GT box "
            "of the class, in original pixels. None without boxes or when every box of the "
            "class is flagged difficult (VOC).",
        ),
        MetricSpec(
            "energy_pointing", "post", ("energy_pointing",),
            {"energy_sign": "relu"},
            "Score-CAM energy pointing game: share of the non-negative map's energy inside "
            "the union of the class's GT boxes. None without boxes or for an all-zero map.",
        ),
        MetricSpec(
            "gini", "post", ("gini",),
            {"gini_eps": 1e-7},
            "Quantus Sparseness: Gini index of |map| / max|map| (+eps), in [0, 1), on the map "
            "over the model input at the input's resolution (not the original-pixel map).",
        ),
        MetricSpec(
            "pseudo_box", "post", ("pseudo_box",),
            {"pseudo_threshold": 0.2, "largest_component": True},
            "CAM-style box: foreground = relu(map) > threshold * max (or Otsu with "
            "threshold='otsu'), largest 8-connected component, bounding box in original "
            "pixels (x1, y1 exclusive). None for a map without positive values.",
        ),
        MetricSpec(
            "pseudo_mask", "post", ("pseudo_mask_png",),
            {"pseudo_threshold": 0.2, "largest_component": True},
            "The pseudo-label foreground as a 1-bit PNG at the original size.",
        ),
        MetricSpec(
            "box_iou", "post", ("box_iou",),
            {"pseudo_threshold": 0.2, "largest_component": True},
            "IoU of the pseudo box with the best-matching GT box of the class. None without "
            "boxes; 0 when the map gives no pseudo box.",
        ),
    )
}


class MetricError(ValueError):
    """Unknown metric, wrong kind or bad parameter (the message names it)."""


def _unknown(name: str, options: list[str], what: str) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {name!r}{hint}; known: {', '.join(options)}"


def get_spec(name: str, kind: str | None = None) -> MetricSpec:
    """The spec of ``name``; raise :class:`MetricError` if unknown or not of ``kind``."""
    if name not in METRICS:
        raise MetricError(_unknown(name, list(METRICS), "metric"))
    spec = METRICS[name]
    if kind is not None and spec.kind != kind:
        raise MetricError(f"metric {name!r} is a {spec.kind!r} metric, not a {kind!r} metric")
    return spec


def names(kind: str | None = None) -> list[str]:
    """Registered metric names, optionally only those of one kind."""
    return [n for n, s in METRICS.items() if kind is None or s.kind == kind]


def resolve_params(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults of ``name`` updated by the flat keys of ``params`` it knows and by
    ``params[name]`` (a dict) if present. Raise on a key no metric knows, or on a key in
    ``params[name]`` that this metric does not take."""
    spec = get_spec(name)
    params = dict(params or {})
    own = params.pop(name, None) or {}
    known_flat = {k for s in METRICS.values() for k in s.defaults} | set(METRICS)
    out = dict(spec.defaults)
    for key, value in params.items():
        if key not in known_flat:
            raise MetricError(_unknown(key, sorted(known_flat), "metric parameter"))
        if key in spec.defaults:
            out[key] = value
    for key, value in dict(own).items():
        if key not in spec.defaults:
            raise MetricError(f"metric {name!r}: " + _unknown(key, sorted(spec.defaults), "parameter"))
        out[key] = value
    return out


# One pseudo-label, three views of it: a parameter set on any of these applies to all three, so
# that box_iou always scores the box written in pseudo_box.
PSEUDO_LABEL_GROUP = ("pseudo_box", "pseudo_mask", "box_iou")


def per_metric_params(specs: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """A config's ``{metric: params}`` in the nested form :func:`resolve_params` reads, each
    metric keeping its own parameters (``deletion_auc: {steps: 56}`` leaves insertion alone),
    except that the pseudo-label group shares its parameters."""
    shared: dict[str, Any] = {}
    for name in PSEUDO_LABEL_GROUP:
        shared.update(specs.get(name) or {})
    out: dict[str, dict[str, Any]] = {}
    for name, params in specs.items():
        own = dict(params or {})
        if name in PSEUDO_LABEL_GROUP:
            own = {**shared, **own}
        out[name] = own
    return out


def check_params(specs: dict[str, dict[str, Any]]) -> None:
    """Validate a config's ``{metric name: params}``; raise :class:`MetricError` naming the key."""
    for name, params in specs.items():
        resolve_params(name, {name: params or {}})


def protocol(names: list[str], params: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The fully resolved parameters of each metric, to store next to the numbers (substrate,
    steps, score, tie seed, map sign, multiplication space, thresholds, ...)."""
    return {name: resolve_params(name, params) for name in names}
