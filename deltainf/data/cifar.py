"""CIFAR-10 / CIFAR-100 loaders reading the standard python-pickle batches from a user path.

Nothing is downloaded. ``root`` may be the extracted folder itself (``cifar-10-batches-py`` /
``cifar-100-python``) or the folder that contains it.

Formats (the ones distributed at https://www.cs.toronto.edu/~kriz/cifar.html):

* CIFAR-10: ``data_batch_1`` ... ``data_batch_5`` (train) and ``test_batch``; each a pickled dict
  with ``b"data"``: uint8 (N, 3072) rows laid out as 1024 red, 1024 green, 1024 blue values
  (row-major 32x32), and ``b"labels"``: N ints in [0, 10). Optional ``batches.meta`` with
  ``b"label_names"``.
* CIFAR-100: ``train`` and ``test``, with ``b"data"`` as above, ``b"fine_labels"`` in [0, 100) and
  ``b"coarse_labels"`` in [0, 20). Optional ``meta`` with ``b"fine_label_names"`` /
  ``b"coarse_label_names"``.

Images become float32 (N, 3, 32, 32) in [0, 1]. Memory: 50,000 training images take 614 MB.
Normalisation constants attached to the datasets are the ones the Δ-Influence / forest code used.
"""
from __future__ import annotations

import os
import pickle
from typing import Sequence

import numpy as np
import torch

from deltainf.data.dataset import ImageDataset

__all__ = ["load_cifar10", "load_cifar100", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN",
           "CIFAR100_STD", "CIFAR10_CLASSES"]

CIFAR10_MEAN = (0.49147, 0.48226, 0.44677)
CIFAR10_STD = (0.24703, 0.24349, 0.26159)
CIFAR100_MEAN = (0.50716, 0.48669, 0.44120)
CIFAR100_STD = (0.26733, 0.25644, 0.27615)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]


def _resolve_root(root, subdir: str, expected: Sequence[str]) -> str:
    root = os.fspath(root)
    if os.path.isfile(root) and root.endswith((".tar.gz", ".tgz", ".tar")):
        raise FileNotFoundError(f"CIFAR root directory not found: {root!r} is an archive, which is not read; extract "
                                f"it (tar xzf {os.path.basename(root)}) and give the folder it makes")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"CIFAR root directory not found: {root!r}")
    nested = os.path.join(root, subdir)
    if not os.path.exists(os.path.join(root, expected[0])) and os.path.isdir(nested):
        return nested
    return root


# Pickle can run arbitrary code; a CIFAR batch only needs numpy's array-reconstruction globals, so
# everything else is refused (a tampered "dataset" cannot execute code while being loaded).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytearray"), ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR batch file not found: {path!r}")
    try:
        with open(path, "rb") as fh:
            obj = _SafeUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means the file is not a valid batch
        raise ValueError(f"could not read CIFAR batch file {path!r}: not a valid python pickle "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR batch file {path!r} must hold a dict, got {type(obj).__name__}")
    return obj


def _get(obj: dict, key: str, path: str):
    # Batches written by python 2 have bytes keys; accept str keys too (files re-pickled by python 3).
    for k in (key.encode(), key):
        if k in obj:
            return obj[k]
    raise ValueError(f"CIFAR batch file {path!r} has no {key!r} entry (keys: {sorted(map(str, obj))})")


def _read_batch(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    obj = _unpickle(path)
    data = np.asarray(_get(obj, "data", path))
    labels = np.asarray(_get(obj, label_key, path))
    if data.dtype != np.uint8:
        raise ValueError(f"{path!r}: 'data' must be uint8, got {data.dtype}")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path!r}: 'data' must have shape (N, 3072), got {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path!r}: {label_key!r} must hold {data.shape[0]} labels, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path!r}: {label_key!r} must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path!r}: {label_key!r} must lie in [0, {num_classes}), got values in "
                         f"[{labels.min()}, {labels.max()}]")
    return data, labels.astype(np.int64)


def _to_dataset(parts, classes, mean, std, name) -> ImageDataset:
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if data.shape[0] == 0:
        raise ValueError(f"{name}: the batch files hold no images")
    # (N, 3072) uint8 -> (N, 3, 32, 32) float32 in [0, 1]; uint8/255 is in range by construction.
    images = torch.from_numpy(data).view(-1, 3, 32, 32).float().div_(255.0)
    return ImageDataset(images, torch.from_numpy(labels), classes=classes, mean=mean, std=std, name=name,
                        check_range=False)


def _label_names(path: str, key: str, n: int) -> list[str] | None:
    if not os.path.isfile(path):
        return None
    obj = _unpickle(path)
    try:
        names = _get(obj, key, path)
    except ValueError:
        return None
    names = [v.decode() if isinstance(v, bytes) else str(v) for v in names]
    return names if len(names) == n else None


def load_cifar10(root, split: str = "train") -> ImageDataset:
    """Load CIFAR-10 from the python-pickle batches under ``root``.

    Args:
        root: ``cifar-10-batches-py`` or its parent folder.
        split: ``"train"`` (data_batch_1..5) or ``"test"`` (test_batch).

    Returns:
        ImageDataset, images float32 (N, 3, 32, 32) in [0, 1], labels int64 in [0, 10).

    Raises:
        FileNotFoundError: ``root`` or a batch file is missing (the message names the path).
        ValueError: a batch is not a valid pickle, has the wrong shape/dtype or labels out of range.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    root = _resolve_root(root, "cifar-10-batches-py", files)
    parts = [_read_batch(os.path.join(root, f), "labels", 10) for f in files]
    classes = _label_names(os.path.join(root, "batches.meta"), "label_names", 10) or CIFAR10_CLASSES
    return _to_dataset(parts, classes, CIFAR10_MEAN, CIFAR10_STD, f"cifar10-{split}")


def load_cifar100(root, split: str = "train", label_mode: str = "fine") -> ImageDataset:
    """Load CIFAR-100 from the python-pickle files ``train``/``test`` under ``root``.

    Args:
        root: ``cifar-100-python`` or its parent folder.
        split: ``"train"`` or ``"test"``.
        label_mode: ``"fine"`` (100 classes, ``b"fine_labels"``) or ``"coarse"`` (20 superclasses).

    Returns:
        ImageDataset, images float32 (N, 3, 32, 32) in [0, 1], labels int64 in [0, 100) or [0, 20).

    Raises:
        FileNotFoundError / ValueError as :func:`load_cifar10`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    n = 100 if label_mode == "fine" else 20
    root = _resolve_root(root, "cifar-100-python", [split])
    parts = [_read_batch(os.path.join(root, split), f"{label_mode}_labels", n)]
    classes = (_label_names(os.path.join(root, "meta"), f"{label_mode}_label_names", n)
               or [str(c) for c in range(n)])
    return _to_dataset(parts, classes, CIFAR100_MEAN, CIFAR100_STD, f"cifar100-{label_mode}-{split}")
