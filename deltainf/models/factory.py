"""``build_model``: construct a deltainf model by name, seeded."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from deltainf._util import as_int, seeded_rng
from deltainf.models.common import init_weights
from deltainf.models.resnet import ResNet18
from deltainf.models.small_cnn import SmallCNN

__all__ = ["build_model", "MODEL_NAMES"]

MODEL_NAMES = ("small_cnn", "resnet18")


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                seed: int = 0, **kwargs) -> nn.Module:
    """Build a model that takes pixel-space [0, 1] images and normalises them itself.

    Args:
        name: ``"small_cnn"`` (digits-sized CNN) or ``"resnet18"`` (forest ResNet-18; the 3x3/stride-1
            stem when ``image_size <= 64``, else the 7x7/stride-2 stem, override with ``stem=``).
        num_classes: number of classes (>= 2).
        in_channels: image channels C.
        image_size: image side H (= W).
        mean, std: per-channel normalisation constants (e.g. ``train.mean``/``train.std``); default 0.5/0.5.
        seed: weight-initialisation seed (global RNG untouched).
        **kwargs: passed to the model class (``width``/``hidden`` for SmallCNN; ``stem``/``base_width``
            for ResNet18).

    Returns:
        The model (on CPU, train mode) with attribute ``build_args`` (a dict that
        :func:`deltainf.train.load_model` uses to rebuild it from a checkpoint).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {list(MODEL_NAMES)}")
    checked = {}
    for arg, v, lo in (("num_classes", num_classes, 2), ("in_channels", in_channels, 1),
                       ("image_size", image_size, 1), ("width", kwargs.get("width", 1), 1),
                       ("hidden", kwargs.get("hidden", 1), 1), ("base_width", kwargs.get("base_width", 1), 1)):
        checked[arg] = as_int(v)  # numpy and 0-d tensor ints count
        if checked[arg] is None or checked[arg] < lo:
            raise ValueError(f"{arg} must be an int >= {lo}, got {v!r}")
    num_classes, in_channels, image_size = checked["num_classes"], checked["in_channels"], checked["image_size"]
    for arg, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) != in_channels:
            raise ValueError(f"{arg} must have {in_channels} values (one per channel), got {len(v)}")
    if name == "resnet18":
        kwargs.setdefault("stem", "cifar" if image_size <= 64 else "imagenet")
    # Layer constructors draw their default init from the global RNG; fork it so building a model
    # leaves the caller's random stream untouched. The real init comes from `seed` just below.
    with seeded_rng(None):
        if name == "small_cnn":
            model = SmallCNN(num_classes, in_channels, image_size, mean=mean, std=std, **kwargs)
        else:
            model = ResNet18(num_classes, in_channels, mean=mean, std=std, **kwargs)
    init_weights(model, seed)
    model.build_args = dict(name=name, num_classes=num_classes, in_channels=in_channels,
                            image_size=image_size,
                            mean=None if mean is None else [float(v) for v in mean],
                            std=None if std is None else [float(v) for v in std], seed=seed, **kwargs)
    return model
