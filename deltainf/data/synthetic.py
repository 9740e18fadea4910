"""Synthetic, learnable image data for scale tests (any N, C, H, W, number of classes).

Each class c owns a smooth random prototype P_c (C, H, W): Gaussian noise on a 4x4 grid upsampled
bilinearly, so classes differ in their low-frequency colour layout. An example of class c is

    x = clamp(0.5 + contrast * (P_c + noise * S), 0, 1) + small pixel noise (clamped),

where S is a per-example smooth random field drawn the same way. Prototypes depend only on ``seed``;
the per-example noise depends on ``seed`` and ``split``, so train and test share classes but not
examples. Labels are balanced (``i % num_classes``, then shuffled). A small CNN learns it well above
chance in one epoch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deltainf.data.dataset import ImageDataset

__all__ = ["make_synthetic_dataset"]

_SPLIT_OFFSET = {"train": 1, "test": 2}


def _smooth_field(n: int, c: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    coarse = torch.randn(n, c, 4, 4, generator=gen)
    field = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return field / field.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)


def make_synthetic_dataset(n: int, channels: int = 3, height: int = 32, width: int = 32,
                           num_classes: int = 10, seed: int = 0, split: str = "train",
                           noise: float = 0.6, pixel_noise: float = 0.03,
                           chunk_size: int = 8192) -> ImageDataset:
    """Generate a synthetic image-classification dataset.

    Args:
        n: number of examples (>= 1).
        channels, height, width: image shape (each >= 1).
        num_classes: number of classes (>= 2).
        seed: prototypes are a function of ``seed`` alone; examples of ``(seed, split)``.
        split: ``"train"`` or ``"test"``.
        noise: relative strength of the per-example smooth deformation (0 = every example equals
            its prototype up to pixel noise; larger = harder).
        pixel_noise: std of i.i.d. per-pixel Gaussian noise.
        chunk_size: examples generated per step (bounds temporary memory for large n).

    Returns:
        ImageDataset, images float32 (n, channels, height, width) in [0, 1], labels int64 (n,).
    """
    for name, v, lo in (("n", n, 1), ("channels", channels, 1), ("height", height, 1),
                        ("width", width, 1), ("num_classes", num_classes, 2), ("chunk_size", chunk_size, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if noise < 0 or pixel_noise < 0:
        raise ValueError(f"noise and pixel_noise must be >= 0, got {noise!r}, {pixel_noise!r}")

    proto_gen = torch.Generator().manual_seed(seed)
    prototypes = _smooth_field(num_classes, channels, height, width, proto_gen)
    gen = torch.Generator().manual_seed(seed * 1000003 + _SPLIT_OFFSET[split])
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    images = torch.empty(n, channels, height, width)
    contrast = 0.18
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        y = labels[start:stop]
        field = prototypes[y] + noise * _smooth_field(stop - start, channels, height, width, gen)
        x = 0.5 + contrast * field + pixel_noise * torch.randn(stop - start, channels, height, width,
                                                               generator=gen)
        images[start:stop] = x.clamp_(0.0, 1.0)
    return ImageDataset(images, labels, num_classes=num_classes, check_range=False,
                        name=f"synthetic-{split}-{n}x{channels}x{height}x{width}")
