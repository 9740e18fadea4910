"""Fused per-example gradient projection: kron_project and its square-sum and score epilogues.

R_i = sum_t (U^T g_it)(V^T a_it)^T for a (N,T,d_in), g (N,T,d_out), U (d_out,r_out), V (d_in,r_in).
The kernels are held to deltainf.reference on the same inputs; the CPU kernel has separate code
paths for T == 1 (outer products; the score contracts the wider rank first) and T > 1 (batched
GEMM), and processes examples in cache-sized blocks, so the shape table crosses all of them.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltainf import ops, reference

DTYPES = [torch.float32, torch.float64]
# rtol, and atol relative to the largest |expected| (sums of T * d products lose absolute precision
# in proportion to their magnitude, and entries that cancel to ~0 have no relative precision).
TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12)}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def make_inputs(N, T, d_in, d_out, r_in, r_out, Q=2, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

    return rand(N, T, d_in), rand(N, T, d_out), rand(d_out, r_out), rand(d_in, r_in), rand(Q, r_out, r_in)


def relayout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as t in a non-contiguous layout."""
    if kind == "contiguous":
        return t
    if kind == "transposed":  # column-major (all dims reversed in memory)
        dims = tuple(reversed(range(t.dim())))
        return t.permute(dims).contiguous().permute(dims)
    if kind == "strided":  # every other element of a wider last dim
        buf = t.new_full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"))
        buf[..., ::2] = t
        return buf[..., ::2]
    if kind == "sliced":  # an interior window of a larger tensor (storage offset, padded strides)
        buf = t.new_full(tuple(s + 2 for s in t.shape), float("nan"))
        window = buf[tuple(slice(1, s + 1) for s in t.shape)]
        window.copy_(t)
        return window
    raise AssertionError(kind)


def check_all_epilogues(a, g, U, V, P, dtype):
    R = ops.kron_project(a, g, U, V)
    assert R.dtype == dtype and R.shape == (a.shape[0], U.shape[1], V.shape[1])
    assert_matches(R, reference.kron_project(a, g, U, V), dtype)

    sq = ops.kron_project_square_sum(a, g, U, V)
    assert sq.dtype == dtype and sq.shape == (U.shape[1], V.shape[1])
    assert_matches(sq, reference.kron_project_square_sum(a, g, U, V), dtype)

    S = ops.kron_project_score(a, g, U, V, P)
    assert S.dtype == dtype and S.shape == (a.shape[0], P.shape[0])
    assert_matches(S, reference.kron_project_score(a, g, U, V, P), dtype)


# (N, T, d_in, d_out, r_in, r_out, Q)
SHAPES = [
    pytest.param(0, 3, 4, 5, 2, 3, 2, id="N0"),
    pytest.param(4, 0, 4, 5, 2, 3, 2, id="T0"),
    pytest.param(4, 3, 4, 5, 0, 3, 2, id="r_in0"),
    pytest.param(4, 3, 4, 5, 2, 0, 2, id="r_out0"),
    pytest.param(4, 1, 4, 5, 0, 3, 2, id="T1-r_in0"),
    pytest.param(4, 3, 0, 5, 2, 3, 2, id="d_in0"),
    pytest.param(4, 3, 4, 0, 2, 3, 2, id="d_out0"),
    pytest.param(4, 3, 4, 5, 2, 3, 0, id="Q0"),
    pytest.param(4, 1, 4, 5, 2, 3, 0, id="T1-Q0"),
    pytest.param(1, 1, 1, 1, 1, 1, 1, id="all1"),
    pytest.param(1, 1, 6, 5, 2, 3, 1, id="N1-T1"),
    pytest.param(1, 4, 6, 5, 2, 3, 1, id="N1-T4"),
    pytest.param(5, 1, 6, 5, 2, 4, 4, id="T1-r_out>r_in"),
    pytest.param(5, 1, 6, 5, 4, 2, 4, id="T1-r_out<r_in"),
    pytest.param(5, 1, 6, 5, 6, 5, 2, id="T1-r=d"),
    pytest.param(5, 4, 6, 5, 6, 5, 2, id="T4-r=d"),
    pytest.param(7, 9, 13, 11, 3, 4, 5, id="odd"),
    pytest.param(3000, 1, 33, 17, 8, 5, 3, id="large-T1"),  # several blocks of examples
    pytest.param(150, 20, 64, 48, 16, 12, 3, id="large-T20"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, T, d_in, d_out, r_in, r_out, Q", SHAPES)
def test_kron_project_matches_reference(N, T, d_in, d_out, r_in, r_out, Q, dtype):
    check_all_epilogues(*make_inputs(N, T, d_in, d_out, r_in, r_out, Q, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("layout", ["transposed", "strided", "sliced"])
def test_kron_project_non_contiguous(layout, T, dtype):
    a, g, U, V, P = make_inputs(6, T, 7, 5, 3, 4, 3, dtype, seed=1)
    nc = [relayout(t, layout) for t in (a, g, U, V, P)]
    for t in nc:
        assert not t.is_contiguous()
    check_all_epilogues(*nc, dtype)
    # The layout must not change the result beyond rounding.
    assert_matches(ops.kron_project(*nc[:4]), ops.kron_project(a, g, U, V), dtype)


@pytest.mark.parametrize("T", [1, 3])
def test_kron_project_broadcast_inputs(T):
    # Stride-0 (expanded) tensors: every example shares one activation, U is one repeated column.
    a, g, U, V, P = make_inputs(5, T, 6, 4, 3, 2, 2, torch.float64, seed=2)
    a = a[:1].expand_as(a)
    U = U[:, :1].expand_as(U)
    check_all_epilogues(a, g, U, V, P, torch.float64)


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(0, 6), T=st.integers(0, 4), d_in=st.integers(0, 7), d_out=st.integers(0, 7),
    r_in=st.integers(0, 7), r_out=st.integers(0, 7), Q=st.integers(0, 4),
    dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_kron_project_random_shapes(N, T, d_in, d_out, r_in, r_out, Q, dtype, layout, seed):
    inputs = make_inputs(N, T, d_in, d_out, r_in, r_out, Q, dtype, seed)
    check_all_epilogues(*[relayout(t, layout) for t in inputs], dtype)


def test_kron_project_hand_computed():
    # One example, two positions, identity bases: R = sum_t g_t a_t^T, the per-example gradient itself.
    a = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]], dtype=torch.float64)  # (1, 2, d_in=2)
    g = torch.tensor([[[2.0], [0.5]]], dtype=torch.float64)  # (1, 2, d_out=1)
    U, V = torch.eye(1, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    expected = torch.tensor([[[2 * 1 + 0.5 * 3, 2 * 2 + 0.5 * -1]]], dtype=torch.float64)
    torch.testing.assert_close(ops.kron_project(a, g, U, V), expected, rtol=0, atol=0)
    torch.testing.assert_close(ops.kron_project_square_sum(a, g, U, V), expected[0] ** 2, rtol=0, atol=0)
    P = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(ops.kron_project_score(a, g, U, V, P), torch.tensor([[3.5, 7.0]], dtype=torch.float64))


@pytest.mark.parametrize("T", [1, 3])
def test_kron_project_thread_count_independent(T):
    a, g, U, V, P = make_inputs(2500, T, 16, 12, 4, 3, 2, torch.float64, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [ops.kron_project(a, g, U, V), ops.kron_project_square_sum(a, g, U, V),
                  ops.kron_project_score(a, g, U, V, P)]
    finally:
        torch.set_num_threads(threads)
    multi = [ops.kron_project(a, g, U, V), ops.kron_project_square_sum(a, g, U, V),
             ops.kron_project_score(a, g, U, V, P)]
    for s, m in zip(single, multi):
        assert_matches(m, s, torch.float64)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kron_project_projection_blocks_wider_than_cache_steps(dtype, threads):
    # Each block projects at least 256 token rows at once (64 examples of 4 positions, capped at one block per
    # thread: 40 or 20 examples) while the square sum forms R_i a cache-sized step at a time: 2 MB budget, 614 KB
    # per example -> steps of 3 examples, the last of a block shorter.
    inputs = make_inputs(40, 4, 600, 256, 600, 256, 3, dtype, seed=7)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_all_epilogues(*inputs, dtype)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kron_project_score_in_row_tiles(dtype):
    # Wide enough that the CPU score epilogue forms R a few eigenbasis rows at a time (8 MB for a tile with its
    # query rows: in float32 tiles of 19, 19 and 2 of the 40 rows, in float64 of 9) over blocks of 32 examples
    # (the last one 8).
    a, g, U, V, P = make_inputs(40, 3, 2000, 40, 3000, 40, 4, dtype, seed=5)
    assert_matches(ops.kron_project_score(a, g, U, V, P), reference.kron_project_score(a, g, U, V, P), dtype)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_kron_project_non_finite_propagates(bad, T):
    # Policy (deltainf/ops.py): no scan for non-finite values; they propagate by IEEE arithmetic into
    # the results that depend on them, and only those.
    a, g, U, V, P = make_inputs(4, T, 5, 3, 2, 2, 2, torch.float64, seed=4)
    a[2, 0, 1] = bad
    R = ops.kron_project(a, g, U, V)
    assert not torch.isfinite(R[2]).any()
    assert torch.isfinite(R[[0, 1, 3]]).all()
    assert not torch.isfinite(ops.kron_project_square_sum(a, g, U, V)).all()
    S = ops.kron_project_score(a, g, U, V, P)
    assert not torch.isfinite(S[2]).any()
    assert torch.isfinite(S[[0, 1, 3]]).all()


def _bad_input_cases():
    a, g, U, V, P = make_inputs(3, 2, 4, 5, 2, 3, 2)
    f64 = torch.float64
    return [
        ("a-rank", (a[0], g, U, V), ValueError, r"expected a to be a 3-d tensor"),
        ("g-rank", (a, g[0], U, V), ValueError, r"expected g to be a 3-d tensor"),
        ("U-rank", (a, g, U[None], V), ValueError, r"expected U to be a 2-d tensor"),
        ("V-rank", (a, g, U, V[0]), ValueError, r"expected V to be a 2-d tensor"),
        ("N-mismatch", (a, g[:2], U, V), ValueError, r"g\.size\(0\) must equal a\.size\(0\)"),
        ("T-mismatch", (a, g[:, :1], U, V), ValueError, r"g\.size\(1\) must equal a\.size\(1\)"),
        ("d_out-mismatch", (a, g, U[:4], V), ValueError, r"U\.size\(0\) must equal g\.size\(2\)"),
        ("d_in-mismatch", (a, g, U, V[:3]), ValueError, r"V\.size\(0\) must equal a\.size\(2\)"),
        ("mixed-dtype-g", (a, g.to(f64), U, V), TypeError, r"g has dtype Double but a has dtype Float"),
        ("mixed-dtype-U", (a, g, U.to(f64), V), TypeError, r"U has dtype Double"),
        ("mixed-dtype-V", (a, g, U, V.to(f64)), TypeError, r"V has dtype Double"),
        ("float16-cpu", tuple(t.half() for t in (a, g, U, V)), TypeError, r"a must be float32 or float64 on CPU"),
        ("bfloat16-cpu", tuple(t.bfloat16() for t in (a, g, U, V)), TypeError, r"a must be float32 or float64"),
        ("int", tuple(t.int() for t in (a, g, U, V)), TypeError, r"a must be float32 or float64.*Int"),
    ]


@pytest.mark.parametrize("args, exc, match", [c[1:] for c in _bad_input_cases()],
                         ids=[c[0] for c in _bad_input_cases()])
@pytest.mark.parametrize("op", ["kron_project", "kron_project_square_sum", "kron_project_score"])
def test_kron_project_bad_input(op, args, exc, match):
    P = torch.zeros(2, 3, 2, dtype=args[0].dtype if args[0].is_floating_point() else torch.float32)
    call = {
        "kron_project": lambda: ops.kron_project(*args),
        "kron_project_square_sum": lambda: ops.kron_project_square_sum(*args),
        "kron_project_score": lambda: ops.kron_project_score(*args, P),
    }[op]
    with pytest.raises(exc, match=f"{op}: {match}"):
        call()


@pytest.mark.parametrize(
    "P_shape, P_dtype, exc, match",
    [
        ((2, 3), torch.float32, ValueError, r"expected P to be a 3-d tensor"),
        ((2, 4, 2), torch.float32, ValueError, r"P\.size\(1\) must equal U\.size\(1\) \(r_out\)"),
        ((2, 3, 5), torch.float32, ValueError, r"P\.size\(2\) must equal V\.size\(1\) \(r_in\)"),
        ((2, 3, 2), torch.float64, TypeError, r"P has dtype Double but a has dtype Float"),
    ],
)
def test_kron_project_score_bad_queries(P_shape, P_dtype, exc, match):
    a, g, U, V, _ = make_inputs(3, 2, 4, 5, 2, 3)
    with pytest.raises(exc, match=f"kron_project_score: {match}"):
        ops.kron_project_score(a, g, U, V, torch.zeros(P_shape, dtype=P_dtype))


def test_kron_project_meta_device_shapes():
    # The fake (meta) implementations give shapes and dtypes without data.
    a, g, U, V, P = (t.to("meta") for t in make_inputs(3, 2, 4, 5, 2, 3, 4))
    assert ops.kron_project(a, g, U, V).shape == (3, 3, 2)
    assert ops.kron_project_square_sum(a, g, U, V).shape == (3, 2)
    assert ops.kron_project_score(a, g, U, V, P).shape == (3, 4)


def test_kron_project_opcheck():
    # Schema, fake tensor and AOT-dispatch checks; both CPU code paths (T == 1 and T > 1).
    for T in (1, 3):
        a, g, U, V, P = make_inputs(3, T, 4, 5, 2, 3, 2)
        torch.library.opcheck(torch.ops.deltainf.kron_project.default, (a, g, U, V))
        torch.library.opcheck(torch.ops.deltainf.kron_project_square_sum.default, (a, g, U, V))
        torch.library.opcheck(torch.ops.deltainf.kron_project_score.default, (a, g, U, V, P))


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, T, d_in, d_out, r_in, r_out, Q", SHAPES)
def test_kron_project_cuda_matches_cpu(N, T, d_in, d_out, r_in, r_out, Q, dtype):
    cpu = make_inputs(N, T, d_in, d_out, r_in, r_out, Q, dtype)
    gpu = [t.cuda() for t in cpu]
    assert_matches(ops.kron_project(*gpu[:4]).cpu(), ops.kron_project(*cpu[:4]), dtype)
    assert_matches(ops.kron_project_square_sum(*gpu[:4]).cpu(), ops.kron_project_square_sum(*cpu[:4]), dtype)
    assert_matches(ops.kron_project_score(*gpu).cpu(), ops.kron_project_score(*cpu), dtype)
    check_all_epilogues(*gpu, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["transposed", "strided", "sliced"])
def test_kron_project_cuda_non_contiguous(layout):
    inputs = [relayout(t.cuda(), layout) for t in make_inputs(6, 3, 7, 5, 3, 4, 3, torch.float32, seed=1)]
    check_all_epilogues(*inputs, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 8])
def test_kron_project_cuda_low_precision(low, T):
    # flash-attn's rule: the kernel (fp32 accumulation, fp32 result) must be no further from the fp64
    # reference than a small multiple of plain PyTorch computing in the low-precision dtype.
    a, g, U, V, P = make_inputs(64, T, 96, 80, 16, 12, 4, torch.float64, seed=5)
    # Unit-scale projections, so that plain fp16 stays far from overflow and its error is meaningful.
    a, g, U, V = a / 96**0.5, g / 80**0.5, U / 80**0.5, V / 96**0.5
    a, g, U, V, P = (t.to(device="cuda", dtype=low) for t in (a, g, U, V, P))
    exact = [t.double() for t in (a, g, U, V, P)]

    def plain(a, g, U, V, P):
        R = (g @ U).transpose(1, 2) @ (a @ V)
        return R, (R * R).sum(0), R.flatten(1) @ P.flatten(1).T

    got = (ops.kron_project(a, g, U, V), ops.kron_project_square_sum(a, g, U, V), ops.kron_project_score(a, g, U, V, P))
    for name, out, ref64, ref_low in zip(("R", "square_sum", "score"), got, plain(*exact), plain(a, g, U, V, P)):
        assert out.dtype == torch.float32, name
        err = (out.double() - ref64).abs().max().item()
        err_plain = (ref_low.double() - ref64).abs().max().item()
        assert 0 < err_plain < float("inf"), (name, err_plain)
        assert err <= 2 * err_plain + 1e-6 * ref64.abs().max().item(), (name, err, err_plain)


@pytest.mark.cuda
def test_kron_project_cuda_opcheck_and_errors():
    a, g, U, V, P = (t.cuda() for t in make_inputs(3, 2, 4, 5, 2, 3, 2))
    torch.library.opcheck(torch.ops.deltainf.kron_project.default, (a, g, U, V))
    torch.library.opcheck(torch.ops.deltainf.kron_project_square_sum.default, (a, g, U, V))
    torch.library.opcheck(torch.ops.deltainf.kron_project_score.default, (a, g, U, V, P))
    with pytest.raises(ValueError, match=r"kron_project: U is on cpu but a is on cuda"):
        ops.kron_project(a, g, U.cpu(), V)
    with pytest.raises(ValueError, match=r"kron_project_score: P is on cpu but a is on cuda"):
        ops.kron_project_score(a, g, U, V, P.cpu())
    # A CPU activation with CUDA bases dispatches to the CUDA kernel, which must reject it too.
    with pytest.raises(ValueError, match=r"kron_project: g is on cuda.* but a is on cpu"):
        ops.kron_project(a.cpu(), g, U, V)
