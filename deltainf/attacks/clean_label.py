"""Clean-label backdoors: SIG (Barni, Kallas & Tondi, ICIP 2019) and label-consistent (Turner,
Tsipras & Madry 2019, arXiv 1912.02771).

Both poison only images of the TARGET class and keep their (correct) labels, so a label audit finds
nothing. At test time the trigger is added to images of the other classes, which should then be
classified as the target.

* SIG: the trigger is a horizontal sinusoid ``v(i, j) = delta * sin(2 pi j f / W)`` added to every
  channel (``clip(x + v, 0, 1)``); poisons = target-class training images with the signal.
  CIFAR-10 setting: delta = 20/255, f = 6.
* Label-consistent (the adversarial-perturbation variant): each poison is first made hard to learn
  from its content with an untargeted L-inf PGD attack on a surrogate model (maximise the
  cross-entropy of its own label within eps), then a small pattern is stamped in the four corners;
  the model must then lean on the pattern to fit the poisons. Turner et al. used eps 8-16/255 on
  CIFAR-10 and a 3x3 black-and-white pattern in each corner.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltainf._util import as_int, model_device, model_dtype, restore_modes, to_model, training_modes
from deltainf.attacks.badnet import PatchTrigger
from deltainf.attacks.base import (PoisonResult, check_classes, check_pair, check_real, check_seed,
                                   select_poison_indices, triggered_test_set)
from deltainf.data.dataset import ImageDataset

__all__ = ["SinusoidTrigger", "CornerTrigger", "sig_attack", "label_consistent_attack", "pgd_away",
           "DIGITS_SIG", "DIGITS_LABEL_CONSISTENT"]

# The whole target class and a strong signal: weaker settings do not take on digits (docs/RESULTS.md)
DIGITS_SIG = {"target_class": 3, "fraction": 1.0, "delta": 100 / 255, "frequency": 6}
DIGITS_LABEL_CONSISTENT = {"target_class": 7, "fraction": 1.0, "eps": 48 / 255, "steps": 20}


class SinusoidTrigger:
    """``clip(x + delta * sin(2 pi j f / W), 0, 1)`` with j the column index (same on every row and channel)."""

    def __init__(self, image_shape: Sequence[int], delta: float = 20 / 255, frequency: float = 6.0):
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        if not 0 < check_real(delta, "delta") <= 1:
            raise ValueError(f"delta must be in (0, 1], got {delta!r}")
        frequency = check_real(frequency, "frequency")
        if not (frequency > 0 and math.isfinite(frequency)):
            raise ValueError(f"frequency must be a finite number > 0, got {frequency!r}")
        c, h, w = (int(v) for v in image_shape)
        # sampled at w columns, a higher frequency is another one (26 over 32 columns: 6), and w / 2 is 0 everywhere
        if not frequency < w / 2:
            raise ValueError(f"frequency: expected less than half the image width ({w / 2:g}), got {frequency:g}")
        j = torch.arange(w, dtype=torch.float64)
        wave = torch.sin(2 * math.pi * j * frequency / w)
        self.signal = (delta * wave).float().view(1, 1, w).expand(c, h, w)
        self.image_shape = (c, h, w)
        self.delta, self.frequency = float(delta), float(frequency)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-3:]) != self.image_shape:
            raise ValueError(f"images must end in shape {self.image_shape}, got {tuple(x.shape)}")
        return (x + self.signal.to(x.device, x.dtype)).clamp(0, 1)

    def describe(self) -> dict:
        return {"delta": self.delta, "frequency": self.frequency}


class CornerTrigger:
    """The same small patch stamped in all four corners (Turner et al.'s label-consistent trigger)."""

    def __init__(self, image_shape: Sequence[int], pattern="checkerboard", size: int = 3, margin: int = 0):
        self.patches = [PatchTrigger(image_shape, pattern=pattern, size=size, location=loc, margin=margin)
                        for loc in ("top-left", "top-right", "bottom-left", "bottom-right")]
        self.image_shape = tuple(int(v) for v in image_shape)
        self.pattern_name, self.size, self.margin = self.patches[0].pattern_name, self.patches[0].size, margin
        if 2 * (self.size + margin) > min(self.image_shape[-2:]):  # they overwrite each other (and the image)
            raise ValueError(f"size: four corner patches of {self.size} px (margin {margin}) overlap on an image of "
                             f"{self.image_shape[-2]}x{self.image_shape[-1]} px; expected 2 * (size + margin) <= "
                             f"{min(self.image_shape[-2:])}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.patches:
            x = p(x)
        return x

    def describe(self) -> dict:
        return {"pattern": self.pattern_name, "size": self.size, "margin": self.margin, "corners": 4}


def _check_pgd(eps, steps, step_size) -> tuple[float, int, float]:
    """(eps, steps, step size) of :func:`pgd_away`, checked; the step size defaults to 2.5 * eps / steps."""
    given, eps = eps, check_real(eps, "eps")
    # a budget in pixel units: beyond 1 the box holds all of [0, 1] and the attack is unbounded
    if not 0 < eps <= 1:
        raise ValueError(f"eps: expected an L-inf budget in pixel units with 0 < eps <= 1 (e.g. 16/255), "
                         f"got {given!r}")
    count = as_int(steps)
    if count is None or count < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if step_size is None:
        return eps, count, 2.5 * eps / count
    alpha = check_real(step_size, "step_size")
    # a negative step descends the loss: the poisons would become easier to learn, not harder
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"step_size: expected a finite number > 0, got {step_size!r}")
    return eps, count, alpha


@torch.enable_grad()  # its gradient steps run under a caller's torch.no_grad() too
def pgd_away(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 20,
             step_size: float | None = None, batch_size: int = 256) -> torch.Tensor:
    """Untargeted L-inf PGD on pixel-space images: maximise ``cross_entropy(model(x'), y)`` subject to
    ``|x' - x| <= eps`` and ``x'`` in [0, 1]. Starts at x (no random start, so it is deterministic).

    Args:
        model: classifier on pixel-space images; the batches are cast to its dtype.
        x: float images (N, C, H, W) in [0, 1]; y: int64 labels (N,).
        eps: L-inf budget in pixel units, 0 < eps <= 1.
        steps: iterations, an int >= 1.
        step_size: finite, > 0; default 2.5 * eps / steps (Madry et al.).
        batch_size: images per forward pass.

    Returns:
        x' (a new CPU tensor of x's shape and dtype)."""
    eps, steps, alpha = _check_pgd(eps, steps, step_size)
    device, dtype = model_device(model), model_dtype(model)
    modes = training_modes(model)
    model.eval()
    out = []
    try:
        for s in range(0, x.shape[0], batch_size):
            x0 = to_model(x[s:s + batch_size], device, dtype)
            yb = y[s:s + batch_size].to(device)
            xa = x0.clone()
            for _ in range(steps):
                xa.requires_grad_(True)
                loss = F.cross_entropy(model(xa), yb, reduction="sum")
                (grad,) = torch.autograd.grad(loss, xa)
                with torch.no_grad():
                    xa = xa + alpha * grad.sign()
                    xa = torch.min(torch.max(xa, x0 - eps), x0 + eps).clamp(0, 1)
            out.append(xa.detach().to("cpu", x.dtype))
    finally:
        restore_modes(modes)
    return torch.cat(out)


def _clean_label_attack(train: ImageDataset, test: ImageDataset, target_class: int, source_classes,
                        num_poisons: int | None, fraction: float | None, make_poisons: Callable,
                        trigger: Callable, seed: int, name: str, params: dict) -> PoisonResult:
    """Poison ``num_poisons`` (or ``fraction`` of the) target-class training images with ``make_poisons``
    (images (K, C, H, W) -> poisoned images), labels kept; the triggered test set is every source-class
    test image with ``trigger`` applied, true labels kept."""
    check_pair(train, test)
    check_seed(seed)
    target_class, sources = check_classes(train, target_class, source_classes)
    pool = train.indices_of_class(target_class)
    if (num_poisons is None) == (fraction is None):
        raise ValueError("give exactly one of num_poisons (a count) or fraction (of the target class)")
    if fraction is not None:
        fraction = check_real(fraction, "fraction")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1] (of the target class), got {fraction!r}")
        num_poisons = max(1, round(fraction * pool.numel()))
    count = as_int(num_poisons)
    if count is None or not 1 <= count <= pool.numel():
        raise ValueError(f"num_poisons must be an int in [1, {pool.numel()}] (the target class's training images), "
                         f"got {num_poisons!r}")
    num_poisons = count
    idx = select_poison_indices(train, (target_class,), num_poisons, seed)
    poisoned = train.with_replaced(idx, images=make_poisons(train.images[idx], train.labels[idx]),
                                   name=f"{train.name}+{name}")
    triggered, test_idx = triggered_test_set(test, sources, trigger, name)
    params = {"target_class": target_class, "source_classes": list(sources), "num_poisons": int(num_poisons),
              "fraction_of_train": int(num_poisons) / len(train),
              "fraction_of_target_class": int(num_poisons) / pool.numel(), "seed": seed, **params}
    return PoisonResult(train=poisoned, poison_indices=idx, target_class=target_class, source_classes=sources,
                        triggered_test=triggered, test_indices=test_idx, original_labels=train.labels[idx].clone(),
                        trigger=trigger, name=name, params=params)


def sig_attack(train: ImageDataset, test: ImageDataset, target_class: int,
               source_classes: int | Sequence[int] | None = None, num_poisons: int | None = None,
               fraction: float | None = None, delta: float = 20 / 255, frequency: float = 6.0,
               seed: int = 0) -> PoisonResult:
    """Poison ``train`` with the SIG clean-label backdoor.

    Args:
        train, test: clean ImageDatasets.
        target_class: the class whose training images carry the signal (labels unchanged).
        source_classes: classes whose triggered test images measure poison success (None = all others).
        num_poisons / fraction: count, or fraction of the TARGET CLASS's training images (exactly one).
        delta, frequency: the sinusoid (see :class:`SinusoidTrigger`).
        seed: seed of the poison draw.
    """
    check_pair(train, test)
    trigger = SinusoidTrigger(train.image_shape, delta=delta, frequency=frequency)
    return _clean_label_attack(train, test, target_class, source_classes, num_poisons, fraction,
                               lambda x, y: trigger(x), trigger, seed, "sig", {"trigger": trigger.describe()})


def label_consistent_attack(train: ImageDataset, test: ImageDataset, surrogate: nn.Module, target_class: int,
                            source_classes: int | Sequence[int] | None = None, num_poisons: int | None = None,
                            fraction: float | None = None, eps: float = 16 / 255, steps: int = 20,
                            pattern="checkerboard", size: int = 3, seed: int = 0) -> PoisonResult:
    """Poison ``train`` with the label-consistent backdoor (adversarial-perturbation variant).

    Args:
        train, test: clean ImageDatasets.
        surrogate: a model trained on clean data (pixel-space input) for the PGD step.
        target_class: the class whose training images are poisoned (labels unchanged).
        source_classes: classes whose triggered test images measure poison success (None = all others).
        num_poisons / fraction: count, or fraction of the TARGET CLASS's training images (exactly one).
        eps, steps: the L-inf PGD budget and iterations (see :func:`pgd_away`).
        pattern, size: the corner patch (see :class:`CornerTrigger`).
        seed: seed of the poison draw.
    """
    check_pair(train, test)
    eps, steps, _ = _check_pgd(eps, steps, None)
    if not isinstance(surrogate, nn.Module):
        raise TypeError(f"surrogate must be an nn.Module trained on the clean data, got {type(surrogate).__name__}")
    from deltainf._util import logits

    try:  # before any PGD
        out = logits(surrogate, train.images[:2], where="the training images")
    except ValueError as err:
        raise ValueError(f"surrogate: {err}") from None
    if out.shape[1] != train.num_classes:
        raise ValueError(f"surrogate: gives {out.shape[1]} logits but the data have {train.num_classes} classes")
    trigger = CornerTrigger(train.image_shape, pattern=pattern, size=size)

    def make(x, y):
        return trigger(pgd_away(surrogate, x, y, eps=eps, steps=steps))

    return _clean_label_attack(train, test, target_class, source_classes, num_poisons, fraction, make, trigger,
                               seed, "label-consistent",
                               {"trigger": trigger.describe(), "eps": float(eps), "steps": int(steps)})
