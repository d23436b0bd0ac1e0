"""Deletion and insertion AUC (RISE, Petsiuk et al. 2018), batched across images and steps.

Protocol (defaults from eclique/RISE ``evaluation.py`` and ``Evaluation.ipynb``):

* pixels are ranked by the map (upsampled bilinearly to the input size; signed by default),
  most salient first; exact ties are broken by a fixed random pixel permutation drawn from
  ``tie_seed`` (lexicographic sort on (value, permutation), i.e. an infinitesimal jitter that
  never reorders distinct values and is the same for every sample, so a sample's result does
  not depend on its batch position);
* ``steps`` equal steps (default 28 = 1792 px per step at 224 x 224); point i has the first
  ``floor(i * H * W / steps)`` pixels (all channels) replaced: deletion puts the substrate
  there, insertion puts the image there on top of the substrate. ``steps`` is a count, not a
  step size: the pixels per step grow with the input (5,266 at 384 x 384), and the AUC's x
  axis is always the fraction of the image. Scale ``steps`` with H * W to keep RISE's step
  size (e.g. 82 at 384 x 384);
* the score is the softmax probability of the explained class (``score="logit"`` for logits);
* AUC = trapezoid rule on an x axis scaled to [0, 1]: (sum - first/2 - last/2) / steps;
* substrates (model-input space): ``"zero"`` = 0 in normalised space, i.e. the mean colour
  (RISE deletion default); ``"black"`` = 0 in [0, 1] pixel space; ``"blur"`` = RISE
  ``gkern`` Gaussian (k=11, sigma=5, tails folded back by reflection) applied depthwise with
  zero padding (RISE insertion default).

Cost per image: ``steps`` forwards per curve plus one clean forward shared by both curves
(and by average drop): 57 distinct forwards for both curves at 28 steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .jobs import CLEAN, Context, JobGroup, Plan, planner, score_index
from .registry import MetricError

SUBSTRATES = ("zero", "black", "blur")
MAP_SIGNS = ("signed", "abs", "relu")


def auc(curve: Tensor) -> Tensor:
    """Trapezoid area of equally spaced points on [0, 1]: ``curve[..., n + 1] -> [...]``."""
    n = curve.shape[-1] - 1
    if n < 1:
        raise MetricError("a curve needs at least two points")
    return (curve.sum(-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / n


def step_counts(n_pixels: int, steps: int) -> list[int]:
    """Pixels changed at each of the ``steps + 1`` curve points: floor(i * N / steps)."""
    if steps < 1:
        raise MetricError(f"steps must be >= 1, got {steps}")
    return [i * n_pixels // steps for i in range(steps + 1)]


def apply_sign(saliency: Tensor, sign: str) -> Tensor:
    """The map used for ranking: as is, absolute value, or ReLU."""
    if sign not in MAP_SIGNS:
        raise MetricError(f"map_sign must be one of {', '.join(MAP_SIGNS)}, got {sign!r}")
    if sign == "abs":
        return saliency.abs()
    if sign == "relu":
        return saliency.clamp_min(0)
    return saliency


def tie_permutation(n: int, tie_seed: int, device: torch.device) -> Tensor:
    """The fixed pixel permutation that orders tied pixels (same for every sample)."""
    g = torch.Generator().manual_seed(int(tie_seed))
    return torch.randperm(n, generator=g).to(device)


def pixel_ranks(saliency: Tensor, tie_seed: int = 0) -> Tensor:
    """``[B, H, W]`` maps -> ``[B, H*W]`` int64 rank of each pixel (0 = most salient).

    Descending by value; exact ties in the order of a seeded random permutation; NaN ranks last.
    """
    flat = saliency.flatten(1).nan_to_num(nan=float("-inf"))
    b, n = flat.shape
    perm = tie_permutation(n, tie_seed, flat.device)
    order = perm[torch.sort(flat[:, perm], dim=1, descending=True, stable=True).indices]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=flat.device).expand(b, n))
    return ranks


def gaussian_kernel(size: int = 11, sigma: float = 5.0) -> np.ndarray:
    """The RISE ``gkern`` kernel: a Gaussian filter (radius 4 sigma, normalised) applied to a
    centred delta in a ``size x size`` array with reflecting borders, so tails that fall
    outside are folded back; the kernel sums to 1."""
    if size < 1 or sigma <= 0:
        raise MetricError(f"blur kernel needs size >= 1 and sigma > 0, got {size}, {sigma}")
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    centre = size // 2
    k1 = np.zeros(size)
    for m in range(size):
        t = (m + offsets) % (2 * size)
        t = np.where(t < size, t, 2 * size - 1 - t)
        k1[m] = weights[t == centre].sum()
    return np.outer(k1, k1)


def blur(images: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """Depthwise Gaussian blur with zero padding (borders fade to 0 in input space)."""
    k = torch.as_tensor(gaussian_kernel(size, sigma), dtype=images.dtype, device=images.device)
    c = images.shape[1]
    return F.conv2d(images, k.expand(c, 1, size, size), padding=size // 2, groups=c)


def substrate(ctx: Context, name: str, size: int, sigma: float) -> Tensor:
    """The substrate images ``[B, 3, H, W]`` in model-input space (cached per call)."""
    if name not in SUBSTRATES:
        raise MetricError(f"substrate must be one of {', '.join(SUBSTRATES)}, got {name!r}")

    def make() -> Tensor:
        x = ctx.images
        if name == "zero":
            return torch.zeros_like(x)
        if name == "black":
            return ((0 - ctx.mean) / ctx.std).to(x.dtype).expand_as(x).contiguous()
        return blur(x, int(size), float(sigma))

    key = ("substrate", name) if name != "blur" else ("substrate", name, int(size), float(sigma))
    return ctx.cached(key, make)


def ranks_for(ctx: Context, sign: str, tie_seed: int) -> Tensor:
    """Pixel ranks of the context's maps after ``apply_sign`` (cached per call)."""
    return ctx.cached(
        ("ranks", sign, int(tie_seed)),
        lambda: pixel_ranks(apply_sign(ctx.saliency, sign), int(tie_seed)),
    )


def plan_curve(ctx: Context, params: dict[str, Any], kind: str) -> Plan:
    """Jobs and reduction for ``kind`` = "deletion" | "insertion"."""
    steps = int(params["steps"])
    sub_name = params[f"{kind}_substrate"]
    _, _, h, w = ctx.images.shape
    counts = torch.tensor(step_counts(h * w, steps), device=ctx.images.device)
    ranks = ranks_for(ctx, params["map_sign"], params["tie_seed"])
    sub = substrate(ctx, sub_name, params["blur_kernel"], params["blur_sigma"])
    images = ctx.images
    b = ctx.batch
    # deletion: points 1..n (point 0 is the clean image); insertion: points 0..n-1 (n is clean)
    points = torch.arange(1, steps + 1) if kind == "deletion" else torch.arange(0, steps)
    points = points.to(images.device)
    samples = torch.arange(b, device=images.device).repeat_interleave(steps)
    job_points = points.repeat(b)

    def render(j: Tensor) -> Tensor:
        s = samples[j]
        changed = (ranks[s] < counts[job_points[j]].view(-1, 1)).view(-1, 1, h, w)
        if kind == "deletion":
            return torch.where(changed, sub[s], images[s])
        return torch.where(changed, images[s], sub[s])

    key = (kind, steps, params["map_sign"], int(params["tie_seed"]), sub_name,
           int(params["blur_kernel"]), float(params["blur_sigma"]))
    group = JobGroup(key, samples, render)
    return Plan([ctx.clean_group(), group], curve_finish(key, kind, kind, b, steps, params))


def curve_finish(key: tuple, kind: str, name: str, b: int, steps: int, params: dict[str, Any]):
    """The plan's finish for a deletion / insertion curve: the clean score and the ``steps``
    scores of job group ``key`` -> ``<name>_auc`` (and ``<name>_curve`` when asked)."""
    col = score_index(params)
    want_curves = bool(params["curves"])

    def finish(scores: dict) -> dict[str, Any]:
        clean = scores[CLEAN][:, col].view(b, 1)
        body = scores[key][:, col].view(b, steps)
        curve = torch.cat([clean, body] if kind == "deletion" else [body, clean], dim=1)
        out: dict[str, Any] = {f"{name}_auc": auc(curve).cpu()}
        if want_curves:
            out[f"{name}_curve"] = curve.cpu().tolist()
        return out

    return finish


@planner("deletion_auc")
def plan_deletion(ctx: Context, params: dict[str, Any]) -> Plan:
    return plan_curve(ctx, params, "deletion")


@planner("insertion_auc")
def plan_insertion(ctx: Context, params: dict[str, Any]) -> Plan:
    return plan_curve(ctx, params, "insertion")
