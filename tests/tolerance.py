"""Numeric tolerances derived from the float type and the size of the computation, not from
one CPU's result.

Two evaluations of the same function that sum in another order (another convolution algorithm
for another batch size, another BLAS kernel, another CPU's vector width) differ by rounding
alone. A sum of n terms carries an error of about sqrt(n) * u * sum|terms| (u the unit
roundoff of the type; the probabilistic bound of Higham & Mary, SIAM J. Sci. Comput. 2019),
and through a network the relative errors of its reductions add up: forward and backward, one
per weighted layer. An optimisation that takes ``steps`` gradient steps adds one such error per
step. The tolerance is that bound, relative to the result's scale, times ``SAFETY`` for the
constants the model leaves out.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SAFETY = 4.0


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps / 2


def reductions(model: nn.Module) -> tuple[int, int]:
    """(largest fan-in, number of weighted layers) of ``model``: the longest sum one output
    element takes, and how many such sums a forward chains."""
    fan_in, depth = 1, 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            fan_in, depth = max(fan_in, m.in_features), depth + 1
        elif isinstance(m, nn.modules.conv._ConvNd):
            fan_in = max(fan_in, m.in_channels // m.groups * math.prod(m.kernel_size))
            depth += 1
    return fan_in, max(depth, 1)


def reorder_atol(model: nn.Module, scale: float, *, backward: bool = True, steps: int = 0,
                 dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance for a result of magnitude ``scale`` computed by ``model`` (and its
    gradient, ``backward``; ``steps`` optimisation steps) with sums in another order."""
    fan_in, depth = reductions(model)
    passes = depth * (2 if backward else 1) * (1 + steps)
    return SAFETY * passes * math.sqrt(fan_in) * unit_roundoff(dtype) * scale
