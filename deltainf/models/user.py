"""The user's own model for the command line: an importable factory or a ``torch.export`` program file.

``"pkg.module:factory"`` imports ``pkg.module`` (the current directory is searched first, as Python's
``-m`` does) and calls ``factory(**kwargs)``, which must return the ``nn.Module``; its weights come from
a safetensors state dict. A ``.pt2`` file written by ``torch.export.save`` is loaded and turned back
into a module whose linear and convolution calls are real ``nn.Linear`` / ``nn.Conv2d`` layers sharing
the program's parameters, so EK-FAC can hook them like any other model.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import types
from typing import Any

import torch
from torch import nn

from deltainf._util import first_line

__all__ = ["build_from_factory", "load_exported", "input_shape_of", "load_state_dict_file", "check_finite"]


def build_from_factory(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Call the factory named by ``"pkg.module:attr"`` (``attr`` may be dotted) with ``kwargs``."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"expected 'package.module:factory' (an importable callable that builds the model), got {spec!r}")
    module_name, attr = spec.split(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or any error the user's module raises on import
        raise ValueError(f"cannot import module {module_name!r} ({type(err).__name__}: {err})") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable")
    try:
        model = obj(**(kwargs or {}))
    except Exception as err:
        raise ValueError(f"calling {spec}(**{kwargs or {}}) failed ({type(err).__name__}: {err})") from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


_LINEAR = torch.ops.aten.linear.default
_CONV2D = (torch.ops.aten.conv2d.default, torch.ops.aten.conv2d.padding)  # padding=(p, q), or "same" / "valid"
# ops whose argument at this position (or keyword) says whether they run as in training
_TRAINING_ARG = {"batch_norm": (5, "training"), "_native_batch_norm_legit_functional": (5, "training"),
                 "_native_batch_norm_legit": (5, "training"), "native_batch_norm": (5, "training"),
                 "dropout": (2, "train"), "feature_dropout": (2, "train"), "alpha_dropout": (2, "train"),
                 "feature_alpha_dropout": (2, "train"), "native_dropout": (2, "train")}


def _param_of(gm: nn.Module, node) -> tuple[str, nn.Parameter] | None:
    if node is None:
        return None
    if getattr(node, "op", None) != "get_attr":
        return None
    try:
        p = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return node.target, p


def _restore_layers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace ``aten.linear`` / ``aten.conv2d`` calls on parameters by ``nn.Linear`` / ``nn.Conv2d``
    submodules that hold the same Parameter objects (so the state dict keys stay the same)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or (node.target is not _LINEAR and node.target not in _CONV2D):
            continue
        args = list(node.args) + [None] * (7 - len(node.args))
        weight = _param_of(gm, args[1])
        bias = _param_of(gm, args[2]) if args[2] is not None else None
        if weight is None or (args[2] is not None and bias is None):
            continue  # a functional call on computed weights: left as it is (EK-FAC will not see it)
        owner, _, wname = weight[0].rpartition(".")
        if wname != "weight" or (bias is not None and bias[0] != f"{owner}.bias") or not owner:
            continue
        w = weight[1]
        # built on the meta device: the exported weights replace its parameters (no allocation, and no
        # draw from the global generator for an initialisation thrown away)
        if node.target is _LINEAR:
            layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        else:
            stride, padding, dilation, groups = (args[3] or [1, 1], args[4] or [0, 0], args[5] or [1, 1],
                                                 args[6] or 1)
            layer = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(stride),
                              padding=padding if isinstance(padding, str) else tuple(padding),
                              dilation=tuple(dilation), groups=groups, bias=bias is not None, device="meta")
        layer.weight = w
        if bias is not None:
            layer.bias = bias[1]
        parent_name, _, child = owner.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        old = getattr(parent, child)
        for name, buf in old.named_buffers(recurse=False):  # keep anything else the owner held
            layer.register_buffer(name, buf)
        setattr(parent, child, layer)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(owner, (node.args[0],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def load_exported(path: str | os.PathLike) -> nn.Module:
    """The module of a ``torch.export.save`` file, with its linear and convolution layers restored as
    ``nn.Linear`` / ``nn.Conv2d`` modules (see the module docstring). Export with a dynamic batch
    dimension so that the model runs on any batch size."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    # torch logs the traceback of a file it cannot read before raising an error that points to it; the error below
    # says it in one line, with the logged cause (a schema version of another torch)
    torch_log, logged = logging.getLogger("torch.export"), _Kept()
    was = torch_log.handlers, torch_log.propagate
    torch_log.handlers, torch_log.propagate = [logged], False
    try:
        program = torch.export.load(path)
    except Exception as err:
        cause = f"{type(err).__name__}: {first_line(err)}"
        if "warnings above" in cause and logged.last:
            cause = logged.last
        raise ValueError(f"{path!r} is not a torch.export program file that torch {torch.__version__} reads "
                         f"({cause})") from err
    finally:
        torch_log.handlers, torch_log.propagate = was
    batch = _batch_bound(program)
    if batch is not None:
        raise ValueError(f"{path!r} takes batches of {batch} examples, and the passes read batches of up to "
                         f"{MAX_BATCH}, of any size; export it with a dynamic batch dimension without an upper bound "
                         "(dynamic_shapes={'x': {0: torch.export.Dim('batch')}})")
    training = _training_ops(program)
    if training:
        raise ValueError(f"{path!r} was exported in training mode ({', '.join(training)} as in training: dropout "
                         "on, batch statistics, running statistics updated on every pass); export model.eval()")
    module = _restore_layers(program.module())
    decomposed = {str(n.target) for n in program.graph.nodes if n.op == "call_function"
                  and getattr(getattr(n.target, "_overloadpacket", None), "__name__", "") in ("convolution", "addmm")}
    if decomposed and not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in module.modules()):
        raise ValueError(f"{path!r} holds its layers decomposed ({', '.join(sorted(decomposed))}, as "
                         "ExportedProgram.run_decompositions() writes them), which cannot be hooked as layers; save "
                         "the program torch.export.export returns, before any decomposition")
    # An exported program runs in the mode it was exported in (export it in eval mode); its module
    # refuses train() / eval(), which every pass over a model calls, so those become no-ops here.
    module.train = types.MethodType(lambda self, mode=True: self, module)
    module.eval = types.MethodType(lambda self: self, module)
    module.exported_input_shape = input_shape_of(program)
    return module


MAX_BATCH = 512  # the largest batch a pass of the command line runs the model on (accuracy checks)


def _batch_bound(program) -> str | None:
    """How the first input's batch dimension is bounded below :data:`MAX_BATCH` ("exactly 8", "at most 64"), or
    None when it is free (a static batch runs only at that size; an upper bound fails past it)."""
    val = _first_input(program)
    if val is None or val.ndim == 0:
        return None
    size = val.shape[0]
    if isinstance(size, int):
        return f"exactly {size}"
    bound = program.range_constraints.get(size.node.expr)
    try:
        upper = int(bound.upper)
    except (AttributeError, TypeError, ValueError, OverflowError):  # no bound: sympy's infinity
        return None
    return f"at most {upper}" if upper < MAX_BATCH else None


def _training_ops(program) -> list[str]:
    """The ops of an exported program that run as in training (a program exported in train mode keeps dropout and
    batch statistics, and no train() / eval() changes that afterwards), by name, once each."""
    found = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(getattr(node.target, "_overloadpacket", None), "__name__", "")
        if name not in _TRAINING_ARG:
            continue
        position, keyword = _TRAINING_ARG[name]
        flag = node.kwargs.get(keyword, node.args[position] if len(node.args) > position else False)
        # a batch norm without running statistics (track_running_stats=False) uses batch statistics in eval mode too
        running = "batch_norm" not in name or (node.kwargs.get("running_mean", node.args[3] if len(node.args) > 3
                                                               else None) is not None)
        if flag is True and running and name not in found:
            found.append(name)
    return found


class _Kept(logging.Handler):
    """Keeps the error of the last record logged to it (its exception, or its message's last line)."""

    def __init__(self):
        super().__init__()
        self.last = ""

    def emit(self, record) -> None:
        if record.exc_info and record.exc_info[1] is not None:  # logger.exception: the error itself
            self.last = f"{type(record.exc_info[1]).__name__}: {first_line(record.exc_info[1])}"
            return
        lines = [line for line in record.getMessage().splitlines() if line.strip()]
        if lines:
            self.last = lines[-1].strip()


def _first_input(program) -> torch.Tensor | None:
    """The example (fake) tensor of an exported program's first user input (not a parameter or buffer), or None."""
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name not in program.graph_signature.inputs_to_parameters \
                and node.name not in program.graph_signature.inputs_to_buffers:
            val = node.meta.get("val")
            return val if isinstance(val, torch.Tensor) else None
    return None


def input_shape_of(program) -> tuple | None:
    """The example input shape of an exported program's first input, or None."""
    val = _first_input(program)
    return None if val is None else tuple(int(s) if isinstance(s, int) else None for s in val.shape)


def load_state_dict_file(path: str | os.PathLike,
                         verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a safetensors file; the metadata values that hold JSON are decoded.

    Read by :func:`deltainf.train.read_checkpoint`: a file deltainf wrote is checked against its content
    hash (``verify=False`` skips that, for huge files), a user's own file has no hash and is read as it
    is. A damaged file is a ValueError naming it; the values are not checked (:func:`check_finite`)."""
    from deltainf.train import read_checkpoint

    state, meta = read_checkpoint(path, verify)
    decoded = {}
    for k, v in meta.items():
        try:
            decoded[k] = json.loads(v)
        except (TypeError, ValueError):
            decoded[k] = v
    return state, decoded


def check_finite(state: dict[str, torch.Tensor], where: str = "") -> None:
    """Raise ValueError naming the first floating tensor that holds NaN or infinity (after ``where``,
    e.g. the file, when given)."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where + ': ' if where else ''}weight {name!r} holds NaN or infinite values")
