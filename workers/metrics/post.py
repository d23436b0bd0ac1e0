"""Post metrics entry point: CPU, numpy, one row at a time.

Two frames: the pointing games and the pseudo labels work on the map in original-image pixels
(the GT boxes' frame); map-only statistics (Gini) work on the map over the model input, at the
input's resolution, so that the part of the photo the model never saw (outside the centre
crop, zero in the original-pixel map) does not count and the value does not depend on the
photo's aspect ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .pointing import energy_pointing, pointing_hit
from .pseudo_labels import best_iou, foreground, mask_box, mask_png
from .registry import MetricError, get_spec, resolve_params
from .sparseness import gini


def compute_post_metrics(
    names: Sequence[str],
    saliency_orig: np.ndarray,
    boxes: Sequence[Sequence[float]] | None,
    params: dict[str, Any] | None = None,
    *,
    saliency_input: np.ndarray | None = None,
    difficult: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Compute the post metrics ``names`` for one map.

    Args:
        names: post metrics: ``pointing_game``, ``energy_pointing``, ``gini``,
            ``pseudo_box``, ``pseudo_mask``, ``box_iou``.
        saliency_orig: ``float32 [H0, W0]`` raw map in original-image pixels
            (:func:`salmap.workers.metrics.geometry.map_to_original`).
        boxes: GT boxes of the explained class, ``[x0, y0, x1, y1]`` in original pixels
            (continuous edges, x1/y1 exclusive), or None when the dataset has none.
        params: flat options and/or per-metric dicts (see the registry defaults).
        saliency_input: the same map over the model input at the input's resolution
            (:func:`salmap.workers.metrics.geometry.map_to_input`); required by ``gini``.
        difficult: one flag per box (VOC ``difficult``): the pointing game skips the trial
            (None) when every box is difficult, as TorchRay does on VOC; the other metrics use
            every box.

    Returns:
        The requested columns only: ``pointing_hit`` (bool | None), ``energy_pointing``
        (float | None), ``gini`` (float), ``pseudo_box`` (``{x0, y0, x1, y1}`` | None),
        ``pseudo_mask_png`` (bytes, 1-bit PNG of size H0 x W0), ``box_iou`` (float | None).
    """
    sal = np.asarray(saliency_orig, dtype=np.float32)
    if sal.ndim != 2:
        raise MetricError(f"saliency_orig must be [H0, W0], got shape {sal.shape}")
    gt = [list(map(float, b)) for b in boxes] if boxes is not None else None
    out: dict[str, Any] = {}
    masks: dict[tuple, np.ndarray] = {}

    def fg(p: dict[str, Any]) -> np.ndarray:
        key = (str(p["pseudo_threshold"]), bool(p["largest_component"]))
        if key not in masks:
            masks[key] = foreground(sal, p["pseudo_threshold"], bool(p["largest_component"]))
        return masks[key]

    for name in dict.fromkeys(names):
        get_spec(name, "post")
        p = resolve_params(name, params)
        if name == "pointing_game":
            out["pointing_hit"] = pointing_hit(sal, gt, float(p["pointing_tolerance"]),
                                               difficult)
        elif name == "energy_pointing":
            out["energy_pointing"] = energy_pointing(sal, gt, p["energy_sign"])
        elif name == "gini":
            out["gini"] = gini(_input_map(saliency_input), float(p["gini_eps"]))
        elif name == "pseudo_box":
            out["pseudo_box"] = mask_box(fg(p))
        elif name == "pseudo_mask":
            out["pseudo_mask_png"] = mask_png(fg(p))
        elif name == "box_iou":
            out["box_iou"] = best_iou(mask_box(fg(p)), gt)
    return out


def _input_map(saliency_input: np.ndarray | None) -> np.ndarray:
    if saliency_input is None:
        raise MetricError("gini needs saliency_input, the map over the model input "
                          "(workers.metrics.geometry.map_to_input)")
    m = np.asarray(saliency_input, dtype=np.float32)
    if m.ndim != 2:
        raise MetricError(f"saliency_input must be [H, W], got shape {m.shape}")
    return m
