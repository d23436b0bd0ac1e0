"""Shared pieces of the mask-optimisation methods (DMBP, HDM): an element-wise optimiser for
per-image mask tensors, seeded init noise that is the same for every image, and a smooth norm.

Everything here acts element by element (or per row), so optimising the masks of several images
together with a SUMMED loss gives the same masks as optimising each image alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import MethodError

OPTIMIZERS = ("adam", "sgd")


class MaskOptimizer:
    """Adam or plain SGD on a list of mask tensors, updated in place from given gradients.

    The gradients come from ``torch.autograd.grad`` (never ``.grad``). Adam follows Kingma &
    Ba (bias-corrected moments, ``betas=(0.9, 0.999)``, ``eps=1e-8``, the PyTorch defaults);
    it is element-wise, so every mask entry moves independently of the others. ``bounds``
    clamps the values after each step (e.g. ``(0, 1)`` for masks optimised directly).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        kind: str = "adam",
        lr: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        bounds: tuple[float, float] | None = None,
    ) -> None:
        check_optimizer(kind, lr)
        self.params = list(params)
        self.kind, self.lr, self.betas, self.eps, self.bounds = kind, float(lr), betas, eps, bounds
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        """One update of the masks from their gradients (SGD or Adam), in place."""
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            if self.kind == "sgd":
                p.sub_(self.lr * g)
            else:
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = m / (1 - b1**self.t)
                v_hat = v / (1 - b2**self.t)
                p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))
            if self.bounds is not None:
                p.clamp_(*self.bounds)


def check_optimizer(kind: str, lr: float) -> None:
    """Raise a MethodError for an unknown optimizer or a learning rate that is not positive."""
    if kind not in OPTIMIZERS:
        raise MethodError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    if not lr > 0:
        raise MethodError(f"learning rate must be > 0, got {lr}")


def shared_noise(seed: int, shape: Sequence[int], index: int = 0) -> Tensor:
    """Uniform ``[0, 1)`` noise of ``shape``, drawn on the CPU from ``(seed, index)``.

    Drawn once per mask tensor and broadcast over the batch, so an image's initial masks do not
    depend on its batch position, its batch size or the device.
    """
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    return torch.rand(tuple(shape), generator=gen)


def smooth_norm(d: Tensor, eps: float) -> Tensor:
    """``sqrt(|d|^2 + eps^2) - eps`` over the last dimension: the L2 norm, smoothed at 0.

    Exactly 0 for ``d = 0`` and within ``eps`` of ``|d|`` elsewhere. The plain norm's gradient
    ``d/|d|`` has unit size for any ``d != 0``, so float noise of 1e-7 in ``d`` (e.g. from a
    different batch size) would steer the first optimisation step; here it gives ~``d/eps``.
    """
    sq = d.square().sum(dim=-1)
    if eps <= 0:
        return sq.sqrt()
    return (sq + eps * eps).sqrt() - eps


def smooth_hinge(d: Tensor, width: float) -> Tensor:
    """``max(d, 0)`` with its kink rounded over ``[0, width]`` (a Huber-style hinge).

    0 for ``d <= 0``, ``d^2 / (2 width)`` up to ``width``, ``d - width / 2`` beyond: the
    gradient rises continuously from 0 to 1, so an optimum sitting at the hinge does not
    flip between a zero and a full gradient from one step to the next (or from float noise).
    """
    if width <= 0:
        return d.clamp_min(0)
    return torch.where(d < width, d.clamp_min(0).square() / (2 * width), d - width / 2)


def logit(p: float) -> float:
    """Inverse sigmoid of ``p`` in (0, 1)."""
    if not 0.0 < p < 1.0:
        raise MethodError(f"a sigmoid-parameterised mask needs 0 < mask_init < 1, got {p}")
    return math.log(p / (1.0 - p))
