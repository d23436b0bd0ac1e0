"""Gradient x Input (Shrikumar et al. 2016): first-order contribution of each input value.

Cost per image: 1 forward + 1 backward to the input.
Defaults and their sources: no hyperparameters; map = signed sum over channels of x * dS_t/dx (keeps completeness; baselines.md 2).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Method
from .gradient import input_gradient
from .registry import register


@register("gradient_x_input")
class GradientXInput(Method):
    """Map ``M(i,j) = sum_c x_c(i,j) * dS_t/dx_c(i,j)``: the SIGNED sum over colour channels.

    The signed sum keeps completeness: for a bias-free ReLU network the map sums to the target
    logit (the TSGB repository reduces with ``max_c |.|`` instead, which loses it). ``x`` is the
    model input after normalisation, so "zero" is the dataset-mean colour. Returns ``[B,H,W]``.
    """

    work_per_image = staticmethod(lambda p: 1.0)
    cost = "1 forward + 1 backward to the input"
    defaults_source = "no hyperparameters; signed channel sum (keeps completeness)"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)

    def attribute(self, images: Tensor, targets: Tensor) -> Tensor:
        """The map: the signed channel sum of input times gradient."""
        grad = input_gradient(self, images, targets)
        return (images.float() * grad).sum(dim=1)
