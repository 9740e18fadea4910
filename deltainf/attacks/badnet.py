"""BadNets patch backdoor (Gu, Dolan-Gavitt, Garg 2017), dirty-label, source class(es) -> target.

Algorithm: pick a trigger (mask m, pattern p) and a target
label t; draw the poisons from the source-class training images; replace each chosen image x by
``(1 - m) * x + m * p`` and its label by t, in place (the dataset keeps its size and order); train
normally. At test time the same stamp on clean source-class test images should flip them to t.

The Δ-Influence BadNet/CIFAR-10 setting poisons 10 % of one source class (1 % of the data) with a
4-pixel black pattern near the bottom-right corner; BackdoorBench and Goel et al. use a 3x3 white
square. Here pattern, size, location and margin are options; the default is a 3x3 black/white
checkerboard one pixel from the bottom-right corner, which stands out on any background (a pure
white square would vanish on a white image region, a black one on the black digits background).
"""
from __future__ import annotations

from typing import Sequence

import torch

from deltainf._util import as_int
from deltainf.attacks.base import PoisonResult, check_real, check_trigger_attack, stamp_trigger_attack
from deltainf.data.dataset import ImageDataset

__all__ = ["PatchTrigger", "badnet_attack", "PATCH_PATTERNS", "PATCH_LOCATIONS", "DIGITS_BADNET"]

PATCH_PATTERNS = ("checkerboard", "white", "black", "pixels4")
PATCH_LOCATIONS = ("bottom-right", "bottom-left", "top-right", "top-left")

# The paper's 8 -> 5 with 5 % poisons (half of class 8): a less granular denominator than 1 % (docs/RESULTS.md)
DIGITS_BADNET = {"target_class": 5, "source_classes": 8, "fraction": 0.05, "pattern": "checkerboard",
                 "size": 3, "location": "bottom-right", "margin": 1}


class PatchTrigger:
    """A patch stamped at a fixed position: ``x' = (1 - m) * x + m * p``.

    Args:
        image_shape: (C, H, W) of the images it will be applied to.
        pattern: ``"checkerboard"`` (1 at the patch's top-left corner, alternating), ``"white"``,
            ``"black"``, ``"pixels4"`` (the 4-pixel ART/Δ-Influence pattern at offsets (−2,−2),
            (−3,−3), (−2,−4), (−4,−2) of the patch corner, value ``value``), or a float tensor
            (C, size, size) / (size, size) in [0, 1].
        size: side of the square patch in pixels (ignored for a tensor pattern, taken from it).
        location: a corner name from ``PATCH_LOCATIONS`` or an explicit (row, col) of ints, the patch's
            top-left pixel.
        margin: distance in pixels between the patch and the image border for corner locations; None
            (default) = 0 for ``"pixels4"``, whose offsets are counted from the image corner itself (ART's
            positions), 1 for every other pattern.
        value: pixel value of the ``"pixels4"`` pattern (0 = black as in Δ-Influence).

    Attributes:
        mask: float tensor (1, H, W), 1 inside the trigger.
        pattern: float tensor (C, H, W), the trigger values (0 outside the mask).
    """

    def __init__(self, image_shape: Sequence[int], pattern="checkerboard", size: int = 3,
                 location="bottom-right", margin: int | None = None, value: float = 0.0):
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        c, h, w = (int(v) for v in image_shape)
        if isinstance(pattern, torch.Tensor):
            patch = pattern.detach().float().cpu()
            if patch.ndim == 2:
                patch = patch.expand(c, -1, -1)
            if patch.ndim != 3 or patch.shape[0] != c or patch.shape[1] != patch.shape[2]:
                raise ValueError(f"a tensor pattern must be (C={c}, s, s) or (s, s), got {tuple(pattern.shape)}")
            if not bool(((patch >= 0) & (patch <= 1)).all()):  # NaN fails both comparisons
                raise ValueError("pattern: a tensor pattern must have values in [0, 1]")
            size = patch.shape[1]
            patch_mask = torch.ones(size, size)
            self.pattern_name = "custom"
        else:
            if pattern not in PATCH_PATTERNS:
                raise ValueError(f"pattern must be one of {list(PATCH_PATTERNS)} or a tensor, got {pattern!r}")
            if pattern == "pixels4":
                size = 4
            side = as_int(size)
            if side is None or side < 1:
                raise ValueError(f"size must be a positive int, got {size!r}")
            size = side
            patch_mask = torch.ones(size, size)
            if pattern == "checkerboard":
                ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
                patch = ((ii + jj) % 2 == 0).float().expand(c, -1, -1)
            elif pattern == "white":
                patch = torch.ones(c, size, size)
            elif pattern == "black":
                patch = torch.zeros(c, size, size)
            else:
                if not 0.0 <= check_real(value, "value") <= 1.0:
                    raise ValueError(f"value must be in [0, 1], got {value!r}")
                # ART add_pattern_bd(distance=2): pixels (H-2,W-2), (H-3,W-3), (H-2,W-4), (H-4,W-2) of a
                # 4x4 window ending at the image corner -> window offsets (2,2), (1,1), (2,0), (0,2).
                patch_mask = torch.zeros(4, 4)
                for r, cc in ((2, 2), (1, 1), (2, 0), (0, 2)):
                    patch_mask[r, cc] = 1.0
                patch = torch.full((c, 4, 4), float(value)) * patch_mask
            self.pattern_name = pattern
        if margin is None:
            margin = 0 if self.pattern_name == "pixels4" else 1
        given, margin = margin, as_int(margin)
        if margin is None or margin < 0:
            raise ValueError(f"margin must be an int >= 0, got {given!r}")
        if isinstance(location, str):
            if location not in PATCH_LOCATIONS:
                raise ValueError(f"location must be one of {list(PATCH_LOCATIONS)} or (row, col), got {location!r}")
            row = margin if location.startswith("top") else h - size - margin
            col = margin if location.endswith("left") else w - size - margin
        else:
            try:
                row, col = (as_int(v) for v in location)
            except (TypeError, ValueError):  # not iterable, or not two values
                row = col = None
            if row is None or col is None:  # a float position such as (1.7, 2.9) is not cut to ints
                raise ValueError(f"location must be a corner name or (row, col) ints, got {location!r}")
        if row < 0 or col < 0 or row + size > h or col + size > w:
            raise ValueError(f"a {size}x{size} patch at (row={row}, col={col}) does not fit in a {h}x{w} image")
        self.image_shape = (c, h, w)
        self.size, self.row, self.col = size, row, col
        self.mask = torch.zeros(1, h, w)
        self.mask[:, row:row + size, col:col + size] = patch_mask
        self.pattern = torch.zeros(c, h, w)
        self.pattern[:, row:row + size, col:col + size] = patch * patch_mask

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the patch on x (C, H, W) or (N, C, H, W), pixel space; returns a new tensor."""
        if x.shape[-3:] != self.image_shape:
            raise ValueError(f"images must end in shape {self.image_shape}, got {tuple(x.shape)}")
        m = self.mask.to(x.device, x.dtype)
        return (1 - m) * x + m * self.pattern.to(x.device, x.dtype)

    def describe(self) -> dict:
        """JSON-serialisable summary."""
        return {"pattern": self.pattern_name, "size": self.size, "row": self.row, "col": self.col}


def badnet_attack(train: ImageDataset, test: ImageDataset, target_class: int,
                  source_classes: int | Sequence[int] | None = None, num_poisons: int | None = None,
                  fraction: float | None = None, pattern="checkerboard", size: int = 3,
                  location="bottom-right", margin: int | None = None, value: float = 0.0,
                  seed: int = 0) -> PoisonResult:
    """Poison ``train`` with a BadNets patch backdoor.

    Args:
        train, test: clean ImageDatasets (same image shape and classes).
        target_class: label given to every poison (the backdoor's target).
        source_classes: class or classes the poisons are drawn from (``None`` = all classes but the
            target, i.e. all-to-one).
        num_poisons / fraction: number of poisons, or a fraction of the whole training set (exactly
            one of them).
        pattern, size, location, margin, value: the trigger (see :class:`PatchTrigger`; margin None = 0 for
            ``"pixels4"``, 1 otherwise).
        seed: seed of the poison draw.

    Returns:
        :class:`PoisonResult` with ``name="badnet"``; ``triggered_test`` = every source-class test
        image with the patch, true labels kept.
    """
    target_class, sources, n = check_trigger_attack(train, test, target_class, source_classes, num_poisons, fraction,
                                                    seed)
    trigger = PatchTrigger(train.image_shape, pattern=pattern, size=size, location=location, margin=margin,
                           value=value)
    poisoned, idx, triggered, test_idx = stamp_trigger_attack(train, test, trigger, sources, target_class, n, seed,
                                                              "badnet")
    params = {"target_class": target_class, "source_classes": list(sources), "num_poisons": n,
              "fraction_of_train": n / len(train),
              "fraction_of_sources": n / train.indices_of_class(list(sources)).numel(), "seed": seed,
              "trigger": trigger.describe()}
    return PoisonResult(train=poisoned, poison_indices=idx, target_class=target_class, source_classes=sources,
                        triggered_test=triggered, test_indices=test_idx, original_labels=train.labels[idx].clone(),
                        trigger=trigger, name="badnet", params=params)
