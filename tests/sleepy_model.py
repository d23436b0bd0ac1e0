"""A tiny CNN whose forward pass takes a fixed wall time per image without using a CPU, as a
``package.module:callable`` model source (``sleepy_model:sleepy_net``, tests folder on the
path). Jobs of several actors then take predictable time on a shared 2-core machine: the work
of a method is its forwards per image times ``SLEEPY_MS`` (milliseconds, from the
environment, default 100)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class SleepyNet(nn.Module):
    def __init__(self, ms_per_image: float, num_classes: int = 10) -> None:
        super().__init__()
        self.ms = ms_per_image
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.ms * x.shape[0] / 1000.0)
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def sleepy_net() -> nn.Module:
    torch.manual_seed(0)
    return SleepyNet(float(os.environ.get("SLEEPY_MS", "100"))).eval()
