"""Exact unlearning (retrain from scratch on D minus the flagged set) and catastrophic forgetting
(fine-tune the poisoned model on D minus the flagged set).

Both run a training recipe: a caller-supplied ``train_fn(model, retained_dataset)`` (best: the recipe the
model was trained with) or :func:`deltainf.train.train_model` with a :class:`deltainf.train.TrainConfig`. The
default is chosen from the images, as the experiments choose the victim's: up to 16 px the digits recipe
(``TrainConfig.digits()``), above it the paper's forest recipe (``TrainConfig.paper_resnet18()``: SGD 0.1
Nesterov, wd 5e-4, batch 128, 40 epochs, milestones 14/24/35, shift 4 px + flip -- what Delta-Influence used
for EU and CF, reference C1-C2). The paper's recipe on 8 px images (a 4 px shift is half the image) took a
small model from 99 % to 29 % accuracy.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from deltainf._util import plain_number
from deltainf.unlearn.base import Unlearner, as_image_dataset, check_model, model_device, reinitialized_copy, \
    seeded, split_indices, view

TrainFn = Callable[[nn.Module, Dataset], Optional[nn.Module]]


def _check_recipe(config, train_fn):
    if config is not None and train_fn is not None:
        raise ValueError("config, train_fn: give at most one training recipe")
    if train_fn is not None and not callable(train_fn):
        raise TypeError(f"train_fn: expected a callable (model, dataset) -> model, got {type(train_fn).__name__}")
    if config is not None:
        from deltainf.train import TrainConfig

        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a deltainf.train.TrainConfig, got {type(config).__name__}")


class _RecipeUnlearner(Unlearner):
    reinit: bool = False

    def __init__(self, config=None, train_fn: Optional[TrainFn] = None, seed: int = 0) -> None:
        _check_recipe(config, train_fn)
        seed = plain_number(seed)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        if not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")
        self.config = config
        self.train_fn = train_fn
        self.seed = seed
        #: positions in train_dataset of the examples the last call trained on (int64 (N - F,))
        self.retain_indices_: Optional[torch.Tensor] = None

    @seeded
    def unlearn(self, model: nn.Module, train_dataset: Dataset, forget_indices) -> nn.Module:
        check_model(model)
        forget, retain = split_indices(train_dataset, forget_indices)
        if retain.numel() == 0:
            raise ValueError("forget_indices: every training example is flagged; nothing is left to train on")
        self.retain_indices_ = retain
        start = reinitialized_copy(model, self.seed) if self.reinit else copy.deepcopy(model)
        dev = model_device(model)
        if self.train_fn is not None:
            out = self.train_fn(start, view(train_dataset, retain))
            out = start if out is None else out
            if not isinstance(out, nn.Module):
                raise TypeError(f"train_fn: expected it to return an nn.Module or None, got {type(out).__name__}")
        else:
            from deltainf.train import TrainConfig, train_model

            from deltainf.recipes import training_recipe

            images = as_image_dataset(train_dataset)
            cfg = self.config if self.config is not None else training_recipe(images, self.seed, progress=False)
            out = train_model(images, cfg, model=start, exclude=forget)
        return out.to(dev).eval()


class ExactRetrain(_RecipeUnlearner):
    """Exact unlearning (EU): re-initialise the victim's architecture and train it on D \\ S_f.

    Args:
        config: :class:`deltainf.train.TrainConfig` for :func:`deltainf.train.train_model`; default chosen from
            the images (module docstring): the digits recipe up to 16 px, the paper's (40 epochs) above.
        train_fn: alternatively ``train_fn(model, retained_dataset) -> model | None`` (trains in place when
            it returns None); ``retained_dataset`` yields (x, y, position) over D \\ S_f in original order.
        seed: seed of the re-initialisation and of the default recipe (a given ``config`` keeps its own seed for
            data order and augmentation).

    After a call, ``retain_indices_`` holds the positions that were trained on.
    """

    name = "exact_retrain"
    reinit = True


class FineTune(_RecipeUnlearner):
    """Catastrophic forgetting (CF): fine-tune (all layers of) the poisoned model on D \\ S_f.

    Same arguments as :class:`ExactRetrain` (``seed`` seeds the default recipe only: no re-initialisation). The
    default recipe is
    chosen as :class:`ExactRetrain`'s; above 16 px the paper's, the full forest recipe again, 40 epochs from the
    victim's weights (reference C2).
    """

    name = "finetune"
    reinit = False
