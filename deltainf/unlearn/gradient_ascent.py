"""Gradient ascent (NegGrad) on the forget set, optionally with a retain-set descent term (NegGrad+).

Neither Goel et al. nor Delta-Influence release a standalone GA; this is the standard form the reference
describes (C6): from the poisoned model, minimise ``beta * CE(D_r) - (1 - beta) * CE(S_f)`` with a small
learning rate for a few epochs, and stop early. Early stopping here reads only training data: the run
stops once the model's accuracy on the forget set (w.r.t. its possibly-poisoned labels) drops to
``stop_forget_accuracy`` -- no clean test set is consulted.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from deltainf._util import check_int, check_number
from deltainf.unlearn.base import (Unlearner, accuracy, bar, check_model, cycle, loader, seeded, split_indices,
                                   view, warns_when_retained_accuracy_is_lost, xy)


# Forget-set accuracy at or above which the ascent is said to have unlearned nothing.
_STILL_FITTED = 0.9


class GradientAscent(Unlearner):
    """Gradient ascent on the forget set.

    Args:
        lr: SGD learning rate (default 1e-4, the reference's "<= 1e-4").
        epochs: maximum passes over the forget set (default 5).
        batch_size: forget (and retain) batch size (default 128).
        momentum, weight_decay: SGD settings (default 0.9, 0).
        retain_weight: beta in [0, 1): 0 (default) is plain GA; > 0 adds a retain-set descent term
            (NegGrad+), one shuffled retain batch per forget batch.
        stop_forget_accuracy: stop after the first epoch whose forget-set accuracy is <= this value
            (default 0.0: stop once no forget example keeps its (poisoned) label); None never stops early.
        seed: shuffling seed.
        progress: tqdm bar over steps.

    The returned model is in eval mode; ``history_`` lists (epoch, forget accuracy) after each epoch.
    """

    name = "gradient_ascent"

    def __init__(self, *, lr: float = 1e-4, epochs: int = 5, batch_size: int = 128, momentum: float = 0.9,
                 weight_decay: float = 0.0, retain_weight: float = 0.0, stop_forget_accuracy: float | None = 0.0,
                 seed: int = 0, progress: bool = False) -> None:
        self.lr = check_number("lr", lr)
        self.epochs = check_int("epochs", epochs)
        self.batch_size = check_int("batch_size", batch_size)
        self.momentum = check_number("momentum", momentum, inclusive=True, maximum=1.0, max_inclusive=False)
        self.weight_decay = check_number("weight_decay", weight_decay, inclusive=True)
        self.retain_weight = check_number("retain_weight", retain_weight, inclusive=True, maximum=1.0,
                                          max_inclusive=False)
        if stop_forget_accuracy is not None:
            stop_forget_accuracy = check_number("stop_forget_accuracy", stop_forget_accuracy, inclusive=True,
                                                maximum=1.0)
        self.stop_forget_accuracy = stop_forget_accuracy
        self.seed = check_int("seed", seed, minimum=0)
        self.progress = progress
        self.history_: list = []

    @seeded  # outermost: the accuracy check's loaders draw from the seeded stream too
    @warns_when_retained_accuracy_is_lost
    def unlearn(self, model: nn.Module, train_dataset: Dataset, forget_indices) -> nn.Module:
        check_model(model)
        forget, retain = split_indices(train_dataset, forget_indices)
        student = copy.deepcopy(model)
        self.history_ = []
        if forget.numel() == 0:
            return student.eval()
        opt = torch.optim.SGD(student.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        forget_loader = loader(view(train_dataset, forget), self.batch_size, self.seed)
        eval_loader = loader(view(train_dataset, forget), 512, 0, shuffle=False)
        retain_iter = None
        if self.retain_weight > 0 and retain.numel():
            retain_iter = cycle(loader(view(train_dataset, retain), self.batch_size, self.seed + 1))
        pbar = bar(self.epochs * len(forget_loader), self.progress, "gradient ascent")
        student.train()
        for epoch in range(self.epochs):
            for batch in forget_loader:
                x, y = xy(batch, student)
                loss = -(1.0 - self.retain_weight) * F.cross_entropy(student(x), y)
                if retain_iter is not None:
                    xr, yr = xy(next(retain_iter), student)
                    loss = loss + self.retain_weight * F.cross_entropy(student(xr), yr)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if pbar is not None:
                    pbar.update(1)
            acc = accuracy(student, eval_loader)[0]
            self.history_.append((epoch, acc))
            if self.stop_forget_accuracy is not None and acc <= self.stop_forget_accuracy:
                break
        if pbar is not None:
            pbar.close()
        final = self.history_[-1][1]
        if final >= _STILL_FITTED:  # what ascent is for did not happen: the defaults are small steps on small sets
            steps = len(self.history_) * len(forget_loader)
            warnings.warn(f"gradient_ascent: the forget set is still predicted as labelled (accuracy {final:.2f}) "
                          f"after {steps} step(s) at lr {self.lr:g}: nothing was unlearned; raise lr or epochs, or "
                          "lower batch_size", stacklevel=3)
        return student.eval()
