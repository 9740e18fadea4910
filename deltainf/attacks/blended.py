"""Blended backdoor (Chen, Liu, Li, Lu, Song 2017, arXiv 1712.05526), dirty-label.

The trigger is a whole-image pattern t mixed into the input: ``x' = (1 - alpha) * x + alpha * t``.
Chen et al. used a fixed image (Hello Kitty) or random noise; with no download allowed the pattern
here is seeded uniform noise in [0, 1] (one value per channel and pixel), or a tensor the caller
passes. Poisons are drawn from the source classes (default: every class but the target, all-to-one),
blended and relabelled to the target; at test time the same blend on source-class test images
should flip them to the target. BackdoorBench's CIFAR-10 defaults: alpha 0.2, 10 % poisons, target 0.
"""
from __future__ import annotations

from typing import Sequence

import torch

from deltainf.attacks.base import PoisonResult, check_real, check_trigger_attack, stamp_trigger_attack
from deltainf.data.dataset import ImageDataset

__all__ = ["BlendTrigger", "blended_attack", "DIGITS_BLENDED"]

# BackdoorBench's CIFAR-10 settings, which take on digits unchanged (docs/RESULTS.md)
DIGITS_BLENDED = {"target_class": 0, "source_classes": None, "fraction": 0.10, "alpha": 0.2}


class BlendTrigger:
    """``x' = (1 - alpha) * x + alpha * pattern`` on pixel-space images.

    Args:
        image_shape: (C, H, W) of the images it will be applied to.
        alpha: blend ratio in (0, 1].
        pattern: ``"noise"`` (uniform [0, 1] per channel and pixel, drawn from ``seed``) or a float
            tensor (C, H, W) / (H, W) in [0, 1].
        seed: seed of the noise pattern.
    """

    def __init__(self, image_shape: Sequence[int], alpha: float = 0.2, pattern="noise", seed: int = 0):
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        c, h, w = (int(v) for v in image_shape)
        if not 0.0 < check_real(alpha, "alpha") <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if isinstance(pattern, torch.Tensor):
            t = pattern.detach().float().cpu()
            if t.ndim == 2:
                t = t.expand(c, -1, -1)
            if tuple(t.shape) != (c, h, w):
                raise ValueError(f"a tensor pattern must have shape ({c}, {h}, {w}) or ({h}, {w}), got "
                                 f"{tuple(pattern.shape)}")
            if not bool(((t >= 0) & (t <= 1)).all()):  # NaN fails both comparisons
                raise ValueError("pattern: a tensor pattern must have values in [0, 1]")
            self.pattern_name = "custom"
        elif pattern == "noise":
            t = torch.rand((c, h, w), generator=torch.Generator().manual_seed(int(seed)))
            self.pattern_name = "noise"
        else:
            raise ValueError(f"pattern must be 'noise' or a tensor, got {pattern!r}")
        self.image_shape = (c, h, w)
        self.alpha = float(alpha)
        self.pattern = t.contiguous()
        self.seed = int(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Blend the pattern into x (C, H, W) or (N, C, H, W); returns a new tensor."""
        if tuple(x.shape[-3:]) != self.image_shape:
            raise ValueError(f"images must end in shape {self.image_shape}, got {tuple(x.shape)}")
        return (1.0 - self.alpha) * x + self.alpha * self.pattern.to(x.device, x.dtype)

    def describe(self) -> dict:
        """JSON-serialisable summary."""
        return {"pattern": self.pattern_name, "alpha": self.alpha, "seed": self.seed}


def blended_attack(train: ImageDataset, test: ImageDataset, target_class: int,
                   source_classes: int | Sequence[int] | None = None, num_poisons: int | None = None,
                   fraction: float | None = None, alpha: float = 0.2, pattern="noise", seed: int = 0) -> PoisonResult:
    """Poison ``train`` with a blended backdoor.

    Args:
        train, test: clean ImageDatasets (same image shape and classes).
        target_class: label given to every poison.
        source_classes: class(es) the poisons are drawn from (None = all but the target).
        num_poisons / fraction: number of poisons, or a fraction of the whole training set (exactly one).
        alpha, pattern: the trigger (see :class:`BlendTrigger`); the noise pattern is drawn from ``seed``.
        seed: seed of the poison draw and the pattern.

    Returns:
        :class:`PoisonResult` with ``name="blended"``.
    """
    target_class, sources, n = check_trigger_attack(train, test, target_class, source_classes, num_poisons, fraction,
                                                    seed)
    trigger = BlendTrigger(train.image_shape, alpha=alpha, pattern=pattern, seed=seed + 7919)
    poisoned, idx, triggered, test_idx = stamp_trigger_attack(train, test, trigger, sources, target_class, n, seed,
                                                              "blended")
    params = {"target_class": target_class, "source_classes": list(sources), "num_poisons": n,
              "fraction_of_train": n / len(train), "seed": seed, "trigger": trigger.describe()}
    return PoisonResult(train=poisoned, poison_indices=idx, target_class=target_class, source_classes=sources,
                        triggered_test=triggered, test_indices=test_idx, original_labels=train.labels[idx].clone(),
                        trigger=trigger, name="blended", params=params)
