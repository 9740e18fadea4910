"""Gradients through the kernels: every op with a floating result has an exact backward, checked by
finite differences (gradcheck, float64), against autograd through deltainf.reference, and by
opcheck's autograd-registration and AOT tests; the vote ops are not differentiable and say nothing."""

from __future__ import annotations

import warnings

import pytest
import torch

from deltainf import ops, reference

pytestmark = pytest.mark.filterwarnings("error::UserWarning")


def _rand(*shape, dtype=torch.float64, grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed + sum(shape) * 31 + len(shape))
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)


# (N, T, d_in, d_out, r_in, r_out): T = 0 and 1 (the outer-product paths), several positions, and ranks
# below, at and above the layer sizes
PROJECT_SHAPES = [(3, 1, 4, 5, 3, 2), (2, 3, 4, 3, 4, 3), (2, 0, 3, 2, 2, 2), (1, 5, 2, 6, 1, 6), (4, 2, 3, 3, 0, 2)]


def _project_inputs(N, T, d_in, d_out, r_in, r_out, dtype=torch.float64, seed=0):
    return (_rand(N, T, d_in, dtype=dtype, seed=seed), _rand(N, T, d_out, dtype=dtype, seed=seed + 1),
            _rand(d_out, r_out, dtype=dtype, seed=seed + 2), _rand(d_in, r_in, dtype=dtype, seed=seed + 3))


@pytest.mark.parametrize("shape", PROJECT_SHAPES)
def test_kron_project_ops_gradcheck(shape):
    a, g, U, V = _project_inputs(*shape)
    P = _rand(3, shape[5], shape[4], seed=7)
    assert torch.autograd.gradcheck(ops.kron_project, (a, g, U, V))
    assert torch.autograd.gradcheck(ops.kron_project_square_sum, (a, g, U, V))
    assert torch.autograd.gradcheck(ops.kron_project_score, (a, g, U, V, P))


def test_kron_project_second_derivative():
    a, g, U, V = _project_inputs(2, 3, 3, 2, 2, 2)
    P = _rand(2, 2, 2, seed=5)
    assert torch.autograd.gradgradcheck(ops.kron_project_score, (a, g, U, V, P))
    assert torch.autograd.gradgradcheck(ops.kron_project_square_sum, (a, g, U, V))


# one tile, and several tiles in both directions (the kernel tiles features by 128 and columns by 256)
@pytest.mark.parametrize("N, p, k, offset", [(3, 5, 4, 0), (2, 256, 16, 7), (2, 130, 300, 2**40)])
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_jl_project_gradcheck(N, p, k, offset, dist):
    x = _rand(N, p)
    assert torch.autograd.gradcheck(lambda t: ops.jl_project(t, k, 11, dist, offset), (x,))


@pytest.mark.parametrize("eigenbasis", [False, True])
@pytest.mark.parametrize("B, d_out, d_in", [(1, 1, 1), (3, 4, 2), (2, 2, 5), (0, 2, 3)])
def test_kron_ihvp_gradcheck(B, d_out, d_in, eigenbasis):
    G, Q_S, Q_A = _rand(B, d_out, d_in), _rand(d_out, d_out, seed=1), _rand(d_in, d_in, seed=2)
    lam = (_rand(d_out, d_in, grad=False, seed=3).abs() + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: ops.kron_ihvp(*t, 0.1, eigenbasis), (G, Q_S, Q_A, lam))
    assert torch.autograd.gradgradcheck(lambda *t: ops.kron_ihvp(*t, 0.1, eigenbasis), (G, Q_S, Q_A, lam))


def _grads(fn, inputs, seed=0):
    out = fn(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_autograd_through_reference(dtype):
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    a, g, U, V = _project_inputs(5, 3, 6, 4, 3, 4, dtype=dtype)
    P = _rand(4, 4, 3, dtype=dtype, seed=9)
    for kernel, twin, args in ((ops.kron_project, reference.kron_project, (a, g, U, V)),
                               (ops.kron_project_square_sum, reference.kron_project_square_sum, (a, g, U, V)),
                               (ops.kron_project_score, reference.kron_project_score, (a, g, U, V, P))):
        for got, want in zip(_grads(kernel, args), _grads(twin, args)):
            torch.testing.assert_close(got, want, **tol)
    x = _rand(4, 300, dtype=dtype)
    for dist in ("rademacher", "gaussian"):
        got, = _grads(lambda t: ops.jl_project(t, 40, 3, dist), (x,))
        want, = _grads(lambda t: reference.jl_project(t, 40, 3, dist), (x,))
        torch.testing.assert_close(got, want, **tol)
    G, Q_S, Q_A = _rand(3, 4, 5, dtype=dtype), _rand(4, 4, dtype=dtype, seed=1), _rand(5, 5, dtype=dtype, seed=2)
    lam = (_rand(4, 5, dtype=dtype, grad=False, seed=3).abs() + 0.5).requires_grad_()
    for eig in (False, True):
        got = _grads(lambda *t: ops.kron_ihvp(*t, 0.01, eig), (G, Q_S, Q_A, lam))
        want = _grads(lambda *t: reference.kron_ihvp(*t, 0.01, eig), (G, Q_S, Q_A, lam))
        for x_got, x_want in zip(got, want):
            torch.testing.assert_close(x_got, x_want, **tol)


def test_gradient_only_for_inputs_that_ask():
    a, g, U, V = _project_inputs(3, 2, 3, 3, 2, 2)
    U.requires_grad_(False)
    R = ops.kron_project(a, g, U, V)
    assert R.requires_grad
    R.sum().backward()
    assert U.grad is None and a.grad is not None and V.grad is not None


def test_vote_ops_are_not_differentiable_and_silent():
    base = _rand(2, 5, dtype=torch.float32)
    transformed = _rand(2, 4, 5, dtype=torch.float32, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        votes, flags = ops.sign_vote(base, transformed, min_votes=2)
        combined = ops.combine_flags(flags, 1)
    assert not votes.requires_grad and not flags.requires_grad and not combined.requires_grad
    torch.testing.assert_close(votes, reference.sign_vote(base.detach(), transformed.detach(), 0.0, 2)[0])


def test_opcheck_with_inputs_requiring_grad():
    a, g, U, V = _project_inputs(3, 2, 4, 3, 2, 3, dtype=torch.float32)
    P = _rand(2, 3, 2, dtype=torch.float32, seed=4)
    torch.library.opcheck(torch.ops.deltainf.kron_project.default, (a, g, U, V))
    torch.library.opcheck(torch.ops.deltainf.kron_project_square_sum.default, (a, g, U, V))
    torch.library.opcheck(torch.ops.deltainf.kron_project_score.default, (a, g, U, V, P))
    torch.library.opcheck(torch.ops.deltainf.jl_project.default, (_rand(3, 200, dtype=torch.float32), 20, 5))
    G, Q_S, Q_A = _rand(2, 3, 4, dtype=torch.float32), _rand(3, 3, dtype=torch.float32), _rand(4, 4, dtype=torch.float32)
    lam = (_rand(3, 4, dtype=torch.float32, grad=False).abs() + 1).requires_grad_()
    torch.library.opcheck(torch.ops.deltainf.kron_ihvp.default, (G, Q_S, Q_A, lam, 0.1, False))
    base, transformed = _rand(2, 5, dtype=torch.float32), _rand(2, 3, 5, dtype=torch.float32)
    torch.library.opcheck(torch.ops.deltainf.sign_vote.default, (base, transformed, 0.0), {"min_votes": 1})


@pytest.mark.parametrize("dist, offset", [("rademacher", 0), ("gaussian", 5)])
def test_jl_project_gradient_under_torch_compile(dist, offset, monkeypatch):
    """The backward built Omega with the plain-PyTorch generator, which inductor compiles without its int64
    wrap-around: the gradient was off by up to 2.85 without a word (rademacher), or compiling failed (gaussian, an
    offset). It now takes Omega from the kernel, which the compiler calls as it is."""
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")  # a cached backward of an older build would be reused
    monkeypatch.setenv("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, requires_grad=True)
    w = torch.randn(5, 7, generator=g)

    def loss(x):
        return (ops.jl_project(x, 7, 3, dist, offset) * w).sum()

    expected = w @ reference.jl_matrix(4, 7, 3, dist, offset).T
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x), x)[0]
    torch.testing.assert_close(compiled, expected, rtol=1e-6, atol=1e-6)


def test_forward_mode_is_refused_not_zero():
    """Only a backward is registered: under jvp / jacfwd / forward_ad torch ran the ops without the tangent, and the
    derivative came out as zero or None."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, generator=g)
    with pytest.raises(NotImplementedError, match="^jl_project: x carries a forward-mode tangent"):
        torch.func.jvp(lambda x: ops.jl_project(x, 5, 1), (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match="^jl_project: x carries a forward-mode tangent"):
        torch.func.jacfwd(lambda x: ops.jl_project(x, 5, 1))(x)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode tangent"):
        ops.jl_project(fwAD.make_dual(x, torch.ones_like(x)), 5, 1)
    # vmap is fine (torch's fallback), and reverse mode is the supported route
    batched = torch.func.vmap(lambda r: ops.jl_project(r.unsqueeze(0), 5, 1).squeeze(0))(x)
    torch.testing.assert_close(batched, ops.jl_project(x, 5, 1))


def test_torch_func_reverse_mode_is_refused_in_plain_words():
    """torch.func.grad / vjp / vmap(grad) through an op raised torch's "an autograd.Function ... must override the
    setup_context staticmethod", a class the user never wrote; torch.autograd's own reverse mode works."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, generator=g)
    refused = "^jl_project: torch.func transforms .* cannot differentiate through the deltainf kernels"
    with pytest.raises(NotImplementedError, match=refused):
        torch.func.grad(lambda x: ops.jl_project(x, 5, 1).sum())(x)
    with pytest.raises(NotImplementedError, match=refused):
        torch.func.vmap(torch.func.grad(lambda r: ops.jl_project(r.unsqueeze(0), 5, 1).sum()))(x)
    a, gr = torch.randn(2, 1, 3, dtype=torch.float64, generator=g), torch.randn(2, 1, 2, dtype=torch.float64, generator=g)
    U, V = torch.randn(2, 2, dtype=torch.float64, generator=g), torch.randn(3, 2, dtype=torch.float64, generator=g)
    with pytest.raises(NotImplementedError, match="^kron_project: torch.func transforms"):
        torch.func.vjp(lambda u: ops.kron_project(a, gr, u, V), U)
    jacobian = torch.autograd.functional.jacobian(lambda x: ops.jl_project(x, 5, 1), x)
    torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(lambda x: reference.jl_project(x, 5, 1), x))


def test_jl_project_backward_memory_bounded_for_small_k(monkeypatch):
    """The backward regenerates Omega in chunks through the kernel (an identity times Omega): for a small k the
    identity, not Omega, is the large operand, and both stay within the chunk budget (k = 64 over 70,000 features
    asked for a 65,536-square float64 identity, 32 GiB)."""
    sizes = []
    eye = torch.eye

    def recording_eye(n, *args, **kwargs):
        sizes.append(n)
        return eye(n, *args, **kwargs)

    x = torch.randn(2, 70_000, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 64, dtype=torch.float64)
    monkeypatch.setattr(torch, "eye", recording_eye)
    got, = torch.autograd.grad((ops.jl_project(x, 64, 9) * w).sum(), x)
    monkeypatch.setattr(torch, "eye", eye)
    assert sizes and max(sizes) ** 2 <= 2 ** 22
    want, = torch.autograd.grad((reference.jl_project(x, 64, 9) * w).sum(), x)
    torch.testing.assert_close(got, want)
