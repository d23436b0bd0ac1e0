"""Average Drop % and Increase in Confidence % (Grad-CAM++, Chattopadhyay et al. 2018).

For each image: Y = p_c(image), O = p_c(explanation image), with the explanation image
E = L * I, L the map upsampled bilinearly to the input size, made non-negative
(``mult_sign``: ReLU by default) and min-max scaled to [0, 1] per image, (L - min) / (max - min)
(pytorch-grad-cam ``scale_cam_image`` adds 1e-7 to the denominator: a relative difference
below 1e-7 on maps of magnitude 1, but it shrinks maps of magnitude 1e-7 and below, e.g. small
gradients, toward 0; here the scaling is exact, so the metric is invariant to the map's scale).

``mult_space`` fixes where the product happens (record it with the numbers):
``"pixel"`` (default, the paper's E = L * I on the [0, 1] image, so L = 0 is black) computes
``normalize(unnormalize(x) * L) = x * L + (L - 1) * mean / std``, which is exact at L = 1;
``"normalized"`` (pytorch-grad-cam ``multiply_tensor_with_cam``) multiplies the model input,
so L = 0 gives the mean colour.

Per-image columns: ``average_drop`` = 100 * max(0, Y - O) / Y (the dataset mean is
Average Drop %), ``confidence_increase`` = 100 if O > Y (strict) else 0 (the mean is
Increase in Confidence %), and Y, O as ``confidence_clean`` / ``confidence_masked`` so that
Win % and other aggregates can be recomputed offline. A map that is constant after
``mult_sign`` explains nothing: min-max scaling turns it into all zeros (the fully masked
image, a large drop), max scaling into all ones (the image itself, no drop); such samples
get a note in ``_notes`` (the row's ``error`` text). Cost: 1 forward per image plus the clean
forward shared with deletion/insertion.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .faithfulness import apply_sign
from .jobs import CLEAN, Context, JobGroup, Plan, planner, score_index
from .registry import MetricError

NORMALIZE = ("minmax", "max", "none")
SPACES = ("pixel", "normalized")


def scale_map(saliency: Tensor, sign: str, normalize: str) -> Tensor:
    """``[B, H, W]`` -> the multiplier L ``[B, H, W]`` (non-negative, scaled per image)."""
    if sign not in ("relu", "abs"):
        raise MetricError(f"mult_sign must be 'relu' or 'abs', got {sign!r}")
    if normalize not in NORMALIZE:
        raise MetricError(f"mult_normalize must be one of {', '.join(NORMALIZE)}, "
                          f"got {normalize!r}")
    m = apply_sign(saliency, sign)
    if normalize == "none":
        return m
    flat = m.flatten(1)
    hi = flat.amax(1).view(-1, 1, 1)
    lo = flat.amin(1).view(-1, 1, 1) if normalize == "minmax" else torch.zeros_like(hi)
    # exact scaling: a map of any magnitude (even 1e-9) reaches 1; a flat map gives 0 / tiny = 0
    return (m - lo) / (hi - lo).clamp_min(torch.finfo(m.dtype).tiny)


def explanation_images(x: Tensor, scale: Tensor, space: str, mean: Tensor, std: Tensor) -> Tensor:
    """E = L * I in the chosen space, returned in model-input space."""
    scale = scale.unsqueeze(1).to(x.dtype)
    if space == "normalized":
        return x * scale
    if space == "pixel":
        return x * scale + (scale - 1) * (mean / std).to(x.dtype)
    raise MetricError(f"mult_space must be one of {', '.join(SPACES)}, got {space!r}")


def _masked_group(ctx: Context, params: dict[str, Any]) -> tuple[JobGroup, Tensor]:
    """The explanation-image jobs (one per sample) and the multipliers L ``[B, H, W]``."""
    sign, norm, space = params["mult_sign"], params["mult_normalize"], params["mult_space"]
    if space not in SPACES:
        raise MetricError(f"mult_space must be one of {', '.join(SPACES)}, got {space!r}")
    scale = ctx.cached(("mult_scale", sign, norm), lambda: scale_map(ctx.saliency, sign, norm))
    images = ctx.images

    def render(j: Tensor) -> Tensor:
        return explanation_images(images[j], scale[j], space, ctx.mean, ctx.std)

    key = ("mult", sign, norm, space)
    return JobGroup(key, torch.arange(ctx.batch, device=images.device), render), scale


def _constant_notes(scale: Tensor) -> list[str]:
    """One note per sample whose multiplier L is the same at every pixel, else ""."""
    flat = scale.flatten(1)
    lo, hi = flat.amin(1).tolist(), flat.amax(1).tolist()
    return [f"average_drop: constant map (the explanation image is {a:.3g} x the image)"
            if a == b else "" for a, b in zip(lo, hi)]


def _y_o(scores: dict, group: JobGroup, scale: Tensor, params: dict[str, Any]
         ) -> tuple[Tensor, Tensor]:
    """Y and O; O is set to Y exactly where the multiplier is all ones (the explanation image
    is the image), so float noise between batch compositions cannot fake an increase."""
    col = score_index(params)
    y, o = scores[CLEAN][:, col], scores[group.key][:, col]
    identical = (scale == 1).flatten(1).all(1)
    return y, torch.where(identical, y, o)


@planner("average_drop")
def plan_average_drop(ctx: Context, params: dict[str, Any]) -> Plan:
    """Average Drop's jobs: the clean and the map-masked image of each sample."""
    group, scale = _masked_group(ctx, params)
    score_index(params)  # fail on a bad score name before any forward

    def finish(scores: dict) -> dict[str, Any]:
        y, o = _y_o(scores, group, scale, params)
        drop = 100.0 * (y - o).clamp_min(0) / y
        return {
            "average_drop": drop.cpu(),
            "confidence_clean": y.cpu(),
            "confidence_masked": o.cpu(),
            "_notes": _constant_notes(scale),
        }

    return Plan([ctx.clean_group(), group], finish)


@planner("confidence_increase")
def plan_confidence_increase(ctx: Context, params: dict[str, Any]) -> Plan:
    """Increase in Confidence's jobs: the clean and the map-masked image (shared with Average Drop)."""
    group, scale = _masked_group(ctx, params)
    score_index(params)  # fail on a bad score name before any forward

    def finish(scores: dict) -> dict[str, Any]:
        y, o = _y_o(scores, group, scale, params)
        return {"confidence_increase": (100.0 * (o > y)).cpu(),
                "_notes": _constant_notes(scale)}

    return Plan([ctx.clean_group(), group], finish)
