"""Kronecker eigenbasis inverse-Hessian product H^-1 G = Q_S [(Q_S^T G Q_A) / (lam + damping)] Q_A^T.

Besides the reference, the result is checked against an independent formulation: solving with the
explicit (d_out*d_in) x (d_out*d_in) matrix H = (Q_S kron Q_A) diag(vec(lam) + damping) (Q_S kron Q_A)^T,
with row-major vec (vec(Q_S Y Q_A^T) = (Q_S kron Q_A) vec(Y)).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltainf import ops, reference

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12)}


def assert_matches(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def make_inputs(B, d_out, d_in, dtype=torch.float64, seed=0, orthogonal=True):
    """G (B,d_out,d_in), eigenbases (orthogonal from QR, or arbitrary), positive eigenvalues lam."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    G = rand(B, d_out, d_in)
    Q_S, Q_A = rand(d_out, d_out), rand(d_in, d_in)
    if orthogonal:
        Q_S, Q_A = torch.linalg.qr(Q_S).Q, torch.linalg.qr(Q_A).Q
    lam = torch.rand(d_out, d_in, generator=gen, dtype=torch.float64) + 0.05
    # QR returns column-major Q: make everything row-major so that layouts are tested on purpose.
    return tuple(t.to(dtype).contiguous() for t in (G, Q_S, Q_A, lam))


def check(G, Q_S, Q_A, lam, damping, dtype):
    for eigenbasis in (False, True):
        out = ops.kron_ihvp(G, Q_S, Q_A, lam, damping, eigenbasis=eigenbasis)
        assert out.dtype == dtype and out.shape == G.shape
        assert_matches(out, reference.kron_ihvp(G, Q_S, Q_A, lam, damping, eigenbasis), dtype)


# (B, d_out, d_in)
SHAPES = [
    pytest.param(0, 3, 4, id="B0"),
    pytest.param(2, 0, 4, id="d_out0"),
    pytest.param(2, 3, 0, id="d_in0"),
    pytest.param(1, 1, 1, id="all1"),
    pytest.param(1, 5, 3, id="B1"),
    pytest.param(4, 6, 6, id="square"),
    pytest.param(3, 17, 9, id="odd"),
    pytest.param(16, 64, 48, id="large"),
]


@pytest.mark.parametrize("damping", [0.0, 0.1])
@pytest.mark.parametrize("orthogonal", [True, False], ids=["qr", "general"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, d_out, d_in", SHAPES)
def test_kron_ihvp_matches_reference(B, d_out, d_in, dtype, orthogonal, damping):
    check(*make_inputs(B, d_out, d_in, dtype, orthogonal=orthogonal), damping, dtype)


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kron_ihvp_non_contiguous(dtype, layout):
    G, Q_S, Q_A, lam = make_inputs(3, 5, 4, dtype, seed=1)
    if layout == "transposed":
        # Column-major in memory (the layout torch.linalg.qr and eigh return).
        G = G.transpose(1, 2).contiguous().transpose(1, 2)
        Q_S, Q_A, lam = (t.T.contiguous().T for t in (Q_S, Q_A, lam))
    elif layout == "strided":
        G, Q_S, Q_A, lam = (torch.repeat_interleave(t, 2, dim=-1)[..., ::2] for t in (G, Q_S, Q_A, lam))
    else:
        G = G[:1].expand_as(G)
    for t in (G, Q_S, Q_A, lam) if layout != "expanded" else (G,):
        assert not t.is_contiguous()
    check(G, Q_S, Q_A, lam, 0.01, dtype)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(0, 4), d_out=st.integers(0, 8), d_in=st.integers(0, 8), dtype=st.sampled_from(DTYPES),
       damping=st.sampled_from([0.0, 1e-3, 0.5, 10.0]), orthogonal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kron_ihvp_random_shapes(B, d_out, d_in, dtype, damping, orthogonal, seed):
    check(*make_inputs(B, d_out, d_in, dtype, seed, orthogonal), damping, dtype)


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_kron_ihvp_equals_explicit_kronecker_solve(damping):
    G, Q_S, Q_A, lam = make_inputs(3, 4, 3, seed=2)
    K = torch.kron(Q_S, Q_A)
    D = lam.flatten() + damping
    H = K @ torch.diag(D) @ K.T
    expected = torch.linalg.solve(H, G.flatten(1).T).T.reshape(G.shape)
    torch.testing.assert_close(ops.kron_ihvp(G, Q_S, Q_A, lam, damping), expected, rtol=1e-9, atol=1e-11)
    # The eigenbasis form is diag(D)^-1 K^T vec(G).
    eig = ((K.T @ G.flatten(1).T).T / D).reshape(G.shape)
    torch.testing.assert_close(ops.kron_ihvp(G, Q_S, Q_A, lam, damping, eigenbasis=True), eig,
                               rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kron_ihvp_identities(dtype):
    G, Q_S, Q_A, lam = make_inputs(5, 7, 6, dtype, seed=3)
    # Rotating the eigenbasis form back gives the full product.
    Y = ops.kron_ihvp(G, Q_S, Q_A, lam, 0.2, eigenbasis=True)
    assert_matches(Q_S @ Y @ Q_A.T, ops.kron_ihvp(G, Q_S, Q_A, lam, 0.2), dtype)
    # With unit eigenvalues and no damping, H = I for orthogonal bases.
    assert_matches(ops.kron_ihvp(G, Q_S, Q_A, torch.ones_like(lam), 0.0), G, dtype)
    # Damping alone (lam = 0) scales by 1/damping.
    assert_matches(ops.kron_ihvp(G, Q_S, Q_A, torch.zeros_like(lam), 4.0), G / 4, dtype)
    # Queries are independent: a batch equals its members one by one.
    one_by_one = torch.cat([ops.kron_ihvp(G[b:b + 1], Q_S, Q_A, lam, 0.2) for b in range(5)])
    assert_matches(ops.kron_ihvp(G, Q_S, Q_A, lam, 0.2), one_by_one, dtype)


def test_kron_ihvp_non_finite_propagates():
    G, Q_S, Q_A, lam = make_inputs(3, 4, 5, seed=4)
    G[1, 2, 3] = float("nan")
    out = ops.kron_ihvp(G, Q_S, Q_A, lam, 0.1)
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[[0, 2]]).all()
    # lam + damping == 0 divides by zero (IEEE, no check): inf in the eigenbasis form, as in the reference.
    G[1, 2, 3] = 0.0
    lam[2, 1] = 0.0
    eig = ops.kron_ihvp(G, Q_S, Q_A, lam, 0.0, eigenbasis=True)
    assert torch.isinf(eig[:, 2, 1]).all()
    torch.testing.assert_close(eig, reference.kron_ihvp(G, Q_S, Q_A, lam, 0.0, True))


def _bad_input_cases():
    G, Q_S, Q_A, lam = make_inputs(2, 3, 4, torch.float32)
    f64 = torch.float64
    return [
        ("G-rank", (G[0], Q_S, Q_A, lam, 0.1), ValueError, r"expected G to be a 3-d tensor"),
        ("Q_S-rank", (G, Q_S[0], Q_A, lam, 0.1), ValueError, r"expected Q_S to be a 2-d tensor"),
        ("Q_A-rank", (G, Q_S, Q_A[None], lam, 0.1), ValueError, r"expected Q_A to be a 2-d tensor"),
        ("lam-rank", (G, Q_S, Q_A, lam[0], 0.1), ValueError, r"expected lam to be a 2-d tensor"),
        ("Q_S-rows", (G, Q_S[:2], Q_A, lam, 0.1), ValueError, r"Q_S\.size\(0\) must equal G\.size\(1\) \(d_out\)"),
        ("Q_S-cols", (G, Q_S[:, :2], Q_A, lam, 0.1), ValueError, r"Q_S\.size\(1\) must equal G\.size\(1\)"),
        ("swapped-bases", (G, Q_A, Q_S, lam, 0.1), ValueError, r"Q_S\.size\(0\) must equal G\.size\(1\)"),
        ("Q_A-cols", (G, Q_S, Q_A[:, :3], lam, 0.1), ValueError, r"Q_A\.size\(1\) must equal G\.size\(2\) \(d_in\)"),
        ("lam-transposed", (G, Q_S, Q_A, lam.T, 0.1), ValueError, r"lam\.size\(0\) must equal G\.size\(1\)"),
        ("mixed-dtype", (G, Q_S.to(f64), Q_A, lam, 0.1), TypeError, r"Q_S has dtype Double but G has dtype Float"),
        ("mixed-dtype-lam", (G, Q_S, Q_A, lam.to(f64), 0.1), TypeError, r"lam has dtype Double"),
        ("float16-cpu", (G.half(), Q_S.half(), Q_A.half(), lam.half(), 0.1), TypeError,
         r"G must be float32 or float64 on CPU"),
        ("int", (G.int(), Q_S.int(), Q_A.int(), lam.int(), 0.1), TypeError, r"G must be float32 or float64.*Int"),
        ("damping-neg", (G, Q_S, Q_A, lam, -1e-3), ValueError, r"damping must be a finite number >= 0"),
        ("damping-nan", (G, Q_S, Q_A, lam, float("nan")), ValueError, r"damping must be a finite number >= 0, got nan"),
        ("damping-inf", (G, Q_S, Q_A, lam, float("inf")), ValueError, r"damping must be a finite number >= 0, got inf"),
        ("damping-beyond-float", (G, Q_S, Q_A, lam, 10**400), ValueError, r"damping must be a real number within the "
                                                                            r"float range"),
        # any truthy value used to select the eigenbasis form: "false" did
        ("eigenbasis-str", (G, Q_S, Q_A, lam, 0.1, "false"), TypeError, r"eigenbasis must be a bool, got str"),
    ]


@pytest.mark.parametrize("args, exc, match", [c[1:] for c in _bad_input_cases()],
                         ids=[c[0] for c in _bad_input_cases()])
def test_kron_ihvp_bad_input(args, exc, match):
    with pytest.raises(exc, match=f"kron_ihvp: {match}"):
        ops.kron_ihvp(*args)


def test_kron_ihvp_opcheck():
    G, Q_S, Q_A, lam = make_inputs(2, 3, 4, torch.float32)
    torch.library.opcheck(torch.ops.deltainf.kron_ihvp.default, (G, Q_S, Q_A, lam, 0.1))
    torch.library.opcheck(torch.ops.deltainf.kron_ihvp.default, (G, Q_S, Q_A, lam, 0.0, True))


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, d_out, d_in", SHAPES)
def test_kron_ihvp_cuda_matches_cpu(B, d_out, d_in, dtype):
    cpu = make_inputs(B, d_out, d_in, dtype)
    gpu = [t.cuda() for t in cpu]
    for eigenbasis in (False, True):
        assert_matches(ops.kron_ihvp(*gpu, 0.1, eigenbasis).cpu(), ops.kron_ihvp(*cpu, 0.1, eigenbasis), dtype)
    check(*gpu, 0.1, dtype)
    G, Q_S, Q_A, lam = gpu
    # Transposes of orthogonal bases are orthogonal bases, in column-major layout.
    check(G.transpose(1, 2).contiguous().transpose(1, 2), Q_S.T, Q_A.T, lam, 0.0, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=str)
def test_kron_ihvp_cuda_low_precision(low):
    G, Q_S, Q_A, lam = (t.to(device="cuda", dtype=low) for t in make_inputs(8, 96, 80, seed=5))
    exact = [t.double() for t in (G, Q_S, Q_A, lam)]

    def plain(G, Q_S, Q_A, lam, eigenbasis):
        scaled = (Q_S.T @ G @ Q_A) / (lam + 0.1)
        return scaled if eigenbasis else Q_S @ scaled @ Q_A.T

    for eigenbasis in (False, True):
        out = ops.kron_ihvp(G, Q_S, Q_A, lam, 0.1, eigenbasis)
        assert out.dtype == torch.float32
        ref64 = plain(*exact, eigenbasis)
        err = (out.double() - ref64).abs().max().item()
        err_plain = (plain(G, Q_S, Q_A, lam, eigenbasis).double() - ref64).abs().max().item()
        assert 0 < err_plain < float("inf")
        assert err <= 2 * err_plain + 1e-6 * ref64.abs().max().item(), (eigenbasis, err, err_plain)


@pytest.mark.cuda
def test_kron_ihvp_cuda_opcheck_and_errors():
    G, Q_S, Q_A, lam = (t.cuda() for t in make_inputs(2, 3, 4, torch.float32))
    torch.library.opcheck(torch.ops.deltainf.kron_ihvp.default, (G, Q_S, Q_A, lam, 0.1))
    torch.library.opcheck(torch.ops.deltainf.kron_ihvp.default, (G.half(), Q_S.half(), Q_A.half(), lam.half(), 0.1))
    with pytest.raises(ValueError, match=r"kron_ihvp: lam is on cpu but G is on cuda"):
        ops.kron_ihvp(G, Q_S, Q_A, lam.cpu(), 0.1)
    with pytest.raises(ValueError, match=r"kron_ihvp: Q_S is on cuda.* but G is on cpu"):
        ops.kron_ihvp(G.cpu(), Q_S, Q_A, lam, 0.1)
