"""Small Fashion-MNIST-sized models: a CNN teacher, an MLP student and a small CNN student.

All take ``(B, C, H, W)`` images and expose ``forward_features`` (the pooled/flattened feature
before the classifier) and ``head``.
"""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """conv(w)-BN-ReLU-maxpool, conv(2w)-BN-ReLU-maxpool, flatten, linear(hidden)-ReLU, linear head.

    The flattened map keeps the spatial layout, which Fashion-MNIST's classes (shirt, coat,
    pullover) need; ``stages`` holds the two conv blocks for feature taps.
    """

    def __init__(
        self, width: int = 32, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: int = 128
    ) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.stages = nn.Sequential(block(in_channels, width), block(width, 2 * width))
        side = image_size // 4
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU())
        self.num_features = hidden
        self.head = nn.Linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.neck(self.stages(x))

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
