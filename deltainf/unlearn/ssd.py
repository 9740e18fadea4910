"""Selective Synaptic Dampening (Foster et al., AAAI 2024), reference C3.

1. Model in eval mode. Importance of each parameter on a loader = mean over mini-batches of the squared
   gradient of the batch-mean cross-entropy (a diagonal-Fisher-like quantity from batch gradients).
2. I_f on the forget set, I_D on the "full" set: the retain set by default (what Goel et al. and
   Delta-Influence ran), or all of D as in the original paper (``full_importance="all"``).
3. Parameters with I_f > alpha * I_D are multiplied by beta = min(lambda * I_D / I_f, 1); the others are
   untouched. One shot, no gradient step.
Defaults: alpha (``selection_weighting``) 10, lambda (``dampening_constant``) 1, batch 128 -- the
original paper's ResNet-18/CIFAR values.
"""
from __future__ import annotations

import copy
from typing import List

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from deltainf._util import check_int, check_number
from deltainf.unlearn.base import (Unlearner, check_model, loader, seeded, split_indices, view,
                                   warns_when_retained_accuracy_is_lost, xy)


def parameter_importance(model: nn.Module, loader_) -> List[torch.Tensor]:
    """Mean over batches of the squared gradient of the batch-mean CE, one tensor per parameter
    (same shapes as ``model.parameters()``; zeros for parameters without a gradient). The model's
    ``.grad`` fields are left cleared."""
    params = list(model.parameters())
    imp = [torch.zeros_like(p) for p in params]
    n_batches = 0
    for batch in loader_:
        x, y = xy(batch, model)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for acc, p in zip(imp, params):
            if p.grad is not None:
                acc += p.grad.detach() ** 2
        n_batches += 1
    model.zero_grad(set_to_none=True)
    if n_batches == 0:
        raise ValueError("train_dataset: an importance loader produced no batches")
    return [a / n_batches for a in imp]


class SSD(Unlearner):
    """Selective Synaptic Dampening.

    Args:
        selection_weighting: alpha > 0 (default 10).
        dampening_constant: lambda > 0 (default 1).
        full_importance: ``"retain"`` (default; Goel / Delta-Influence) or ``"all"`` (original: D = D_r + S_f).
        batch_size: importance batch size (default 128).
        seed: shuffling seed (batch composition only).

    After a call, ``num_dampened_`` is the number of scalar parameters that were dampened.
    """

    name = "ssd"

    def __init__(self, *, selection_weighting: float = 10.0, dampening_constant: float = 1.0,
                 full_importance: str = "retain", batch_size: int = 128, seed: int = 0) -> None:
        self.selection_weighting = check_number("selection_weighting", selection_weighting)
        self.dampening_constant = check_number("dampening_constant", dampening_constant)
        if full_importance not in ("retain", "all"):
            raise ValueError(f"full_importance: expected 'retain' or 'all', got {full_importance!r}")
        self.full_importance = full_importance
        self.batch_size = check_int("batch_size", batch_size)
        self.seed = check_int("seed", seed, minimum=0)
        self.num_dampened_ = 0

    @seeded  # outermost: the accuracy check's loaders draw from the seeded stream too
    @warns_when_retained_accuracy_is_lost
    def unlearn(self, model: nn.Module, train_dataset: Dataset, forget_indices) -> nn.Module:
        check_model(model)
        forget, retain = split_indices(train_dataset, forget_indices)
        m = copy.deepcopy(model).eval()
        self.num_dampened_ = 0
        if forget.numel() == 0:
            return m
        full = retain if self.full_importance == "retain" else torch.arange(len(train_dataset))
        if full.numel() == 0:
            raise ValueError("forget_indices: every training example is flagged; the retain importance is undefined")
        i_f = parameter_importance(m, loader(view(train_dataset, forget), self.batch_size, self.seed))
        i_d = parameter_importance(m, loader(view(train_dataset, full), self.batch_size, self.seed + 1))
        a, lam = self.selection_weighting, self.dampening_constant
        with torch.no_grad():
            for p, f, d in zip(m.parameters(), i_f, i_d):
                mask = f > a * d
                if not bool(mask.any()):
                    continue
                beta = (lam * d[mask] / f[mask]).clamp(max=1.0)  # never amplifies (lower_bound = 1)
                p[mask] = p[mask] * beta
                self.num_dampened_ += int(mask.sum())
        return m
