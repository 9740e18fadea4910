"""Bad Teacher (Chundawat et al., AAAI 2023), reference C5.

Competent teacher = the poisoned model (frozen, eval); incompetent teacher = a randomly re-initialised copy
of the same architecture; student = a copy of the poisoned model. For a sample with forget flag u, the
target is ``u * softmax(z_bad / T) + (1 - u) * softmax(z_good / T)`` and the loss is
``KL(target || softmax(z_student / T))`` averaged over every element (``F.kl_div(..., reduction="mean")``).

``variant="goel"`` (default; what Delta-Influence ran): the full training set with u = 1 on the flagged
indices, SGD lr 0.025 (momentum 0.9, wd 5e-4, Goel's linear schedule), batch 512, 40 steps, T = 1 -- but
with a shuffled loader (theirs was sequential, so 40 x 512 steps only ever saw the first ~20k examples).
``variant="original"``: the forget set plus a random 30 % of the retain set, Adam lr 1e-4, one epoch,
batch 256, T = 1.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from deltainf._util import check_int, check_number
from deltainf.unlearn.base import (Unlearner, bar, check_model, cycle, goel_linear_lr, loader, model_device,
                                   reinitialized_copy, seeded, split_indices, view,
                                   warns_when_retained_accuracy_is_lost, xy)

_DEFAULTS = {
    "goel": dict(iters=40, lr=0.025, batch_size=512),
    "original": dict(iters=1, lr=1e-4, batch_size=256),
}


def bad_teacher_loss(student_logits: torch.Tensor, good_logits: torch.Tensor, bad_logits: torch.Tensor,
                     forget_flag: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL(u softmax(bad/T) + (1-u) softmax(good/T) || softmax(student/T)), mean over all B*K elements.

    Shapes: logits (B, K) float; forget_flag (B,) in {0, 1}. Returns a scalar.
    """
    u = forget_flag.to(student_logits.dtype).unsqueeze(1)
    target = u * F.softmax(bad_logits / T, dim=1) + (1 - u) * F.softmax(good_logits / T, dim=1)
    log_s = F.log_softmax(student_logits / T, dim=1)
    # the elementwise KL of F.kl_div with reduction="mean" (xlogy makes 0 log 0 = 0), without its warning
    return (torch.special.xlogy(target, target) - target * log_s).mean()


class BadTeacher(Unlearner):
    """Bad Teacher unlearning (see the module docstring).

    Args:
        variant: ``"goel"`` (default) or ``"original"``.
        iters: optimiser steps (goel, default 40) or epochs (original, default 1).
        lr: default 0.025 (goel, SGD) / 1e-4 (original, Adam).
        batch_size: default 512 / 256.
        T: temperature (default 1).
        retain_fraction: fraction of the retain set mixed in by the original variant (default 0.3).
        momentum, weight_decay: SGD settings of the goel variant (default 0.9, 5e-4).
        seed: seeds the incompetent teacher's weights, the retain subsample and shuffling.
        progress: tqdm bar.
    """

    name = "bad_teacher"

    def __init__(self, variant: str = "goel", *, iters: Optional[int] = None, lr: Optional[float] = None,
                 batch_size: Optional[int] = None, T: float = 1.0, retain_fraction: float = 0.3,
                 momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0, progress: bool = False) -> None:
        if variant not in _DEFAULTS:
            raise ValueError(f"variant: expected one of {sorted(_DEFAULTS)}, got {variant!r}")
        d = _DEFAULTS[variant]
        self.variant = variant
        self.iters = check_int("iters", d["iters"] if iters is None else iters)
        self.lr = check_number("lr", d["lr"] if lr is None else lr)
        self.batch_size = check_int("batch_size", d["batch_size"] if batch_size is None else batch_size)
        self.T = check_number("T", T)
        self.retain_fraction = check_number("retain_fraction", retain_fraction, inclusive=True, maximum=1.0)
        self.momentum = check_number("momentum", momentum, inclusive=True, maximum=1.0, max_inclusive=False)
        self.weight_decay = check_number("weight_decay", weight_decay, inclusive=True)
        self.seed = check_int("seed", seed, minimum=0)
        self.progress = progress

    @seeded  # outermost: the accuracy check's loaders draw from the seeded stream too
    @warns_when_retained_accuracy_is_lost
    def unlearn(self, model: nn.Module, train_dataset: Dataset, forget_indices) -> nn.Module:
        check_model(model)
        forget, retain = split_indices(train_dataset, forget_indices)
        if retain.numel() == 0:  # as the other unlearners: nothing left whose knowledge the good teacher keeps
            raise ValueError("forget_indices: every training example is flagged; Bad Teacher needs a retain set")
        n = len(train_dataset)
        dev = model_device(model)
        good = copy.deepcopy(model).eval()
        bad = reinitialized_copy(model, self.seed, stacklevel=5).eval()  # under @seeded and the accuracy check
        for p in list(good.parameters()) + list(bad.parameters()):
            p.requires_grad_(False)
        student = copy.deepcopy(model).train()
        if self.variant == "goel":
            rows = torch.arange(n)
            opt = torch.optim.SGD(student.parameters(), lr=self.lr, momentum=self.momentum,
                                  weight_decay=self.weight_decay)
        else:
            g = torch.Generator().manual_seed(self.seed)
            k = int(round(self.retain_fraction * retain.numel()))
            sub = retain[torch.randperm(retain.numel(), generator=g)[:k]]
            rows = torch.cat([forget, sub]).sort().values
            opt = torch.optim.Adam(student.parameters(), lr=self.lr)
        if rows.numel() == 0:
            return student.eval()
        flag = torch.zeros(n, dtype=torch.bool)
        flag[forget] = True
        row_flag = flag[rows]  # the view yields positions into ``rows``
        from deltainf.data.dataset import ImageDataset

        # an ImageDataset already yields positions, so the whole set needs no copy
        whole = rows.numel() == n and isinstance(train_dataset, ImageDataset)
        loader_ = loader(train_dataset if whole else view(train_dataset, rows), self.batch_size, self.seed + 1)

        def step(batch) -> None:
            x, _ = xy(batch, model)
            u = row_flag[torch.as_tensor(batch[2]).long().cpu()].to(dev)
            with torch.no_grad():
                zg, zb = good(x), bad(x)
            loss = bad_teacher_loss(student(x), zg, zb, u, self.T)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if self.variant == "goel":
            factor = goel_linear_lr(self.iters)
            pbar = bar(self.iters, self.progress, "bad teacher")
            it = cycle(loader_)
            for t in range(self.iters):
                for grp in opt.param_groups:
                    grp["lr"] = self.lr * factor(t)
                step(next(it))
                if pbar is not None:
                    pbar.update(1)
        else:
            pbar = bar(self.iters * len(loader_), self.progress, "bad teacher")
            for _ in range(self.iters):
                for batch in loader_:
                    step(batch)
                    if pbar is not None:
                        pbar.update(1)
        if pbar is not None:
            pbar.close()
        return student.eval()
