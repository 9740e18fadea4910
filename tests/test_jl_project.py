"""Dense JL projection x (N, p) -> x Omega (N, k), Omega from a counter-based RNG keyed by (seed, row, col).

Omega itself is observable exactly: projecting the identity returns it row by row (every output is
one entry plus exact zeros), so the matrix is compared entry for entry with reference.jl_matrix and
across devices. The CPU kernel tiles Omega in 128-row x 256-column tiles and splits the feature
dimension across threads when there are few column blocks, so the shapes cross those boundaries.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from deltainf import ops, reference

DTYPES = [torch.float32, torch.float64]
DISTS = ["rademacher", "gaussian"]
TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12)}


def assert_matches(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def omega(p, k, seed, dist="rademacher", offset=0, dtype=torch.float64, device="cpu"):
    """The kernel's matrix, read back by projecting the identity."""
    return ops.jl_project(torch.eye(p, dtype=dtype, device=device), k, seed, dist, offset)


def relayout(t, kind):
    if kind == "contiguous":
        return t
    if kind == "transposed":
        return t.T.contiguous().T
    if kind == "strided":
        buf = t.new_full((t.shape[0], 2 * t.shape[1]), float("nan"))
        buf[:, ::2] = t
        return buf[:, ::2]
    if kind == "sliced":
        buf = t.new_full((t.shape[0] + 2, t.shape[1] + 3), float("nan"))
        buf[1:-1, 2:-1] = t
        return buf[1:-1, 2:-1]
    raise AssertionError(kind)


# (N, p, k, offset)
SHAPES = [
    pytest.param(0, 5, 7, 0, id="N0"),
    pytest.param(3, 0, 7, 0, id="p0"),
    pytest.param(1, 1, 1, 0, id="all1"),
    pytest.param(1, 5, 7, 3, id="N1"),
    pytest.param(5, 17, 64, 0, id="k64"),
    pytest.param(5, 17, 65, 0, id="k65"),
    pytest.param(4, 130, 100, 12345, id="p130"),  # crosses the 128-row tile
    pytest.param(3, 40, 257, 2**33 + 1, id="k257"),  # crosses the 256-column block
    pytest.param(2, 300, 1000, 0, id="k1000"),
    pytest.param(64, 1000, 3, 77, id="p1000-k3"),  # one column block: the features are split across threads
]


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, p, k, offset", SHAPES)
def test_jl_project_matches_reference(N, p, k, offset, dtype, dist):
    x = randn(N, p, dtype=dtype, seed=N + p + k)
    out = ops.jl_project(x, k, 7, dist, offset)
    assert out.dtype == dtype and out.shape == (N, k)
    assert_matches(out, reference.jl_project(x, k, 7, dist, offset), dtype)


@pytest.mark.parametrize("layout", ["transposed", "strided", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_jl_project_non_contiguous(dtype, layout):
    x = randn(6, 150, dtype=dtype, seed=1)
    xs = relayout(x, layout)
    assert not xs.is_contiguous()
    for dist in DISTS:
        assert_matches(ops.jl_project(xs, 33, 3, dist), reference.jl_project(x, 33, 3, dist), dtype)


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(0, 5), p=st.integers(0, 200), k=st.integers(1, 200), seed=st.integers(0, 2**63 - 1),
    offset=st.integers(0, 2**45), dist=st.sampled_from(DISTS), dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]),
)
def test_jl_project_random_shapes(N, p, k, seed, offset, dist, dtype, layout):
    x = randn(N, p, dtype=dtype, seed=p)
    out = ops.jl_project(relayout(x, layout), k, seed, dist, offset)
    assert_matches(out, reference.jl_project(x, k, seed, dist, offset), dtype)


@pytest.mark.parametrize("k", [1, 7, 100, 257, 1000])
def test_jl_rademacher_matrix_equals_reference_exactly(k):
    M = omega(300, k, seed=11)
    assert torch.equal(M, reference.jl_matrix(300, k, 11, dtype=torch.float64))
    # Every entry is exactly +-1/sqrt(k).
    assert torch.equal(M.abs(), torch.full_like(M, 1.0 / math.sqrt(k)))


@pytest.mark.parametrize("k", [6, 7, 1000])
def test_jl_rademacher_matrix_equals_reference_exactly_float32(k):
    M = omega(20, k, seed=11, dtype=torch.float32)
    assert torch.equal(M, reference.jl_matrix(20, k, 11, dtype=torch.float32))


def test_jl_gaussian_float32_polynomials_accurate_over_many_draws():
    """The float32 Box-Muller polynomials against float64 libm over 2^18 pairs (both columns of k = 2):
    largest error below 1e-6 in N(0, 1) units, including the tails (|z| up to ~5)."""
    eye = torch.eye(1 << 12)  # Omega's rows read back 4096 at a time, through the offset
    got, want = [], []
    for off in range(0, 1 << 18, 1 << 12):
        got.append(ops.jl_project(eye, 2, 3, "gaussian", off))
        want.append(reference.jl_matrix(1 << 12, 2, 3, "gaussian", off, dtype=torch.float64))
    got, want = torch.cat(got).double() * math.sqrt(2), torch.cat(want) * math.sqrt(2)
    assert want.abs().max() > 4.5  # the tails were drawn
    assert (got - want).abs().max() < 1e-6


@pytest.mark.parametrize("k", [1, 7, 257])
def test_jl_gaussian_matrix_matches_reference(k):
    torch.testing.assert_close(omega(200, k, 5, "gaussian"),
                               reference.jl_matrix(200, k, 5, "gaussian", dtype=torch.float64),
                               rtol=1e-12, atol=1e-14)
    # float32 draws use the same 24-bit uniforms; the float32 Box-Muller runs on branch-free polynomials
    # (rng.h), within 7e-7 of the float64 libm values in N(0, 1) units.
    torch.testing.assert_close(omega(200, k, 5, "gaussian", dtype=torch.float32),
                               reference.jl_matrix(200, k, 5, "gaussian", dtype=torch.float32),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dist", DISTS)
def test_jl_preserves_norms(dist):
    # JL: ||x Omega||^2 / ||x||^2 concentrates at 1 with standard deviation ~ sqrt(2/k).
    k = 1024
    x = randn(200, 300, seed=21)
    ratio = ops.jl_project(x, k, 3, dist).square().sum(1) / x.square().sum(1)
    within = ((ratio - 1).abs() < 4 / math.sqrt(k)).double().mean().item()
    assert within >= 0.98, within
    assert abs(ratio.mean().item() - 1) < 5 * math.sqrt(2 / k / 200)


@pytest.mark.parametrize("dist", DISTS)
def test_jl_omega_moments(dist):
    k, p = 1024, 256
    M = omega(p, k, seed=99, dist=dist)
    n = M.numel()
    assert abs(M.mean().item()) < 5 / math.sqrt(k * n)
    assert abs(M.var().item() * k - 1) < 0.02
    # Columns are uncorrelated (a stuck bit position or a Box-Muller pair mix-up would show here).
    C = (M.T @ M) * (k / p)  # ~ identity
    off = C - torch.diag(torch.diagonal(C))
    assert off.abs().max().item() < 6 / math.sqrt(p)
    if dist == "rademacher":
        # Each of the 64 bit positions of a draw is balanced.
        neg = (M < 0).double().reshape(p, k // 64, 64).mean((0, 1))
        assert (neg - 0.5).abs().max().item() < 5 * 0.5 / math.sqrt(p * k // 64)
    else:
        z = (M * math.sqrt(k)).flatten().numpy()
        assert stats.kstest(z, "norm").pvalue > 1e-3
        assert abs(np.mean(z**4) - 3) < 0.1  # Gaussian kurtosis


@pytest.mark.parametrize("dist", DISTS)
def test_jl_deterministic(dist):
    x = randn(20, 500, dtype=torch.float32, seed=3)
    assert torch.equal(ops.jl_project(x, 300, 42, dist), ops.jl_project(x, 300, 42, dist))
    # Omega does not depend on how the work is split across threads.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_M, single_y = omega(300, 300, 42, dist), ops.jl_project(x, 300, 42, dist)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single_M, omega(300, 300, 42, dist))
    assert_matches(ops.jl_project(x, 300, 42, dist), single_y, torch.float32)


@pytest.mark.parametrize("dist", DISTS)
def test_jl_seeds_differ(dist):
    a, b, c = omega(64, 128, 0, dist), omega(64, 128, 1, dist), omega(64, 128, 2**63 - 1, dist)
    for u, v in ((a, b), (a, c), (b, c)):
        assert (u == v).double().mean().item() < (0.6 if dist == "rademacher" else 0.01)
    # The two distributions use separate key streams.
    other = "gaussian" if dist == "rademacher" else "rademacher"
    assert (torch.sign(a) == torch.sign(omega(64, 128, 0, other))).double().mean().item() < 0.6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTS)
def test_jl_chunked_with_offset_equals_one_shot(dist, dtype):
    x = randn(7, 1000, dtype=dtype, seed=5)
    whole = ops.jl_project(x, 257, 9, dist)
    bounds = [0, 1, 137, 600, 999, 1000]
    chunks = sum(ops.jl_project(x[:, s:e], 257, 9, dist, offset=s) for s, e in zip(bounds, bounds[1:]))
    assert_matches(chunks, whole, dtype)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("offset", [2**32 - 3, 2**40, 2**62 + 5])
def test_jl_64bit_offsets(offset, dist):
    M = omega(10, 70, 4, dist, offset)
    expected = reference.jl_matrix(10, 70, 4, dist, offset, dtype=torch.float64)
    if dist == "rademacher":
        assert torch.equal(M, expected)
    else:
        torch.testing.assert_close(M, expected, rtol=1e-12, atol=1e-14)
    # Row indices are not truncated to 32 bits: rows that agree in their low 32 bits differ.
    alias = omega(10, 70, 4, dist, offset ^ 2**32)
    assert (M == alias).double().mean().item() < 0.6
    # Chunking works at large offsets too.
    x = randn(3, 10, seed=6)
    halves = ops.jl_project(x[:, :4], 70, 4, dist, offset) + ops.jl_project(x[:, 4:], 70, 4, dist, offset + 4)
    assert_matches(halves, ops.jl_project(x, 70, 4, dist, offset), torch.float64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_jl_non_finite_propagates(bad):
    x = randn(4, 50, seed=7)
    x[1, 3] = bad
    out = ops.jl_project(x, 20, 0)
    assert not torch.isfinite(out[1]).any()
    assert torch.isfinite(out[[0, 2, 3]]).all()


X = torch.zeros(3, 4)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ops.jl_project(X[0], 3, 0), ValueError, r"jl_project: expected x to be a 2-d tensor"),
        (lambda: ops.jl_project(X[None], 3, 0), ValueError, r"jl_project: expected x to be a 2-d tensor"),
        (lambda: ops.jl_project(X.half(), 3, 0), TypeError, r"jl_project: x must be float32 or float64 on CPU"),
        (lambda: ops.jl_project(X.bfloat16(), 3, 0), TypeError, r"jl_project: x must be float32 or float64"),
        (lambda: ops.jl_project(X.long(), 3, 0), TypeError, r"jl_project: x must be float32 or float64.*Long"),
        (lambda: ops.jl_project(X, 0, 0), ValueError, r"jl_project: k .* must be >= 1, got 0"),
        (lambda: ops.jl_project(X, -5, 0), ValueError, r"jl_project: k .* must be >= 1, got -5"),
        (lambda: ops.jl_project(X, 3, -1), ValueError, r"jl_project: seed must be an int in \[0, 2\*\*63 - 1\]"),
        (lambda: ops.jl_project(X, 3, 2**63), ValueError, r"jl_project: seed must be an int"),
        (lambda: ops.jl_project(X, 3, 1.5), ValueError, r"jl_project: seed must be an int"),
        (lambda: ops.jl_project(X, 3, True), ValueError, r"jl_project: seed must be an int"),
        (lambda: ops.jl_project(X, 3, 0, offset=-1), ValueError, r"jl_project: offset must be an int in \[0, 2\*\*63"),
        (lambda: ops.jl_project(X, 7.0, 0), TypeError, r"jl_project: k must be an int, got float"),
        (lambda: ops.jl_project(X, 3, 0, offset=2**63), ValueError, r"jl_project: offset must be an int in"),
        (lambda: ops.jl_project(X, 3, 0, offset=2**63 - 2), ValueError, r"jl_project: offset .* must be in \[0, 2\*\*63 - 1 - p\]"),
        (lambda: ops.jl_project(X, 2**31, 0), ValueError, r"jl_project: k .* must be at most max\(p, 65536\)"),
        (lambda: ops.jl_project(X, 3, 0, "normal"), ValueError, r"jl_project: dist must be 'rademacher' or 'gaussian'"),
        (lambda: ops.jl_project(X, 3, 0, "Gaussian"), ValueError, r"jl_project: dist must be"),
        (lambda: ops.jl_project(X, 2**64, 0), ValueError, r"jl_project: k must be an int in the int64 range"),
        # The registered op validates by itself too (other libraries may call torch.ops directly).
        (lambda: torch.ops.deltainf.jl_project(X, 3, -1), ValueError, r"jl_project: seed must be >= 0"),
        (lambda: torch.ops.deltainf.jl_project(X, 3, 0, "normal"), ValueError, r"jl_project: dist must be"),
    ],
    ids=["rank1", "rank3", "float16", "bfloat16", "int64", "k0", "k-neg", "seed-neg", "seed-big", "seed-float",
         "seed-bool", "offset-neg", "k-float", "offset-beyond-int64", "offset-plus-p-beyond-int64", "k-huge", "dist-unknown", "dist-case", "k-beyond-int64", "op-seed-neg",
         "op-dist-unknown"],
)
def test_jl_project_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_jl_project_opcheck():
    x = randn(3, 10, dtype=torch.float32)
    torch.library.opcheck(torch.ops.deltainf.jl_project.default, (x, 7, 3))
    torch.library.opcheck(torch.ops.deltainf.jl_project.default, (x, 300, 2**40, "gaussian", 2**33))


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 7, 100, 257, 1000])
def test_jl_cuda_matrix_equals_cpu(k, dtype):
    # The same Omega on every device: bit-identical for Rademacher; for Gaussian the same arithmetic
    # (float32: rng.h's polynomials; float64: each device's libm), up to rounding and FMA contraction.
    for offset in (0, 2**40):
        cpu = omega(300, k, 17, "rademacher", offset, dtype)
        assert torch.equal(omega(300, k, 17, "rademacher", offset, dtype, "cuda").cpu(), cpu)
        cpu = omega(300, k, 17, "gaussian", offset, dtype)
        gpu = omega(300, k, 17, "gaussian", offset, dtype, "cuda").cpu()
        if dtype == torch.float64:
            torch.testing.assert_close(gpu, cpu, rtol=1e-12, atol=1e-14)
        else:
            torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, p, k, offset", SHAPES)
def test_jl_cuda_matches_cpu(N, p, k, offset, dtype, dist):
    x = randn(N, p, dtype=dtype, seed=N + p + k)
    assert_matches(ops.jl_project(x.cuda(), k, 7, dist, offset).cpu(), ops.jl_project(x, k, 7, dist, offset), dtype)
    xs = relayout(x.cuda(), "transposed") if N and p else x.cuda()
    assert_matches(ops.jl_project(xs, k, 7, dist, offset).cpu(), reference.jl_project(x, k, 7, dist, offset), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=str)
def test_jl_cuda_low_precision(low, dist):
    x = randn(64, 2048, dtype=low, seed=8).cuda()
    out = ops.jl_project(x, 512, 1, dist)
    assert out.dtype == torch.float32
    M = reference.jl_matrix(2048, 512, 1, dist, dtype=torch.float64).cuda()
    ref64 = x.double() @ M
    err = (out.double() - ref64).abs().max().item()
    err_plain = ((x @ M.to(low)).double() - ref64).abs().max().item()
    assert 0 < err_plain < float("inf")
    assert err <= 2 * err_plain + 1e-6 * ref64.abs().max().item(), (err, err_plain)


@pytest.mark.cuda
def test_jl_cuda_opcheck():
    x = randn(3, 10, dtype=torch.float32).cuda()
    torch.library.opcheck(torch.ops.deltainf.jl_project.default, (x, 7, 3))
    torch.library.opcheck(torch.ops.deltainf.jl_project.default, (x.half(), 300, 2**40, "gaussian", 2**33))
