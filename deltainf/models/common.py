"""Pieces shared by all models: input normalisation, seeded initialisation, penultimate features."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from deltainf._util import unwrapped

__all__ = ["Normalize", "init_weights", "penultimate_features", "head_inputs", "unwrap_model"]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the first module of every deltainf model.

    Args:
        mean, std: per-channel constants (length C); std > 0.

    Shapes: x (N, C, H, W) float -> same shape and dtype. ``mean``/``std`` are buffers of shape
    (1, C, 1, 1), so they are saved in checkpoints and follow ``model.to(device)``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        # checked as Python numbers, so that a model can be built on the meta device (shapes only)
        mean_v, std_v = _floats(mean), _floats(std)
        if len(mean_v) != len(std_v) or not mean_v:
            raise ValueError(f"mean and std must be non-empty and of equal length, got {len(mean_v)} "
                             f"and {len(std_v)}")
        if any(not (v > 0 and math.isfinite(v)) for v in std_v):
            raise ValueError(f"std must be positive and finite, got {std_v}")
        if not all(math.isfinite(v) for v in mean_v):
            raise ValueError(f"mean must be finite, got {mean_v}")
        self.register_buffer("mean", torch.tensor(mean_v, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std_v, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"Normalize expects input (N, {self.mean.shape[1]}, H, W), got {tuple(x.shape)}")
        return (x - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Map a normalised tensor back to pixel space."""
        return z * self.std + self.mean

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _floats(values) -> list[float]:
    return [float(v) for v in torch.as_tensor(values, dtype=torch.float64, device="cpu").flatten().tolist()]


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise ``model``'s parameters from ``seed`` without touching the global RNG.

    Conv2d: Kaiming-normal (fan_out, ReLU), as the forest ResNet-18 used by Δ-Influence; Linear:
    PyTorch's default (Kaiming-uniform with a = sqrt(5), bias U(±1/sqrt(fan_in))); BatchNorm:
    weight 1, bias 0, running stats reset. Modules are visited in registration order, so the same
    architecture and seed always give the same weights. Returns ``model``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            w = torch.empty(m.weight.shape)
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=gen)
            m.weight.copy_(w)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Linear):
            w = torch.empty(m.weight.shape)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
            m.weight.copy_(w)
            if m.bias is not None:
                bound = 1.0 / math.sqrt(m.in_features) if m.in_features > 0 else 0.0
                m.bias.copy_(torch.empty(m.bias.shape).uniform_(-bound, bound, generator=gen))
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            if m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.reset_running_stats()
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel / torch.compile wrappers, and inside any wrapper that
    holds it as ``.module`` (an AveragedModel of SWA or EMA, FSDP)."""
    for _ in range(8):
        inner = unwrapped(model)
        if inner is model:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


def _check_feature_model(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    m = unwrap_model(model)
    missing = [a for a in ("normalize", "features", "classifier") if not hasattr(m, a)]
    if missing:
        raise TypeError(f"{type(m).__name__} lacks {missing}: penultimate features need a model with "
                        f"`normalize`, `features` and `classifier` (build it with deltainf.models.build_model)")
    return m


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Last hidden layer of ``model`` for pixel-space images ``x``.

    Args:
        model: a deltainf model (has ``normalize``, ``features``, ``classifier``), possibly wrapped in
            DataParallel/DDP/torch.compile.
        x: float tensor (N, C, H, W) in [0, 1] on the model's device.

    Returns:
        Tensor (N, feature_dim), the input of ``model.classifier``; gradients flow if enabled.

    Raises:
        TypeError: the model does not expose the features/classifier split.
    """
    m = _check_feature_model(model)
    return m.features(m.normalize(x))


def head_inputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the classifier head of any ``model`` reads: the input of the last nn.Linear or nn.Conv2d that
    ``model(x)`` calls, as (B, D). A convolutional head's input is averaged over its positions (B, channels) and
    a linear head applied to tokens (B, ..., D) over the tokens, so D stays the width of the head whatever the
    image size. For a deltainf model this is :func:`penultimate_features` of the model's own inputs; a user's
    model needs no ``features`` / ``classifier`` split.

    The model runs in eval mode and without gradients (its modes are restored): in training mode the pass moved a
    BatchNorm's running statistics and dropout made two calls differ.

    Raises:
        TypeError: the forward pass calls no nn.Linear or nn.Conv2d, or ``model`` is not a module.
    """
    from deltainf._util import restore_modes, training_modes

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch nn.Module, got {type(model).__name__}")
    seen: list = []

    def keep(module, inputs, kwargs, output):
        seen[:] = [(module, inputs[0] if inputs else kwargs.get("input"))]  # layer(input=x) passes it by name

    hooks = [m.register_forward_hook(keep, with_kwargs=True) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))]
    modes = training_modes(model)
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        restore_modes(modes)
        for h in hooks:
            h.remove()
    if not seen:
        raise TypeError(f"model: {type(model).__name__} calls no nn.Linear or nn.Conv2d, so it has no classifier "
                        "head whose inputs could be read")
    module, inputs = seen[0]
    if isinstance(module, nn.Conv2d):
        return inputs.mean((-2, -1)).reshape(inputs.shape[0], -1)
    return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).mean(1)
