"""Grad-CAM++ (Chattopadhyay et al. 2018): positive gradients weighted per position by alpha.

Cost per image: 1 forward + 1 backward down to the target layer only.
Defaults and their sources: paper closed form (arXiv 1710.11063) as jacobgil GradCAMPlusPlus, epsilon=0 (jacobgil 1e-6), alpha_renorm=False (True in the authors' TF code); target layer as Grad-CAM.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .cam_base import CAMMethod
from .errors import MethodError
from .registry import register


@register("gradcam_pp")
class GradCAMPlusPlus(CAMMethod):
    """``ReLU(sum_k w_k A_k)`` with ``w_k = sum_ij alpha_kij ReLU(g_kij)``, ``g = dS_t/dA``.

    ``alpha = g^2 / (2 g^2 + S_k g^3 + epsilon)`` with ``S_k = sum_ij A_kij`` is the paper's
    closed form for a piecewise-linear network, with the ``exp(S_t)`` factor cancelled (it
    would overflow float32 for logits above 88; it only rescales the map). Only positions
    with ``g > 0`` enter ``w``, so alpha is evaluated there only, as
    ``1 / (2 + S_k g + epsilon / g^2)``: the same value, without underflow of ``g^2``.

    Options:
      * ``epsilon`` (default 0): the denominator guard. With a post-activation target layer
        (``S_k >= 0``) the denominator is at least ``2 g^2`` where ``g > 0``, so no guard is
        needed and 0 gives the exact paper formula. pytorch-grad-cam uses ``1e-6``, which is
        NOT negligible at typical gradient scales (g ~ 1e-3), so pass ``epsilon=1e-6`` to
        reproduce it. If the denominator is not positive (only possible with negative
        channel sums, i.e. a target layer before its activation) a :class:`MethodError` is
        raised naming the layer, instead of returning a meaningless map.
      * ``alpha_renorm`` (default False): the authors' TF code (``grad_CAM_plus``) also divides
        alpha, per channel, by its sum over the positions where ``g > 0`` (not in the paper).

    Returns the raw ``[B,u,v]`` map at the target layer's resolution (no upsampling, no
    normalisation; the authors divide by the max, pytorch-grad-cam uses min-max).
    """

    cost = "1 forward + 1 backward to the target layer"
    defaults_source = (
        "closed form of the paper (arXiv 1710.11063) as in jacobgil GradCAMPlusPlus; "
        "epsilon 0 (jacobgil: 1e-6; authors: zero denominator -> 1); alpha_renorm off "
        "(on in the authors' adityac94/Grad_CAM_plus_plus misc/utils.py)"
    )

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        epsilon: float = 0.0,
        alpha_renorm: bool = False,
        reshape: str | None = None,
    ) -> None:
        super().__init__(model, target_layer, reshape)
        if epsilon < 0:
            raise MethodError(f"gradcam_pp: epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)
        self.alpha_renorm = bool(alpha_renorm)

    def weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        """Per-channel weights: the positive gradients weighted by the closed-form alphas."""
        pos = grads > 0
        g = torch.where(pos, grads, torch.ones_like(grads))  # dummy 1 where g <= 0 (masked out)
        sums = acts.sum(dim=(2, 3), keepdim=True)
        denom = 2 + sums * g
        if self.epsilon:
            denom = denom + self.epsilon / g.square()
        if bool((denom[pos] <= 0).any()):
            raise MethodError(
                f"gradcam_pp: alpha's denominator 2 + S_k g is not positive at target layer "
                f"{self.target_layer_name!r} (negative channel sums); use a post-activation layer"
            )
        alpha = torch.where(pos, 1 / denom, torch.zeros_like(denom))
        if self.alpha_renorm:
            total = alpha.sum(dim=(2, 3), keepdim=True)
            alpha = alpha / torch.where(total != 0, total, torch.ones_like(total))
        return (alpha * torch.relu(grads)).sum(dim=(2, 3))
