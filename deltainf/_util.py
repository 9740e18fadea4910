"""Small helpers shared across deltainf: the one home of each.

Messages go through the ``deltainf`` logger (the command line shows INFO and up; ``--quiet`` warnings
only, ``--verbose`` DEBUG too); a library user sees nothing until they configure logging. Progress bars
honour ``TQDM_DISABLE`` as well as each function's ``progress`` argument.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["log", "progress_bar", "model_device", "seeded_rng", "keeps_global_rng", "first_line", "log_to_console",
           "gaussian_kernel1d", "to_jsonable", "logits", "checked_forward", "refuse_probabilities", "as_int",
           "named_as", "class_indices", "training_modes", "restore_modes", "check_bool", "plain_number"]

log = logging.getLogger("deltainf")
log.addHandler(logging.NullHandler())


def _tqdm_disabled_by_env() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress_bar(iterable=None, enabled: bool = True, **kwargs):
    """``tqdm(iterable, **kwargs)``, hidden when ``enabled`` is false or ``TQDM_DISABLE`` is set."""
    return tqdm(iterable, disable=not enabled or _tqdm_disabled_by_env(), **kwargs)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model without either."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device | str | None = None):
    """torch's global RNG (the CPU's, and ``device``'s when it is a GPU) seeded with ``seed`` inside the block and
    restored after it: what draws from it there (layer init, dropout, a DataLoader's base seed) follows ``seed``
    and the caller's stream is left where it was. ``seed=None``: forked, not seeded."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:  # the generators forked here only: torch.manual_seed would reseed every GPU's
            torch.random.default_generator.manual_seed(int(seed))
            for index in devices:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(int(seed))
        yield


def keeps_global_rng(method):
    """Run ``method`` with torch's global (CPU) RNG forked: each pass over a DataLoader draws its base seed from it, so
    a fit or a detection moved the caller's random stream (their next shuffle or initialisation differed with and
    without one). What deltainf draws is seeded on its own."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        with seeded_rng(None):
            return method(*args, **kwargs)
    return run


def unwrapped(model):
    """The module inside ``torch.compile``, DistributedDataParallel and DataParallel wrappers, however nested
    (``model`` itself otherwise). Influence runs hooks on the model's layers, which a compiled graph traced before
    they were registered would skip, and its passes run different examples on each torchrun rank, where DDP's
    forward would wait for the other ranks to broadcast its buffers (a hang); the inner module has the same
    parameters and its own layer names (no ``module.`` prefix)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, torch.nn.Module):
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype inputs are cast to: the one most of the model's linear and convolution weights hold, else most of
    its floating-point parameters (the first parameter's was taken: a float64 temperature or auxiliary head registered
    before float32 layers cast float32 inputs to float64, which the layers refused; a large frozen bfloat16
    embedding table does not decide it either), else that of its first floating-point buffer; None for a model
    without either. Parameters a lazy module has not shaped yet are not counted."""
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    for params in ([t for m in model.modules() if isinstance(m, layers) for t in m.parameters(recurse=False)],
                   list(model.parameters())):
        held: dict[torch.dtype, int] = {}
        for t in params:
            if t.is_floating_point() and not isinstance(t, torch.nn.parameter.UninitializedParameter):
                held[t.dtype] = held.get(t.dtype, 0) + t.numel()
        if held:
            return max(held, key=held.get)  # the first of equal counts
    for t in model.buffers():
        if t.is_floating_point():
            return t.dtype
    return None


def to_model(x: torch.Tensor, device, dtype: torch.dtype | None) -> torch.Tensor:
    """x on the model's device, floating-point inputs in the model's dtype (integer inputs, e.g. token ids or
    uint8 pixels a model converts itself, as they are)."""
    return x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)


def training_modes(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Every module's train/eval flag, for :func:`restore_modes`: a model in training with its batch norms frozen in
    eval mode (or in eval mode with its dropout kept on) would come back wholly in one mode from ``train(was)``."""
    return [(m, m.training) for m in model.modules()]


def restore_modes(modes: list[tuple[torch.nn.Module, bool]]) -> None:
    """Each module back in its mode of :func:`training_modes`, through its own ``train()`` (a layer that merges an
    adapter into its weight on eval() and takes it out on train() must see the call), parents first: a parent's
    call sets its children, whose own calls follow."""
    for m, training in modes:
        if m.training != training:
            m.train(training)


@torch.no_grad()
def in_eval_mode(model: torch.nn.Module, fn, x: torch.Tensor, batch_size: int = 256, device=None,
                 progress: bool = False, desc: str = "predict") -> torch.Tensor:
    """``fn(batch)`` over x (B, ...) in batches moved to ``device`` (default: the model's) and, when floating, to the
    model's dtype, with the model in eval mode and no gradients (its mode is restored): the outputs as float32 CPU,
    concatenated ((0, 0) for no input)."""
    device = torch.device(device) if device is not None else model_device(model)
    dtype = model_dtype(model)
    modes = training_modes(model)
    model.eval()
    outs = []
    try:
        for i in progress_bar(range(0, x.shape[0], batch_size), progress, desc=desc, leave=False):
            outs.append(fn(to_model(x[i:i + batch_size], device, dtype)).float().cpu())
    finally:
        restore_modes(modes)
    return torch.cat(outs) if outs else torch.empty(0, 0)


def logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256, where: str = "inputs", device=None,
           progress: bool = False) -> torch.Tensor:
    """The model's logits on x (B, ...) in eval mode (its mode is restored), batch by batch on ``device``
    (default: the model's): float32 CPU (B, K). A forward pass that fails, or an output that is not
    (B, K), is a ValueError naming ``where`` and the batch shape."""
    return in_eval_mode(model, lambda b: checked_forward(model, b, where), x, batch_size, device, progress)


def checked_forward(model: torch.nn.Module, x: torch.Tensor, where: str) -> torch.Tensor:
    """``model(x)`` (gradients kept), checked: a forward pass that fails, or an output that is not logits
    (B, K), is a ValueError naming ``where`` and the batch shape."""
    try:
        out = model(x)
    except Exception as err:  # a shape mismatch surfaces deep inside the model as a bare RuntimeError
        raise ValueError(f"model: the forward pass failed on {where} of shape {tuple(x.shape)} "
                         f"({first_line(err)}); the model must map these inputs to logits (B, K)") from err
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        hint = "" if isinstance(out, torch.Tensor) else " (wrap the model in a module whose forward returns the logits)"
        raise ValueError(f"model must return logits of shape ({x.shape[0]}, K) for {where}, got {got}{hint}")
    # half-precision logits: the softmax, loss and margin in float32 (in float16 a near-saturated example's gradient
    # vanished: 17 examples of 105 flagged changed, estimate 0.17 for 0.014)
    return out.to(torch.promote_types(out.dtype, torch.float32)) if out.is_floating_point() else out


def refuse_probabilities(out: torch.Tensor, where: str) -> None:
    """ValueError when every row of the model's output ``out`` (B, K) on ``where`` is a probability vector (to the
    rounding of a softmax in its dtype): a model ending in a softmax, whose outputs taken for logits give other
    gradients (a probe: 72 examples flagged where its logits gave 22). Where only the argmax is read, they are fine."""
    if not out.is_floating_point() or out.ndim != 2 or out.shape[1] < 2 or not out.numel():
        return
    tolerance = 1e-4 if torch.finfo(out.dtype).bits >= 32 else 1e-2
    rows = out.detach().double()
    if bool((rows >= 0).all() and (rows <= 1).all() and ((rows.sum(1) - 1).abs() <= tolerance).all()):
        raise ValueError(f"model must return logits, but returns probabilities for {where} (every row is in [0, 1] "
                         f"and sums to 1): the influence scores take the loss on logits; leave out its final softmax "
                         f"(log-probabilities, as nn.LogSoftmax gives, are logits too)")


def as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer number (a Python, numpy or 0-d integer tensor one; not a
    bool), else None: what an argument check accepts as "an int"."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.ndim != 0 or value.is_floating_point() or value.is_complex() \
                or value.dtype == torch.bool:
            return None
        return int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def check_bool(name: str, value) -> bool:
    """``value`` when it is a bool (Python or numpy); TypeError naming ``name`` otherwise ("no" is not False)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return bool(value)


def plain_number(value):
    """A numpy or 0-d tensor number as the Python int or float it holds (np.int64(20) is an int like 20); anything
    else as it is, for the caller's own check."""
    if isinstance(value, (bool, np.bool_)):
        return value
    if isinstance(value, np.integer) or isinstance(value, torch.Tensor) and value.ndim == 0 and not \
            value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool:
        return int(value)
    if isinstance(value, np.floating) or isinstance(value, torch.Tensor) and value.ndim == 0 and \
            value.is_floating_point():
        return float(value)
    return value


def check_real(value, name: str) -> float:
    """``value`` as a Python float when it is a real number (a Python, numpy or 0-d tensor one; not a bool);
    TypeError naming ``name`` otherwise. The range is the caller's to check: NaN and inf pass here."""
    if isinstance(value, torch.Tensor):
        ok = value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool
    else:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok:
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name}: expected a real number within the float range, got {value!r}") from None


def check_int(name: str, v, minimum: int = 1, maximum: int | None = None) -> int:
    """``v`` as a Python int when it is an integer number (:func:`as_int`: a Python, numpy or 0-d
    tensor int; not a bool) in [minimum, maximum] (no upper bound when ``maximum`` is None); a ValueError
    naming ``name`` otherwise."""
    value = as_int(v)
    if value is None or value < minimum or (maximum is not None and value > maximum):
        expected = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
        raise ValueError(f"{name}: expected {expected}, got {v!r}")
    return value


def check_number(name: str, v, *, minimum: float = 0.0, inclusive: bool = False, maximum: float = math.inf,
                 max_inclusive: bool = True) -> float:
    """``v`` as a Python float when it is a finite real number (:func:`check_real`: a
    Python, numpy or 0-d tensor one; not a bool) above ``minimum`` (at or above it when ``inclusive``) and below
    ``maximum`` (at or below it when ``max_inclusive``; ``maximum=math.inf``: no upper bound); a ValueError
    naming ``name`` otherwise. NaN and +-inf are always refused: an infinite learning rate or temperature gives
    a NaN model without a word."""
    try:
        x = check_real(v, name)
    except (TypeError, ValueError):  # not a real number: refused below with the range expected
        x = math.nan
    ok = math.isfinite(x) and (x >= minimum if inclusive else x > minimum) \
        and (x <= maximum if max_inclusive else x < maximum)
    if not ok:
        if maximum == math.inf:
            expected = f"{'>=' if inclusive else '>'} {minimum:g}"
        else:
            expected = f"in {'[' if inclusive else '('}{minimum:g}, {maximum:g}{']' if max_inclusive else ')'}"
        raise ValueError(f"{name}: expected a finite number {expected}, got {v!r}")
    return x


@contextlib.contextmanager
def named_as(names: Mapping[str, str]):
    """Inside, a ValueError / TypeError whose message starts with a key of ``names`` (an argument of an inner call)
    is raised again under the caller's name for it (``names[key]``): a wrapper's errors name its own arguments."""
    try:
        yield
    except (ValueError, TypeError) as err:
        text = str(err)
        for theirs, ours in names.items():
            if text.startswith(theirs):
                raise type(err)(ours + text[len(theirs):]) from err
        raise


def class_indices(y, name: str, num_classes: int | None = None) -> torch.Tensor:
    """Labels as int64 class indices: integers (B,) or a column of them (B, 1), or one-hot / score rows (B, K >= 2)
    (their argmax), or floats that hold whole numbers; ValueError naming ``name`` for anything else (a float label
    such as 2.7 is not cut to 2), or for an index outside [0, num_classes)."""
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if t.ndim == 2 and t.shape[1] == 1:  # a column of indices (Keras' (N, 1) labels), not one-hot rows of one class
        t = t[:, 0]
    elif t.ndim == 2:
        if num_classes is not None and t.shape[1] != num_classes:
            raise ValueError(f"{name}: one-hot rows of {t.shape[1]} columns, but there are {num_classes} classes")
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{name}: expected one-hot or score rows, got {str(t.dtype).removeprefix('torch.')} "
                             "values")
        if t.shape[0] and t.shape[1] >= 2:  # a row without a single largest entry names no class (all zeros)
            top = t.double().topk(2, dim=1).values
            tied = (top[:, 0] == top[:, 1]) | ~torch.isfinite(top[:, 0])
            if bool(tied.any()):
                row = int(tied.nonzero()[0, 0])
                raise ValueError(f"{name}: row {row} of the one-hot / score rows has no single largest entry "
                                 f"({t[row].tolist()[:8]}{' ...' if t.shape[1] > 8 else ''})")
        t = t.argmax(1)
    elif t.ndim > 2:
        raise ValueError(f"{name}: expected class indices (B,) or one-hot rows (B, K), got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name}: expected class indices, got {str(t.dtype).removeprefix('torch.')} values")
    if t.is_floating_point():
        whole = torch.isfinite(t) & (t == t.round())
        if not bool(whole.all()):
            bad = t[~whole].flatten()[0].item()
            raise ValueError(f"{name}: expected class indices (whole numbers), got {bad!r}")
    t = t.to(torch.int64)
    if num_classes is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise ValueError(f"{name}: class indices must lie in [0, {num_classes}), got {bad}")
    return t


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class _ConsoleHandler(logging.Handler):
    """Writes records to stdout through tqdm, so that a message does not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def log_to_console(level: int = logging.INFO) -> None:
    """Show the ``deltainf`` logger's messages of ``level`` and above on the console (the command line
    does this; a library user configures logging as they like)."""
    for h in [h for h in log.handlers if isinstance(h, _ConsoleHandler)]:
        log.removeHandler(h)
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(level)


def gaussian_kernel1d(size: int, sigma: float, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The normalised Gaussian on the ``size`` taps centred on the middle one: weights proportional to
    exp(-(i - (size - 1) / 2)^2 / (2 sigma^2)), summing to 1 (torchvision's and Zeng et al.'s kernel)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    pdf = torch.exp(-0.5 * (t / sigma) ** 2)
    return (pdf / pdf.sum()).to(dtype=dtype, device=device)


def to_jsonable(v: Any) -> Any:
    """Recursively turn tensors, numpy values, paths, dataclasses and objects with ``to_dict()`` into JSON
    types; nan and inf become None; anything else becomes its repr."""
    if hasattr(v, "to_dict") and callable(v.to_dict):
        return to_jsonable(v.to_dict())
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_jsonable(dataclasses.asdict(v))
    if isinstance(v, Mapping):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return to_jsonable(v.detach().cpu().tolist())
    if isinstance(v, np.ndarray):
        return to_jsonable(v.tolist())
    if isinstance(v, np.generic):
        return to_jsonable(v.item())
    if isinstance(v, (list, tuple, set)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, Path):
        return str(v)
    return repr(v)
