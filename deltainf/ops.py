"""Typed wrappers over the deltainf kernels (``torch.ops.deltainf.*``).

Every op dispatches by device to the C++ (CPU) or CUDA kernel and has a ``register_fake``
implementation, so it works under ``torch.compile(fullgraph=True)``. ``deltainf.reference`` holds the
same ops in plain PyTorch; the tests hold the kernels to it.

Dtypes: float32/float64 on CPU, also float16/bfloat16 on CUDA; all floating inputs of one call
share a dtype. Results are float64 for float64 inputs and float32 otherwise (low-precision inputs
accumulate in float32).

NaN/Inf policy (every backend, zero-size shapes included): the kernels do not scan their inputs for
non-finite values (that would cost an extra pass, and on CUDA a host sync). One output is scanned:
``kron_project_score`` with T > 1 positions on its folded route (the eigenbases folded into the
queries, when that is fewer FLOP) checks its scores once per call, and recomputes them through the
projections if any is non-finite, since W_i = sum_t g_it a_it^T can overflow where its rotation
U^T W_i V (what the projections form) does not; on CUDA that check is one host sync per call. A result is what IEEE
arithmetic gives for the op's definition in ``deltainf.reference``: a NaN or Inf in an input makes the
results that depend on it non-finite (NaN or +-Inf; which of the two may differ from the reference,
as summation order differs), an empty sum is 0, and 0 * Inf is NaN (so kron_project_score with T = 0
positions is NaN against a query holding a NaN or Inf). No intermediate overflows where the result is
finite, except at the ends of the float range (known, not fixed): with T = 1, ``kron_project_score`` contracts the
balanced projections with P first, which overflows when |g| |P| passes the range although every term of the
result is finite (P near 2**120 in float32), and the balancing of ``kron_project_score`` and
``kron_project_square_sum`` flushes an entry of the larger side to 0 when it falls below the subnormal range
(g = [2**100, 2**-100]); with T > 1 the folded route forms W_i in the input dtype, which can underflow without a
non-finite value to send it to the projections (a, g near 1e-21 against non-orthonormal bases near 1e6 in
float32: relative error 3e-4; near 1e-22: 3e-2). In ``sign_vote`` a NaN score never votes (a comparison with NaN is false). Callers that must
reject non-finite data check it where it is produced (the EK-FAC engine checks gradients). Scalar
arguments (damping, threshold, seed, k, offset) are validated; sizes that can only be mistakes are
refused (``jl_project``: k beyond max(p, 65536)).

Autograd: every op with a floating result has a registered backward (plain PyTorch, in
``deltainf._op_autograd``), so gradients through the kernels are exact; ``sign_vote`` and
``combine_flags`` return counts and flags and are not differentiable. Argument checks and fake
(meta) implementations live in ``deltainf._op_checks`` and agree with the kernels call for call.
The kernels' derivative is that reverse mode, through torch.autograd. Where it cannot serve, these wrappers compute
the op with its plain-PyTorch twin in ``deltainf.reference`` instead, which gives the same result and every
derivative: forward mode (torch.func.jvp, jacfwd, torch.autograd.forward_ad: an input carries a tangent) and
torch.func's reverse transforms (grad, vjp, jacrev, hessian), at the twin's speed and memory (it forms what the
kernels never store). ``sign_vote`` and ``combine_flags`` return counts and flags, whose derivative is zero. The
raw ``torch.ops.deltainf.*`` ops have no such fallback: forward mode through them drops the tangent (a zero
derivative), and torch.func refuses them.
"""

from __future__ import annotations

import numpy as np
import torch

from deltainf._extension import _C  # noqa: F401, I001  (loads the kernels into torch.ops.deltainf)
from deltainf import _op_autograd, _op_checks  # noqa: F401, E402  (then their backward and fake implementations)
from deltainf import reference  # noqa: E402

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
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{op}: {name} must be a real number within the float range, got {value!r}") from None


def _integer(op: str, name: str, value, low: int = -2**63, span: str = "the int64 range") -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if not low <= value <= _MAX_SEED:  # the kernels take int64
        raise ValueError(f"{op}: {name} must be an int in {span}, got {value!r}")
    return value


def _flag(op: str, name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _tensors(op: str, **tensors) -> bool:
    """Check that every argument is a tensor; returns whether one carries a forward-mode tangent (torch.func.jvp,
    jacfwd, torch.autograd.forward_ad), which the kernels, registered with a backward only, would drop."""
    from torch.autograd.forward_ad import unpack_dual

    tangent = False
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
        tangent = tangent or unpack_dual(value).tangent is not None
    return tangent


def _differentiable(kernel, twin, tangent: bool, *args):
    """``kernel(*args)``, or the op's plain-PyTorch twin in ``deltainf.reference`` where the kernel has no derivative
    to give: forward mode (``tangent``: torch would run the kernel without the tangent, a zero derivative without a
    word) and torch.func's transforms (grad, vjp, jacrev, hessian: torch refuses the kernel's registered backward
    there). The twin computes the same result in plain PyTorch, which every mode differentiates."""
    if tangent:
        return twin(*args)
    try:
        return kernel(*args)
    except RuntimeError as err:
        if "functorch transforms" not in str(err):
            raise
        return twin(*args)


def kron_project(a: torch.Tensor, g: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Per-example projected gradients R_i = sum_t (U^T g_it)(V^T a_it)^T, without forming d_out x d_in gradients.

    Args:
        a: layer inputs (N, T, d_in) (T positions per example; T = 1 for a plain linear layer).
        g: gradients at the layer output (N, T, d_out).
        U: output basis (d_out, r_out).  V: input basis (d_in, r_in).
    Returns: R (N, r_out, r_in).
    """
    tangent = _tensors("kron_project", a=a, g=g, U=U, V=V)
    return _differentiable(_ops.kron_project.default, reference.kron_project, tangent, a, g, U, V)


def kron_project_square_sum(a: torch.Tensor, g: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """sum_i R_i * R_i (elementwise) -> (r_out, r_in); R as in :func:`kron_project`, never stored.

    With U, V the Kronecker eigenbases this is EK-FAC's eigenvalue correction (times N)."""
    tangent = _tensors("kron_project_square_sum", a=a, g=g, U=U, V=V)
    return _differentiable(_ops.kron_project_square_sum.default, reference.kron_project_square_sum, tangent,
                           a, g, U, V)


def kron_project_score(a: torch.Tensor, g: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                       P: torch.Tensor) -> torch.Tensor:
    """S_iq = <R_i, P_q> for P (Q, r_out, r_in) -> S (N, Q); R as in :func:`kron_project`, never stored."""
    tangent = _tensors("kron_project_score", a=a, g=g, U=U, V=V, P=P)
    return _differentiable(_ops.kron_project_score.default, reference.kron_project_score, tangent, a, g, U, V, P)


def jl_project(x: torch.Tensor, k: int, seed: int, dist: str = "rademacher", offset: int = 0) -> torch.Tensor:
    """Dense Johnson-Lindenstrauss projection x (N, p) -> x @ Omega (N, k).

    Omega (p, k) is generated on the fly from (seed, offset + row, column): Rademacher entries
    +-1/sqrt(k) or Gaussian N(0, 1/k). It is the same matrix on CPU and on every GPU, for any k, and
    projecting the feature chunks x[:, s:e] with offset=s and summing equals projecting x at once.
    """
    tangent = _tensors("jl_project", x=x)
    k = _integer("jl_project", "k", k)
    offset = _integer("jl_project", "offset", offset, 0, "[0, 2**63 - 1]")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"jl_project: seed must be an int in [0, 2**63 - 1], got {seed!r}")
    seed = int(seed)
    if dist not in ("rademacher", "gaussian"):
        raise ValueError(f"jl_project: dist must be 'rademacher' or 'gaussian', got {dist!r}")
    return _differentiable(_ops.jl_project.default, reference.jl_project, tangent, x, k, seed, dist, offset)


def kron_ihvp(G: torch.Tensor, Q_S: torch.Tensor, Q_A: torch.Tensor, lam: torch.Tensor, damping: float,
              eigenbasis: bool = False) -> torch.Tensor:
    """Kronecker eigenbasis inverse-Hessian product, batched over queries.

    Args:
        G: query gradients (B, d_out, d_in).  Q_S: (d_out, d_out) and Q_A: (d_in, d_in) eigenbases.
        lam: corrected eigenvalues (d_out, d_in).  damping: finite, >= 0.
        eigenbasis: return (Q_S^T G Q_A) / (lam + damping) instead of Q_S [...] Q_A^T.
    Returns: (B, d_out, d_in).
    """
    tangent = _tensors("kron_ihvp", G=G, Q_S=Q_S, Q_A=Q_A, lam=lam)
    damping = _number("kron_ihvp", "damping", damping)
    eigenbasis = _flag("kron_ihvp", "eigenbasis", eigenbasis)
    return _differentiable(_ops.kron_ihvp.default, reference.kron_ihvp, tangent, G, Q_S, Q_A, lam, damping,
                           eigenbasis)


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
    _tensors("sign_vote", base=base, transformed=transformed)  # (counts: a tangent has nothing to carry)
    threshold = _number("sign_vote", "threshold", threshold)
    min_votes = _integer("sign_vote", "min_votes", min_votes)
    return _ops.sign_vote.default(base, transformed, threshold, min_votes=min_votes)


def combine_flags(flags: torch.Tensor, min_points: int) -> torch.Tensor:
    """Combine per-test-point flags (P, N) bool into (N,) bool: flagged by at least ``min_points`` points
    (1 = any, P = all)."""
    _tensors("combine_flags", flags=flags)
    return _ops.combine_flags.default(flags, _integer("combine_flags", "min_points", min_points))
