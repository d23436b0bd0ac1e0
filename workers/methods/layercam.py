"""LayerCAM (Jiang et al. 2021): each activation weighted by its own positive gradient.

Cost per image: 1 forward + 1 backward down to the target layer only.
Defaults and their sources: element-wise ReLU(gradient) weights (PengtaoJiang/LayerCAM-jittor convert.py, jacobgil LayerCAM); target layer as Grad-CAM; no multi-layer fusion (not in the official code).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cam_base import CAMMethod
from .registry import register


@register("layercam")
class LayerCAM(CAMMethod):
    """``ReLU(sum_k ReLU(dS_t/dA_k) * A_k)``, element-wise weights, at ``[B,u,v]``.

    Works at any layer, shallow ones included (the official demo uses the five VGG16
    max-pool outputs); the paper's multi-layer ``tanh`` fusion is not part of the official
    single-layer code and is left out. Raw map: no upsampling, no min-max scaling.
    """

    cost = "1 forward + 1 backward to the target layer"
    defaults_source = (
        "element-wise ReLU(gradient) weights as PengtaoJiang/LayerCAM-jittor convert.py and "
        "jacobgil LayerCAM; target layer: the architecture's default CAM layer"
    )

    def weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        """Per-position weights: the positive part of the gradients."""
        return torch.relu(grads)
