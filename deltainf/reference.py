"""Plain-PyTorch reference implementations of deltainf's kernels.

These are the oracle the C++ and CUDA kernels are tested and benchmarked against. They favour
clarity over speed: every intermediate is materialised (the full per-example projected gradients,
the full N x n difference tensor), which is exactly what the kernels avoid. The random matrix of
:func:`jl_project` is produced by the same counter-based generator as the kernels
(``csrc/include/deltainf/rng.h``), re-expressed here with 64-bit integer tensor arithmetic.

Dtype rule shared with the kernels: results are float64 for float64 inputs and float32 otherwise
(low-precision inputs are accumulated in float32).
"""

from __future__ import annotations

import math

import torch

from deltainf._rng import GOLDEN, mix64, row_key, signed64

__all__ = [
    "kron_project",
    "kron_project_square_sum",
    "kron_project_score",
    "jl_project",
    "jl_matrix",
    "kron_ihvp",
    "sign_vote",
    "combine_flags",
]

_SALT_GAUSSIAN = 0x6A09E667F3BCC909


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def kron_project(a: torch.Tensor, g: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """R_i = sum_t (U^T g_it)(V^T a_it)^T.  a (N,T,d_in), g (N,T,d_out), U (d_out,r_out), V (d_in,r_in)
    -> (N, r_out, r_in)."""
    gp, ap = projections(a, g, U, V, _acc_dtype(a, g, U, V))
    return gp.transpose(1, 2) @ ap


def projections(a: torch.Tensor, g: torch.Tensor, U: torch.Tensor, V: torch.Tensor, dtype: torch.dtype):
    """(U^T g_it, V^T a_it) for every example and position, in ``dtype``: gp (N, T, r_out), ap (N, T, r_in)."""
    return g.to(dtype) @ U.to(dtype), a.to(dtype) @ V.to(dtype)


def kron_project_square_sum(a, g, U, V) -> torch.Tensor:
    """sum_i R_i * R_i -> (r_out, r_in)."""
    R = kron_project(a, g, U, V)
    return (R * R).sum(0)


def kron_project_score(a, g, U, V, P) -> torch.Tensor:
    """S_iq = <R_i, P_q>.  P (Q, r_out, r_in) -> (N, Q)."""
    R = kron_project(a, g, U, V)
    dt = R.dtype
    return R.flatten(1) @ P.to(dt).flatten(1).T


def _draw(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    return mix64(key + (counter + 1) * signed64(GOLDEN))


def jl_matrix(p: int, k: int, seed: int, dist: str = "rademacher", offset: int = 0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (p, k) projection matrix Omega for feature rows offset..offset+p-1.

    Rademacher: entry (j, c) = +-1/sqrt(k) from bit c % 64 of draw(seed, j, c // 64).
    Gaussian: entries (j, 2m) and (j, 2m+1) are the Box-Muller pair of draw(seed ^ salt, j, m),
    scaled by 1/sqrt(k).
    """
    rows = torch.arange(offset, offset + p, dtype=torch.int64).unsqueeze(1)
    cols = torch.arange(k, dtype=torch.int64).unsqueeze(0)
    scale = 1.0 / math.sqrt(k)
    if dist == "rademacher":
        bits = _draw(row_key(seed, rows, 0), cols // 64)
        bit = (bits >> (cols % 64)) & 1
        return ((1 - 2 * bit).to(torch.float64) * scale).to(dtype)
    if dist == "gaussian":
        bits = _draw(row_key(seed, rows, _SALT_GAUSSIAN), cols // 2)
        hi = (bits >> 40) & 0xFFFFFF  # top 24 bits
        lo = (bits >> 16) & 0xFFFFFF  # next 24 bits
        u1 = (hi.to(torch.float64) + 1.0) * 2.0 ** -24  # (0, 1]
        u2 = lo.to(torch.float64) * 2.0 ** -24  # [0, 1)
        r = torch.sqrt(-2.0 * torch.log(u1))
        theta = 2.0 * math.pi * u2
        z = torch.where(cols % 2 == 0, r * torch.cos(theta), r * torch.sin(theta))
        return (z * scale).to(dtype)
    raise ValueError(f"jl_project: dist must be 'rademacher' or 'gaussian', got {dist!r}")


def jl_project(x: torch.Tensor, k: int, seed: int, dist: str = "rademacher", offset: int = 0) -> torch.Tensor:
    """x (N, p) @ Omega (p, k) with Omega = jl_matrix(p, k, seed, dist, offset)."""
    dt = _acc_dtype(x)
    omega = jl_matrix(x.shape[1], k, seed, dist, offset, dtype=torch.float64).to(dt)
    return x.to(dt) @ omega


def kron_ihvp(G: torch.Tensor, Q_S: torch.Tensor, Q_A: torch.Tensor, lam: torch.Tensor, damping: float,
              eigenbasis: bool = False) -> torch.Tensor:
    """Q_S [(Q_S^T G Q_A) / (lam + damping)] Q_A^T for G (B, d_out, d_in) -> (B, d_out, d_in).
    With eigenbasis=True, return the bracketed eigenbasis form instead."""
    dt = _acc_dtype(G, Q_S, Q_A, lam)
    G, Q_S, Q_A, lam = G.to(dt), Q_S.to(dt), Q_A.to(dt), lam.to(dt)
    rotated = Q_S.T @ G @ Q_A
    scaled = rotated / (lam + damping)
    if eigenbasis:
        return scaled
    return Q_S @ scaled @ Q_A.T


def sign_vote(base: torch.Tensor, transformed: torch.Tensor, threshold: float = 0.0, min_votes: int = 1):
    """votes[p, i] = #{j : transformed[p, j, i] - base[p, i] < threshold}; flags = votes >= min_votes.
    base (P, N), transformed (P, n, N) -> (votes int32 (P, N), flags bool (P, N)). NaN never votes."""
    dt = _acc_dtype(base, transformed)
    delta = transformed.to(dt) - base.to(dt).unsqueeze(1)
    votes = (delta < threshold).sum(1).to(torch.int32)
    return votes, votes >= min(min_votes, transformed.shape[1] + 1)  # votes <= n; keeps int32 exact


def combine_flags(flags: torch.Tensor, min_points: int) -> torch.Tensor:
    """Flag training example i when at least min_points of the P test points flag it.
    flags (P, N) bool -> (N,) bool. min_points=1 is 'any', min_points=P is 'all'. A flag is any nonzero
    byte (a bool tensor reinterpreted from other data may hold bytes other than 0 and 1)."""
    return (flags.view(torch.uint8) != 0).sum(0) >= min_points
