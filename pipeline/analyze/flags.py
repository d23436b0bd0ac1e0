"""Shortcut flags: clusters whose relevance sits outside the object or on one fixed region.

A cluster is flagged when enough of its images (``min_images``, 20: the median of fewer
hot spots is too noisy to call a place fixed) agree on a strategy that a model should not
need. The rules judge *where the relevance is and whether it moves with the object*, not
how sharp the maps can be. A coarse map (8 x 8 Grad-CAM) over a small object puts well under
half of even an object-focused map inside the box (22-45% for boxes of 8-11% of the image:
BENCHMARKS.md, section 13), and a point-like mark spreads over up to ten cells of such a
map once upsampled; absolute lines (30% in the box, half the relevance in 10% of the image)
flagged those objects and missed the mark. So the lines are drawn relative to

* the map's **cell** (one cell of the stored map's grid or of the analysis grid, whichever
  is coarser: :func:`cell_size`): region sizes and hot-spot movements are counted
  in cells, so an 8 x 8 map is held to what 64 cells can show;
* the **class's reference box share** (``box_ref``: the ``ref_quantile`` (90%) quantile of
  the class's per-image box shares): what this model's maps of this class put in the box
  when they find the object, at this resolution and for objects of this size. The ideal
  reference (the box indicator resampled through the map's grid) needs each image's box,
  which the committed rows do not hold (only its box share, ``energy_pointing``); the
  best-placed tenth of the class's own maps stands in for it. It needs only a tenth of the
  class on the object, so a class mostly answered by a shortcut keeps a reference; a class
  that is never looked at on its object has none worth the name, and is not flagged
  ``outside_box`` against itself. With fewer than ``min_images`` box shares in the class
  the absolute lines ``box_max`` and ``box_ok`` apply, and the evidence says so.

The flags:

* ``outside_box``: the cluster's mean box share is below ``box_max_rel`` (35%) of
  ``box_ref`` while its maps are focused (half of each map's relevance in at most
  ``focus_max_area`` of the image, or ``focus_max_cells`` cells when cells are big): the
  relevance sits clearly off the object compared with how this model's maps of the class
  find it. A diffuse map is not flagged. The pseudo box is not used (it is cut from the map
  itself, so the relevance always sits in it).
* ``fixed_region``: a place in image coordinates that the cluster's maps share, whatever
  the object:

  - the mean map holds half its relevance in at most ``region_max_area`` of the image or
    ``region_max_cells`` cells, whichever is larger (a 3 x 3-pixel mark under an 8 x 8
    Grad-CAM covers 5-10 cells of the upsampled mean map);
  - at least ``consistency_min`` of the images each put a quarter of their relevance there;
  - the hot spots coincide: each map's hot spot (its hottest cells holding
    ``HOT_MASS``, a tenth, of its relevance: :func:`hot_spots`) lies within
    ``spread_max_cells`` (0.3 of a cell) of the cluster's median hot spot, for at least half
    of the images (the median distance). This is what tells a mark from objects: a mark
    fixed to the image stays put (0.02-0.17 cell in the planted benchmark, small and full
    size) while maps that follow objects move with them, even when SpRAy groups objects by
    where they lie (0.4-1.3 cell for clusters of 20 images or more, 0.58-0.68 for objects
    held in a corner by the image's edges);
  - off-centre (its centre of mass outside the central half of the image) or on the border
    band;
  - not on the object: the cluster's box share is below ``box_ok_rel`` (70%) of
    ``box_ref``. Objects that do sit at one place put nearly as much in their box as the
    class's best-placed maps (85-90% of ``box_ref`` for the planted benchmark's objects held
    in the bottom-right corner); a mark beside the object puts clearly less (38-44%, its
    maps also touch the object). Without boxes this cannot be checked: such a flag says
    "look at the exemplars".

Every flag carries its evidence (the measured values against the thresholds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .core import border_mask, region

HOT_MASS = 0.1  # a map's hot spot: its hottest cells holding this share of its relevance
HOT_TIE = 0.1  # ... and the cells within this share of the last of them


@dataclass(frozen=True)
class Thresholds:
    """When a cluster is flagged (see the module doc)."""

    min_images: int = 20
    ref_quantile: float = 0.9
    box_max_rel: float = 0.35
    box_ok_rel: float = 0.7
    box_max: float = 0.3  # without a reference (box_ref): absolute lines
    box_ok: float = 0.5
    region_max_area: float = 0.1
    region_max_cells: float = 16.0
    spread_max_cells: float = 0.3
    consistency_min: float = 0.8
    border_min: float = 0.5
    focus_max_area: float = 0.15
    focus_max_cells: float = 9.0

    def as_dict(self) -> dict:
        return asdict(self)


def cell_size(native: tuple[int, int] | None, side: int) -> float:
    """The side of one map cell as a share of the image side: the stored map's ``native``
    ``(h, w)`` grid or of the analysis grid ``side``, whichever is coarser (geometric mean
    of the two axes)."""
    if not native:
        return 1.0 / side
    h, w = (min(int(v), side) for v in native)
    return float(1.0 / np.sqrt(max(h, 1) * max(w, 1)))


def hot_spots(dists: np.ndarray, mass: float = HOT_MASS) -> tuple[np.ndarray, np.ndarray]:
    """Per map ``[n, s, s]``, the centre ``(x, y)`` in [0, 1] of its hot spot: its hottest
    cells holding ``mass`` of its relevance, and every cell within ``HOT_TIE`` (10%) of the
    last of them (near-ties: which of two equally hot neighbours comes first is noise; a
    uniform map's hot spot is the image centre), relevance-weighted."""
    n, s = len(dists), dists.shape[-1]
    flat = dists.reshape(n, -1).astype(np.float64)
    vals = -np.sort(-flat, axis=1)
    cum = np.cumsum(vals, axis=1)
    k = (cum < mass * np.maximum(cum[:, -1:], 1e-12)).sum(axis=1)
    cut = np.take_along_axis(vals, np.minimum(k, flat.shape[1] - 1)[:, None], axis=1)
    w = np.where(flat >= cut * (1 - HOT_TIE), np.maximum(flat, 1e-12), 0.0)
    xs = (np.arange(flat.shape[1]) % s + 0.5) / s
    ys = (np.arange(flat.shape[1]) // s + 0.5) / s
    tot = w.sum(axis=1)
    return (w @ xs) / tot, (w @ ys) / tot


def region_stats(mean_map: np.ndarray, dists: np.ndarray | None,
                 cell: float | None = None) -> dict:
    """Where the cluster's relevance lies: ``region_area`` (share of the image holding half
    the mean map's relevance), ``region_center`` ``(x, y)`` in [0, 1], ``region_off_centre``,
    ``border_share`` of the mean map, ``cell`` (:func:`cell_size`; default one cell of the
    mean map), and, given the cluster's maps ``[n, s, s]``, ``region_consistency`` (share of
    them with at least a quarter of their relevance in the region) and ``hotspot_spread``
    (the median distance, as a share of the image side, of each map's :func:`hot_spots`
    centre from their median: how far the hottest relevance moves from image to image)."""
    s = mean_map.shape[0]
    r = region(mean_map)
    ys, xs = np.nonzero(r)
    w = mean_map[r]
    cx = float(((xs + 0.5) * w).sum() / max(w.sum(), 1e-12) / s)
    cy = float(((ys + 0.5) * w).sum() / max(w.sum(), 1e-12) / s)
    out = {"region_area": float(r.mean()), "region_center": (cx, cy),
           "region_off_centre": bool(not (0.25 <= cx <= 0.75 and 0.25 <= cy <= 0.75)),
           "border_share": float(mean_map[border_mask(s)].sum() / max(mean_map.sum(), 1e-12)),
           "cell": float(cell if cell else 1.0 / s),
           "region_consistency": float("nan"), "hotspot_spread": float("nan")}
    if dists is not None and len(dists):
        flat = dists.reshape(len(dists), -1)
        mass = dists[:, r].sum(axis=1) / np.maximum(flat.sum(1), 1e-12)
        out["region_consistency"] = float((mass >= 0.25).mean())
        hx, hy = hot_spots(dists)
        out["hotspot_spread"] = float(np.median(np.hypot(hx - np.median(hx),
                                                         hy - np.median(hy))))
    return out


def flag(size: int, box_share: float, focus: float, stats: dict, t: Thresholds,
         box_ref: float = float("nan")) -> tuple[list[str], str]:
    """``(flags, evidence)`` for one cluster of ``size`` images with mean ground-truth box
    share ``box_share`` (NaN: the run has no boxes), mean per-map :func:`focus_area`
    ``focus``, :func:`region_stats` ``stats`` and ``box_ref``, the class's reference box
    share (see the module doc; NaN: too few box shares, the absolute lines apply)."""
    flags: list[str] = []
    notes: list[str] = []
    if size < t.min_images:
        return flags, f"{size} images < min_images {t.min_images}: not judged"
    cell = stats["cell"]
    has_box = bool(np.isfinite(box_share))
    relative = has_box and bool(np.isfinite(box_ref)) and box_ref > 0
    if relative:
        box_line, ok_line = t.box_max_rel * box_ref, t.box_ok_rel * box_ref
        against = f"the class's reference {box_ref:.0%}"
    else:
        box_line, ok_line = t.box_max, t.box_ok
        against = "no reference: too few box shares in the class"
    focus_line = max(t.focus_max_area, t.focus_max_cells * cell * cell)
    if has_box and box_share < box_line and focus <= focus_line:
        flags.append("outside_box")
        rel = (f"< {t.box_max_rel:.0%} of {against}" if relative
               else f"< {t.box_max:.0%}; {against}")
        notes.append(f"{box_share:.0%} of the relevance inside the object's box ({rel}), "
                     f"maps focused (half in {focus:.0%} of the image, <= {focus_line:.0%})")
    area, cons = stats["region_area"], stats["region_consistency"]
    spread = stats["hotspot_spread"]
    area_line = max(t.region_max_area, t.region_max_cells * cell * cell)
    where = stats["region_off_centre"] or stats["border_share"] >= t.border_min
    fixed = np.isfinite(spread) and spread <= t.spread_max_cells * cell
    on_object = has_box and box_share >= ok_line
    if (area <= area_line and np.isfinite(cons) and cons >= t.consistency_min and fixed
            and where and not on_object):
        flags.append("fixed_region")
        cx, cy = stats["region_center"]
        if not has_box:
            box_note = "no ground-truth boxes"
        elif relative:
            box_note = (f"{box_share:.0%} in the box (< {t.box_ok_rel:.0%} of {against}: "
                        "not on the object)")
        else:
            box_note = f"{box_share:.0%} in the box (< {t.box_ok:.0%}; {against})"
        notes.append(f"half the relevance in {area:.1%} of the image ({area / cell ** 2:.1f} "
                     f"map cells; <= {area_line:.0%}) at (x={cx:.2f}, y={cy:.2f}), used by "
                     f"{cons:.0%} of its images (>= {t.consistency_min:.0%}), hot spots at "
                     f"the same place (median distance {spread / cell:.2f} cell, <= "
                     f"{t.spread_max_cells:.2f}); border share {stats['border_share']:.0%}; "
                     + box_note)
    return flags, "; ".join(notes)
