"""Models of the end-to-end tests, as ``module:callable`` sources (``tiny_models:tiny_resnet``;
the tests folder is on every test process's path, Ray workers included).

A job's fixed cost on the 2-core test machine is mostly its actors' start: a torchvision source
imports torchvision (and with it ``torch._dynamo``) and builds the network in every actor. The
end-to-end tests check the pipeline, not an architecture (the method tests run the real ones),
so their jobs use a small residual CNN with what the methods care about: Conv2d + BatchNorm +
in-place ReLU, a residual add, max pooling, global average pooling and a linear head. Like
ResNet it downsamples by 32 (CAM maps 2x2 at 64 px); 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer3 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        self.layer4 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_resnet() -> nn.Module:
    """Seeded weights and BatchNorm statistics: every process builds the same network."""
    g = torch.Generator().manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()
