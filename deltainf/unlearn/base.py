"""Shared pieces of the unlearning methods: the interface, dataset views, losses, schedules, checks.

Every method follows one contract: ``Unlearner.unlearn(model, train_dataset, forget_indices)`` returns a
NEW model; the input model (weights and train/eval mode) is left untouched. The forget set S_f is the
flagged indices; the retain set D_r is everything else (it may still hold unflagged poisons).

Deliberate differences from the released Goel et al. / Delta-Influence code: every loader is shuffled (their unshuffled retain loaders let a 40-step run see
only the first ~20k examples), and no checkpoint is ever selected on test data -- each method returns the
model of its last step.
"""
from __future__ import annotations

import abc
import copy
import functools
import warnings
from typing import Iterator, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from deltainf._util import model_device, model_dtype, progress_bar, seeded_rng
from deltainf.data.dataset import ImageDataset, as_index_tensor
from deltainf.data.loaders import check_dataset


class IndexSubset(Dataset):
    """A view of a generic dataset restricted to ``indices``; yields ``(x, y, position_in_view)``.

    ``indices[j]`` is the position in ``base`` of item j. (ImageDatasets use ``subset`` instead.)
    """

    def __init__(self, base: Dataset, indices) -> None:
        self.base = base
        self.indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, j: int):
        x, y = example(self.base[int(self.indices[j])])
        return x, y, int(j)


def example(item, name: str = "train_dataset") -> tuple:
    """(x, int label) of a dataset item (x, y, ...); a TypeError naming ``name`` for any other item."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        got = type(item).__name__ + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
        raise TypeError(f"{name}: items must be (x, y, ...) with an integer label, got {got}")
    try:
        label = torch.as_tensor(item[1])
        if label.numel() != 1 or label.is_floating_point() or label.dtype == torch.bool:
            raise TypeError
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: items must be (x, y, ...) with an integer label, got a label of type "
                        f"{type(item[1]).__name__}") from None
    return item[0], int(label)


def check_model(model) -> None:
    """TypeError/ValueError unless ``model`` is an nn.Module with trainable parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model: has no trainable parameters")


def split_indices(train_dataset: Dataset, forget_indices) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate ``forget_indices`` (ints or a bool mask (N,)) -> (forget int64 (F,) sorted, retain int64 (N-F,))."""
    if isinstance(train_dataset, (tuple, list)) and len(train_dataset) == 2 \
            and all(isinstance(t, torch.Tensor) for t in train_dataset):  # else a dataset of two examples
        raise TypeError("train_dataset: got a pair of tensors (x, y); pass a dataset of examples, e.g. "
                        "torch.utils.data.TensorDataset(x, y)")
    n = check_dataset(train_dataset)
    if n == 0:
        raise ValueError("train_dataset: the dataset is empty")
    f = as_index_tensor(forget_indices, n, name="forget_indices", unique=False)
    f = torch.unique(f)
    keep = torch.ones(n, dtype=torch.bool)
    keep[f] = False
    return f, keep.nonzero().reshape(-1)


def view(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    """The rows ``indices`` of ``dataset`` as a dataset yielding (x, y, position): ``ImageDataset.subset``
    for ImageDatasets (fast batched loading), :class:`IndexSubset` otherwise."""
    if isinstance(dataset, ImageDataset):
        return dataset.subset(indices)
    return IndexSubset(dataset, indices)


def as_image_dataset(dataset: Dataset, name: str = "train_dataset") -> ImageDataset:
    """An ImageDataset holding every item of ``dataset`` (returned as is when it already is one)."""
    if isinstance(dataset, ImageDataset):
        return dataset
    n = check_dataset(dataset, name)
    if n == 0:
        raise ValueError(f"{name}: the dataset is empty")
    xs, ys = [], []
    for i in range(n):
        x, y = example(dataset[i], name)
        xs.append(torch.as_tensor(x).float())
        ys.append(y)
    try:  # the training recipes work on pixel images (their augmentations, their checks)
        return ImageDataset(torch.stack(xs), torch.tensor(ys))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: the training recipe needs pixel images: {err} (pass train_fn= for other "
                        "inputs)") from None


def loader(dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True):
    """A seeded, by default shuffled, loader yielding (x, y, index) batches (deltainf.data.make_loader)."""
    from deltainf.data.loaders import make_loader

    return make_loader(dataset, batch_size, shuffle=shuffle, seed=int(seed))


def seeded(unlearn):
    """For an :meth:`Unlearner.unlearn`: run it with torch's global RNG seeded by the unlearner's ``seed`` and
    restored after, so that what draws from it (a model's dropout) follows the seed, not the caller's random
    stream, and the caller's stream is left where it was."""

    @functools.wraps(unlearn)
    def run(self, model, train_dataset, forget_indices):
        with seeded_rng(self.seed, model_device(model) if isinstance(model, nn.Module) else None):
            return unlearn(self, model, train_dataset, forget_indices)

    return run


# An approximate method's result is said to have lost the model when it keeps less than this share of the original's
# accuracy above chance on the retained examples (read on at most _KEPT_SAMPLE of them).
_KEPT_SHARE = 0.5
_KEPT_SAMPLE = 512


def accuracy(model: nn.Module, loader_) -> tuple[float, int]:
    """(``model``'s accuracy on the (x, y[, index]) batches of ``loader_``, its number of logits), read by
    :func:`deltainf._util.logits` (eval mode, the model's modes restored)."""
    from deltainf._util import logits

    correct = total = classes = 0
    for batch in loader_:
        out = logits(model, batch[0], where="train_dataset inputs")
        correct += int((out.argmax(1) == torch.as_tensor(batch[1]).long()).sum())
        total, classes = total + out.shape[0], out.shape[1]
    return correct / max(total, 1), classes


def warns_when_retained_accuracy_is_lost(unlearn):
    """For an approximate :meth:`Unlearner.unlearn`: a warning when the unlearned model classifies the retained
    examples far worse than the model it started from (less than ``_KEPT_SHARE`` of its accuracy above chance):
    the papers' defaults, made for CIFAR-sized runs, can wreck a small model on a small forget set (SCRUB on digits:
    the test accuracy 0.98 -> 0.11), and the result would otherwise look like an unlearned model."""

    @functools.wraps(unlearn)
    def run(self, model, train_dataset, forget_indices):
        unlearned = unlearn(self, model, train_dataset, forget_indices)
        _, retain = split_indices(train_dataset, forget_indices)
        if retain.numel():
            g = torch.Generator().manual_seed(self.seed)
            sample = retain[torch.randperm(retain.numel(), generator=g)[:_KEPT_SAMPLE]].sort().values
            (before, classes), (after, _) = (accuracy(m, loader(view(train_dataset, sample), 256, self.seed,
                                                                shuffle=False)) for m in (model, unlearned))
            chance = 1.0 / max(classes, 1)
            if before > chance and after - chance < _KEPT_SHARE * (before - chance):
                warnings.warn(f"{self.name}: the unlearned model classifies {after:.0%} of the retained training "
                              f"examples correctly, the model it started from {before:.0%} (chance {chance:.0%}): the "
                              "unlearning lost what it should keep; its defaults are the paper's settings for "
                              "CIFAR-sized runs, try a lower lr or fewer steps", stacklevel=3)  # above @seeded
        return unlearned

    return run


def cycle(loader_) -> Iterator:
    """Endless iteration over a loader (a fresh shuffle each pass)."""
    while True:
        yielded = False
        for batch in loader_:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("dataset: the loader produced no batches (empty dataset?)")


def xy(batch, model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y int64) from a batch (x, y) or (x, y, index), on ``model``'s device, x in its dtype (float32 for a model
    without floating-point weights): a float64 model takes float64 inputs."""
    dtype = model_dtype(model) or torch.float32
    return batch[0].to(model_device(model), dtype), torch.as_tensor(batch[1]).to(model_device(model)).long()


def reinitialized_copy(model: nn.Module, seed: int, stacklevel: int = 4) -> nn.Module:
    """A deep copy of ``model`` with fresh weights (Goel's EU re-init; Bad Teacher's incompetent teacher).

    Every submodule with ``reset_parameters()`` is reset under a forked, seeded RNG (no global RNG
    leak), then :func:`deltainf.models.init_weights` re-draws Conv2d/Linear/BatchNorm exactly as
    ``build_model`` does, so a deltainf model comes back initialised like a freshly built one. Parameters
    the model does not train (``requires_grad=False``: a frozen, pretrained part) keep their values, and a
    module whose parameters are all frozen its buffers (running statistics): retraining would never learn them
    back. ``stacklevel``: of the warning that names the parameters it cannot draw afresh (4: the caller of an
    :meth:`Unlearner.unlearn` that calls this directly under ``@seeded``).
    """
    from deltainf.models.common import init_weights

    kept = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    kept_buffers = {}
    for name, mod in model.named_modules():
        own = list(mod.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            kept_buffers.update({f"{name}.{b}" if name else b: v.detach().clone()
                                 for b, v in mod.named_buffers(recurse=False) if v is not None})
    m = copy.deepcopy(model)
    with seeded_rng(seed, model_device(m)):
        for mod in m.modules():
            if hasattr(mod, "reset_parameters") and callable(mod.reset_parameters):
                mod.reset_parameters()
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.reset_running_stats()
    init_weights(m, seed)
    # a parameter of the user's own module (no reset_parameters()) comes back as trained: retraining would start
    # from the poisoned values (a probe: the backdoor survived retraining without every poison, 28 % success)
    # (a parameter a reset drew back to the value it had, a BatchNorm's weight of ones never trained, is reset)
    trained = dict(model.named_parameters())
    unreset = [full for name, mod in m.named_modules() if not callable(getattr(mod, "reset_parameters", None))
               for k, v in mod.named_parameters(recurse=False) for full in [f"{name}.{k}" if name else k]
               if v.requires_grad and v.numel() and torch.equal(v.detach(), trained[full].detach())]
    if unreset:
        shown = ", ".join(unreset[:4]) + (f" and {len(unreset) - 4} more" if len(unreset) > 4 else "")
        warnings.warn(f"model: {shown} keep their trained values in the re-initialised copy (their module has no "
                      "reset_parameters()), so training starts from them; give the module a reset_parameters() "
                      "that draws them afresh", stacklevel=stacklevel)
    with torch.no_grad():
        for k, v in kept.items():
            m.get_parameter(k).copy_(v)
        for k, v in kept_buffers.items():
            m.get_buffer(k).copy_(v)
    return m


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """SCRUB's distillation loss: KL(softmax(z_t/T) || softmax(z_s/T)) * T^2, summed over the batch then
    divided by the batch size (scalar)."""
    log_ps = F.log_softmax(student_logits / T, dim=1)
    pt = F.softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_ps, pt, reduction="sum") * (T * T) / student_logits.shape[0]


def goel_linear_lr(iters: int):
    """Goel et al.'s LinearLR factor for step t: linear warm-up over iters//100 steps, then
    1 - (t - warm) / (1.25 iters) (still ~0.2 at the last step)."""
    warm = iters // 100

    def factor(t: int) -> float:
        if warm > 0 and t < warm:
            return (t + 1) / warm
        return max(1.0 - (t - warm) / (1.25 * iters), 0.0)

    return factor


def bar(total: int, enabled: bool, desc: str):
    """A progress bar over ``total`` steps (hidden when disabled)."""
    return progress_bar(total=total, enabled=enabled, desc=desc, leave=False)


class Unlearner(abc.ABC):
    """Base class: ``unlearn(model, train_dataset, forget_indices) -> new nn.Module``.

    ``train_dataset`` yields (x, y) or (x, y, index) with x float32 (C,H,W) in [0,1] and y int (an
    ImageDataset is fastest); ``forget_indices`` is an int sequence/LongTensor (or a bool mask (N,)) of
    positions in it. The returned model is on the input model's device, in eval mode.
    """

    #: registry name (see :func:`deltainf.unlearn.get_unlearner`)
    name: str = ""

    @abc.abstractmethod
    def unlearn(self, model: nn.Module, train_dataset: Dataset, forget_indices) -> nn.Module:
        """Return a new model with the forget set unlearned; ``model`` is not modified."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
