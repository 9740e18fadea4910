"""TRAK-style attribution (Park et al. 2023) on ``deltainf.ops.jl_project``, one checkpoint.

phi(z) = Omega^T grad_theta f(z), f = margin z_y - logsumexp_{c != y} z_c (TRAK's output function),
Omega a (p, k) JL matrix generated on the fly by the kernel (the same on every device);
features Phi (N, k) of the training set, score(q, i) = phi_q^T (Phi^T Phi + lambda I)^-1 phi_i x w_i
with w_i = 1 - softmax(z_i)[y_i] (TRAK's out-to-loss term, optional).

Sign: with the CE loss, grad L_i = -w_i grad f_i, so a positive score means z_i raises the query's
margin, i.e. supports the query label — the same convention as :class:`deltainf.influence.EKFAC`.
"""

from __future__ import annotations

import math

from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from deltainf._rng import GOLDEN, mix64_int
from deltainf._util import progress_bar, restore_modes, training_modes
from deltainf import ops
from deltainf.data.loaders import positioned_batches
from deltainf.influence._batches import check_labels, negative_margin

__all__ = ["TRAKScorer", "projection_seed", "project_param_grads"]

def projection_seed(seed: int, model_id: int) -> int:
    """Seed of the JL matrix for checkpoint ``model_id`` (a distinct matrix per checkpoint), in [0, 2^63)."""
    return mix64_int(seed ^ mix64_int(model_id + GOLDEN)) & ((1 << 63) - 1)


def project_param_grads(grads, k: int, seed: int, dist: str) -> torch.Tensor:
    """JL-project per-example gradients given as one (B, p) tensor or an ordered sequence of
    (B, ...) parameter blocks, without concatenating them: block j is projected with the rows
    offset..offset+p_j-1 of the same Omega and the results are summed (== projecting the
    concatenation). Low-precision blocks are accumulated in float32. -> (B, k) float32/float64."""
    if isinstance(grads, torch.Tensor):
        grads = [grads]
    out, offset = None, 0
    for gblock in grads:
        x = gblock.reshape(gblock.shape[0], math.prod(gblock.shape[1:]))  # not -1: a batch may be empty
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        part = ops.jl_project(x, k, seed, dist=dist, offset=offset)
        out = part if out is None else out + part
        offset += x.shape[1]
    return out


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -negative_margin(logits, y)


class TRAKScorer:
    """TRAK scores for one model checkpoint.

    Args:
        model: nn.Module mapping (B, ...) inputs to logits (B, C); used in eval mode.
        proj_dim: k, the JL dimension.
        seed: projection seed (checkpoint ``model_id``'s matrix uses ``projection_seed(seed, model_id)``).
        dist: "rademacher" or "gaussian" JL entries.
        params: names of the parameters to differentiate (default: all with requires_grad).
        lambda_reg: ridge term added to Phi^T Phi, on the scale of projections whose entries are +-1/sqrt(k)
            (traker's entries are +-1: its lambda_reg of v is v / k here).
        out_to_loss: multiply by 1 - p(y_i | x_i) as TRAK does.
        model_id: checkpoint id (selects the projection matrix).
        grad_batch: examples per vmap chunk when forming per-example gradients (memory bound).
    """

    def __init__(self, model: nn.Module, proj_dim: int = 2048, *, seed: int = 0, dist: str = "rademacher",
                 params: Sequence[str] | None = None, lambda_reg: float = 0.0, out_to_loss: bool = True,
                 model_id: int = 0, grad_batch: int = 32, progress: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 1:
            raise ValueError(f"proj_dim: expected an int >= 1, got {proj_dim!r}")
        if dist not in ("rademacher", "gaussian"):
            raise ValueError(f"dist: expected 'rademacher' or 'gaussian', got {dist!r}")
        if not (isinstance(lambda_reg, (int, float)) and lambda_reg >= 0):
            raise ValueError(f"lambda_reg: expected a float >= 0, got {lambda_reg!r}")
        if isinstance(grad_batch, bool) or not isinstance(grad_batch, int) or grad_batch < 1:
            raise ValueError(f"grad_batch: expected an int >= 1, got {grad_batch!r}")
        named = dict(model.named_parameters())
        if params is None:
            params = [n for n, p in named.items() if p.requires_grad]
        else:
            missing = [n for n in params if n not in named]
            if missing:
                raise ValueError(f"params: no parameters named {missing}; the model has {list(named)}")
        if not params:
            raise ValueError("params: nothing to differentiate (no parameter requires grad)")
        self.model = model
        self.proj_dim = proj_dim
        self.seed = seed
        self.dist = dist
        self.params = list(params)
        self.lambda_reg = float(lambda_reg)
        self.out_to_loss = out_to_loss
        self.model_id = model_id
        self.grad_batch = grad_batch
        self.progress = progress
        self.features: torch.Tensor | None = None  # (N, k): Phi (Phi^T Phi + lambda I)^-1
        self.weights: torch.Tensor | None = None  # (N,): 1 - p_i (or ones)

    @property
    def n_params(self) -> int:
        named = dict(self.model.named_parameters())
        return sum(named[n].numel() for n in self.params)

    def project(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected margin gradients phi (B, k) and out-to-loss weights (B,) for inputs x (B, ...)
        and int64 labels y (B,)."""
        model = self.model
        named = dict(model.named_parameters())
        p = next(model.parameters())
        x = x.to(p.device, p.dtype) if x.is_floating_point() else x.to(p.device)
        y = y.to(p.device)
        diff = {n: named[n].detach() for n in self.params}
        rest = {n: t.detach() for n, t in named.items() if n not in diff}
        buffers = dict(model.named_buffers())

        def f(dp, xi, yi):
            logits = functional_call(model, {**dp, **rest, **buffers}, (xi.unsqueeze(0),))
            return _margin(logits, yi.unsqueeze(0)).sum()

        modes = training_modes(model)
        model.eval()
        try:
            with torch.no_grad():
                logits = model(x)
            if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                raise TypeError(f"model: expected logits of shape ({x.shape[0]}, C), got {tuple(logits.shape)}")
            check_labels(y, logits.shape[1], "labels")
            with torch.enable_grad():
                g = vmap(grad(f), in_dims=(None, 0, 0), chunk_size=self.grad_batch)(diff, x, y)
        finally:
            restore_modes(modes)
        for n in self.params:
            if not bool(torch.isfinite(g[n]).all()):
                raise FloatingPointError(f"TRAKScorer: non-finite gradient for parameter {n!r}")
        phi = project_param_grads([g[n] for n in self.params], self.proj_dim,
                                  projection_seed(self.seed, self.model_id), self.dist)
        w = 1 - torch.softmax(logits.to(torch.float64), -1).gather(1, y.unsqueeze(1)).squeeze(1)
        return phi, (w if self.out_to_loss else torch.ones_like(w))

    def fit(self, train_loader) -> "TRAKScorer":
        """Project every training example (one pass) and precompute Phi (Phi^T Phi + lambda I)^-1.
        train_loader yields (x, y) or (x, y, index); rows are stored at the dataset positions."""
        rows, ws, idxs = [], [], []

        def show(batches):
            return progress_bar(batches, self.progress, desc="TRAK features", leave=False)

        for x, y, idx, _ in positioned_batches(train_loader, "train_loader", show):
            phi, w = self.project(x, y)
            rows.append(phi.cpu())
            ws.append(w.cpu())
            idxs.append(idx.cpu())
        if not rows:
            raise ValueError("train_loader: yielded no examples")
        idx = torch.cat(idxs)
        n = int(idx.max()) + 1
        Phi = torch.zeros(n, self.proj_dim, dtype=rows[0].dtype)
        Phi[idx] = torch.cat(rows)
        W = torch.full((n,), float("nan"), dtype=torch.float64)
        W[idx] = torch.cat(ws)
        xtx = Phi.to(torch.float64).T @ Phi.to(torch.float64)
        xtx += self.lambda_reg * torch.eye(self.proj_dim, dtype=torch.float64)
        # pinv: Phi^T Phi is singular when N < k (TRAK's inv would fail there)
        inv = torch.linalg.pinv(xtx, hermitian=True)
        self.features = (Phi.to(torch.float64) @ inv).to(Phi.dtype)
        seen = torch.zeros(n, dtype=torch.bool)
        seen[idx] = True
        self.features[~seen] = float("nan")
        self.weights = W
        return self

    def score(self, query_x: torch.Tensor, query_y: torch.Tensor, train_loader=None) -> torch.Tensor:
        """Scores (Q, N) float32 (float64 for a float64 model) against the features of :meth:`fit`; the
        training data are not read again (``train_loader`` is accepted for the :class:`Scorer` contract)."""
        if self.features is None:
            raise RuntimeError("TRAKScorer: call .fit(train_loader) before scoring")
        if not isinstance(query_x, torch.Tensor):
            raise TypeError(f"query_x: expected a Tensor (Q, ...), got {type(query_x).__name__}")
        query_y = torch.as_tensor(query_y)
        if query_y.dtype.is_floating_point or query_y.dim() != 1 or query_y.shape[0] != query_x.shape[0]:
            raise TypeError(f"query_y: expected integer labels of shape ({query_x.shape[0]},)")
        try:
            phi_q, _ = self.project(query_x, query_y.to(torch.int64))
        except ValueError as e:
            raise ValueError(str(e).replace("labels:", "query_y:")) from None
        s = phi_q.cpu().to(torch.float64) @ self.features.to(torch.float64).T
        return (s * self.weights).to(self.features.dtype)
