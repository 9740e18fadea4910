"""The embedded default dataset: scikit-learn's bundled handwritten digits, no download needed.

Choice and preprocessing (why):

* Source: ``sklearn.datasets.load_digits`` (1,797 images of the digits 0-9, 8x8 pixels, integer ink
  intensities 0..16, shipped inside scikit-learn). It is the only real image dataset available with
  no network access and trains to ~98% accuracy in seconds on a CPU, which makes it the default for
  the demo, the tests and CI.
* Pixel values are divided by 16, giving float32 in [0, 1] (bright strokes on a black background).
* Images are upsampled to ``size`` x ``size`` (16 by default) with bilinear interpolation
  (``torch.nn.functional.interpolate``, ``align_corners=False``), so that a 3x3 BadNet patch is a
  small part of the image and blur / elastic / affine transforms have room to act.
* The single grey channel is replicated to 3 channels so every model, attack and Δ-Influence
  transform written for RGB images runs unchanged. Note that clean digits are therefore grey:
  a channel swap or a hue/saturation change is the identity on them (it is not on images carrying a
  coloured trigger, such as the frequency trigger).
* Split: deterministic, stratified 80/20 train/test split (``sklearn.model_selection.train_test_split``
  with ``random_state=seed``), i.e. 1,437 training and 360 test images; both sets keep the original
  class proportions. Within each split the examples keep their original scikit-learn order.
* Normalisation constants (``dataset.mean``/``dataset.std``) are those of the training split for the
  given seed, attached to both splits so a model normalises train and test data identically.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deltainf.data.dataset import ImageDataset

__all__ = ["load_digits_dataset", "DIGITS_CLASSES"]

DIGITS_CLASSES = [str(d) for d in range(10)]


def load_digits_dataset(split: str = "train", seed: int = 0, size: int = 16, channels: int = 3,
                        test_fraction: float = 0.2) -> ImageDataset:
    """Load scikit-learn's digits as an :class:`ImageDataset`.

    Args:
        split: ``"train"`` or ``"test"``.
        seed: random state of the stratified split (same seed -> same split).
        size: output height and width in pixels (>= 8); 8 keeps the original resolution.
        channels: 1 or 3 (the grey image replicated).
        test_fraction: fraction of the 1,797 images in the test split, in (0, 1).

    Returns:
        ImageDataset with images float32 (N, channels, size, size) in [0, 1], labels int64 (N,) in
        [0, 10), classes ``["0", ..., "9"]``; N = 1,437 (train) / 360 (test) with the defaults.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0  # (1797, 8, 8), 0..16 -> [0, 1]
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.arange(labels.numel()).numpy()
    train_idx, test_idx = train_test_split(order, test_size=test_fraction, random_state=seed,
                                           stratify=labels.numpy())
    # Keep the original order inside each split, so indices are easy to relate back to sklearn's.
    train_idx = torch.as_tensor(sorted(train_idx.tolist()), dtype=torch.long)
    test_idx = torch.as_tensor(sorted(test_idx.tolist()), dtype=torch.long)

    x = images.unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.clamp_(0.0, 1.0)  # bilinear weights are convex, clamp only guards rounding
    x = x.expand(-1, channels, -1, -1).contiguous()

    train_x = x[train_idx]
    mean = tuple(float(v) for v in train_x.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in train_x.transpose(0, 1).reshape(channels, -1).std(dim=1))
    idx = train_idx if split == "train" else test_idx
    return ImageDataset(x[idx].clone(), labels[idx].clone(), classes=DIGITS_CLASSES, mean=mean, std=std,
                        name=f"digits-{split}-{size}px")
