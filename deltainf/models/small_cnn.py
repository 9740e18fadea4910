"""A small CNN sized for the 16x16x3 digits default (trains to ~98% in a few seconds on 2 CPU cores)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from deltainf.models.common import Normalize

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """normalize -> [conv3x3 -> ReLU -> maxpool2] x 2 -> adaptive-avg-pool 4x4 -> linear -> ReLU -> linear.

    No BatchNorm and no dropout: the model is a deterministic function of its weights in train and eval
    mode alike, which keeps influence computations (EK-FAC over Conv2d/Linear) simple and exact.

    Args:
        num_classes: outputs of the classifier.
        in_channels: C of the input images.
        image_size: H (= W) of the inputs; any size >= 4 works (the 4x4 adaptive pool fixes the
            flattened size, and is the identity for 16x16 inputs).
        mean, std: per-channel normalisation constants (length ``in_channels``); default 0.5 / 0.5.
        width: channels of the first conv (the second has ``2 * width``).
        hidden: size of the penultimate layer (``feature_dim``).

    Shapes: x (N, in_channels, H, W) float32 in [0, 1] -> logits (N, num_classes).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 16,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 width: int = 16, hidden: int = 128):
        super().__init__()
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {image_size}")
        self.normalize = Normalize(mean if mean is not None else [0.5] * in_channels,
                                   std if std is not None else [0.5] * in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, hidden), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))
