"""SCRUB (Kurmanji et al., NeurIPS 2023), reference C4.

Teacher = the frozen poisoned model (eval mode); student = a copy, trained. KD_T(s, t) =
KL(softmax(z_t/T) || softmax(z_s/T)) * T^2 / batch.

``variant="goel"`` (default; the corrective-unlearning-bench class Delta-Influence ran): counted in
optimiser STEPS. While step < ``iters``: if step < ``msteps``, one pass over the forget loader minimising
``-(CE + alpha KD)`` (ascent on the forget labels plus KD); then a pass over the retain loader minimising
``CE + alpha KD``; stop as soon as ``iters`` steps are done. SGD (momentum 0.9, wd 5e-4) with Goel's
linear schedule. Defaults are Delta-Influence's: iters 40, msteps 400, lr 0.025, batch 512, alpha 0.001,
T 4. With msteps > iters the passes alternate until iters steps are done: one ascent pass over S_f, then
descent on D_r, and, where a retain pass is shorter than the steps left (a training set of fewer than about
40 x 512 examples), the ascent pass again after each retain pass, as in Goel's loop.

``variant="original"``: counted in EPOCHS. For e = 1..``epochs``: if e <= ``msteps``, a max pass over the
forget loader minimising ``-KD``; then a min pass over the retain loader with ``gamma CE + alpha KD``.
SGD lr 5e-4 (x0.1 after epochs 3, 5, 9), momentum 0.9, wd 5e-4; defaults epochs 3, msteps 2, gamma 0.99,
alpha 0.001, T 4, retain batch 128, forget batch 512 (the authors' CIFAR-10 settings).

Unlike the released code, loaders are shuffled and no checkpoint is picked by clean-test accuracy.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from deltainf._util import check_int, check_number
from deltainf.unlearn.base import (Unlearner, bar, check_model, goel_linear_lr, kd_loss, loader, seeded, split_indices,
                                   view, warns_when_retained_accuracy_is_lost, xy)

_DEFAULTS = {
    "goel": dict(iters=40, msteps=400, lr=0.025, batch_size=512, forget_batch_size=512),
    "original": dict(iters=3, msteps=2, lr=5e-4, batch_size=128, forget_batch_size=512),
}


class SCRUB(Unlearner):
    """SCRUB unlearning (see the module docstring for both variants).

    Args:
        variant: ``"goel"`` (default) or ``"original"``.
        iters: total optimiser steps (goel) or epochs (original); default 40 / 3.
        msteps: steps (goel) / epochs (original) during which forget passes run; default 400 / 2.
        lr: default 0.025 / 5e-4.
        batch_size: retain batch size; default 512 / 128.
        forget_batch_size: forget batch size; default 512 / 512.
        alpha: KD weight (default 0.001).
        gamma: CE weight of the original min step (default 0.99; goel uses 1).
        kd_T: distillation temperature (default 4).
        momentum, weight_decay: SGD settings (default 0.9, 5e-4).
        lr_decay_epochs: original variant's decay epochs (default (3, 5, 9), x0.1 each).
        seed: shuffling seed.
        progress: tqdm bar.
    """

    name = "scrub"

    def __init__(self, variant: str = "goel", *, iters: Optional[int] = None, msteps: Optional[int] = None,
                 lr: Optional[float] = None, batch_size: Optional[int] = None,
                 forget_batch_size: Optional[int] = None, alpha: float = 0.001, gamma: float = 0.99,
                 kd_T: float = 4.0, momentum: float = 0.9, weight_decay: float = 5e-4,
                 lr_decay_epochs=(3, 5, 9), seed: int = 0, progress: bool = False) -> None:
        if variant not in _DEFAULTS:
            raise ValueError(f"variant: expected one of {sorted(_DEFAULTS)}, got {variant!r}")
        d = _DEFAULTS[variant]
        self.variant = variant
        self.iters = check_int("iters", d["iters"] if iters is None else iters)
        self.msteps = check_int("msteps", d["msteps"] if msteps is None else msteps, minimum=0)
        self.lr = check_number("lr", d["lr"] if lr is None else lr)
        self.batch_size = check_int("batch_size", d["batch_size"] if batch_size is None else batch_size)
        self.forget_batch_size = check_int("forget_batch_size",
                                           d["forget_batch_size"] if forget_batch_size is None else forget_batch_size)
        self.alpha = check_number("alpha", alpha, inclusive=True)
        self.gamma = check_number("gamma", gamma, inclusive=True)
        self.kd_T = check_number("kd_T", kd_T)
        self.momentum = check_number("momentum", momentum, inclusive=True, maximum=1.0, max_inclusive=False)
        self.weight_decay = check_number("weight_decay", weight_decay, inclusive=True)
        if isinstance(lr_decay_epochs, (str, bytes)) or not hasattr(lr_decay_epochs, "__iter__") or \
                any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in lr_decay_epochs):
            raise ValueError(f"lr_decay_epochs: expected a sequence of epoch numbers (ints >= 0), got "
                             f"{lr_decay_epochs!r}")
        self.lr_decay_epochs = tuple(lr_decay_epochs)
        self.seed = check_int("seed", seed, minimum=0)
        self.progress = progress
        self.steps_ = 0

    @seeded  # outermost: the accuracy check's loaders draw from the seeded stream too
    @warns_when_retained_accuracy_is_lost
    def unlearn(self, model: nn.Module, train_dataset: Dataset, forget_indices) -> nn.Module:
        check_model(model)
        forget, retain = split_indices(train_dataset, forget_indices)
        if retain.numel() == 0:
            raise ValueError("forget_indices: every training example is flagged; SCRUB needs a retain set")
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student = copy.deepcopy(model).train()
        opt = torch.optim.SGD(student.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        forget_loader = loader(view(train_dataset, forget), self.forget_batch_size, self.seed) \
            if forget.numel() else None
        retain_loader = loader(view(train_dataset, retain), self.batch_size, self.seed + 1)
        T = self.kd_T

        def step(batch, sign: float, ce_weight: float, kd_weight: float) -> None:
            x, y = xy(batch, model)
            zs = student(x)
            with torch.no_grad():
                zt = teacher(x)
            loss = kd_weight * kd_loss(zs, zt, T)
            if ce_weight:
                loss = loss + ce_weight * F.cross_entropy(zs, y)
            opt.zero_grad(set_to_none=True)
            (sign * loss).backward()
            opt.step()

        self.steps_ = 0
        if self.variant == "goel":
            factor = goel_linear_lr(self.iters)
            pbar = bar(self.iters, self.progress, "scrub")

            def run_pass(loader_, sign):
                for batch in loader_:
                    if self.steps_ >= self.iters:
                        return
                    for g in opt.param_groups:
                        g["lr"] = self.lr * factor(self.steps_)
                    step(batch, sign, 1.0, self.alpha)
                    self.steps_ += 1
                    if pbar is not None:
                        pbar.update(1)

            while self.steps_ < self.iters:
                if self.steps_ < self.msteps and forget_loader is not None:
                    run_pass(forget_loader, -1.0)  # ascent on -(CE + alpha KD) over S_f
                run_pass(retain_loader, 1.0)
        else:
            pbar = bar(self.iters, self.progress, "scrub")
            for epoch in range(1, self.iters + 1):
                decay = sum(1 for e in self.lr_decay_epochs if epoch > e)
                for g in opt.param_groups:
                    g["lr"] = self.lr * 0.1 ** decay
                if epoch <= self.msteps and forget_loader is not None:
                    for batch in forget_loader:  # max step: push the student away from the teacher on S_f
                        step(batch, -1.0, 0.0, 1.0)
                        self.steps_ += 1
                for batch in retain_loader:  # min step: gamma CE + alpha KD on D_r
                    step(batch, 1.0, self.gamma, self.alpha)
                    self.steps_ += 1
                if pbar is not None:
                    pbar.update(1)
        if pbar is not None:
            pbar.close()
        return student.eval()
