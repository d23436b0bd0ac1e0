"""Integrated Gradients (Sundararajan, Taly & Yan 2017): gradients integrated along a straight path.

Cost per image: steps x (1 forward + 1 backward to the input) = 50 F+B with the defaults.
Defaults and their sources: baseline 0 in model-input space (PAIR, DeepExplain, Captum); steps=50, method='gausslegendre' (Captum IntegratedGradients n_steps=50 default); map = signed channel sum.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .base import Method
from .errors import MethodError
from .gradient import input_gradient
from .registry import register

METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


def path_points(method: str, steps: int) -> tuple[Tensor, Tensor]:
    """Quadrature nodes ``alpha`` in [0, 1] and their weights (summing to 1), float64.

    ``riemann_trapezoid`` uses ``alpha = linspace(0, 1, steps)`` and the true trapezoid
    weights ``1/(steps-1)`` (halved at the ends). Captum's ``riemann_trapezoid`` uses
    ``1/steps`` instead, so its weights sum to ``1 - 1/steps``; the other rules match Captum.
    """
    if method not in METHODS:
        raise MethodError(f"integrated_gradients: method must be one of {', '.join(METHODS)}")
    if steps < 2:
        raise MethodError(f"integrated_gradients: steps must be >= 2, got {steps}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)
    k = torch.arange(steps, dtype=torch.float64)
    w = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if method == "riemann_left":
        return k / steps, w
    if method == "riemann_right":
        return (k + 1) / steps, w
    if method == "riemann_middle":
        return (k + 0.5) / steps, w
    w = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
    w[0] = w[-1] = 0.5 / (steps - 1)
    return k / (steps - 1), w


@register("integrated_gradients")
class IntegratedGradients(Method):
    """``A = x * sum_k w_k grad(alpha_k x)``, baseline 0; map = SIGNED channel sum of ``A``.

    * Baseline ``x' = 0`` in model-input space (after normalisation: the dataset-mean
      colour), as PAIR, DeepExplain and Captum.
    * ``steps`` (default 50, Captum ``n_steps``) and ``method`` (default ``gausslegendre``,
      Captum's default: exact for polynomial integrands of degree < 2*steps, so it reaches a
      given completeness error with fewer steps than the Riemann rules); see
      :func:`path_points` for the others.
    * Map: ``sum_c A_c`` keeps completeness, ``sum_ij M = S_t(x) - S_t(0)`` up to the
      quadrature error. Returns ``[B,H,W]``.

    The ``B * steps`` path points go through the model ``inner_batch_size`` at a time.
    """

    work_per_image = staticmethod(lambda p: float(p["steps"]))
    cost = "steps x (1 forward + 1 backward to the input)"
    defaults_source = (
        "baseline 0 (PAIR/DeepExplain/Captum); steps=50 and Gauss-Legendre nodes as Captum "
        "IntegratedGradients (n_steps=50, method='gausslegendre'); signed channel sum"
    )

    def __init__(self, model: nn.Module, steps: int = 50, method: str = "gausslegendre") -> None:
        super().__init__(model)
        path_points(method, steps)  # validate early
        self.steps = int(steps)
        self.method = method

    def attributions(self, images: Tensor, targets: Tensor) -> Tensor:
        """The per-channel attributions ``A`` ``[B,3,H,W]`` (float32)."""
        b, m = images.shape[0], self.steps
        alphas, weights = path_points(self.method, m)
        alphas = alphas.to(device=images.device, dtype=torch.float32)
        weights = weights.to(device=images.device, dtype=torch.float32)
        x = images.detach().float()
        total = torch.zeros_like(x)
        rows = torch.arange(b * m, device=images.device)  # row r = image r // m, step r % m
        for sl in self.chunks(b * m, track=True):
            img, k = rows[sl] // m, rows[sl] % m
            scaled = x[img] * alphas[k, None, None, None]
            grad = input_gradient(self, scaled.to(images.dtype), targets[img])
            total.index_add_(0, img, grad * weights[k, None, None, None])
        return x * total

    def attribute(self, images: Tensor, targets: Tensor) -> Tensor:
        """The map: the signed channel sum of the attributions."""
        return self.attributions(images, targets).sum(dim=1)
