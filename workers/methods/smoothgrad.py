"""SmoothGrad (Smilkov et al. 2017): the input gradient averaged over noisy copies of the image.

Cost per image: nsamples x (1 forward + 1 backward to the input) = 25 F+B with the defaults.
Defaults and their sources: stdev_spread=0.15 of each image's input range, nsamples=25, magnitude=True (squared gradients): PAIR-code/saliency core/base.py GetSmoothedMask; map max_c|.|; seed=0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Method
from .errors import MethodError
from .gradient import input_gradient
from .registry import register


def unit_noise(seed: int, nsamples: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise ``[nsamples, *shape]`` drawn on the CPU from ``seed``.

    Drawn once per call and shared by every sample of the batch, so a sample's map does not
    depend on its batch position or on the device.
    """
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((nsamples, *shape), generator=gen)


@register("smoothgrad")
class SmoothGrad(Method):
    """``G = mean_i grad(x + sigma * z_i)`` (or of its square), reduced with ``max_c |.|``.

    * ``sigma``: ``stdev_spread * (max(x) - min(x))`` over each image's own input tensor
      (PAIR-code/saliency ``GetSmoothedMask``: ``stdev_spread=0.15``), or the absolute
      ``stdev`` when given (Captum ``NoiseTunnel`` convention, ``stdevs`` absolute).
    * ``nsamples`` (default 25, PAIR), ``magnitude`` (default True, PAIR: average the
      squared gradients, so the map is >= 0; False averages signed gradients).
    * ``z_i``: :func:`unit_noise` from ``seed``, the same ``z_i`` for every image.
    * Map: ``max_c |G_c|``, as the vanilla gradient, so ``sigma -> 0`` gives the gradient map
      (squared with ``magnitude=True``). Returns ``[B,H,W]``.

    The ``B * nsamples`` noisy copies go through the model ``inner_batch_size`` at a time.
    """

    work_per_image = staticmethod(lambda p: float(p["nsamples"]))
    cost = "nsamples x (1 forward + 1 backward to the input)"
    defaults_source = (
        "PAIR-code/saliency core/base.py GetSmoothedMask: stdev_spread=0.15 of the input range, "
        "nsamples=25, magnitude=True (squared gradients); reduction max_c|.|"
    )

    def __init__(
        self,
        model: nn.Module,
        stdev_spread: float = 0.15,
        nsamples: int = 25,
        magnitude: bool = True,
        seed: int = 0,
        stdev: float | None = None,
    ) -> None:
        super().__init__(model)
        if nsamples < 1:
            raise MethodError(f"smoothgrad: nsamples must be >= 1, got {nsamples}")
        if stdev_spread < 0 or (stdev is not None and stdev < 0):
            raise MethodError("smoothgrad: stdev_spread and stdev must be >= 0")
        self.stdev_spread = float(stdev_spread)
        self.nsamples = int(nsamples)
        self.magnitude = bool(magnitude)
        self.seed = int(seed)
        self.stdev = None if stdev is None else float(stdev)

    def sigmas(self, images: Tensor) -> Tensor:
        """Noise standard deviation per image, ``[B]``."""
        if self.stdev is not None:
            return torch.full((images.shape[0],), self.stdev, device=images.device)
        flat = images.detach().float().flatten(1)
        return self.stdev_spread * (flat.amax(dim=1) - flat.amin(dim=1))

    def attribute(self, images: Tensor, targets: Tensor) -> Tensor:
        """The map: the (squared) input gradient averaged over ``nsamples`` noisy copies."""
        b, n = images.shape[0], self.nsamples
        noise = unit_noise(self.seed, n, tuple(images.shape[1:])).to(images.device)
        sigma = self.sigmas(images)
        total = torch.zeros(images.shape, dtype=torch.float32, device=images.device)
        rows = torch.arange(b * n, device=images.device)  # row r = image r // n, noise r % n
        for sl in self.chunks(b * n, track=True):
            img, k = rows[sl] // n, rows[sl] % n
            x = images[img].float() + sigma[img, None, None, None] * noise[k]
            grad = input_gradient(self, x.to(images.dtype), targets[img])
            total.index_add_(0, img, grad.square() if self.magnitude else grad)
        return (total / n).abs().amax(dim=1)
