"""Seeded, reproducible training, evaluation, prediction and safetensors checkpoints.

One recipe trains the victim and, later, the exact-unlearning retrain (``train_model(train, config,
exclude=flagged)``), so the two differ only in the data.

Recipes (``TrainConfig`` presets):

* :meth:`TrainConfig.digits` — SmallCNN on the 16x16 digits: Adam (lr 3e-3, cosine decay), batch 64,
  12 epochs, augmentation = random translation of up to ±1 px (zero padding), **no horizontal flip**
  (mirrored digits are different or invalid symbols: a flipped 2/3/7 is not a digit). About 3 s on
  2 CPU cores, ~98 % clean test accuracy.
* :meth:`TrainConfig.paper_resnet18` — the forest "conservative" recipe the Δ-Influence paper used
  for every victim and EU retrain: SGD lr 0.1, momentum 0.9, Nesterov,
  weight decay 5e-4, batch 128, 40 epochs, MultiStepLR ×0.1 at ``epochs//2.667, epochs//1.6,
  epochs//1.142`` (14, 24, 35 for 40 epochs, Python float floor division as in forest), random
  translation of up to ±4 px plus horizontal flip (p = 0.5). forest translates by a continuous
  amount with bilinear resampling (``shift_mode="translate"``); the default here is an integer
  shift, i.e. ``RandomCrop(pad=4)`` (``shift_mode="crop"``), which keeps patch triggers pixel-exact.
  Padding is 0 in pixel space (black); forest padded 0 in normalised space (the mean colour).

Randomness: weights come from ``build_model(seed=config.seed)``; the data order from a generator
seeded with ``config.seed + 1``; augmentation draws from a CPU generator seeded with
``config.seed + 2`` (so CPU and GPU runs see the same shifts and flips). The global RNG is never
used. On CPU two runs with the same config give bit-identical weights; on GPU cuDNN may add
run-to-run noise unless ``torch.backends.cudnn.deterministic`` is set by the caller.
No checkpoint is selected on test accuracy (Goel et al. keep the best clean-test checkpoint; we
return the final model).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deltainf._files import file_error, read_tensors, require_digest, write_tensors
from deltainf._util import as_int, logits, model_device, model_dtype, progress_bar, seeded_rng
from deltainf.data.dataset import ImageDataset
from deltainf.data.loaders import make_loader
from deltainf.models import MODEL_NAMES, build_model, unwrap_model
from deltainf.models.user import check_finite

__all__ = ["TrainConfig", "train_model", "accuracy", "predict", "augment_batch", "save_checkpoint",
           "load_checkpoint", "load_model", "model_from_build_args", "read_checkpoint", "check_state",
           "forest_milestones", "resolve_device"]

_OPTIMIZERS = ("sgd", "adam")
_SCHEDULES = ("constant", "cosine", "multistep")
_SHIFT_MODES = ("crop", "translate")


def forest_milestones(epochs: int) -> tuple[int, ...]:
    """forest's MultiStepLR milestones ``(epochs//2.667, epochs//1.6, epochs//1.142)``; (14, 24, 35) for 40."""
    return tuple(int(epochs // d) for d in (2.667, 1.6, 1.142))


def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available else CPU; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") from exc


@dataclass
class TrainConfig:
    """Options of :func:`train_model`, validated on construction.

    Attributes:
        model: architecture for a fresh model (``"small_cnn"`` or ``"resnet18"``).
        model_kwargs: extra keyword arguments for :func:`deltainf.models.build_model`.
        epochs: passes over the training set (>= 1).
        batch_size: examples per step (>= 1).
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: peak learning rate (> 0).
        momentum: SGD momentum in [0, 1).
        nesterov: Nesterov momentum (SGD only; needs momentum > 0).
        weight_decay: L2 penalty (>= 0), coupled (torch's ``weight_decay``) for both optimisers.
        schedule: ``"constant"``, ``"cosine"`` (per step, to 0 at the end) or ``"multistep"``
            (×``gamma`` at each epoch in ``milestones``, stepped per epoch as forest does).
        milestones: epochs for ``"multistep"``; empty = :func:`forest_milestones` (epochs).
        gamma: multistep decay factor in (0, 1].
        shift: augmentation translation range in pixels (0 = none).
        shift_mode: ``"crop"`` (integer shift, zero padding) or ``"translate"`` (continuous, bilinear).
        flip: random horizontal flip with p = 0.5.
        seed: seed for the initial weights, data order and augmentation.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or None/"auto" (CUDA if available; with None, a
            model passed to :func:`train_model` stays on its own device).
        progress: show a tqdm bar over epochs.
        num_workers: DataLoader workers.
        cpu_threads: torch CPU threads while training (None = leave torch's setting). Small models
            train best on one thread: their ops are too small to share, and on a busy 2-core machine
            every OpenMP region waits for a second core (measured: digits 4.6 s on 1 thread, 120 s
            on 2 while another process ran).
    """

    model: str = "small_cnn"
    model_kwargs: dict = field(default_factory=dict)
    epochs: int = 12
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 3e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"
    milestones: tuple = ()
    gamma: float = 0.1
    shift: int = 1
    shift_mode: str = "crop"
    flip: bool = False
    seed: int = 0
    device: str | None = None
    progress: bool = True
    num_workers: int = 0
    cpu_threads: int | None = None

    def __post_init__(self):
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model must be one of {list(MODEL_NAMES)}, got {self.model!r}")
        if not isinstance(self.model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {type(self.model_kwargs).__name__}")
        for name in ("epochs", "batch_size"):
            v = as_int(getattr(self, name))  # numpy ints too
            if v is None or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
            setattr(self, name, v)
        # bool settings: "no" was true (flipping on), and True passed as a number (lr, shift, seed)
        for name in ("flip", "nesterov"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name} must be a number, got {v!r}")
            setattr(self, name, float(v))
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(_OPTIMIZERS)}, got {self.optimizer!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov=True needs optimizer='sgd' and momentum > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):  # inf trained to NaN weights
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {list(_SCHEDULES)}, got {self.schedule!r}")
        # "12" was read as (1, 2), 1.7 as 1
        if isinstance(self.milestones, (str, bytes)) or any(as_int(m) is None for m in self.milestones):
            raise ValueError(f"milestones must be a sequence of epoch numbers (ints), got {self.milestones!r}")
        self.milestones = tuple(as_int(m) for m in self.milestones)
        if any(m < 0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be non-negative and sorted, got {self.milestones}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma!r}")
        if as_int(self.shift) is None or self.shift < 0:
            raise ValueError(f"shift must be an int >= 0, got {self.shift!r}")
        self.shift = as_int(self.shift)
        if self.shift_mode not in _SHIFT_MODES:
            raise ValueError(f"shift_mode must be one of {list(_SHIFT_MODES)}, got {self.shift_mode!r}")
        if as_int(self.seed) is None:
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        self.seed = as_int(self.seed)
        resolve_device(self.device)
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise ValueError(f"cpu_threads must be None or an int >= 1, got {self.cpu_threads!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")

    @classmethod
    def digits(cls, **overrides) -> "TrainConfig":
        """SmallCNN recipe for the 16x16 digits (see module docstring), on one CPU thread."""
        return cls(**{"cpu_threads": 1, **overrides})

    @classmethod
    def paper_resnet18(cls, epochs: int = 40, **overrides) -> "TrainConfig":
        """The Δ-Influence / forest ResNet-18 recipe."""
        base = dict(model="resnet18", epochs=epochs, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9,
                    nesterov=True, weight_decay=5e-4, schedule="multistep",
                    milestones=forest_milestones(epochs), gamma=0.1, shift=4, flip=True)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        """JSON-serialisable view (for checkpoint metadata and reports)."""
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


def augment_batch(x: torch.Tensor, shift: int, flip: bool, generator: torch.Generator,
                  mode: str = "crop") -> torch.Tensor:
    """Random translation (zero padding) and horizontal flip, independently per example.

    Args:
        x: float tensor (N, C, H, W), pixel space, any device.
        shift: maximum translation in pixels along each axis.
        flip: flip each example left-right with probability 0.5.
        generator: CPU generator all random draws come from (device-independent results).
        mode: ``"crop"`` — integer offsets in [-shift, shift] (RandomCrop with zero padding);
            ``"translate"`` — continuous offsets, bilinear resampling (forest's RandomTransform).

    Returns:
        Tensor of the same shape, dtype and device.
    """
    n, _, h, w = x.shape
    if n == 0:
        return x
    if shift > 0:
        if mode == "crop":
            off = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator).to(x.device)
            padded = F.pad(x, (shift, shift, shift, shift))
            rows = off[:, 0:1] + torch.arange(h, device=x.device)  # (N, H)
            cols = off[:, 1:2] + torch.arange(w, device=x.device)  # (N, W)
            batch = torch.arange(n, device=x.device)[:, None, None]
            # Advanced indexing gathers each example's window: result (N, H, W, C).
            x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        elif mode == "translate":
            t = (torch.rand(n, 2, generator=generator) * 2 - 1) * shift  # pixels, (dx, dy)
            theta = torch.zeros(n, 2, 3)
            theta[:, 0, 0] = 1.0
            theta[:, 1, 1] = 1.0
            theta[:, 0, 2] = -2.0 * t[:, 0] / w  # sampling grid moves opposite to the content
            theta[:, 1, 2] = -2.0 * t[:, 1] / h
            grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        else:
            raise ValueError(f"mode must be 'crop' or 'translate', got {mode!r}")
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
        x = torch.where(mask, x.flip(-1), x)
    return x.contiguous()


def _lr_factor(config: TrainConfig, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "multistep":
        milestones = config.milestones or forest_milestones(config.epochs)
        return config.gamma ** sum(1 for m in milestones if epoch >= m)
    total = config.epochs * steps_per_epoch
    t = epoch * steps_per_epoch + step_in_epoch
    return 0.5 * (1.0 + math.cos(math.pi * t / total))


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def train_model(dataset: ImageDataset, config: TrainConfig | None = None, model: nn.Module | None = None,
                exclude=None, test_dataset: ImageDataset | None = None,
                history: list | None = None) -> nn.Module:
    """Train a model on ``dataset`` with ``config`` and return it in eval mode.

    Args:
        dataset: training data (ImageDataset; images (N, C, H, W) float32 in [0, 1], labels int64).
        config: the recipe; default :meth:`TrainConfig.digits`.
        model: a model to train further (fine-tuning, e.g. catastrophic-forgetting unlearning); when
            None a fresh ``config.model`` is built from the dataset's shape, classes and mean/std
            with ``seed=config.seed``.
        exclude: training indices to leave out (LongTensor/sequence/bool mask (N,)) — exact
            unlearning is ``train_model(train, config, exclude=flagged)``.
        test_dataset: if given, clean accuracy is measured after every epoch (logged, never used for
            model selection).
        history: if a list is given, one dict per epoch is appended
            (``epoch``, ``loss``, ``train_acc``, ``lr``, and ``test_acc`` with ``test_dataset``).

    Returns:
        The trained model (on ``config.device``, eval mode).
    """
    config = config if config is not None else TrainConfig.digits()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
    if exclude is not None:
        dataset = dataset.without(exclude)
    if len(dataset) == 0:
        raise ValueError("dataset is empty (nothing left to train on)")
    side = min(dataset.image_shape[-2:])
    if config.shift >= side:  # 20 px on 8 px images: most augmented images blank, with their labels
        raise ValueError(f"shift: {config.shift} px moves {side} px images out of their frame; give less than the "
                         "image side")
    if model is not None and config.device is None and isinstance(model, nn.Module):
        device = model_device(model)  # fine-tuning: stay where the caller put the model
    else:
        device = resolve_device(config.device)
    if model is None:
        c, h, _ = dataset.image_shape
        model = build_model(config.model, dataset.num_classes, in_channels=c, image_size=h,
                            mean=dataset.mean, std=dataset.std, seed=config.seed, **config.model_kwargs)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model.to(device)
    _check_classes(model, dataset)
    threads = torch.get_num_threads()
    if config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    try:
        with seeded_rng(config.seed + 3, device):  # a model's dropout follows the seed, not the caller's stream
            _fit(model, dataset, config, device, test_dataset, history)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


def _check_classes(model: nn.Module, dataset: ImageDataset) -> None:
    """ValueError, before training, when the model gives fewer logits than the dataset has labels (fine-tuning a
    model of another task: the loss failed at its first step with "Target 7 is out of bounds")."""
    k = logits(model, dataset.images[:2], where="the dataset's first images").shape[1]
    top = int(dataset.labels.max()) if len(dataset) else -1
    if top >= k:
        raise ValueError(f"model: gives {k} logits, but the dataset has label {top} (labels 0..{k - 1} fit the model); "
                         "give the model an output per class")


def _frozen_norms(model: nn.Module) -> list[nn.Module]:
    """The batch-norm layers whose affine parameters are all frozen (requires_grad=False): a user who froze them
    (a frozen backbone) keeps their running statistics too, which training in train mode would move."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]


def _fit(model: nn.Module, dataset: ImageDataset, config: TrainConfig, device: torch.device,
         test_dataset: ImageDataset | None, history: list | None) -> None:
    """The training loop of :func:`train_model` (model already on ``device``)."""
    optimizer = _make_optimizer(model, config)
    # a last batch of one example cannot train a batch norm ("expected more than 1 value per channel"): it is left
    # out, a different example each epoch as the order is drawn anew
    frozen_norms = _frozen_norms(model)  # kept in eval mode: a batch of one is fine for those
    lone = len(dataset) % config.batch_size == 1 and len(dataset) > 1 and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in frozen_norms for m in model.modules())
    loader = make_loader(dataset, config.batch_size, shuffle=True, seed=config.seed + 1, drop_last=lone,
                         num_workers=config.num_workers)
    aug_gen = torch.Generator().manual_seed(config.seed + 2)
    dtype = model_dtype(model) or torch.float32  # a float64 model trains on float64 inputs
    steps = len(loader)
    bar = progress_bar(range(config.epochs), config.progress, desc="train", leave=False)
    for epoch in bar:
        model.train()
        for m in frozen_norms:  # frozen with its statistics: a frozen layer's running mean and variance stay
            m.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        for step, (x, y, _) in enumerate(loader):
            lr = config.lr * _lr_factor(config, epoch, step, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = x.to(device, dtype, non_blocking=True)
            y = y.to(device, non_blocking=True)
            x = augment_batch(x, config.shift, config.flip, aug_gen, config.shift_mode)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * y.numel()
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += y.numel()
        stats = {"epoch": epoch, "loss": loss_sum / seen, "train_acc": correct / seen, "lr": lr}
        if not math.isfinite(stats["loss"]):  # the model's weights are NaN from here on: nothing to return
            raise FloatingPointError(f"training: the loss became {stats['loss']} in epoch {epoch} (lr {config.lr}, "
                                     f"weight_decay {config.weight_decay}): lower the learning rate")
        if test_dataset is not None:
            stats["test_acc"] = accuracy(model, test_dataset, device=device)
        if history is not None:
            history.append(stats)
        bar.set_postfix({k: round(v, 4) for k, v in stats.items() if k != "epoch"})


@torch.no_grad()
def predict(model: nn.Module, data, batch_size: int = 512, device=None, return_logits: bool = False,
            progress: bool = False) -> torch.Tensor:
    """Predicted classes (or logits) for a dataset or an image tensor, model in eval mode.

    Args:
        model: classifier taking pixel-space images.
        data: ImageDataset, or float tensor (N, C, H, W) in [0, 1], or a single image (C, H, W).
        batch_size: examples per forward pass.
        device: where to run; default = the model's device.
        return_logits: return float32 logits (N, num_classes) instead of int64 classes (N,).
        progress: tqdm bar.

    Returns:
        CPU tensor: int64 (N,) predictions, or float32 (N, num_classes) logits.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(data, ImageDataset):
        images = data.images
    elif isinstance(data, torch.Tensor):
        images = data.unsqueeze(0) if data.ndim == 3 else data
        if images.ndim != 4:
            raise ValueError(f"data must be images (N, C, H, W) or (C, H, W), got {tuple(data.shape)}")
    else:
        raise TypeError(f"data must be an ImageDataset or a tensor, got {type(data).__name__}")
    out = logits(model, images.to(torch.float32), batch_size, where="data", device=device, progress=progress)
    return out if return_logits else out.argmax(1) if out.numel() else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, dataset: ImageDataset, batch_size: int = 512, device=None) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` on ``dataset`` (no augmentation, eval mode)."""
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    pred = predict(model, dataset, batch_size=batch_size, device=device)
    return float((pred == dataset.labels).float().mean())


_META_KEY = "deltainf_meta"
_BUILD_KEY = "deltainf_build_args"
CHECKPOINT_FORMAT = "deltainf-checkpoint-v1"
# Build arguments come from a file: an image side beyond this is taken for damage, not for a model
# (the data would be resized to it before anything else could fail).
MAX_IMAGE_SIDE = 8192


def save_checkpoint(model: nn.Module, path, meta: dict[str, Any] | None = None) -> None:
    """Save ``model``'s state dict (parameters and buffers, incl. Normalize mean/std) as safetensors,
    atomically and with a content hash that the loaders check (see :mod:`deltainf._files`).

    Args:
        model: the model (wrappers such as DDP are unwrapped).
        path: output file (parent folders are created).
        meta: JSON-serialisable dict stored in the file header (e.g. accuracy, config, poison info).
            The model's ``build_args`` (set by ``build_model``) are stored too, for :func:`load_model`.
    """
    m = unwrap_model(model)
    try:
        meta_json = json.dumps(meta if meta is not None else {})
    except (TypeError, ValueError) as exc:
        raise TypeError(f"meta must be JSON-serialisable: {exc}") from exc
    header = {_META_KEY: meta_json, "format": CHECKPOINT_FORMAT}
    build_args = getattr(m, "build_args", None)
    if build_args is not None:
        header[_BUILD_KEY] = json.dumps(build_args)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in m.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # every loader refuses such a file: say it now, not at the next load
        raise ValueError(f"model: {bad[0]!r} holds non-finite values (NaN or infinity); nothing was saved")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_tensors(path, state, header)


def read_checkpoint(path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state, header) of a safetensors state dict; one written by deltainf must carry its content hash,
    checked unless ``verify`` is False."""
    state, header = read_tensors(path, "checkpoint", verify=verify)
    if verify and header.get("format") == CHECKPOINT_FORMAT:
        require_digest(header, "checkpoint", path)
    return state, header


def _read_finite_checkpoint(path, verify: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state, header = read_checkpoint(path, verify)
    check_finite(state, where=f"checkpoint {os.fspath(path)!r}")
    return state, header


def _json_entry(header: dict[str, str], key: str, path, default=None):
    """The JSON object stored under ``key`` in a checkpoint header (``default`` when absent)."""
    if key not in header:
        return default
    try:
        value = json.loads(header[key])
    except ValueError as exc:
        raise file_error("checkpoint", path, f"metadata {key!r} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise file_error("checkpoint", path, f"metadata {key!r} must be a JSON object, got {type(value).__name__}")
    return value


def check_state(model: nn.Module, state: dict[str, torch.Tensor], where: str, strict: bool = True) -> None:
    """The stored tensors fit ``model``: the same keys (when ``strict``), shapes and kinds of dtype
    (floating point where the model's is)."""
    own = model.state_dict()
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            prefixes = [p for p in ("module.", "model.", "_orig_mod.")  # DataParallel, wrappers, torch.compile
                        if all(k.startswith(p) for k in state) and {k[len(p):] for k in state} == set(own)]
            hint = f" (its keys carry the prefix {prefixes[0]!r}: save the unwrapped model's state_dict)" if prefixes \
                else ""
            raise ValueError(f"{where} does not match {type(model).__name__}: missing keys {missing[:5]}, "
                             f"unexpected keys {unexpected[:5]}{hint}")
    for k, v in state.items():
        if k not in own:
            continue
        if own[k].shape != v.shape:
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        same_kind = own[k].dtype == v.dtype or (own[k].is_floating_point() and v.is_floating_point())
        if not same_kind:
            raise ValueError(f"{where}: {k} has dtype {v.dtype}, the model expects {own[k].dtype}")


def load_checkpoint(model: nn.Module, path, strict: bool = True, verify: bool = True) -> dict[str, Any]:
    """Load weights saved by :func:`save_checkpoint` into ``model`` (in place) and return the meta dict.

    ``verify=False`` skips the content hash check (for huge files); the other checks stay.

    Raises:
        FileNotFoundError: no such file.
        ValueError naming the file: not a safetensors file, content that does not match its hash,
            damaged metadata, non-finite weights, or keys/shapes/dtypes that do not match the model.
    """
    state, header = _read_finite_checkpoint(path, verify)
    meta = _json_entry(header, _META_KEY, path, default={})
    m = unwrap_model(model)
    check_state(m, state, f"checkpoint {os.fspath(path)!r}", strict)
    m.load_state_dict(state, strict=strict)
    return meta


def model_from_build_args(args, state: dict[str, torch.Tensor] | None, where: str) -> nn.Module:
    """The model that build arguments read from a file describe (``{"name": ..., **build_model kwargs}``),
    checked before it is built: the arguments' types, a plausible image side and, on the meta device
    (which allocates nothing), that the architecture has exactly the shapes of the stored ``state``.
    Every problem is a ValueError starting with ``where``."""
    if not isinstance(args, dict) or not isinstance(args.get("name"), str):
        raise ValueError(f"{where}: its build arguments must be a JSON object with the model's name, got {args!r}")
    args = dict(args)
    name = args.pop("name")
    side = args.get("image_size", 32)
    if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_IMAGE_SIDE:
        raise ValueError(f"{where}: its build argument image_size={side!r} is not an image side in "
                         f"[1, {MAX_IMAGE_SIDE}]")
    try:
        with torch.device("meta"):
            skeleton = build_model(name, **args)
    except Exception as exc:  # noqa: BLE001 - any failure to build from stored arguments is the file's
        raise ValueError(f"{where}: its build arguments are not usable ({type(exc).__name__}: {exc})") from None
    if state is not None:
        check_state(skeleton, state, where)
    return build_model(name, **args)


def load_model(path, device=None, verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored by :func:`save_checkpoint` (needs ``build_args``) and load its weights.

    The file is checked as by :func:`load_checkpoint`, and its build arguments against its tensors
    before the model is built (:func:`model_from_build_args`).

    Returns:
        (model in eval mode on ``device`` (default CPU), meta dict).
    """
    state, header = _read_finite_checkpoint(path, verify)
    args = _json_entry(header, _BUILD_KEY, path)
    if args is None:
        raise ValueError(f"checkpoint {os.fspath(path)!r} has no build arguments; build the model yourself "
                         f"and call load_checkpoint(model, path)")
    meta = _json_entry(header, _META_KEY, path, default={})
    model = model_from_build_args(args, state, f"checkpoint {os.fspath(path)!r}")
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # a float64 (or half) model came back as float32: load_state_dict casts into the built one
        model.to(dtypes.pop())
    model.load_state_dict(state)
    model.to(torch.device(device) if device is not None else "cpu").eval()
    return model, meta
