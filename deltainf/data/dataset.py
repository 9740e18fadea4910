"""In-memory, tensor-backed image dataset used throughout deltainf.

Every dataset in the library (digits, CIFAR, image folders, synthetic data, poisoned copies made by
attacks) is an :class:`ImageDataset`: one float32 tensor of images in PIXEL space [0, 1] and one int64
tensor of labels. Items are ``(x, y, index)`` where ``index`` is the position in *this* dataset, which
is what influence scores and detection results refer to.

Helpers return new datasets and never modify the receiver in place, so a clean dataset and its
poisoned copy can live side by side (tests compare them to check that an attack changed exactly the
indices it reports).
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch
from torch.utils.data import Dataset

from deltainf._util import as_int

__all__ = ["ImageDataset", "as_index_tensor"]


def as_index_tensor(indices, n: int, name: str = "indices", unique: bool = True,
                    int_mask: bool = False) -> torch.Tensor:
    """Validate and convert ``indices`` into a 1-D int64 tensor of positions in ``[0, n)``.

    Args:
        indices: a sequence of ints, a numpy array or an integer tensor (any shape is flattened), or
            a bool mask of length ``n``.
        n: length of the indexed dataset.
        name: argument name used in error messages.
        unique: reject repeated indices.
        int_mask: accept ``n`` (> 2) integers that are all 0 or 1 as positions (indexing); otherwise they are
            refused as what they almost surely are, a mask given as ints.

    Returns:
        LongTensor (K,) in the given order.
    """
    if isinstance(indices, torch.Tensor):
        t = indices.detach().cpu()
    else:
        try:
            t = torch.as_tensor(indices)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a sequence of integers or an integer tensor, got "
                            f"{type(indices).__name__}") from exc
    if t.dtype == torch.bool:
        if t.ndim != 1 or t.numel() != n:
            raise ValueError(f"{name}: a bool mask must have shape ({n},), got {tuple(t.shape)}")
        return t.nonzero().flatten()
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    t = t.flatten().long()
    if not int_mask and n > 2 and t.numel() == n and bool(((t == 0) | (t == 1)).all()):
        # n positions all 0 or 1 cannot be distinct indices (nor meant as repeats of two): a 0/1 mask as ints
        raise ValueError(f"{name}: {n} values, all 0 or 1: a mask? pass it as bool (mask.bool()), or the positions "
                         "(mask.nonzero())")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= n:
        raise IndexError(f"{name} must lie in [0, {n}), got values in [{lo}, {hi}]")
    if unique and torch.unique(t).numel() != t.numel():
        raise ValueError(f"{name} must not contain repeated indices")
    return t


# Classes inferred from the largest label (num_classes and classes not given) at most: beyond, a label is more
# likely corrupt than a class (ImageNet-21k has 21,841).
_MAX_INFERRED_CLASSES = 100_000


class ImageDataset(Dataset):
    """A labelled image dataset held in memory as tensors.

    Args:
        images: float32 tensor (N, C, H, W), pixel values in [0, 1]. Other floating dtypes are
            converted to float32; integer dtypes are rejected (scale them to [0, 1] first).
        labels: integer tensor (N,), stored as int64; each label in ``[0, num_classes)``.
        classes: class names; ``num_classes = len(classes)``. Defaults to ``["0", ..., str(K-1)]``
            with K = ``num_classes`` (or max label + 1 when that is not given either).
        num_classes: only needed when ``classes`` is omitted and the labels may not cover every class.
        mean, std: per-channel normalisation constants (length C) that a model trained on this data
            should use. When omitted they are computed from ``images`` on first access. Copies made by
            ``subset``/``with_replaced``/``without`` inherit them, so a poisoned or pruned copy keeps
            the statistics of the dataset it came from.
        name: free-form description used in reports.
        check_range: verify that all pixels are finite and in [0, 1] (one pass over the data).

    Items: ``dataset[i] -> (x (C, H, W) float32, y int, i int)``. Indexing with a LongTensor, list or
    slice returns a batch ``(x (B, C, H, W), y (B,) int64, index (B,) int64)``; ``make_loader`` uses
    that to fetch whole batches without per-item Python overhead.
    """

    def __init__(self, images: torch.Tensor, labels, classes: Sequence[str] | None = None,
                 num_classes: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, name: str = "", check_range: bool = True):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be a floating tensor with values in [0, 1], got dtype "
                            f"{images.dtype} (divide uint8 images by 255 first)")
        if images.shape[1] not in (1, 3, 4) and images.shape[-1] in (1, 3, 4):  # (N, H, W, C) from numpy / PIL
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}: channels last? "
                             "(images.permute(0, 3, 1, 2))")
        images = images.detach().to(device="cpu", dtype=torch.float32).contiguous()
        try:
            labels = torch.as_tensor(labels).detach().cpu()
        except (TypeError, ValueError, RuntimeError):  # strings: torch's "too many dimensions 'str'"
            raise TypeError(f"labels must be integer class indices, got {type(labels).__name__} "
                            f"{str(labels)[:60]!r} (class names go to classes=...)") from None
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        labels = labels.long().flatten().contiguous()
        if labels.numel() != images.shape[0]:
            raise ValueError(f"labels must have shape ({images.shape[0]},) to match images, got "
                             f"{labels.numel()} labels")
        if num_classes is not None:
            count = as_int(num_classes)
            if count is None or count < 0:
                raise TypeError(f"num_classes must be an int >= 0, got {num_classes!r}")
            num_classes = count
        if classes is None:
            if num_classes is None:
                num_classes = int(labels.max()) + 1 if labels.numel() else 0
                if num_classes > _MAX_INFERRED_CLASSES:  # one corrupt label would make millions of class names
                    raise ValueError(f"labels: the largest label is {num_classes - 1}, which would make "
                                     f"{num_classes:,} classes; pass num_classes= (or classes=) for that many")
            classes = [str(c) for c in range(num_classes)]
        else:
            classes = [str(c) for c in classes]
            if num_classes is not None and num_classes != len(classes):
                raise ValueError(f"num_classes={num_classes} disagrees with len(classes)={len(classes)}")
        if len(classes) == 0 and labels.numel() > 0:
            raise ValueError("classes must not be empty for a non-empty dataset")
        if labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= len(classes):
                raise ValueError(f"labels must lie in [0, {len(classes)}) (num_classes={len(classes)}), "
                                 f"got values in [{lo}, {hi}]")
        if check_range and images.numel():
            if not bool(torch.isfinite(images).all()):
                raise ValueError("images must be finite")
            lo, hi = float(images.min()), float(images.max())
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"images must be in pixel space [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        self.images = images
        self.labels = labels
        self.classes = classes
        self.name = name
        self._mean = self._check_stats(mean, "mean")
        self._std = self._check_stats(std, "std")
        if self._std is not None and min(self._std) <= 0:
            raise ValueError(f"std must be positive, got {self._std}")

    # ------------------------------------------------------------------ basic protocol
    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        if isinstance(index, numbers.Integral) or (isinstance(index, torch.Tensor) and index.ndim == 0):
            i = int(index)
            if i < 0:
                i += len(self)
            if not 0 <= i < len(self):
                raise IndexError(f"index {int(index)} out of range for dataset of length {len(self)}")
            return self.images[i], int(self.labels[i]), i
        if isinstance(index, slice):
            idx = torch.arange(len(self))[index]
        else:
            idx = as_index_tensor(index, len(self), name="index", unique=False, int_mask=True)
        return self.images[idx], self.labels[idx], idx

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, image_shape=({c}, {h}, {w}), "
                f"num_classes={self.num_classes})")

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel normalisation mean (length C)."""
        if self._mean is None:
            self._mean = tuple(float(v) for v in self.images.mean(dim=(0, 2, 3)))
        return self._mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel normalisation std (length C); never below 1e-3 so a constant channel is safe."""
        if self._std is None:
            if len(self) == 0:
                self._std = tuple(1.0 for _ in range(self.images.shape[1]))
            else:
                s = self.images.transpose(0, 1).reshape(self.images.shape[1], -1).std(dim=1)
                self._std = tuple(max(float(v), 1e-3) for v in s)
        return self._std

    def class_counts(self) -> torch.Tensor:
        """LongTensor (num_classes,): number of examples per class."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def indices_of_class(self, classes: int | Iterable[int]) -> torch.Tensor:
        """LongTensor of positions whose label is in ``classes`` (ascending order)."""
        cls = [classes] if isinstance(classes, int) else list(classes)
        for c in cls:
            if not isinstance(c, int) or not 0 <= c < self.num_classes:
                raise ValueError(f"classes must be ints in [0, {self.num_classes}), got {c!r}")
        mask = torch.isin(self.labels, torch.tensor(cls, dtype=torch.long))
        return mask.nonzero().flatten()

    # ------------------------------------------------------------------ copies
    def _derive(self, images: torch.Tensor, labels: torch.Tensor, name: str | None = None,
                check_range: bool = False) -> "ImageDataset":
        return ImageDataset(images, labels, classes=self.classes, mean=self.mean, std=self.std,
                            name=self.name if name is None else name, check_range=check_range)

    def subset(self, indices, name: str | None = None) -> "ImageDataset":
        """A new dataset holding rows ``indices`` (in that order); its own indices restart at 0.

        Args:
            indices: LongTensor/sequence of positions (unique) or a bool mask (N,).
        """
        idx = as_index_tensor(indices, len(self), name="indices")
        return self._derive(self.images[idx].clone(), self.labels[idx].clone(), name)

    def without(self, indices, name: str | None = None) -> "ImageDataset":
        """A new dataset with rows ``indices`` removed, order of the rest kept (exact unlearning)."""
        idx = as_index_tensor(indices, len(self), name="indices")
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[idx] = False
        return self._derive(self.images[keep].clone(), self.labels[keep].clone(), name)

    def with_replaced(self, indices, images: torch.Tensor | None = None, labels=None,
                      name: str | None = None) -> "ImageDataset":
        """A copy in which rows ``indices`` get new images and/or labels; all other rows are unchanged.

        Args:
            indices: LongTensor (K,) of unique positions.
            images: float tensor (K, C, H, W) in [0, 1], or None to keep the images.
            labels: int tensor (K,) or a single int for all K rows, or None to keep the labels.
        """
        idx = as_index_tensor(indices, len(self), name="indices")
        new_images = self.images.clone()
        new_labels = self.labels.clone()
        if images is not None:
            if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
                raise TypeError("images must be a floating torch.Tensor (K, C, H, W)")
            expected = (idx.numel(), *self.image_shape)
            if tuple(images.shape) != expected:
                raise ValueError(f"images must have shape {expected}, got {tuple(images.shape)}")
            images = images.detach().to("cpu", torch.float32)
            if images.numel() and (not bool(torch.isfinite(images).all())
                                   or float(images.min()) < 0.0 or float(images.max()) > 1.0):
                raise ValueError("images must be finite and in pixel space [0, 1]")
            new_images[idx] = images
        if labels is not None:
            lab = torch.as_tensor(labels)
            if lab.dtype.is_floating_point or lab.dtype == torch.bool:
                raise TypeError(f"labels must be integers, got dtype {lab.dtype}")
            lab = lab.long().cpu()
            if lab.ndim == 0:
                lab = lab.expand(idx.numel())
            if lab.shape != (idx.numel(),):
                raise ValueError(f"labels must have shape ({idx.numel()},) or be a scalar, got "
                                 f"{tuple(lab.shape)}")
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got values in "
                                 f"[{int(lab.min())}, {int(lab.max())}]")
            new_labels[idx] = lab
        return self._derive(new_images, new_labels, name)

    def _check_stats(self, values, name: str):
        if values is None:
            return None
        try:
            vals = tuple(float(v) for v in torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist())
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be numbers, one per channel, got {values!r}") from None
        if len(vals) != self.images.shape[1]:
            raise ValueError(f"{name} must have one value per channel ({self.images.shape[1]}), got {len(vals)}")
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"{name} must be finite, got {vals}")
        return vals
