"""Score-CAM (Wang et al. 2020): channels weighted by the score of the image masked with them.

Cost per image: 1 forward + K masked forwards (K = channels of the target layer; 1280 on Lite0's head), no backward.
Defaults and their sources: variant='official' (haofanwang/Score-CAM cam/scorecam.py: softmax-probability weights, min-max normalised upsampled masks, constant channels skipped); 'jacobgil' = pytorch-grad-cam ScoreCAM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FORWARD, target_scores
from .cam_base import CAMMethod, combine
from .errors import MethodError
from .registry import register

VARIANTS = ("official", "jacobgil")
#: Score-CAM does one forward per channel of its target layer; the driver does not build the
#: model to count them, so its cost estimate assumes this many (ResNet-18/34 layer4;
#: ResNet-50 has 2048)
ASSUMED_CHANNELS = 512


@register("scorecam")
class ScoreCAM(CAMMethod):
    """``ReLU(sum_k w_k A_k)`` with ``w_k`` read from one masked forward per channel.

    For each channel ``k``: ``U_k`` = ``A_k`` upsampled bilinearly to the input size,
    ``H_k = (U_k - min) / (max - min)`` per image and channel, forward ``x * H_k``.

    * ``variant="official"`` (default; haofanwang/Score-CAM ``cam/scorecam.py``):
      ``w_k`` = softmax probability of the target class on ``x * H_k``; constant channels are
      skipped (``w_k = 0``, no forward); upsampling ``align_corners=False``.
    * ``variant="jacobgil"`` (pytorch-grad-cam ``ScoreCAM``): ``s_k`` = target logit on
      ``x * H_k`` with ``H_k = (U_k - min) / (max - min + 1e-8)``, upsampling
      ``align_corners=True`` (``nn.UpsamplingBilinear2d``), every channel forwarded,
      ``w = softmax_k(s)`` across channels.

    The map is returned at the target layer's resolution: ``ReLU(sum_k w_k A_k)``. The
    official code weights the upsampled ``U_k`` and applies the ReLU after upsampling;
    since upsampling is linear, the two differ only where the map changes sign within a
    cell. No upsampling or scaling here (the pipeline does it). Needs no gradient: every
    forward runs under ``torch.no_grad``. The ``B * K`` masked forwards run
    ``inner_batch_size`` at a time.
    """

    # one masked forward per channel of the target layer, plus the prediction's forward
    work_per_image = staticmethod(lambda p: (1 + int(p.get("channels", ASSUMED_CHANNELS))) * FORWARD)
    cost = "1 + K forwards (K = channels of the target layer), no backward"
    defaults_source = (
        "variant 'official': haofanwang/Score-CAM cam/scorecam.py (softmax probability "
        "weights, min-max normalised upsampled masks, constant channels skipped)"
    )

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        variant: str = "official",
        reshape: str | None = None,
    ) -> None:
        super().__init__(model, target_layer, reshape)
        if variant not in VARIANTS:
            raise MethodError(f"scorecam: variant must be one of {', '.join(VARIANTS)}")
        self.variant = variant

    def masks(self, acts: Tensor, size: tuple[int, int]) -> Tensor:
        """Min-max normalised upsampled activations ``[N,1,H,W]`` for ``acts`` ``[N,u,v]``."""
        jacobgil = self.variant == "jacobgil"
        up = F.interpolate(acts[:, None], size=size, mode="bilinear", align_corners=jacobgil)
        lo = up.amin(dim=(2, 3), keepdim=True)
        span = up.amax(dim=(2, 3), keepdim=True) - lo
        if jacobgil:
            return (up - lo) / (span + 1e-8)
        return (up - lo) / torch.where(span > 0, span, torch.ones_like(span))

    def attribute(self, images: Tensor, targets: Tensor) -> Tensor:
        """The map from the score-weighted channels, without gradients."""
        with torch.no_grad():
            logits, acts = self.layer_forward(images, cut_graph=False)
            target_scores(logits, targets)  # an invalid target fails here, not silently later
            acts = acts.float()
            return combine(self.score_weights(images, targets, acts), acts)

    def score_weights(self, images: Tensor, targets: Tensor, acts: Tensor) -> Tensor:
        """Channel weights ``[B,K]`` from the masked forwards, for activations ``acts``."""
        b, k = acts.shape[:2]
        scores = torch.zeros(b * k, device=images.device)
        if self.variant == "official":
            flat = acts.flatten(2)
            live = (flat.amax(dim=2) > flat.amin(dim=2)).flatten().nonzero().squeeze(1)
        else:
            live = torch.arange(b * k, device=images.device)
        with torch.no_grad():
            for sl in self.chunks(live.numel(), track=True):
                rows = live[sl]
                img, ch = rows // k, rows % k
                mask = self.masks(acts[img, ch], tuple(images.shape[-2:]))
                logits = self.forward((images[img].float() * mask).to(images.dtype))
                if self.variant == "official":
                    logits = logits.softmax(dim=1)
                scores[rows] = target_scores(logits, targets[img])
        scores = scores.view(b, k)
        return scores.softmax(dim=1) if self.variant == "jacobgil" else scores
