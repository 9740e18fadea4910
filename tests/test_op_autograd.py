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


def _project_inputs(N, T, d_in, d_out, r_in, r_out, dtype=torch.float64, seed=0, grad=True):
    shapes = [(N, T, d_in), (N, T, d_out), (d_out, r_out), (d_in, r_in)]
    return tuple(_rand(*shape, dtype=dtype, seed=seed + i, grad=grad) for i, shape in enumerate(shapes))


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


def _differentiable_ops():
    """Each differentiable op with float64 inputs: (name, function of its tensor inputs, those inputs)."""
    a, g, U, V = _project_inputs(3, 2, 4, 3, 3, 2, grad=False)
    P = _rand(5, 2, 3, grad=False, seed=7)
    G, Q_S, Q_A = (_rand(*shape, grad=False, seed=11 + i) for i, shape in enumerate([(2, 3, 4), (3, 3), (4, 4)]))
    lam = _rand(3, 4, grad=False, seed=14).abs() + 0.5
    x = _rand(3, 6, grad=False, seed=15)
    return [("kron_project", ops.kron_project, (a, g, U, V)),
            ("kron_project_square_sum", ops.kron_project_square_sum, (a, g, U, V)),
            ("kron_project_score", ops.kron_project_score, (a, g, U, V, P)),
            ("jl_project", lambda x: ops.jl_project(x, 5, 1, "gaussian", 2), (x,)),
            ("kron_ihvp", lambda *t: ops.kron_ihvp(*t, 0.1), (G, Q_S, Q_A, lam)),
            ("kron_ihvp eigenbasis", lambda *t: ops.kron_ihvp(*t, 0.1, True), (G, Q_S, Q_A, lam))]


@pytest.mark.parametrize("case", range(6))
def test_forward_mode_gives_the_derivative(case):
    """Only a backward is registered: under jvp / jacfwd / forward_ad torch ran the kernels without the tangent, and
    the derivative came out as zero or None (then the wrappers refused). They now compute the op with its plain
    PyTorch twin there: the same value, and the directional derivative of the kernels' own reverse mode."""
    import torch.autograd.forward_ad as fwAD

    name, fn, inputs = _differentiable_ops()[case]
    gen = torch.Generator().manual_seed(case)
    tangents = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in inputs)
    value, derivative = torch.func.jvp(fn, inputs, tangents)
    torch.testing.assert_close(value, fn(*inputs), rtol=1e-12, atol=1e-12)
    # J t from the kernels' reverse mode: the Jacobian row by row (torch.autograd.functional, not torch.func)
    jacobians = torch.autograd.functional.jacobian(fn, inputs)
    expected = sum((J.reshape(value.numel(), -1) @ t.reshape(-1)).reshape(value.shape)
                   for J, t in zip(jacobians, tangents))
    torch.testing.assert_close(derivative, expected, rtol=1e-10, atol=1e-10)
    assert float(derivative.abs().max()) > 0  # (the zero the kernels gave)
    with fwAD.dual_level():
        dual = fn(*(fwAD.make_dual(t, d) for t, d in zip(inputs, tangents)))
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, expected, rtol=1e-10, atol=1e-10)
    first = torch.func.jacfwd(fn)(*inputs)  # with respect to the first input
    torch.testing.assert_close(first, jacobians[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", range(6))
def test_torch_func_reverse_mode_gives_the_gradient(case):
    """torch.func.grad / vjp / vmap of grad through an op raised torch's "an autograd.Function ... must override the
    setup_context staticmethod" (then the wrappers refused in plain words): they give torch.autograd's gradient."""
    name, fn, inputs = _differentiable_ops()[case]
    weight = torch.randn(fn(*inputs).shape, generator=torch.Generator().manual_seed(case), dtype=torch.float64)
    loss = lambda *t: (fn(*t) * weight).sum()  # noqa: E731
    leaves = tuple(t.clone().requires_grad_() for t in inputs)
    expected = torch.autograd.grad(loss(*leaves), leaves)
    got = torch.func.grad(loss, argnums=tuple(range(len(inputs))))(*inputs)
    for e, gr in zip(expected, got):
        torch.testing.assert_close(gr, e, rtol=1e-10, atol=1e-10)
    _, pullback = torch.func.vjp(fn, *inputs)
    for e, gr in zip(expected, pullback(weight)):
        torch.testing.assert_close(gr, e, rtol=1e-10, atol=1e-10)


def test_per_example_gradients_through_an_op_with_vmap_of_grad():
    """vmap(grad) (per-example gradients, as dattri and torch.func users take them) through jl_project: each row's
    gradient, that of the op on that row alone."""
    x = _rand(4, 6, grad=False, seed=3)
    per_row = torch.func.vmap(torch.func.grad(lambda r: ops.jl_project(r.unsqueeze(0), 5, 1).square().sum()))(x)
    for i in range(4):
        leaf = x[i:i + 1].clone().requires_grad_()
        (expected,) = torch.autograd.grad(ops.jl_project(leaf, 5, 1).square().sum(), leaf)
        torch.testing.assert_close(per_row[i], expected[0], rtol=1e-10, atol=1e-10)
    # vmap alone runs the kernel (torch's fallback)
    batched = torch.func.vmap(lambda r: ops.jl_project(r.unsqueeze(0), 5, 1).squeeze(0))(x)
    torch.testing.assert_close(batched, ops.jl_project(x, 5, 1))


def test_vote_ops_ignore_a_tangent():
    """Counts and flags have derivative zero: a tangent on the scores changes nothing."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(0)
    base, transformed = torch.randn(2, 7, generator=gen), torch.randn(2, 4, 7, generator=gen)
    votes, flags = ops.sign_vote(base, transformed, min_votes=2)
    with fwAD.dual_level():
        got = ops.sign_vote(fwAD.make_dual(base, torch.ones_like(base)), transformed, min_votes=2)
    assert torch.equal(got[0], votes) and torch.equal(got[1], flags)
    assert torch.equal(ops.combine_flags(flags, 1), flags.any(0))


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
