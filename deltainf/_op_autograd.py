"""Backward formulas of the differentiable ops, registered with ``torch.library.register_autograd``.

The kernels compute forward results only; their gradients are written here in plain PyTorch from the
definitions in ``deltainf.reference`` (so they are themselves differentiable, and a second derivative
works too). They recompute what the kernels never store (the projections g U and a V, R_i, Omega), in
the result dtype, and return each gradient in its input's dtype. ``tests/test_op_autograd.py`` checks
every formula with ``gradcheck`` in float64 and ``opcheck``.

``sign_vote`` and ``combine_flags`` return counts and flags: their outputs can never require grad, so
they are registered as non-differentiable (no gradient flows back through them, and PyTorch does not
warn about a missing autograd kernel).
"""

from __future__ import annotations

import math

import torch

from deltainf import reference

# Rows of Omega regenerated at once in jl_project's backward (elements): bounds its memory.
_OMEGA_CHUNK_ELEMENTS = 2 ** 22


def _cast(grad, like: torch.Tensor):
    return None if grad is None else grad.to(like.dtype)


def _save_tensors(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))


# --- kron_project and its epilogues: R_i = sum_t (U^T g_it)(V^T a_it)^T ---

def _project_backward(ctx, a, g, U, V, gp, ap, dR):
    """Gradients of a, g, U, V from dL/dR (N, r_out, r_in)."""
    needs = ctx.needs_input_grad
    dt = dR.dtype
    d_gp = ap @ dR.transpose(1, 2)  # (N, T, r_out)
    d_ap = gp @ dR  # (N, T, r_in)
    d_a = d_ap @ V.to(dt).T if needs[0] else None
    d_g = d_gp @ U.to(dt).T if needs[1] else None
    d_U = g.to(dt).flatten(0, 1).T @ d_gp.flatten(0, 1) if needs[2] else None  # sum over examples, positions
    d_V = a.to(dt).flatten(0, 1).T @ d_ap.flatten(0, 1) if needs[3] else None
    return _cast(d_a, a), _cast(d_g, g), _cast(d_U, U), _cast(d_V, V)


def _kron_project_backward(ctx, dR):
    a, g, U, V = ctx.saved_tensors
    gp, ap = reference.projections(a, g, U, V, dR.dtype)
    return _project_backward(ctx, a, g, U, V, gp, ap, dR)


def _square_sum_backward(ctx, dS):
    a, g, U, V = ctx.saved_tensors
    gp, ap = reference.projections(a, g, U, V, dS.dtype)
    R = gp.transpose(1, 2) @ ap
    return _project_backward(ctx, a, g, U, V, gp, ap, 2 * R * dS)


def _score_backward(ctx, dS):
    a, g, U, V, P = ctx.saved_tensors
    dt = dS.dtype
    gp, ap = reference.projections(a, g, U, V, dt)
    R = gp.transpose(1, 2) @ ap  # (N, r_out, r_in)
    dR = (dS @ P.to(dt).flatten(1)).view(R.shape)
    grads = _project_backward(ctx, a, g, U, V, gp, ap, dR)
    d_P = (dS.T @ R.flatten(1)).view(P.shape) if ctx.needs_input_grad[4] else None
    return (*grads, _cast(d_P, P))


# --- jl_project: x @ Omega ---

def _jl_setup(ctx, inputs, output):
    x, k, seed, dist, offset = inputs
    ctx.save_for_backward(x)
    ctx.jl = (k, seed, dist, offset)


def _jl_backward(ctx, dy):
    (x,) = ctx.saved_tensors  # the only tensor input: this runs only when x needs a gradient
    k, seed, dist, offset = ctx.jl
    p = x.shape[1]
    # k >= 1 (checked); both the identity (rows x rows) and Omega's chunk (rows x k) stay within the budget
    rows = max(1, min(_OMEGA_CHUNK_ELEMENTS // k, math.isqrt(_OMEGA_CHUNK_ELEMENTS)))
    parts = []
    for s in range(0, p, rows):
        e = min(s + rows, p)
        # Omega's rows from the kernel itself (I @ Omega is exact): an op the compiler cannot trace into; traced, the
        # generator's int64 wrap-around is not reproduced by inductor, which gave wrong gradients without a word
        eye = torch.eye(e - s, dtype=torch.float64, device=dy.device)
        omega = torch.ops.deltainf.jl_project.default(eye, k, seed, dist, offset + s).to(dy)
        parts.append(dy @ omega.T)
    dx = torch.cat(parts, 1) if parts else dy.new_zeros((x.shape[0], 0))
    return _cast(dx, x), None, None, None, None


# --- kron_ihvp: Q_S [(Q_S^T G Q_A) / (lam + damping)] Q_A^T ---

def _ihvp_setup(ctx, inputs, output):
    G, Q_S, Q_A, lam, damping, eigenbasis = inputs
    ctx.save_for_backward(G, Q_S, Q_A, lam)
    ctx.ihvp = (damping, eigenbasis)


def _ihvp_backward(ctx, d_out):
    G0, Q_S0, Q_A0, lam0 = ctx.saved_tensors
    damping, eigenbasis = ctx.ihvp
    needs = ctx.needs_input_grad
    G, Q_S, Q_A, lam = (t.to(d_out.dtype) for t in (G0, Q_S0, Q_A0, lam0))
    denom = lam + damping
    E = Q_S.T @ G @ Q_A / denom  # the damped rotated queries (B, d_out, d_in)
    dE = d_out if eigenbasis else Q_S.T @ d_out @ Q_A  # out = E, or Q_S E Q_A^T
    dM = dE / denom
    d_G = Q_S @ dM @ Q_A.T if needs[0] else None
    d_Q_S = (G @ Q_A @ dM.transpose(1, 2)).sum(0) if needs[1] else None
    d_Q_A = (G.transpose(1, 2) @ Q_S @ dM).sum(0) if needs[2] else None
    if not eigenbasis:  # the outer rotation's own terms
        if needs[1]:
            d_Q_S = d_Q_S + (d_out @ Q_A @ E.transpose(1, 2)).sum(0)
        if needs[2]:
            d_Q_A = d_Q_A + (d_out.transpose(1, 2) @ Q_S @ E).sum(0)
    d_lam = -(dE * E / denom).sum(0) if needs[3] else None
    return _cast(d_G, G0), _cast(d_Q_S, Q_S0), _cast(d_Q_A, Q_A0), _cast(d_lam, lam0), None, None


# --- counts and flags: not differentiable ---

def _no_setup(ctx, inputs, output, keyword_only_inputs=None):
    ctx.n_inputs = len(inputs)


def _no_gradient(ctx, *grads):
    return (None,) * ctx.n_inputs


torch.library.register_autograd("deltainf::kron_project", _kron_project_backward, setup_context=_save_tensors)
torch.library.register_autograd("deltainf::kron_project_square_sum", _square_sum_backward,
                                setup_context=_save_tensors)
torch.library.register_autograd("deltainf::kron_project_score", _score_backward, setup_context=_save_tensors)
torch.library.register_autograd("deltainf::jl_project", _jl_backward, setup_context=_jl_setup)
torch.library.register_autograd("deltainf::kron_ihvp", _ihvp_backward, setup_context=_ihvp_setup)
torch.library.register_autograd("deltainf::sign_vote", _no_gradient, setup_context=_no_setup)
torch.library.register_autograd("deltainf::combine_flags", _no_gradient, setup_context=_no_setup)
