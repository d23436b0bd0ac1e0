"""Vanilla gradient (Simonyan, Vedaldi & Zisserman 2014): how the target logit moves with each pixel.

Cost per image: 1 forward + 1 backward to the input.
Defaults and their sources: no hyperparameters; map max_c|dS_t/dx_c| (Simonyan et al. 2014; Captum Saliency abs=True).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Method, target_scores
from .registry import register


def input_gradient(method: Method, x: Tensor, targets: Tensor) -> Tensor:
    """``dS_t/dx`` for each sample's own target logit ``S_t``: float32 ``[B,3,H,W]``.

    The backward is seeded with the sum of the per-sample target logits, which keeps the
    samples of a batch independent (eval mode); only the input requires grad, so no
    parameter ``.grad`` is touched.
    """
    x = x.detach().requires_grad_(True)
    score = target_scores(method.forward(x), targets).sum()
    (grad,) = torch.autograd.grad(score, x)
    return grad.float()


@register("gradient")
class Gradient(Method):
    """Saliency ``M(i,j) = max_c |dS_t/dx_c(i,j)|`` over the colour channels.

    ``S_t`` is the pre-softmax target logit, ``x`` the model input (after normalisation).
    Returns ``[B,H,W]`` at the input resolution. No parameters.
    """

    work_per_image = staticmethod(lambda p: 1.0)
    cost = "1 forward + 1 backward to the input"
    defaults_source = "no hyperparameters; max_c|.| reduction as in Simonyan et al. 2014"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)

    def attribute(self, images: Tensor, targets: Tensor) -> Tensor:
        """The map ``max_c |dS_t/dx_c|``."""
        return input_gradient(self, images, targets).abs().amax(dim=1)
