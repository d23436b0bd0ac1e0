"""Model metrics entry point: every requested metric of a batch in shared, chunked forwards."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# the modules whose planners register themselves (``@planner(name)``) in jobs.PLANNERS
from . import average_drop, faithfulness, region, road  # noqa: F401
from .jobs import PLANNERS, Context, run_groups
from .registry import MetricError, get_spec, resolve_params

NOTES = "_notes"  # per-sample remarks, not a column


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, h, w]`` -> ``[B, H, W]`` float32, bilinear, align_corners=False."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]


def compute_model_metrics(
    names: Sequence[str],
    forward: Callable[[Tensor], Tensor],
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    params: dict[str, Any] | None = None,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    max_batch: int = 64,
    progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Compute the model metrics ``names`` for one batch.

    Args:
        names: model metrics (``deletion_auc``, ``insertion_auc``, ``average_drop``,
            ``confidence_increase``, ``road``); see :data:`salmap.workers.metrics.METRICS`.
        forward: model-input batch -> float32 logits ``[N, classes]`` (eval mode; called
            under ``torch.inference_mode``).
        images: ``[B, 3, H, W]`` model-normalised input, on the model's device.
        maps: ``[B, h, w]`` raw saliency at native resolution; upsampled here (bilinear,
            align_corners=False) to ``H x W``.
        targets: ``[B]`` int64, the explained class of each sample.
        params: flat options and/or per-metric dicts (``{"deletion_auc": {...}}``), see
            :func:`salmap.workers.metrics.registry.resolve_params`.
        mean, std: the model's input normalisation (for pixel-space substrates/products).
        max_batch: the most images per forward (memory budget); jobs of all samples, steps
            and metrics share chunks.
        progress: told the fraction (0..1) of the forwards done after each one.

    Returns:
        column -> per-sample float32 CPU tensor ``[B]`` (``deletion_auc``, ``insertion_auc``,
        ``average_drop``, ``confidence_clean``, ``confidence_masked``,
        ``confidence_increase``, ``road``), plus ``deletion_curve`` / ``insertion_curve``
        (list of per-sample lists of ``steps + 1`` floats) when ``curves`` is true, and
        ``_notes``: one string per sample, what the numbers should be read with (e.g. a
        constant map in average drop), "" when nothing. Samples whose map has a non-finite
        value get NaN (curves: None).
    """
    names = list(dict.fromkeys(names))
    for name in names:
        get_spec(name, "model")
    if images.dim() != 4 or maps.dim() != 3 or maps.shape[0] != images.shape[0]:
        raise MetricError(
            f"expected images [B,3,H,W] and maps [B,h,w] with the same B, got "
            f"{tuple(images.shape)} and {tuple(maps.shape)}"
        )
    device = images.device
    targets = torch.as_tensor(targets, device=device).long().reshape(-1)
    if targets.numel() != images.shape[0]:
        raise MetricError(f"got {images.shape[0]} images but {targets.numel()} targets")
    if not names:
        return {}
    maps = maps.to(device)
    bad = ~torch.isfinite(maps).flatten(1).all(1)
    saliency = upsample_maps(maps.nan_to_num(0.0, 0.0, 0.0), tuple(images.shape[-2:]))
    shape = (1, -1, 1, 1)
    ctx = Context(
        images=images,
        saliency=saliency,
        targets=targets,
        mean=torch.tensor(mean, dtype=torch.float32, device=device).view(shape),
        std=torch.tensor(std, dtype=torch.float32, device=device).view(shape),
    )
    plans = [PLANNERS[name](ctx, resolve_params(name, params)) for name in names]
    scores = run_groups([g for p in plans for g in p.groups], forward, targets, max_batch,
                        progress)
    out: dict[str, Any] = {}
    notes = [[] for _ in range(images.shape[0])]
    for plan in plans:
        done = plan.finish(scores)
        for i, note in enumerate(done.pop(NOTES, [])):
            if note and note not in notes[i]:
                notes[i].append(note)
        out.update(done)
    out[NOTES] = ["; ".join(n) for n in notes]
    if bool(bad.any()):
        bad_list = bad.cpu().tolist()
        for key, value in out.items():
            if key == NOTES:
                continue
            if isinstance(value, Tensor):
                value[bad.cpu()] = float("nan")
            else:
                out[key] = [None if flag else v for v, flag in zip(value, bad_list)]
    return out
