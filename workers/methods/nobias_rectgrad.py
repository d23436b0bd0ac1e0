"""NoBias-RectGrad (Brocki & Chung 2020): RectGrad without the final product with the input.

Cost per image: 1 forward + 1 modified backward (+ one per-sample k-th value per activation call).
Defaults and their sources: as RectGrad (q=98, padding trick) without the product with the input (lenbrocki/NoBias-Rectified-Gradient NoBiasRectifiedGradient); signed channel sum.
"""

from __future__ import annotations

from .rectgrad import RectGrad
from .registry import register


@register("nobias_rectgrad")
class NoBiasRectGrad(RectGrad):
    """The rectified gradient itself, ``A = g_x`` (lenbrocki/NoBias-Rectified-Gradient).

    Same rules, parameters and defaults as :class:`~salmap.workers.methods.rectgrad.RectGrad`
    (``q=98`` per sample and layer, strict ``>``, padding trick on padded convs), but no
    multiplication by the input, which removes RectGrad's "brightness bias" (zero where the
    normalised input is 0). ``NoBias * x == RectGrad`` element-wise before the reduction.
    Map: ``reduction="sum"`` (default, signed channel sum as the reference ``preprocess``),
    ``"max_abs"`` or ``"positive_sum"``. Returns ``[B,H,W]``.
    """

    cost = "1 forward + 1 modified backward (+1 per-sample k-th value per activation call)"
    defaults_source = (
        "lenbrocki/NoBias-Rectified-Gradient methods.py NoBiasRectifiedGradient: as RectGrad "
        "(percentile=98, padding trick) without x input; signed channel sum"
    )
    times_input = False
