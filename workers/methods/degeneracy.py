"""Degeneracy checks for the optimised methods (DMBP, HDM): does a map say something of its
own, or is it a cheaper method in disguise, a flat field, or nearly nothing?

An optimisation can end in a trivial place that still has the right shape: masks that stay at
their start give back gradient x input (DMBP) or a uniform field (HDM), a coarse mask gives
back the CAM's blob, a collapsed one an empty map. Each check below names one such end; a
method passes on an image when no check fires. Thresholds are deliberately loose: they catch
the degenerate case, not a method that merely agrees with a baseline.

    report = degeneracy(maps, gradient_x_input=gxi, gradcam=cam)   # {check: [B] bool, fired}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: a map this correlated with a baseline (Pearson, over pixels) IS that baseline
MAX_CORRELATION = 0.95
#: a map whose spread is below this share of its largest magnitude is constant
MIN_RELATIVE_SPREAD = 1e-3
#: a map with fewer pixels above 1 % of its peak magnitude than this share is nearly empty
MIN_SUPPORT = 0.01
#: the top 10 % of pixels hold at least this share of the mass in a map with any focus
#: (0.10 = flat) and at most this share in one that is not a handful of points
TOP_SHARE_RANGE = (0.12, 0.99)


def _flat(maps: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    m = maps.detach().float()
    if m.dim() == 4:  # [B,C,H,W] attributions: the channel mean, as the maps are shown
        m = m.mean(1)
    if size is not None and tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return m.flatten(1)


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample Pearson correlation ``[B]`` of two maps over pixels (``b`` resized to
    ``a``'s grid); 0 where either map is constant."""
    x = _flat(a)
    y = _flat(b, tuple(a.shape[-2:]))
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    den = x.norm(dim=1) * y.norm(dim=1)
    return torch.where(den > 0, (x * y).sum(1) / den.clamp_min(1e-30), torch.zeros_like(den))


def relative_spread(maps: Tensor) -> Tensor:
    """Per-sample standard deviation over the largest magnitude ``[B]`` (0 for a zero map)."""
    m = _flat(maps)
    peak = m.abs().amax(1)
    return torch.where(peak > 0, m.std(1) / peak.clamp_min(1e-30), torch.zeros_like(peak))


def support(maps: Tensor) -> Tensor:
    """Per-sample share of pixels whose magnitude exceeds 1 % of the peak ``[B]``."""
    m = _flat(maps).abs()
    return (m > 0.01 * m.amax(1, keepdim=True)).float().mean(1) * (m.amax(1) > 0)


def top_share(maps: Tensor, fraction: float = 0.1) -> Tensor:
    """Per-sample share of the absolute mass held by the top ``fraction`` of pixels ``[B]``
    (``fraction`` for a flat map, 1 for a map on fewer pixels; NaN for a zero map)."""
    m = _flat(maps).abs()
    k = max(1, round(fraction * m.shape[1]))
    return m.topk(k, dim=1).values.sum(1) / m.sum(1)


def degeneracy(maps: Tensor, gradient_x_input: Tensor | None = None,
               gradcam: Tensor | None = None) -> dict[str, Tensor]:
    """Which degenerate end each map ``[B,H,W]`` reached: ``{check: [B] bool}``, True = the
    check fired. ``gradient_x_input`` / ``gradcam``: the same images' baseline maps (any
    grid; resized); a check whose baseline is not given is left out."""
    lo, hi = TOP_SHARE_RANGE
    share = top_share(maps)
    out = {
        "constant": relative_spread(maps) < MIN_RELATIVE_SPREAD,
        "near_empty": support(maps) < MIN_SUPPORT,
        "top10_share": ~((share >= lo) & (share <= hi)),  # NaN (zero map) fires too
    }
    if gradient_x_input is not None:
        out["is_gradient_x_input"] = correlation(maps, gradient_x_input).abs() > MAX_CORRELATION
    if gradcam is not None:
        out["is_gradcam"] = correlation(maps, gradcam).abs() > MAX_CORRELATION
    return out
