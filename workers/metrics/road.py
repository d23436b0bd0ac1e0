"""ROAD Combined (Remove And Debias, Rong et al. 2022) as in pytorch-grad-cam ``ROADCombined``,
with the fixes the spec recommends: exact-count pixel selection on seeded tie-broken ranks
(original ROAD) instead of percentile thresholds, and a batched matrix-free imputer.

For each percentile p (default 10, 20, ..., 90, pytorch-grad-cam's default):

* LeRF(p) keeps the top ``round(p% * H * W)`` pixels of the map, MoRF(p) keeps the bottom
  ones; the removed pixels are filled by noisy linear imputation;
* ROAD = (mean_p p_c(LeRF(p)) - mean_p p_c(MoRF(p))) / 2, in [-0.5, 0.5] with probabilities;
  higher is better. (The clean score cancels, so it needs no clean forward.)

The two curves are also columns of their own, because Combined hides which side a map gets
right: ``road_morf`` = mean_p p_c(MoRF(p)) (the score left when the most relevant pixels are
removed; lower is better), ``road_lerf`` = mean_p p_c(LeRF(p)) (the score kept when the least
relevant are removed; higher is better) and ``road_gap`` = ``road_lerf - road_morf`` (= 2 x
ROAD; higher is better). A map that ranks pixels at random has MoRF = LeRF in expectation
(gap 0); a map that only finds where the evidence is NOT (good LeRF, poor MoRF) and one that
finds one strong cue among several (good MoRF, poor LeRF) are told apart.

Noisy linear imputation (tleemann/road_evaluation, copied into pytorch-grad-cam): each
removed pixel equals the weighted mean of its in-image 8-neighbours (1/6 direct, 1/12
diagonal), kept pixels are fixed; solved per channel by conjugate gradients on the
symmetric positive-definite system over the removed pixels (operator applied matrix-free
with shifted adds; zero padding reproduces the reference's border weights), then Gaussian
noise of std ``road_noise`` (model-input space, 0.01 as in pytorch-grad-cam) is added to the
imputed values. A removed region with no kept neighbour keeps its start value, the
channel mean of the kept pixels. Noise fields are drawn once from ``road_seed`` per
(LeRF/MoRF, p), the same for every sample.

Cost per image: 2P imputations (CG iterations grow with the diameter of the largest hole:
about 100-400 at 224 x 224 for a blob-shaped map, each a few elementwise passes) and 2P
forwards; on demand only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .faithfulness import ranks_for
from .jobs import Context, JobGroup, Plan, planner, score_index
from .registry import MetricError

_D, _C = 1.0 / 6.0, 1.0 / 12.0  # weight of a direct and of a diagonal neighbour


def _neighbour_sum(v: Tensor) -> Tensor:
    """Weighted sum of each pixel's in-image 8-neighbours (1/6 direct, 1/12 diagonal; zero
    outside the image), per channel, by shifted adds (faster than a depthwise conv on CPU)."""
    p = F.pad(v, (1, 1, 1, 1))
    pairs = p[..., :, :-2] + p[..., :, 2:]  # left + right, every padded row
    direct = pairs[..., 1:-1, :] + p[..., :-2, 1:-1] + p[..., 2:, 1:-1]
    diagonal = pairs[..., :-2, :] + pairs[..., 2:, :]
    return direct * _D + diagonal * _C


def impute(x: Tensor, keep: Tensor, tol: float = 1e-5, max_iter: int = 2000) -> Tensor:
    """Fill the pixels where ``keep`` ``[N, 1, H, W]`` (bool) is False in ``x`` ``[N, C, H, W]``
    by linear imputation (no noise). Kept pixels are returned unchanged.

    Each (image, channel) system runs CG, started from the channel mean of the kept pixels,
    until its residual is at most ``tol`` times its right-hand side's norm, then stops
    updating, so a result does not depend on the other images in the batch. Iterations grow
    with the largest hole's diameter (about 400 for 90% removed as one blob at 224 x 224).
    """
    x = x.float()
    n, c, h, w = x.shape
    removed = (~keep.bool()).to(x.dtype).expand(n, c, h, w)
    kept = 1 - removed
    degree = _neighbour_sum(torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device))

    def op(v: Tensor) -> Tensor:
        return removed * (degree * v - _neighbour_sum(removed * v))

    rhs = removed * _neighbour_sum(kept * x)
    n_kept = kept.sum((2, 3), keepdim=True)
    v = removed * (kept * x).sum((2, 3), keepdim=True) / n_kept.clamp_min(1)
    r = rhs - op(v)
    p = r.clone()
    rs = (r * r).sum((2, 3))
    bound = (tol * rhs.flatten(2).norm(dim=2)) ** 2
    for _ in range(int(max_iter)):
        active = rs > bound
        if not bool(active.any()):
            break
        ap = op(p)
        denom = (p * ap).sum((2, 3))
        alpha = torch.where(active & (denom > 0), rs / denom.clamp_min(1e-30), torch.zeros_like(rs))
        v = v + alpha[..., None, None] * p
        r = r - alpha[..., None, None] * ap
        rs_new = (r * r).sum((2, 3))
        beta = torch.where(active, rs_new / rs.clamp_min(1e-30), torch.zeros_like(rs))
        p = r + beta[..., None, None] * p
        rs = torch.where(active, rs_new, rs)
    return kept * x + removed * v


def keep_counts(n_pixels: int, percentiles: tuple[float, ...] | list[float]) -> list[int]:
    """Pixels kept at each percentile: round(p / 100 * N)."""
    out = []
    for p in percentiles:
        if not 0 <= float(p) <= 100:
            raise MetricError(f"road_percentiles must lie in [0, 100], got {p}")
        out.append(int(round(float(p) / 100.0 * n_pixels)))
    return out


@planner("road")
def plan_road(ctx: Context, params: dict[str, Any]) -> Plan:
    percentiles = tuple(float(p) for p in params["road_percentiles"])
    if not percentiles:
        raise MetricError("road_percentiles must not be empty")
    x = ctx.images
    b, c, h, w = x.shape
    n_pix, n_p = h * w, len(percentiles)
    counts = torch.tensor(keep_counts(n_pix, percentiles), device=x.device)
    ranks = ranks_for(ctx, params["map_sign"], params["tie_seed"])
    noise_std = float(params["road_noise"])
    gen = torch.Generator().manual_seed(int(params["road_seed"]))
    noise = (torch.randn(2, n_p, c, h, w, generator=gen) * noise_std).to(x.device, x.dtype)
    tol, max_iter = float(params["road_tol"]), int(params["road_max_iter"])
    samples = torch.arange(b, device=x.device).repeat_interleave(n_p)
    job_p = torch.arange(n_p, device=x.device).repeat(b)
    base_key = ("road", percentiles, noise_std, int(params["road_seed"]), tol, max_iter,
                params["map_sign"], int(params["tie_seed"]))

    def make_render(which: int):
        def render(j: Tensor) -> Tensor:
            s, k = samples[j], counts[job_p[j]].view(-1, 1)
            r = ranks[s]
            keep = (r < k) if which == 0 else (r >= n_pix - k)
            keep = keep.view(-1, 1, h, w)
            filled = impute(x[s], keep, tol, max_iter)
            return (filled + (~keep) * noise[which, job_p[j]]).to(x.dtype)

        return render

    lerf = JobGroup((*base_key, "lerf"), samples, make_render(0))
    morf = JobGroup((*base_key, "morf"), samples, make_render(1))
    col = score_index(params)

    def finish(scores: dict) -> dict[str, Any]:
        keep_top = scores[lerf.key][:, col].view(b, n_p).mean(1).cpu()
        keep_bottom = scores[morf.key][:, col].view(b, n_p).mean(1).cpu()
        gap = keep_top - keep_bottom
        return {"road": gap / 2, "road_morf": keep_bottom, "road_lerf": keep_top,
                "road_gap": gap}

    return Plan([lerf, morf], finish)
