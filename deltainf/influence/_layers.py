"""Tracked layers: discovery, forward capture and per-example (a, g) tensors.

A tracked layer is an ``nn.Linear``, an ``nn.Conv2d``, an ``nn.Conv1d`` (as the Conv2d of kernel (1, k) on inputs of
height 1) or an ``nn.Embedding``. For every call of such a layer during a
forward pass we keep its input (detached) and the autograd edge of its output; one
``torch.autograd.grad`` on those edges then returns dL/d(output) for every layer at once without
computing any parameter gradient (the weight-gradient GEMMs of a normal backward are skipped).

Because the loss is summed over the batch, the captured output gradient of example i is exactly
example i's own gradient, so a layer's per-example weight gradient is
``G_i = sum_t g_it a_it^T`` with ``a`` the layer input (Conv2d: unfolded patches) and, when the
layer has a bias, an extra input column of ones (the bias is the last column of G_i). An embedding is
the linear layer its weight's transpose makes of one-hot token rows: ``a`` the one-hot row of each token id, so
G_i is the transpose of the embedding weight's gradient (a padding_idx token's row is zero, as its gradient is).
Those rows are never formed by the passes: its input factor is diagonal (token counts) and its eigenbasis the
identity, so the passes add and gather rows by token id (:mod:`~deltainf.influence._contract`), and an embedding
costs what a linear layer with its weight's shape costs, whatever its vocabulary. A grouped or depthwise convolution
is the linear layer whose tokens are its (group, position) pairs (:func:`grouped`); it has no (B, T, d_in) inputs, and
the passes take its per-example gradients instead.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.utils import parametrize

from deltainf._util import first_line

__all__ = ["LayerInfo", "LayerBatch", "Capture", "ModuleCoverage", "resolve_layers", "module_coverage", "grouped",
           "modules_by_name", "conv_patches", "token_rows"]

_SUPPORTED = (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding)
CONVOLUTIONS = ("conv2d", "conv1d")
_ROOT = "(root)"  # name used when the model itself is the tracked layer


@dataclass(frozen=True)
class LayerInfo:
    """Static description of one tracked layer.

    ``d_in`` counts the layer's inputs (Conv2d: C_in * k_h * k_w) WITHOUT the bias column;
    ``d_in_aug`` adds one column of ones when the layer has a bias.
    """

    name: str
    kind: str  # "linear" | "conv2d" | "conv1d" | "embedding" (d_in: the vocabulary, d_out: the embedding's width)
    d_in: int
    d_out: int
    bias: bool

    @property
    def d_in_aug(self) -> int:
        return self.d_in + int(self.bias)

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "d_in": self.d_in, "d_out": self.d_out,
                "bias": self.bias}


def _describe(name: str, module: nn.Module) -> LayerInfo:
    if isinstance(module, nn.Linear):
        return LayerInfo(name, "linear", module.in_features, module.out_features, module.bias is not None)
    if isinstance(module, nn.Embedding):
        return LayerInfo(name, "embedding", module.num_embeddings, module.embedding_dim, False)
    # a grouped convolution: the linear layer whose tokens are its (group, position) pairs (see grouped())
    kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
    return LayerInfo(name, kind, module.in_channels // module.groups * math.prod(module.kernel_size),
                     module.out_channels, module.bias is not None)


def grouped(module) -> int:
    """The groups of a grouped or depthwise convolution (1 for any other layer). Such a layer is tracked as the linear
    layer whose tokens are its (group, position) pairs: a token's input is the patch of its group's input channels
    (C_in / G * k_h * k_w: the weight's columns), its output gradient that of its group's output channels, zero in the
    others. Its per-example gradient is then exactly the weight's, the input factor A is shared by the groups, and
    the output factor S is block-diagonal (one block per group; diagonal for a depthwise convolution)."""
    return getattr(module, "groups", 1)


class _Conv1dAs2d:
    """An nn.Conv1d described as the Conv2d of kernel (1, k) that it is on inputs (B, C, 1, L): what the patch and
    per-example gradient helpers read of a convolution."""

    def __init__(self, conv: nn.Conv1d):
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size, self.stride, self.dilation = ((1, v[0]) for v in (conv.kernel_size, conv.stride,
                                                                              conv.dilation))
        self.padding = conv.padding if isinstance(conv.padding, str) else (0, conv.padding[0])
        self.padding_mode = conv.padding_mode
        # F.pad's widths, last dimension first: the length's, then none for the height
        self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice) + [0, 0]


def _as_conv2d(module: nn.Module):
    return _Conv1dAs2d(module) if isinstance(module, nn.Conv1d) else module


_NOT_LAYER = "not an nn.Linear, nn.Conv2d, nn.Conv1d or nn.Embedding"
_BATCH_SCALED = "Embedding with scale_grad_by_freq=True"


def _untrackable(module: nn.Module) -> str | None:
    """Why EK-FAC cannot track ``module`` (None when it can)."""
    if not isinstance(module, _SUPPORTED):
        return _NOT_LAYER
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        # each token's gradient is divided by its count in the mini-batch: an example's gradient depends on its batch
        return f"{_BATCH_SCALED} (an example's gradient depends on the rest of its batch)"
    return None


def token_rows(module: nn.Embedding, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., V) the one-hot rows of the token ``ids`` (..., ): an embedding's inputs as the linear layer its weight's
    transpose is; a padding_idx token's row is zero (its weight row gets no gradient)."""
    rows = F.one_hot(ids.long(), module.num_embeddings).to(dtype)
    if module.padding_idx is not None:
        rows[..., module.padding_idx] = 0
    return rows


TRACKED = "tracked"
NOT_CALLED = ("not called by the forward pass as a module with gradients on (e.g. applied through F.linear, only in "
              "training, or only under torch.no_grad())")
NOT_PER_EXAMPLE = "its inputs do not hold the examples along one dimension (positions folded into the batch)"
NOT_ITS_GRADIENT = ("its weight's or bias's gradient is not the one its inputs and output gradients give (the "
                    "parameter shared with another module or used outside the layer's call, or a forward of its own "
                    "that transforms the weight or the output)")
OTHER_DTYPE = "an embedding whose weight's dtype is not the other tracked layers' (EK-FAC fits them in one)"
_BRIEF = {NOT_CALLED: "layer(s) not called by the forward pass",
          NOT_PER_EXAMPLE: "layer(s) whose input is not per example",
          NOT_ITS_GRADIENT: "layer(s) whose parameters' gradient the hooks cannot see",
          OTHER_DTYPE: "embedding(s) of another dtype"}


@dataclass(frozen=True)
class ModuleCoverage:
    """Every module of a model that owns parameters, in ``named_modules()`` order, as
    ``(name, type, parameter count, status)`` with status ``"tracked"`` or the reason EK-FAC skips it."""

    modules: tuple

    @property
    def tracked(self) -> list:
        return [m for m in self.modules if m[3] == TRACKED]

    @property
    def skipped(self) -> list:
        return [m for m in self.modules if m[3] != TRACKED]

    @property
    def tracked_params(self) -> int:
        return sum(m[2] for m in self.tracked)

    @property
    def skipped_params(self) -> int:
        return sum(m[2] for m in self.skipped)

    def fraction(self) -> float:
        """Share of the model's parameters that EK-FAC tracks (1.0 for a parameter-free model)."""
        total = self.tracked_params + self.skipped_params
        return self.tracked_params / total if total else 1.0

    def brief(self) -> str:
        """One line: what is tracked, and the skipped modules grouped by type."""
        line = (f"EK-FAC tracks {len(self.tracked)} module(s) holding {self.tracked_params:,} parameters "
                f"({100 * self.fraction():.1f} % of the model's)")
        if not self.skipped:
            return line
        groups: dict[str, list] = {}
        for _, kind, count, why in self.skipped:
            # a reason's detail in brackets stays in table(): a MobileNet's depthwise layers differ in their groups,
            # and are one entry here
            if why == _NOT_LAYER:
                key = kind
            else:
                key = _BRIEF.get(why, why.split(" (", 1)[0])
            groups.setdefault(key, []).append(count)
        return line + "; not tracked: " + ", ".join(f"{len(v)} {k} ({sum(v):,} params)" for k, v in groups.items())

    def table(self) -> str:
        """Every parameterised module, tracked or not and why, one per line."""
        width = max([len(m[0]) for m in self.modules] + [6])
        lines = [f"{'module':<{width}}  {'type':<16} {'params':>12}  EK-FAC"]
        lines += [f"{n:<{width}}  {k:<16} {c:>12,}  {why}" for n, k, c, why in self.modules]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"modules": [list(m) for m in self.modules], "tracked_params": self.tracked_params,
                "skipped_params": self.skipped_params}


def resolve_layers(model: nn.Module, modules: str | Sequence[str] | None) -> list[tuple[LayerInfo, nn.Module]]:
    """Return ``[(LayerInfo, module), ...]`` in ``model.named_modules()`` order.

    ``modules=None`` tracks every nn.Linear, nn.Conv2d, nn.Conv1d and nn.Embedding (:func:`module_coverage` lists
    what is left out); otherwise the named subset, where
    naming an untrackable module is an error. Raises ValueError for unknown names, duplicates or an
    empty selection and TypeError for a named module of an unsupported type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    named = modules_by_name(model)
    if modules is None:
        chosen = [(n, m) for n, m in named.items() if _untrackable(m) is None]
        if not chosen:
            # a TorchScript model's layers are compiled modules, no nn.Linear or nn.Conv2d among them
            scripted = " (a TorchScript model: pass the nn.Module it was scripted from)" \
                if isinstance(model, torch.jit.ScriptModule) else ""
            raise ValueError(
                "model: no trackable layers found; EK-FAC tracks nn.Linear, nn.Conv2d, nn.Conv1d and "
                "nn.Embedding "
                f"modules and the model ({type(model).__name__}) has none{scripted}")
    else:
        if isinstance(modules, str):
            modules = [modules]
        if isinstance(modules, (set, frozenset)):  # the layers' order is the factors' and the files' order
            raise TypeError(f"modules: expected a list of module names, got a {type(modules).__name__}, whose order "
                            "may change from one process to the next")
        if not isinstance(modules, Iterable):
            raise TypeError(f"modules: expected a module name or a list of them, got {modules!r}")
        modules = list(modules)
        if not modules:
            raise ValueError("modules: expected a non-empty list of module names (or None for all layers)")
        if len(set(modules)) != len(modules):
            raise ValueError(f"modules: duplicate names in {modules}")
        chosen = []
        for n in modules:
            if not isinstance(n, str):
                raise TypeError(f"modules: expected module names (str), got {type(n).__name__}")
            if n not in named:
                avail = [k for k, m in named.items() if _untrackable(m) is None]
                raise ValueError(f"modules: no module named {n!r} in the model; trackable layers are {avail}")
            why = _untrackable(named[n])
            if why is not None:
                err = TypeError if not isinstance(named[n], _SUPPORTED) else ValueError
                raise err(f"modules: {n!r} ({type(named[n]).__name__}) cannot be tracked: {why}; EK-FAC tracks "
                          "nn.Linear, nn.Conv2d, nn.Conv1d and nn.Embedding layers")
            chosen.append((n, named[n]))
    return [(_describe(n, m), m) for n, m in chosen]


def modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules by the names layers are known by (the model itself as ``(root)``)."""
    return {(n or _ROOT): m for n, m in model.named_modules()}


def module_coverage(model: nn.Module, layers: Sequence[tuple[LayerInfo, nn.Module]],
                    left_out: dict[str, str] | None = None) -> ModuleCoverage:
    """Every module of ``model`` that owns parameters, tracked (in ``layers``) or skipped and why (``left_out``:
    trackable layers that the forward pass showed cannot be tracked, name -> reason)."""
    tracked_ids = {id(m) for _, m in layers}
    # a parametrized layer (weight_norm, spectral_norm) is tracked through the weight it computes: the
    # parametrization's own parameters count as the layer's, not as a module left out
    folded = {id(q) for _, m in layers if parametrize.is_parametrized(m) for q in m.parametrizations.modules()}
    left_out = left_out or {}

    def params_of(m):
        params = list(m.parameters(recurse=False))
        if id(m) in tracked_ids and parametrize.is_parametrized(m):
            params += list(m.parametrizations.parameters())
        return params

    # a weight shared by two modules (tied embeddings) is the model's once: a tracked module counts it, else the first
    owner: dict[int, int] = {}
    for tracked_first in (True, False):
        for _, m in model.named_modules():
            if (id(m) in tracked_ids) == tracked_first:
                for p in params_of(m):
                    owner.setdefault(id(p), id(m))
    rows = []
    for n, m in model.named_modules():
        params = params_of(m)
        if not params or id(m) in folded:
            continue
        count = sum(p.numel() for p in params if owner[id(p)] == id(m))
        if id(m) in tracked_ids:
            status = TRACKED
        elif (n or _ROOT) in left_out:
            status = left_out[n or _ROOT]
        else:
            status = _untrackable(m) or "not selected (modules=[...])"
        rows.append((n or _ROOT, type(m).__name__, count, status))
    return ModuleCoverage(tuple(rows))


def model_fingerprint(layers: Iterable[tuple[LayerInfo, nn.Module]], model: nn.Module) -> str:
    """sha256 over the tracked layers' descriptions and every parameter and buffer of ``model``, as stored (detects
    a different model, or one trained further: the factors and the scores depend on the layers EK-FAC does not
    track too, a batch norm's statistics or a frozen backbone before the tracked head). The state dict holds a
    parametrized layer's (weight_norm, spectral_norm) stored parameters: computing its weight would run the
    parametrization, which in training mode updates the model (spectral_norm's power iteration)."""
    h = hashlib.sha256()
    for info, _ in layers:
        h.update(repr(info.as_dict()).encode())
    stored = model.state_dict()
    # buffers registered with persistent=False (a normalisation's mean and std) are the model's too
    unstored = {name: b for name, b in model.named_buffers() if name not in stored}
    for name, t in [*stored.items(), *unstored.items()]:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _padded(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input as the convolution sees it after padding (so the patches need no further padding).

    int padding, "valid", "same" (total dilation*(k-1) per dimension, the odd one extra on the
    right/bottom like torch) and non-zero padding modes (torch applies F.pad(mode) and a
    padding-free convolution)."""
    pad = module.padding
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    if isinstance(pad, str):
        if pad == "valid":
            return x
        widths = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            widths += [total // 2, total - total // 2]
        return F.pad(x, widths)
    if pad == (0, 0):
        return x
    return F.pad(x, (pad[1], pad[1], pad[0], pad[0]))


def conv_patches(module: nn.Conv2d, x: torch.Tensor, feature_major: bool = False) -> torch.Tensor:
    """Unfolded input patches of a Conv2d.

    x (B, C_in, H, W) -> (B, C_in*k_h*k_w, H_out*W_out), or (C_in*k_h*k_w, B*H_out*W_out) with
    ``feature_major`` (the layout whose Gram matrix is the activation covariance). Features are
    ordered like ``module.weight.flatten(1)`` (channel, kernel row, kernel column), so
    ``weight.flatten(1) @ patches`` is the convolution without bias. Handles stride, dilation, int
    and string padding and every padding mode. Built as one strided copy of a view of the padded
    input (several times faster than F.unfold on CPU).
    """
    xp = _padded(module, x)
    B, Cin, Hp, Wp = xp.shape
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    sh, sw = module.stride
    Ho = (Hp - dh * (kh - 1) - 1) // sh + 1
    Wo = (Wp - dw * (kw - 1) - 1) // sw + 1
    sB, sC, sH, sW = xp.stride()
    if feature_major:
        view = xp.as_strided((Cin, kh, kw, B, Ho, Wo), (sC, sH * dh, sW * dw, sB, sH * sh, sW * sw))
        return view.reshape(Cin * kh * kw, B * Ho * Wo)
    view = xp.as_strided((B, Cin, kh, kw, Ho, Wo), (sB, sC, sH * dh, sW * dw, sH * sh, sW * sw))
    return view.reshape(B, Cin * kh * kw, Ho * Wo)


# Per-example conv weight gradients are formed as patches (b, D, T) and one batched GEMM rather than as a
# grouped weight-gradient convolution when the output has few positions AND the layer is wide enough for the
# per-example GEMMs to pay. Measured on CPU (2 threads), 3x3 convolutions: ResNet-18, 16 examples, 32x32
# outputs (T = 1024): grouped 23 ms, patches 54 ms; 16x16: equal; 8x8 and 4x4 with 256-512 channels: patches
# about 2x faster (44 vs 67 ms, 122 vs 238 ms); 128 -> 128 channels at 8x8: 5.7 vs 7.0 ms; but 64 -> 64:
# 7.7 vs 6.9 ms, 32 -> 32: 5.9 vs 3.5 ms, 16 -> 16: 11.0 vs 4.7 ms (narrow layers: the grouped convolution).
_PATCH_GRAD_MAX_POSITIONS = 128
_PATCH_GRAD_MIN_CHANNEL_PRODUCT = 96 * 96


def _conv_example_grads(module: nn.Conv2d, x: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
    """Per-example Conv2d weight gradients (b, C_out, c*k_h*k_w) for the c input channels x has (all of the layer's,
    or a contiguous range of them: the columns of those channels): for few output positions of a wide layer,
    patches and one batched GEMM; otherwise the weight-gradient convolution with the b examples stacked as b groups
    (input (1, b*c, H, W), output grad (1, b*C_out, ...)); a grouped convolution's, (b, C_out, C_in / G * k_h * k_w),
    by the latter with b*G groups."""
    b = x.shape[0]
    groups = grouped(module)
    positions = gout.shape[2] * gout.shape[3]
    if groups == 1 and positions <= _PATCH_GRAD_MAX_POSITIONS and \
            module.in_channels * module.out_channels >= _PATCH_GRAD_MIN_CHANNEL_PRODUCT:
        return torch.bmm(gout.reshape(b, module.out_channels, positions), conv_patches(module, x).transpose(1, 2))
    padded = module.padding_mode != "zeros" or isinstance(module.padding, str)  # "same" / "valid": padded here
    xp = _padded(module, x) if padded else x
    pad = [0, 0] if padded else list(module.padding)
    c_out, c_in = module.out_channels, x.shape[1]
    kh, kw = module.kernel_size
    w = x.new_empty(b * c_out, c_in // groups, kh, kw)  # only its shape is read (output_mask asks for dW only)
    dw = torch.ops.aten.convolution_backward(
        gout.reshape(1, b * c_out, *gout.shape[2:]), xp.reshape(1, b * c_in, *xp.shape[2:]), w, None,
        list(module.stride), pad, list(module.dilation), False, [0, 0], b * groups, [False, True, False])[1]
    return dw.reshape(b, c_out, c_in // groups * kh * kw)


class LayerBatch:
    """Per-example data of one tracked layer for one batch, built lazily in the layout each use needs.

    a: (B, T, d_in) layer inputs (Conv2d: patches), no bias column; may be a non-contiguous view.
    g: (B, T, d_out) gradients of the summed loss w.r.t. the layer outputs; may be a view.
    a_cols / g_cols: (d_in, B*T) / (d_out, B*T) feature-major token matrices (covariance GEMMs).
    """

    def __init__(self, info: LayerInfo, module: nn.Module | None = None, calls=None, *,
                 a: torch.Tensor | None = None, g: torch.Tensor | None = None):
        self.info = info
        self.module = module
        self.groups = grouped(module)  # > 1: a grouped convolution, whose tokens are (group, position) pairs
        self.calls = calls or []  # [(x, gout)] per call of the layer in the forward pass
        self._a, self._g = a, g
        self.batch = (a if a is not None else self.calls[0][0]).shape[0]

    @property
    def a(self) -> torch.Tensor:
        if self._a is None:
            parts = [self._a_of(x) for x, _ in self.calls]
            self._a = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return self._a

    @property
    def g(self) -> torch.Tensor:
        if self._g is None:
            parts = [self._g_of(x, go) for x, go in self.calls]
            self._g = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return self._g

    @property
    def dtype(self) -> torch.dtype:
        if self._a is not None:
            return self._a.dtype
        # an embedding's inputs are token ids: its dtype is its output's
        return self.calls[0][1 if self.info.kind == "embedding" else 0].dtype

    @property
    def device(self) -> torch.device:
        return self._a.device if self._a is not None else self.calls[0][0].device

    @property
    def tokens(self) -> int:
        if self._a is not None:
            return self._a.shape[1]
        return sum(go[0].numel() for _, go in self.calls) // self.info.d_out

    def _a_of(self, x):
        if self.groups > 1:  # (a_cols, and per-example gradients for the rest)
            raise RuntimeError(f"layer {self.info.name!r}: a grouped convolution has no (B, T, d_in) inputs")
        B = x.shape[0]
        if self.info.kind == "linear":
            return x.reshape(B, -1, self.info.d_in)
        if self.info.kind == "embedding":
            return token_rows(self.module, x.reshape(B, -1), self.dtype)
        return conv_patches(self.module, x).transpose(1, 2)

    def _g_of(self, x, gout):
        B = gout.shape[0]
        if self.info.kind not in CONVOLUTIONS:
            return gout.reshape(B, -1, self.info.d_out)
        # (B, C_out, H_out, W_out) -> (B, T, C_out) as a transposed view: no copy
        return gout.reshape(B, self.info.d_out, -1).transpose(1, 2)

    def a_cols(self) -> torch.Tensor:
        """(d_in, B*T) inputs, one column per token; a grouped convolution's (G d_in, B*T), each group's d_in rows in
        turn (its tokens' columns, which :class:`~deltainf.influence._linalg.CovAccumulator` takes with
        ``shared=G``)."""
        if self.info.kind in CONVOLUTIONS and self._a is None:
            parts = [conv_patches(self.module, x, feature_major=True) for x, _ in self.calls]
            return parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return self.a.reshape(-1, self.info.d_in).T

    def g_cols(self) -> torch.Tensor:
        """(d_out, B*T) output gradients, one column per token."""
        if self.info.kind in CONVOLUTIONS and self._g is None:
            parts = [go.transpose(0, 1).reshape(self.info.d_out, -1) for _, go in self.calls]
            return parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return self.g.reshape(-1, self.info.d_out).T

    def token_ids(self) -> torch.Tensor:
        """(B, T) int64 token ids of an embedding's inputs, a padding_idx token's as V (a row past the vocabulary that
        the one-hot paths drop: its row of token_rows is zero)."""
        parts = [x.reshape(x.shape[0], -1).long() for x, _ in self.calls]
        ids = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        pad = self.module.padding_idx
        return ids if pad is None else ids.masked_fill(ids == pad, self.info.d_in)

    def summed_grad(self) -> torch.Tensor:
        """(d_out, d_in) sum over the examples and positions of g a^T (an embedding's by its token ids: no one-hot
        rows, whose (V, tokens) matrix a vocabulary of 50,000 makes gigabytes)."""
        if self.groups > 1:
            return self.weight_grads().sum(0)
        if self.info.kind != "embedding":
            return self.g_cols() @ self.a_cols().T
        V = self.info.d_in
        g = self.g.reshape(-1, self.info.d_out)
        total = g.new_zeros(V + 1, self.info.d_out).index_add_(0, self.token_ids().reshape(-1), g)
        return total[:V].T

    def finite(self) -> bool:
        """Whether every output gradient is finite. One reduction, no mask: a sum is finite only if
        all its terms are (NaN and +-inf propagate; a finite overflow would be an error anyway)."""
        parts = [go for _, go in self.calls] if self._g is None else [self._g]
        return all(bool(torch.isfinite(p.sum())) for p in parts)

    def a_aug(self) -> torch.Tensor:
        """(B, T, d_in_aug): inputs with the bias column of ones appended (copies when biased)."""
        if not self.info.bias:
            return self.a
        ones = self.a.new_ones(self.a.shape[0], self.a.shape[1], 1)
        return torch.cat([self.a, ones], dim=2)

    @property
    def unit_width(self) -> int:
        """Weight columns per input unit (Conv2d: k_h*k_w per input channel; Linear: 1 per feature)."""
        if self.groups > 1:  # its weight's columns are no input channel's: one unit of all of them
            return self.info.d_in
        return self.info.d_in // self.module.in_channels if self.info.kind in CONVOLUTIONS else 1

    def weight_grads(self, start: int = 0, stop: int | None = None, units: tuple[int, int] | None = None
                     ) -> torch.Tensor:
        """Per-example weight gradients sum_t g_it a_it^T of examples start..stop-1: (b, d_out, d_in), or only the
        columns of input units u0..u1-1 (``units``; Conv2d: input channels, d_in / C_in columns each).

        Conv2d: :func:`_conv_example_grads` on the input (channels) directly, no full patch matrix. Linear: a
        batched GEMM."""
        if self.info.kind in CONVOLUTIONS and self._a is None:
            total = None
            if self.groups > 1:
                units = None  # its one unit (unit_width): every column
            for x, go in self.calls:
                x = x[start:stop] if units is None else x[start:stop, units[0]:units[1]]
                part = _conv_example_grads(self.module, x, go[start:stop])
                total = part if total is None else total + part
            return total
        a, g = self.a[start:stop], self.g[start:stop]
        if units is not None:
            w = self.unit_width
            a = a[:, :, units[0] * w:units[1] * w]
        return torch.bmm(g.transpose(1, 2), a)

    def bias_grads(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Per-example bias gradients sum_t g_it: (b, d_out)."""
        return self.g[start:stop].sum(1)

    def grads(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Per-example gradients G_i of examples start..stop-1: (b, d_out, d_in_aug), the bias
        gradient (sum_t g_it) as the last column when the layer has a bias."""
        w = self.weight_grads(start, stop)
        if not self.info.bias:
            return w
        return torch.cat([w, self.bias_grads(start, stop).unsqueeze(2)], dim=2)

    def examples(self, start: int, stop: int) -> "LayerBatch":
        """The LayerBatch of examples start..stop-1 (views)."""
        if self._a is not None:
            return LayerBatch(self.info, self.module, a=self._a[start:stop], g=self.g[start:stop])
        return LayerBatch(self.info, self.module, [(x[start:stop], go[start:stop]) for x, go in self.calls])

    def to(self, dtype: torch.dtype) -> "LayerBatch":
        if self.groups > 1:  # (no a to hold)
            return LayerBatch(self.info, self.module, [(x.to(dtype), go.to(dtype)) for x, go in self.calls])
        return LayerBatch(self.info, self.module, a=self.a.to(dtype), g=self.g.to(dtype))


class Capture:
    """Forward hooks on the tracked layers that record inputs and output gradient edges.

    Use as a context manager around the forward pass, then call :meth:`gradients` with the
    (summed) loss. Hooks are removed on exit.
    """

    def __init__(self, layers: list[tuple[LayerInfo, nn.Module]], batch_axes: dict[str, int] | None = None):
        self.layers = layers
        # the axis of a layer's inputs and outputs that holds the examples: 0, or 1 for a linear layer in a
        # sequence-first (T, B, ...) layout (found by EKFAC's probe)
        self.batch_axes = batch_axes or {}
        self.records: dict[str, list] = {}
        self._handles = []

    def __enter__(self) -> "Capture":
        self.records = {info.name: [] for info, _ in self.layers}
        for info, mod in self.layers:
            self._handles.append(mod.register_forward_hook(self._make_hook(info), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, info: LayerInfo):
        def hook(mod, inputs, kwargs, out):
            if not torch.is_grad_enabled():
                # a call the model makes under torch.no_grad() (a stop-gradient target computed with the same layer)
                # gives the loss no gradient through this weight: its inputs are no positions of the layer (they
                # entered A as positions of zero gradient: scores 75 % off)
                return None
            x = inputs[0] if inputs else kwargs.get("input")  # layer(input=x) passes it by name
            replaced = None
            if not out.requires_grad:
                # Frozen layer fed by a non-differentiable input: route its output through a leaf
                # that requires grad so gradients still reach it. The model continues with a clone
                # (a leaf must not be modified in place, e.g. by a following ReLU(inplace=True)).
                out = out.detach().requires_grad_(True)
                replaced = out.clone()
            elif out._is_view():
                # a linear layer on (B, T, d) inputs returns a view: an in-place op on it (ReLU(inplace=True),
                # +=) rewrites the view's history, and the edge taken below would leave the graph (its gradient
                # came back as None, i.e. zero, without a word); the model continues with a copy instead
                replaced = out.clone()
            # The edge is taken NOW, so an in-place op applied to `out` later (ReLU(inplace=True))
            # does not change which gradient we get: dL/d(pre-modification output).
            self.records[info.name].append((x.detach(), get_gradient_edge(out), out.shape))
            return replaced

        return hook

    def batch_dims(self, name: str, axis: int | None = None) -> set[int]:
        """The sizes along ``axis`` (default: the layer's batch axis) of layer ``name``'s inputs and outputs over its
        calls so far; -1 for a call with no such axis."""
        axis = self.batch_axes.get(name, 0) if axis is None else axis
        return {(t[axis] if len(t) > axis else -1) for x, _, shape in self.records[name] for t in (x.shape, shape)}

    def gradients(self, loss: torch.Tensor, batch: int, *, retain_graph: bool = False) -> list[LayerBatch]:
        """Backpropagate ``loss`` of ``batch`` examples to the captured layer outputs only (no parameter gradients
        are computed) and return one LayerBatch per tracked layer, in tracking order. Raises RuntimeError if a
        tracked layer was not called, ValueError if a layer's inputs do not hold the examples along its batch axis
        (its per-example gradients would be those of positions)."""
        edges = []
        for info, _ in self.layers:
            recs = self.records[info.name]
            if not recs:
                raise RuntimeError(
                    f"modules: tracked layer {info.name!r} was not called during the forward pass of this batch (a "
                    "layer the model calls only for some inputs cannot be tracked): leave it out, with modules=[...] "
                    "naming the others")
            if self.batch_dims(info.name) != {batch}:
                axis = self.batch_axes.get(info.name, 0)
                raise ValueError(
                    f"modules: layer {info.name!r} takes inputs of size {sorted(self.batch_dims(info.name))} along "
                    f"dimension {axis} in a batch of {batch} examples; EK-FAC needs every example along one dimension "
                    "of a layer's inputs (a model that folds positions into it, or routes part of the batch to the "
                    "layer, cannot have that layer tracked): leave it out, with modules=[...] naming the others")
            edges += [edge for _, edge, _ in recs]
        try:
            grads = torch.autograd.grad(loss, edges, retain_graph=retain_graph, allow_unused=True)
        except RuntimeError as err:  # e.g. reentrant activation checkpointing, which torch.autograd.grad cannot run
            raise ValueError(f"model: the backward pass to its tracked layers' outputs failed ({first_line(err)})") \
                from err
        out, k = [], 0
        for info, mod in self.layers:
            calls = []
            axis = self.batch_axes.get(info.name, 0)
            for x, _, shape in self.records[info.name]:
                gout = grads[k]
                if gout is None:  # output does not influence the loss
                    dtype = mod.weight.dtype if info.kind == "embedding" else x.dtype  # (token ids: its weight's)
                    gout = torch.zeros(shape, dtype=dtype, device=x.device)
                if info.kind == "conv1d":  # (B, C, L) as (B, C, 1, L), for the Conv2d it is
                    x, gout = x.unsqueeze(2), gout.unsqueeze(2)
                calls.append((x, gout) if axis == 0 else (x.movedim(axis, 0), gout.movedim(axis, 0)))
                k += 1
            out.append(LayerBatch(info, _as_conv2d(mod), calls))
        return out
