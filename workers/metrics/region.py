"""Region-level deletion and insertion: whole patches, not scattered pixels, on a blurred
substrate.

Why: pixel-level deletion (RISE, ``faithfulness.py``) replaces scattered pixels, which pushes
an image off the data distribution so fast that a high-frequency or random order, or a
centred blob that knows nothing of the model, can score as "faithful" (Hooker et al. 2019,
ROAR; Rong et al. 2022, ROAD). Here the map is averaged over square patches of
``region_size`` input pixels (a ``ceil(H/p) x ceil(W/p)`` grid; border patches may be
smaller) and the patches are replaced in order of their mean value, most salient first; the
substrate is the RISE Gaussian blur of the image (k=11, sigma=5) for both curves, so a removed
patch keeps its colour and low frequencies and the curve measures the loss of the patch's
detail, not the shock of a grey hole. Compare with a random order AT THE SAME GRANULARITY
(a random patch order: the patch means of a uniform-noise map), never with a per-pixel one.

Point i of a curve has the first ``floor(i * P / steps)`` of the P patches changed; exact ties
between patch means are broken by a fixed random permutation of the patches (``tie_seed``), the
same for every sample. Deletion AUC: lower is better; insertion AUC: higher is better; AUC by
the trapezoid rule on [0, 1]. Cost per image: ``steps`` forwards per curve plus the clean
forward shared with the other model metrics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .faithfulness import apply_sign, curve_finish, substrate, tie_permutation
from .jobs import Context, JobGroup, Plan, planner
from .registry import MetricError


def region_grid(h: int, w: int, size: int) -> tuple[int, int, Tensor]:
    """``(rows, cols, index [H*W])``: the patch index of every pixel on a grid of
    ``size``-pixel squares (row-major)."""
    if size < 1:
        raise MetricError(f"region_size must be >= 1, got {size}")
    rows, cols = math.ceil(h / size), math.ceil(w / size)
    ys = torch.arange(h) // size
    xs = torch.arange(w) // size
    return rows, cols, (ys.view(-1, 1) * cols + xs.view(1, -1)).flatten()


def region_ranks(saliency: Tensor, size: int, tie_seed: int = 0) -> tuple[Tensor, Tensor]:
    """``[B, H, W]`` maps -> ``(ranks [B, P], pixel_region [H*W])``: rank of each patch by its
    mean value (0 = most salient; exact ties by a seeded permutation of the patches, NaN
    last) and the patch of every pixel."""
    b, h, w = saliency.shape
    rows, cols, index = region_grid(h, w, int(size))
    means = F.avg_pool2d(saliency.unsqueeze(1).float(), size, stride=size, ceil_mode=True)
    # avg_pool2d with ceil_mode averages border patches over their real pixels (no padding)
    flat = means.flatten(1).nan_to_num(nan=float("-inf"))
    n = rows * cols
    if flat.shape[1] != n:  # pragma: no cover - avg_pool2d's grid equals ours
        raise MetricError(f"region grid mismatch: {flat.shape[1]} vs {n}")
    perm = tie_permutation(n, tie_seed, flat.device)
    order = perm[torch.sort(flat[:, perm], dim=1, descending=True, stable=True).indices]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=flat.device).expand(b, n))
    return ranks, index.to(saliency.device)


def plan_region_curve(ctx: Context, params: dict[str, Any], kind: str) -> Plan:
    """Jobs and reduction for ``kind`` = "deletion" | "insertion" over patches."""
    steps = int(params["region_steps"])
    if steps < 1:
        raise MetricError(f"region_steps must be >= 1, got {steps}")
    size = int(params["region_size"])
    sub_name = params["region_substrate"]
    _, _, h, w = ctx.images.shape
    ranks, pixel_region = ctx.cached(
        ("region_ranks", params["map_sign"], size, int(params["tie_seed"])),
        lambda: region_ranks(apply_sign(ctx.saliency, params["map_sign"]), size,
                             int(params["tie_seed"])))
    n_regions = ranks.shape[1]
    counts = torch.tensor([i * n_regions // steps for i in range(steps + 1)],
                          device=ctx.images.device)
    sub = substrate(ctx, sub_name, params["blur_kernel"], params["blur_sigma"])
    images = ctx.images
    b = ctx.batch
    points = torch.arange(1, steps + 1) if kind == "deletion" else torch.arange(0, steps)
    points = points.to(images.device)
    samples = torch.arange(b, device=images.device).repeat_interleave(steps)
    job_points = points.repeat(b)

    def render(j: Tensor) -> Tensor:
        s = samples[j]
        pixel_rank = ranks[s][:, pixel_region]  # [n, H*W]
        changed = (pixel_rank < counts[job_points[j]].view(-1, 1)).view(-1, 1, h, w)
        if kind == "deletion":
            return torch.where(changed, sub[s], images[s])
        return torch.where(changed, images[s], sub[s])

    key = ("region_" + kind, steps, size, params["map_sign"], int(params["tie_seed"]), sub_name,
           int(params["blur_kernel"]), float(params["blur_sigma"]))
    return Plan([ctx.clean_group(), JobGroup(key, samples, render)],
                curve_finish(key, kind, f"region_{kind}", b, steps, params))


@planner("region_deletion_auc")
def plan_region_deletion(ctx: Context, params: dict[str, Any]) -> Plan:
    """Region deletion's jobs: patches replaced by the substrate, most salient first."""
    return plan_region_curve(ctx, params, "deletion")


@planner("region_insertion_auc")
def plan_region_insertion(ctx: Context, params: dict[str, Any]) -> Plan:
    """Region insertion's jobs: patches copied onto the substrate, most salient first."""
    return plan_region_curve(ctx, params, "insertion")
