"""A model whose own cost is negligible (one 4x4 stride-4 convolution, pooling, a linear
head), as a ``package.module:callable`` model source (``bench.tiny_model:tiny_net``): a whole
``salmap run`` with it measures the CPU the pipeline spends around the model."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()
