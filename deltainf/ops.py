"""Typed wrappers over the deltainf kernels (``torch.ops.deltainf.*``).

Every op dispatches by device to the C++ (CPU) or CUDA kernel and has a ``register_fake``
implementation, so it works under ``torch.compile(fullgraph=True)``. ``deltainf.reference`` holds the
same ops in plain PyTorch; the tests hold the kernels to it.

Dtypes: float32/float64 on CPU, also float16/bfloat16 on CUDA; all floating inputs of one call
share a dtype. Results are float64 for float64 inputs and float32 otherwise (low-precision inputs
accumulate in float32).

NaN/Inf policy: the kernels never scan data for non-finite values (that would cost an extra pass,
and on CUDA a host sync). They follow IEEE arithmetic: a NaN or Inf in an input propagates into
the results that depend on it, and in ``sign_vote`` a NaN score never votes (a comparison with NaN
is false). Callers that must reject non-finite data check it where it is produced (the EK-FAC
engine checks gradients). Scalar arguments (damping, threshold, seed, k, offset) are validated.
"""

from __future__ import annotations

import torch

from deltainf._extension import _C  # noqa: F401  (loads the kernels into torch.ops.deltainf)

__all__ = [
    "kron_project",
    "kron_project_square_sum",
    "kron_project_score",
    "jl_project",
    "kron_ihvp",
    "sign_vote",
    "combine_flags",
]

_ops = torch.ops.deltainf
_MAX_SEED = 2**63 - 1


def _number(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _integer(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    return value


def _result_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def kron_project(a: torch.Tensor, g: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Per-example projected gradients R_i = sum_t (U^T g_it)(V^T a_it)^T, without forming d_out x d_in gradients.

    Args:
        a: layer inputs (N, T, d_in) (T positions per example; T = 1 for a plain linear layer).
        g: gradients at the layer output (N, T, d_out).
        U: output basis (d_out, r_out).  V: input basis (d_in, r_in).
    Returns: R (N, r_out, r_in).
    """
    return _ops.kron_project.default(a, g, U, V)


def kron_project_square_sum(a: torch.Tensor, g: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """sum_i R_i * R_i (elementwise) -> (r_out, r_in); R as in :func:`kron_project`, never stored.

    With U, V the Kronecker eigenbases this is EK-FAC's eigenvalue correction (times N)."""
    return _ops.kron_project_square_sum.default(a, g, U, V)


def kron_project_score(a: torch.Tensor, g: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                       P: torch.Tensor) -> torch.Tensor:
    """S_iq = <R_i, P_q> for P (Q, r_out, r_in) -> S (N, Q); R as in :func:`kron_project`, never stored."""
    return _ops.kron_project_score.default(a, g, U, V, P)


def jl_project(x: torch.Tensor, k: int, seed: int, dist: str = "rademacher", offset: int = 0) -> torch.Tensor:
    """Dense Johnson-Lindenstrauss projection x (N, p) -> x @ Omega (N, k).

    Omega (p, k) is generated on the fly from (seed, offset + row, column): Rademacher entries
    +-1/sqrt(k) or Gaussian N(0, 1/k). It is the same matrix on CPU and on every GPU, for any k, and
    projecting the feature chunks x[:, s:e] with offset=s and summing equals projecting x at once.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"jl_project: seed must be an int in [0, 2**63 - 1], got {seed!r}")
    if dist not in ("rademacher", "gaussian"):
        raise ValueError(f"jl_project: dist must be 'rademacher' or 'gaussian', got {dist!r}")
    return _ops.jl_project.default(x, k, seed, dist, offset)


def kron_ihvp(G: torch.Tensor, Q_S: torch.Tensor, Q_A: torch.Tensor, lam: torch.Tensor, damping: float,
              eigenbasis: bool = False) -> torch.Tensor:
    """Kronecker eigenbasis inverse-Hessian product, batched over queries.

    Args:
        G: query gradients (B, d_out, d_in).  Q_S: (d_out, d_out) and Q_A: (d_in, d_in) eigenbases.
        lam: corrected eigenvalues (d_out, d_in).  damping: finite, >= 0.
        eigenbasis: return (Q_S^T G Q_A) / (lam + damping) instead of Q_S [...] Q_A^T.
    Returns: (B, d_out, d_in).
    """
    damping = _number("kron_ihvp", "damping", damping)
    return _ops.kron_ihvp.default(G, Q_S, Q_A, lam, damping, bool(eigenbasis))


def sign_vote(base: torch.Tensor, transformed: torch.Tensor, threshold: float = 0.0, *,
              min_votes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Influence-collapse vote of Delta-Influence.

    Args:
        base: scores on the P original affected points (P, N).
        transformed: scores on their n transformed copies (P, n, N).
        threshold: a copy votes for example i when transformed - base < threshold.
        min_votes: examples with at least this many votes are flagged.
    Returns: votes int32 (P, N), flags bool (P, N).
    """
    threshold = _number("sign_vote", "threshold", threshold)
    min_votes = _integer("sign_vote", "min_votes", min_votes)
    return _ops.sign_vote.default(base, transformed, threshold, min_votes=min_votes)


def combine_flags(flags: torch.Tensor, min_points: int) -> torch.Tensor:
    """Combine per-test-point flags (P, N) bool into (N,) bool: flagged by at least ``min_points`` points
    (1 = any, P = all)."""
    return _ops.combine_flags.default(flags, _integer("combine_flags", "min_points", min_points))


# --- fake (meta) implementations: shapes and dtypes only, for torch.compile / export ---

def _check_project_shapes(a, g, U, V):
    torch._check(a.dim() == 3 and g.dim() == 3 and U.dim() == 2 and V.dim() == 2,
                 lambda: "kron_project*: expected a (N,T,d_in), g (N,T,d_out), U (d_out,r_out), V (d_in,r_in)")
    torch._check(g.shape[0] == a.shape[0] and g.shape[1] == a.shape[1], lambda: "g must match a in N and T")
    torch._check(U.shape[0] == g.shape[2] and V.shape[0] == a.shape[2], lambda: "U/V rows must equal d_out/d_in")


@torch.library.register_fake("deltainf::kron_project")
def _(a, g, U, V):
    _check_project_shapes(a, g, U, V)
    return a.new_empty((a.shape[0], U.shape[1], V.shape[1]), dtype=_result_dtype(a))


@torch.library.register_fake("deltainf::kron_project_square_sum")
def _(a, g, U, V):
    _check_project_shapes(a, g, U, V)
    return a.new_empty((U.shape[1], V.shape[1]), dtype=_result_dtype(a))


@torch.library.register_fake("deltainf::kron_project_score")
def _(a, g, U, V, P):
    _check_project_shapes(a, g, U, V)
    torch._check(P.shape[1] == U.shape[1] and P.shape[2] == V.shape[1])
    return a.new_empty((a.shape[0], P.shape[0]), dtype=_result_dtype(a))


@torch.library.register_fake("deltainf::jl_project")
def _(x, k, seed, dist="rademacher", offset=0):
    torch._check(k >= 1)
    return x.new_empty((x.shape[0], k), dtype=_result_dtype(x))


@torch.library.register_fake("deltainf::kron_ihvp")
def _(G, Q_S, Q_A, lam, damping, eigenbasis=False):
    torch._check(G.dim() == 3 and tuple(Q_S.shape) == (G.shape[1],) * 2 and tuple(Q_A.shape) == (G.shape[2],) * 2
                 and tuple(lam.shape) == tuple(G.shape[1:]), lambda: "kron_ihvp: inconsistent shapes")
    return G.new_empty(G.shape, dtype=_result_dtype(G))


@torch.library.register_fake("deltainf::sign_vote")
def _(base, transformed, threshold=0.0, *, min_votes):
    torch._check(transformed.shape[0] == base.shape[0] and transformed.shape[2] == base.shape[1])
    return base.new_empty(base.shape, dtype=torch.int32), base.new_empty(base.shape, dtype=torch.bool)


@torch.library.register_fake("deltainf::combine_flags")
def _(flags, min_points):
    return flags.new_empty((flags.shape[1],), dtype=torch.bool)
