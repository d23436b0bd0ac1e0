"""Shortcut flags: clusters whose relevance sits outside the object or on one fixed region.

A cluster is flagged when enough of its images (``min_images``) agree on a strategy that a
model should not need:

* ``outside_box``: on average less than ``box_max`` of the relevance lies inside the
  ground-truth box of the target class (the run's ``energy_pointing`` values: the share of
  the non-negative map inside the boxes) while the maps are focused (half of each map's
  relevance in at most ``focus_max_area`` of the image, on average): the relevance *sits*
  outside the object. A diffuse map, spread over the whole image, is not flagged. The pseudo box is not used for this flag: it is cut
  from the map itself, so the relevance always sits in it.
* ``fixed_region``: the cluster's mean map holds half its relevance in at most
  ``region_max_area`` of the image, at least ``consistency_min`` of its images each put a
  quarter of their own relevance there, and that region is off-centre (its centre of mass
  outside the central half of the image) or on the border band, and, when the run has
  ground-truth boxes, at most ``box_ok`` of the relevance lies in the object's box. A centred
  object is not a shortcut, nor a group of objects that happen to sit at one place; a corner
  mark, a watermark or a frame edge is. Without boxes, the second cannot be told apart from
  the first by the maps alone: such a flag says "look at the exemplars".

Every flag carries its evidence (the measured values against the thresholds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .core import border_mask, region


@dataclass(frozen=True)
class Thresholds:
    """When a cluster is flagged (see the module doc)."""

    min_images: int = 5
    box_max: float = 0.3
    region_max_area: float = 0.1
    consistency_min: float = 0.8
    border_min: float = 0.5
    focus_max_area: float = 0.15
    box_ok: float = 0.5

    def as_dict(self) -> dict:
        return asdict(self)


def region_stats(mean_map: np.ndarray, dists: np.ndarray | None) -> dict:
    """Where the cluster's relevance lies: ``region_area`` (share of the image holding half
    the mean map's relevance), ``region_center`` ``(x, y)`` in [0, 1], ``region_off_centre``,
    ``border_share`` of the mean map, and, given the cluster's maps ``[n, s, s]``,
    ``region_consistency`` (share of them with at least a quarter of their relevance in the
    region)."""
    s = mean_map.shape[0]
    r = region(mean_map)
    ys, xs = np.nonzero(r)
    w = mean_map[r]
    cx = float(((xs + 0.5) * w).sum() / max(w.sum(), 1e-12) / s)
    cy = float(((ys + 0.5) * w).sum() / max(w.sum(), 1e-12) / s)
    out = {"region_area": float(r.mean()), "region_center": (cx, cy),
           "region_off_centre": bool(not (0.25 <= cx <= 0.75 and 0.25 <= cy <= 0.75)),
           "border_share": float(mean_map[border_mask(s)].sum() / max(mean_map.sum(), 1e-12)),
           "region_consistency": float("nan")}
    if dists is not None and len(dists):
        inside = dists[:, r].sum(axis=1) / np.maximum(dists.reshape(len(dists), -1).sum(1), 1e-12)
        out["region_consistency"] = float((inside >= 0.25).mean())
    return out


def flag(size: int, box_share: float, focus: float, stats: dict,
         t: Thresholds) -> tuple[list[str], str]:
    """``(flags, evidence)`` for one cluster of ``size`` images with mean ground-truth box
    share ``box_share`` (NaN: the run has no boxes), mean per-map :func:`focus_area`
    ``focus`` and :func:`region_stats` ``stats``."""
    flags: list[str] = []
    notes: list[str] = []
    if size < t.min_images:
        return flags, f"{size} images < min_images {t.min_images}: not judged"
    if np.isfinite(box_share) and box_share < t.box_max and focus <= t.focus_max_area:
        flags.append("outside_box")
        notes.append(f"{box_share:.0%} of the relevance inside the object's box "
                     f"(< {t.box_max:.0%}), maps focused (half in {focus:.0%} of the image, "
                     f"<= {t.focus_max_area:.0%})")
    area, cons = stats["region_area"], stats["region_consistency"]
    where = stats["region_off_centre"] or stats["border_share"] >= t.border_min
    on_object = np.isfinite(box_share) and box_share > t.box_ok
    if (area <= t.region_max_area and np.isfinite(cons) and cons >= t.consistency_min and where
            and not on_object):
        flags.append("fixed_region")
        cx, cy = stats["region_center"]
        notes.append(f"half the relevance in {area:.1%} of the image at (x={cx:.2f}, "
                     f"y={cy:.2f}) (<= {t.region_max_area:.0%}), used by {cons:.0%} of its "
                     f"images (>= {t.consistency_min:.0%}); border share "
                     f"{stats['border_share']:.0%}"
                     + ("" if np.isfinite(box_share) else "; no ground-truth boxes"))
    return flags, "; ".join(notes)
