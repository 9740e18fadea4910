"""Argument checks of the seven ops, and their fake (meta) implementations built on them.

The C++ entry points check their arguments in ``csrc/include/deltainf/checks.h``; the functions here
are the same checks in the same order, raising the same exception types (``ValueError`` for shapes,
sizes, devices and scalar values, ``TypeError`` for dtypes), so a call that fails on a kernel fails
the same way under ``torch.compile`` / ``torch.export`` / meta tensors, and a call that passes here
passes there. ``tests/test_op_fuzz.py`` holds the two to that, call for call.
"""

from __future__ import annotations

import math

import torch

# A projection to k >= p dimensions already keeps all of x (Omega has rank p), so k beyond
# max(p, MAX_JL_FIXED_K) can only be a mistake; MAX_JL_FIXED_K leaves room for the fixed projection
# sizes users ask for on small layers. Mirrors kMaxJLFixedK in checks.h.
MAX_JL_FIXED_K = 2 ** 16
_INT64_MAX = 2 ** 63 - 1
_FLOATS = (torch.float32, torch.float64)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _ndim(t: torch.Tensor, op: str, name: str, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: expected {name} to be a {ndim}-d tensor, got {t.dim()}-d with shape "
                         f"{tuple(t.shape)}")


def _size(t: torch.Tensor, op: str, name: str, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{op}: {name}.size({dim}) must equal {what} = {expected}, got {t.shape[dim]} "
                         f"({name} shape {tuple(t.shape)})")


def _float_dtype(t: torch.Tensor, op: str, name: str) -> None:
    # float16/bfloat16 need the CUDA kernels; a meta tensor may stand for a CUDA one.
    low_ok = t.device.type in ("cuda", "meta")
    if t.dtype in _FLOATS or (low_ok and t.dtype in _LOW_PRECISION):
        return
    where = " (or float16/bfloat16 on CUDA)" if low_ok else " on CPU (float16/bfloat16 need CUDA)"
    raise TypeError(f"{op}: {name} must be float32 or float64{where}, got {t.dtype}")


def _same_dtype(t: torch.Tensor, ref: torch.Tensor, op: str, name: str, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; all floating "
                        "inputs must share one dtype")


def _same_device(t: torch.Tensor, ref: torch.Tensor, op: str, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must be "
                         "on one device")


def check_kron_project(op: str, a, g, U, V) -> None:
    """a (N, T, d_in), g (N, T, d_out), U (d_out, r_out), V (d_in, r_in): one floating dtype, one device."""
    for t, name, ndim in ((a, "a", 3), (g, "g", 3), (U, "U", 2), (V, "V", 2)):
        _ndim(t, op, name, ndim)
    _size(g, op, "g", 0, a.shape[0], "a.size(0) (examples N)")
    _size(g, op, "g", 1, a.shape[1], "a.size(1) (positions T)")
    _size(U, op, "U", 0, g.shape[2], "g.size(2) (d_out)")
    _size(V, op, "V", 0, a.shape[2], "a.size(2) (d_in)")
    _float_dtype(a, op, "a")
    for t, name in ((g, "g"), (U, "U"), (V, "V")):
        _same_dtype(t, a, op, name, "a")
    for t, name in ((g, "g"), (U, "U"), (V, "V")):
        _same_device(t, a, op, name, "a")


def check_score_queries(op: str, P, a, U, V) -> None:
    """P (Q, r_out, r_in) in a's dtype, on a's device."""
    _ndim(P, op, "P", 3)
    _size(P, op, "P", 1, U.shape[1], "U.size(1) (r_out)")
    _size(P, op, "P", 2, V.shape[1], "V.size(1) (r_in)")
    _same_dtype(P, a, op, "P", "a")
    _same_device(P, a, op, "P", "a")


def check_jl_project(x, k: int, seed: int, dist: str, offset: int) -> None:
    op = "jl_project"
    _ndim(x, op, "x", 2)
    _float_dtype(x, op, "x")
    p = x.shape[1]
    if k < 1:
        raise ValueError(f"{op}: k (output dimension) must be >= 1, got {k}")
    if k > max(p, MAX_JL_FIXED_K):
        raise ValueError(f"{op}: k (output dimension) must be at most max(p, {MAX_JL_FIXED_K}) = "
                         f"{max(p, MAX_JL_FIXED_K)} for x with p = {p} features (k >= p already keeps all of x), "
                         f"got {k}")
    if seed < 0:
        raise ValueError(f"{op}: seed must be >= 0, got {seed}")
    if not 0 <= offset <= _INT64_MAX - p:
        raise ValueError(f"{op}: offset (index of x's first feature) must be in [0, 2**63 - 1 - p] with p = {p}, "
                         f"got {offset}")
    if dist not in ("rademacher", "gaussian"):
        raise ValueError(f"{op}: dist must be 'rademacher' or 'gaussian', got '{dist}'")


def check_kron_ihvp(G, Q_S, Q_A, lam, damping: float) -> None:
    op = "kron_ihvp"
    for t, name, ndim in ((G, "G", 3), (Q_S, "Q_S", 2), (Q_A, "Q_A", 2), (lam, "lam", 2)):
        _ndim(t, op, name, ndim)
    _size(Q_S, op, "Q_S", 0, G.shape[1], "G.size(1) (d_out)")
    _size(Q_S, op, "Q_S", 1, G.shape[1], "G.size(1) (d_out)")
    _size(Q_A, op, "Q_A", 0, G.shape[2], "G.size(2) (d_in)")
    _size(Q_A, op, "Q_A", 1, G.shape[2], "G.size(2) (d_in)")
    _size(lam, op, "lam", 0, G.shape[1], "G.size(1) (d_out)")
    _size(lam, op, "lam", 1, G.shape[2], "G.size(2) (d_in)")
    _float_dtype(G, op, "G")
    for t, name in ((Q_S, "Q_S"), (Q_A, "Q_A"), (lam, "lam")):
        _same_dtype(t, G, op, name, "G")
    for t, name in ((Q_S, "Q_S"), (Q_A, "Q_A"), (lam, "lam")):
        _same_device(t, G, op, name, "G")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"{op}: damping must be a finite number >= 0, got {damping}")


def check_sign_vote(base, transformed, threshold: float, min_votes: int) -> None:
    op = "sign_vote"
    _ndim(base, op, "base", 2)
    _ndim(transformed, op, "transformed", 3)
    _size(transformed, op, "transformed", 0, base.shape[0], "base.size(0) (test points P)")
    _size(transformed, op, "transformed", 2, base.shape[1], "base.size(1) (training examples N)")
    _float_dtype(base, op, "base")
    _same_dtype(transformed, base, op, "transformed", "base")
    _same_device(transformed, base, op, "transformed", "base")
    if math.isnan(threshold):
        raise ValueError(f"{op}: threshold must be a number, got NaN")
    if min_votes < 0:
        raise ValueError(f"{op}: min_votes must be >= 0, got {min_votes}")


def check_combine_flags(flags, min_points: int) -> None:
    op = "combine_flags"
    _ndim(flags, op, "flags", 2)
    if flags.dtype != torch.bool:
        raise TypeError(f"{op}: flags must be a bool tensor, got {flags.dtype}")
    if flags.shape[0] < 1:
        raise ValueError(f"{op}: flags must hold at least one test point (P >= 1), got shape {tuple(flags.shape)}")
    if not 1 <= min_points <= flags.shape[0]:
        raise ValueError(f"{op}: min_points must be in [1, P] = [1, {flags.shape[0]}], got {min_points}")


def _result_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --- fake (meta) implementations: the kernels' checks, then shapes and dtypes only ---

@torch.library.register_fake("deltainf::kron_project")
def _(a, g, U, V):
    check_kron_project("kron_project", a, g, U, V)
    return a.new_empty((a.shape[0], U.shape[1], V.shape[1]), dtype=_result_dtype(a))


@torch.library.register_fake("deltainf::kron_project_square_sum")
def _(a, g, U, V):
    check_kron_project("kron_project_square_sum", a, g, U, V)
    return a.new_empty((U.shape[1], V.shape[1]), dtype=_result_dtype(a))


@torch.library.register_fake("deltainf::kron_project_score")
def _(a, g, U, V, P):
    check_kron_project("kron_project_score", a, g, U, V)
    check_score_queries("kron_project_score", P, a, U, V)
    return a.new_empty((a.shape[0], P.shape[0]), dtype=_result_dtype(a))


@torch.library.register_fake("deltainf::jl_project")
def _(x, k, seed, dist="rademacher", offset=0):
    check_jl_project(x, k, seed, dist, offset)
    return x.new_empty((x.shape[0], k), dtype=_result_dtype(x))


@torch.library.register_fake("deltainf::kron_ihvp")
def _(G, Q_S, Q_A, lam, damping, eigenbasis=False):
    check_kron_ihvp(G, Q_S, Q_A, lam, damping)
    return G.new_empty(G.shape, dtype=_result_dtype(G))


@torch.library.register_fake("deltainf::sign_vote")
def _(base, transformed, threshold=0.0, *, min_votes):
    check_sign_vote(base, transformed, threshold, min_votes)
    return base.new_empty(base.shape, dtype=torch.int32), base.new_empty(base.shape, dtype=torch.bool)


@torch.library.register_fake("deltainf::combine_flags")
def _(flags, min_points):
    check_combine_flags(flags, min_points)
    return flags.new_empty((flags.shape[1],), dtype=torch.bool)
