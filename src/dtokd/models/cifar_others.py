"""The rest of the CIFAR KD zoo (CRD / ReviewKD / DKD protocol): WRN, VGG, MobileNetV2,
ShuffleNetV1/V2 and the bottleneck ResNet-50, for 32x32 inputs.

Every model exposes ``forward_features(x) -> (B, C)``, ``head`` and ``stages`` (for taps).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _Classifier(nn.Module):
    """``stem -> stages -> global average pool -> head``: the shape every zoo model shares."""

    stem: nn.Module
    stages: nn.Sequential
    head: nn.Linear

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x)).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def _conv_bn(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------- Wide ResNet (Zagoruyko & Komodakis)


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(_Classifier):
    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            stages.append(
                nn.Sequential(
                    *[_WideBlock(cin if b == 0 else w, w, (1 if i == 0 else 2) if b == 0 else 1) for b in range(n)]
                )
            )
            cin = w
        stages.append(nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True)))
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes)


# ----------------------------------------------------------------- VGG (Simonyan & Zisserman), CIFAR

VGG_CONFIGS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


class VGG(_Classifier):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
        self.stem = nn.Identity()
        stages, cin = [], in_channels
        for i, stage in enumerate(VGG_CONFIGS[depth]):
            layers: list[nn.Module] = []
            for cout in stage:
                layers.append(_conv_bn(cin, cout))
                cin = cout
            if i < 4:
                layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes)


# ----------------------------------------------------------------- MobileNetV2 (Sandler et al.), width 0.5


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            _conv_bn(cin, hidden, 1),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, relu=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(_Classifier):
    SETTINGS = [
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, width: float = 0.5, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        cin = int(32 * width)
        self.stem = _conv_bn(in_channels, cin, 3, 1)
        stages = []
        for t, c, n, s in self.SETTINGS:
            cout = int(c * width)
            stages.append(
                nn.Sequential(
                    *[_InvertedResidual(cin if i == 0 else cout, cout, s if i == 0 else 1, t) for i in range(n)]
                )
            )
            cin = cout
        stages.append(_conv_bn(cin, 1280, 1))
        self.stages = nn.Sequential(*stages)
        self.num_features = 1280
        self.head = nn.Linear(1280, num_classes)


# ----------------------------------------------------------------- ShuffleNet V1 / V2 (Zhang et al.; Ma et al.)


def _shuffle(x: Tensor, groups: int) -> Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class _ShuffleV1Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride, self.groups = stride, groups
        mid = cout // 4
        first_groups = 1 if cin == 24 else groups
        branch_out = cout - cin if stride == 2 else cout
        self.conv1 = _conv_bn(cin, mid, 1, groups=first_groups)
        self.conv2 = _conv_bn(mid, mid, 3, stride, groups=mid, relu=False)
        self.conv3 = _conv_bn(mid, branch_out, 1, groups=groups, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv3(self.conv2(_shuffle(self.conv1(x), self.groups if x.shape[1] != 24 else 1)))
        if self.stride == 2:
            return torch.relu(torch.cat([out, nn.functional.avg_pool2d(x, 3, 2, 1)], 1))
        return torch.relu(out + x)


class ShuffleNetV1(_Classifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, groups: int = 3) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, 24, 1)
        stages, cin = [], 24
        for cout, blocks in zip((240, 480, 960), (4, 8, 4)):
            stages.append(
                nn.Sequential(
                    *[_ShuffleV1Block(cin if i == 0 else cout, cout, 2 if i == 0 else 1, groups) for i in range(blocks)]
                )
            )
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes)


class _ShuffleV2Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride == 2:
            self.left: nn.Module = nn.Sequential(
                _conv_bn(cin, cin, 3, 2, groups=cin, relu=False), _conv_bn(cin, branch, 1)
            )
            right_in = cin
        else:
            self.left = nn.Identity()
            right_in = branch
        self.right = nn.Sequential(
            _conv_bn(right_in, branch, 1),
            _conv_bn(branch, branch, 3, stride, groups=branch, relu=False),
            _conv_bn(branch, branch, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 2:
            out = torch.cat([self.left(x), self.right(x)], 1)
        else:
            a, b = x.chunk(2, 1)
            out = torch.cat([a, self.right(b)], 1)
        return _shuffle(out, 2)


class ShuffleNetV2(_Classifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, 24, 3)
        stages, cin = [], 24
        for cout, blocks in zip((116, 232, 464), (3, 7, 3)):
            stages.append(
                nn.Sequential(
                    *[_ShuffleV2Block(cin if i == 0 else cout, cout, 2 if i == 0 else 1) for i in range(blocks + 1)]
                )
            )
            cin = cout
        stages.append(_conv_bn(cin, 1024, 1))
        self.stages = nn.Sequential(*stages)
        self.num_features = 1024
        self.head = nn.Linear(1024, num_classes)


# ----------------------------------------------------------------- ResNet-50 (bottleneck), CIFAR stem


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            _conv_bn(cin, width, 1), _conv_bn(width, width, 3, stride), _conv_bn(width, cout, 1, relu=False)
        )
        self.shortcut = nn.Identity() if (stride == 1 and cin == cout) else _conv_bn(cin, cout, 1, stride, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet50(_Classifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, 64, 3)
        stages, cin = [], 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            stages.append(
                nn.Sequential(
                    *[
                        _Bottleneck(cin if b == 0 else 4 * width, width, (2 if i > 0 else 1) if b == 0 else 1)
                        for b in range(blocks)
                    ]
                )
            )
            cin = 4 * width
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes)
