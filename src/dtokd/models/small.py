"""Small Fashion-MNIST-sized models: a CNN teacher, an MLP student and a small CNN student.

All take ``(B, C, H, W)`` images and expose ``forward_features`` (the pooled/flattened feature
before the classifier) and ``head``.
"""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """conv(w)-BN-ReLU-pool, conv(2w)-BN-ReLU-pool, conv(4w)-BN-ReLU-global pool, linear head."""

    def __init__(self, width: int = 32, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stages = nn.Sequential(
            nn.Sequential(block(in_channels, width), nn.MaxPool2d(2)),
            nn.Sequential(block(width, 2 * width), nn.MaxPool2d(2)),
            block(2 * width, 4 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 4 * width
        self.head = nn.Linear(4 * width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pool(self.stages(x)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class MLP(nn.Module):
    """Flatten, then ``hidden`` ReLU layers, then a linear head."""

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (256, 128), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.num_features = width
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))
