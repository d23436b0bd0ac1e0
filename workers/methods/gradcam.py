"""Grad-CAM (Selvaraju et al. 2017): channels weighted by their mean gradient.

Cost per image: 1 forward + 1 backward down to the target layer only.
Defaults and their sources: mean-gradient channel weights (Selvaraju et al. 2017; jacobgil GradCAM); target layer per architecture (ResNet layer4, VGG16 conv5_3 ReLU as in the paper, MobileNet last features block, Lite0 head activation).
"""

from __future__ import annotations

from torch import Tensor

from .cam_base import CAMMethod
from .registry import register


@register("gradcam")
class GradCAM(CAMMethod):
    """``ReLU(sum_k mean_ij(dS_t/dA_k) * A_k)`` at the target layer's resolution ``[B,u,v]``.

    Raw map: no upsampling and no min-max scaling (the pipeline does both; pytorch-grad-cam
    upsamples bilinearly and scales ``(L - min) / (max + 1e-7)``). Target layer defaults per
    architecture (:func:`salmap.workers.methods.layers.default_target_layer_name`).
    """

    cost = "1 forward + 1 backward to the target layer"
    defaults_source = (
        "mean-gradient weights (Selvaraju et al. 2017; jacobgil GradCAM.get_cam_weights); "
        "target layer ResNet layer4 / VGG16 conv5_3 ReLU as in the paper"
    )

    def weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        """Per-channel weights: the gradients' spatial mean."""
        return grads.mean(dim=(2, 3))
