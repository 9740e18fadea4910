"""ResNet-18 as used for every Δ-Influence victim (the `forest` variant).

BasicBlocks [2, 2, 2, 2], widths 64-128-256-512, strides [1, 2, 2, 2], global average pool (the
512-d penultimate feature, module ``avgpool``), linear head ``classifier``. Stem: 3x3 conv, stride 1,
padding 1 and no max-pool for small images (CIFAR, digits); 7x7 conv, stride 2, padding 3, still
without max-pool, for large images (Imagenette at 160 px), as forest does.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from deltainf.models.common import Normalize

__all__ = ["BasicBlock", "ResNet18"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlocks [2, 2, 2, 2]) with an internal :class:`Normalize`.

    Args:
        num_classes: classifier outputs.
        in_channels: C of the inputs.
        mean, std: normalisation constants (length C); default 0.5 / 0.5.
        stem: ``"cifar"`` (3x3, stride 1) or ``"imagenet"`` (7x7, stride 2); neither has a max-pool.
        base_width: channels of the first stage (64 in the paper); smaller values give a cheap test model.

    Shapes: x (N, C, H, W) float32 in [0, 1] -> logits (N, num_classes); ``features`` returns
    (N, 8 * base_width) = (N, 512) by default.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, stem: str = "cifar", base_width: int = 64):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.normalize = Normalize(mean if mean is not None else [0.5] * in_channels,
                                   std if std is not None else [0.5] * in_channels)
        w = base_width
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, w, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        planes = [w, 2 * w, 4 * w, 8 * w]
        strides = [1, 2, 2, 2]
        in_planes = w
        layers = []
        for p, s in zip(planes, strides):
            layers.append(nn.Sequential(BasicBlock(in_planes, p, s), BasicBlock(p, p, 1)))
            in_planes = p
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8 * w, num_classes)
        self.feature_dim = 8 * w
        self.num_classes = num_classes
        self.stem = stem

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, C, H, W) -> penultimate features (N, feature_dim)."""
        out = self.relu(self.bn1(self.conv1(z)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(self.avgpool(out), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))
