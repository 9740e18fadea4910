"""Model outputs of loader batches, Fisher label sampling and query measurements."""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

from deltainf._rng import row_key

__all__ = ["sample_fisher_labels", "negative_margin", "cross_entropy", "resolve_measurement",
           "check_labels"]

Measurement = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_labels(y: torch.Tensor, num_classes: int, where: str) -> None:
    if num_classes == 1:
        raise ValueError(f"{where}: the model has one output (a binary classifier with a sigmoid?); deltainf needs "
                         "one logit per class: wrap it to return torch.cat([torch.zeros_like(z), z], 1), whose "
                         "softmax is the sigmoid of z")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{where}: labels must lie in [0, {num_classes}) (the model has {num_classes} outputs), got "
            f"min {int(y.min())} and max {int(y.max())}")


_SALT_FISHER = 0x3C6EF372FE94F82B


def uniform_from_positions(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in [0, 1): one float64 per dataset position, a pure function of
    (seed, position) — independent of batching, shuffling and device."""
    h = row_key(seed, positions.to("cpu", torch.int64), _SALT_FISHER)
    return ((h >> 11) & ((1 << 53) - 1)).to(torch.float64) * 2.0 ** -53


def sample_fisher_labels(logits: torch.Tensor, positions: torch.Tensor, seed: int) -> torch.Tensor:
    """True-Fisher labels: y_i ~ softmax(logits_i), drawn by inverse-CDF with the uniform of
    dataset position i. The same example gets the same label in every pass (covariance and
    eigenvalue-correction passes therefore see the same Fisher sample).

    logits (B, C) any float dtype, positions (B,) int64 -> (B,) int64 on logits.device.
    """
    u = uniform_from_positions(seed, positions).to(logits.device)
    p = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    cdf = p.cumsum(-1)
    y = (cdf < (u * cdf[:, -1]).unsqueeze(1)).sum(-1)
    return y.clamp_max(logits.shape[1] - 1)


def negative_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example negative margin -(z_y - logsumexp_{c != y} z_c): (B, C), (B,) -> (B,)."""
    z_y = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    # arange == y rather than one_hot: works under torch.func.vmap (no data-dependent shapes)
    is_y = torch.arange(logits.shape[1], device=logits.device) == y.unsqueeze(1)
    others = logits.masked_fill(is_y, float("-inf")).logsumexp(-1)
    return -(z_y - others)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy: (B, C), (B,) -> (B,)."""
    return F.cross_entropy(logits, y, reduction="none")


_MEASUREMENTS = {"margin": negative_margin, "ce": cross_entropy}


def resolve_measurement(measurement: Union[str, Measurement]) -> Measurement:
    if callable(measurement):
        return measurement
    if measurement not in _MEASUREMENTS:
        raise ValueError(f"measurement: expected 'margin', 'ce' or a callable (logits, y) -> (B,), got {measurement!r}")
    return _MEASUREMENTS[measurement]
