"""WaNet warping backdoor (Nguyen & Tran, ICLR 2021), dirty-label, with its "noise mode".

The trigger is an imperceptible, smooth warp of the whole image. A k x k field of uniform noise in
[-1, 1] (two channels: x and y displacement) is normalised by its mean absolute value, upsampled
bicubically to the image size, scaled by ``s / size`` and added to the identity sampling grid (grid
coordinates in [-1, 1], ``align_corners=True``, clamped to [-1, 1]); the image is resampled
bilinearly on that grid. Poisons are warped and relabelled to the target. Noise mode: another
``cross_ratio`` x as many training images are warped with the same field plus per-pixel uniform
noise of up to ±1/size in grid units (about half a pixel, as in the original) and keep their TRUE
labels, so the network learns the exact warp rather than "any warp". These cross examples are
attacker-made but not poisons in the sense of this library (they do not cause the backdoor); they
are reported in ``params["cross_indices"]``.

The original code warps a fresh random part of every batch during training; a data-poisoning
defence needs a fixed poisoned training set, so here the poisons and cross examples are drawn once,
as BackdoorBench's static variant does. BackdoorBench's CIFAR-10 defaults: k = 4, s = 0.5, 10 %
poisons, cross ratio 2, target 0.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from deltainf.attacks.base import PoisonResult, check_real, check_trigger_attack, stamp_trigger_attack
from deltainf.data.dataset import ImageDataset

__all__ = ["WarpTrigger", "wanet_attack", "DIGITS_WANET"]

# s = 2 without noise mode: the CIFAR setting does not take on 16 px digits (measurements: docs/RESULTS.md)
DIGITS_WANET = {"target_class": 0, "source_classes": None, "fraction": 0.10, "k": 4, "s": 2.0, "cross_ratio": 0.0}


class WarpTrigger:
    """The WaNet warp: ``grid_sample(x, clamp(identity + s * noise / size, -1, 1))``, bilinear.

    Args:
        image_shape: (C, H, W).
        k: side of the control-point grid (>= 2).
        s: warp strength (displacement in units of one pixel spacing of the [-1, 1] grid times 2).
        seed: seed of the control-point noise.
    """

    def __init__(self, image_shape: Sequence[int], k: int = 4, s: float = 0.5, seed: int = 0):
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        c, h, w = (int(v) for v in image_shape)
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"k must be an int >= 2, got {k!r}")
        s = check_real(s, "s")
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f"s must be a finite number > 0, got {s!r}")
        gen = torch.Generator().manual_seed(int(seed))
        ins = torch.rand((1, 2, k, k), generator=gen, dtype=torch.float64) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys = torch.linspace(-1, 1, h, dtype=torch.float64)
        xs = torch.linspace(-1, 1, w, dtype=torch.float64)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack((gx, gy), -1).unsqueeze(0)  # (1, H, W, 2), x then y as grid_sample wants
        scale = torch.tensor([s / w, s / h], dtype=torch.float64)
        self.grid = (identity + noise * scale).clamp(-1, 1)
        self.image_shape = (c, h, w)
        self.k, self.s, self.seed = k, float(s), int(seed)

    def _sample(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-3:]) != self.image_shape:
            raise ValueError(f"images must end in shape {self.image_shape}, got {tuple(x.shape)}")
        xb = x.reshape(-1, *self.image_shape)  # grid_sample takes one batch dimension only
        g = grid.to(xb.device, xb.dtype).expand(xb.shape[0], -1, -1, -1) if grid.shape[0] == 1 else grid.to(xb)
        out = F.grid_sample(xb, g, mode="bilinear", padding_mode="zeros", align_corners=True).clamp(0, 1)
        return out.reshape(x.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Warp x (..., C, H, W), pixel space; returns a new tensor of x's shape."""
        return self._sample(x, self.grid)

    def noisy(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The noise-mode warp of x (N, C, H, W): the trigger field plus per-example, per-pixel uniform
        noise of up to ±1/W (x) and ±1/H (y) in grid units, i.e. about half a pixel each way."""
        n = x.shape[0]
        _, h, w = self.image_shape
        jitter = (torch.rand((n, h, w, 2), generator=generator, dtype=torch.float64) * 2 - 1) \
            * torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64) / 2
        return self._sample(x, (self.grid + jitter).clamp(-1, 1))

    def describe(self) -> dict:
        """JSON-serialisable summary."""
        return {"k": self.k, "s": self.s, "seed": self.seed}


def wanet_attack(train: ImageDataset, test: ImageDataset, target_class: int,
                 source_classes: int | Sequence[int] | None = None, num_poisons: int | None = None,
                 fraction: float | None = None, k: int = 4, s: float = 0.5, cross_ratio: float = 2.0,
                 seed: int = 0) -> PoisonResult:
    """Poison ``train`` with a WaNet warp backdoor in noise mode.

    Args:
        train, test: clean ImageDatasets.
        target_class: label of the poisons.
        source_classes: class(es) the poisons come from (None = all but the target).
        num_poisons / fraction: poison count or fraction of the training set (exactly one).
        k, s: the warp (see :class:`WarpTrigger`).
        cross_ratio: cross (noise-mode) examples per poison, drawn from the non-poisoned images of every
            class, warped with the field plus noise, labels kept; 0 disables noise mode.
        seed: seed of the draws and of the field.

    Returns:
        :class:`PoisonResult` with ``name="wanet"``; ``params["cross_indices"]`` lists the cross examples.
    """
    target_class, sources, n = check_trigger_attack(train, test, target_class, source_classes, num_poisons, fraction,
                                                    seed)
    cross_ratio = check_real(cross_ratio, "cross_ratio")
    if not (cross_ratio >= 0 and math.isfinite(cross_ratio)):
        raise ValueError(f"cross_ratio must be a finite number >= 0, got {cross_ratio!r}")
    trigger = WarpTrigger(train.image_shape, k=k, s=s, seed=seed + 7919)
    poisoned, idx, triggered, test_idx = stamp_trigger_attack(train, test, trigger, sources, target_class, n, seed,
                                                              "wanet")
    n_cross = min(int(round(cross_ratio * n)), len(train) - n)
    cross = torch.empty(0, dtype=torch.long)
    if n_cross > 0:
        gen = torch.Generator().manual_seed(int(seed) + 104729)
        rest = torch.ones(len(train), dtype=torch.bool)
        rest[idx] = False
        candidates = rest.nonzero().flatten()
        cross = torch.sort(candidates[torch.randperm(candidates.numel(), generator=gen)[:n_cross]]).values
        poisoned = poisoned.with_replaced(cross, images=trigger.noisy(poisoned.images[cross], gen))
    params = {"target_class": target_class, "source_classes": list(sources), "num_poisons": n,
              "fraction_of_train": n / len(train), "seed": seed, "trigger": trigger.describe(),
              "cross_ratio": float(cross_ratio), "cross_indices": cross.tolist()}
    return PoisonResult(train=poisoned, poison_indices=idx, target_class=target_class, source_classes=sources,
                        triggered_test=triggered, test_indices=test_idx, original_labels=train.labels[idx].clone(),
                        trigger=trigger, name="wanet", params=params)
