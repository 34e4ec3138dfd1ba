"""CIFAR ResNets of the KD literature (He et al. 2016, as used by CRD / ReviewKD / DKD).

``resnetN``: three stages of ``(N - 2) / 6`` basic blocks with 16, 32, 64 channels after a
16-channel stem; ``resnet8x4`` / ``resnet32x4``: the same with 32, 64, 128, 256 channels.
Each model exposes ``forward_features(x) -> pooled feature (B, C)``, ``head`` and the
stage modules ``stem``, ``stages`` for feature taps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (1x1 conv-BN when shapes change) shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(
        self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, channels = [], widths[0]
        for index, width in enumerate(widths[1:]):
            layers = []
            for b in range(blocks):
                layers.append(BasicBlock(channels, width, 2 if (index > 0 and b == 0) else 1))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels
        self.head = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def cifar_resnet(depth: int, *, wide: bool = False, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """``resnet{depth}`` (``wide=False``) or ``resnet{depth}x4`` (``wide=True``)."""
    widths = (32, 64, 128, 256) if wide else (16, 16, 32, 64)
    return CifarResNet(depth, widths, num_classes=num_classes, in_channels=in_channels)
