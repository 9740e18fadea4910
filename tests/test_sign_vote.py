"""Batched sign vote of Delta-Influence and the combination of flags across affected test points.

votes[p, i] = #{j : transformed[p, j, i] - base[p, i] < threshold}, flags = votes >= min_votes.
Votes are integers, so every comparison with the reference is exact (torch.equal). Scores are often
drawn as small integers so that ties (delta == threshold, which must not vote) are frequent.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltainf import ops, reference

DTYPES = [torch.float32, torch.float64]
INF, NAN = math.inf, math.nan


def scores(P, n, N, dtype=torch.float64, seed=0, integer=True):
    gen = torch.Generator().manual_seed(seed)
    if integer:
        base = torch.randint(-3, 4, (P, N), generator=gen).to(dtype)
        transformed = torch.randint(-3, 4, (P, n, N), generator=gen).to(dtype)
    else:
        base = torch.randn(P, N, generator=gen, dtype=torch.float64).to(dtype)
        transformed = torch.randn(P, n, N, generator=gen, dtype=torch.float64).to(dtype)
    return base, transformed


def assert_vote_matches(base, transformed, threshold, min_votes):
    votes, flags = ops.sign_vote(base, transformed, threshold, min_votes=min_votes)
    ref_votes, ref_flags = reference.sign_vote(base, transformed, threshold, min_votes)
    assert votes.dtype == torch.int32 and flags.dtype == torch.bool
    assert votes.shape == flags.shape == base.shape
    assert torch.equal(votes, ref_votes)
    assert torch.equal(flags, ref_flags)
    return votes, flags


def test_sign_vote_hand_computed():
    base = torch.tensor([[0.0, 1.0, NAN, 2.0]])
    transformed = torch.tensor([[
        [-1.0, 1.0, 0.0, -INF],
        [0.5, 0.0, -5.0, INF],
        [NAN, -INF, -1.0, 2.0],
    ]])
    # delta:  [-1, 0, nan, -inf] / [0.5, -1, nan, inf] / [nan, -inf, nan, 0]
    votes, flags = ops.sign_vote(base, transformed, 0.0, min_votes=2)
    assert votes.tolist() == [[1, 2, 0, 1]]
    assert flags.tolist() == [[False, True, False, False]]
    votes, _ = ops.sign_vote(base, transformed, 0.75, min_votes=1)
    assert votes.tolist() == [[2, 3, 0, 2]]  # 0.5 < 0.75 and 0 < 0.75 now vote; nan and +inf never
    votes, _ = ops.sign_vote(base, transformed, -1.0, min_votes=1)
    assert votes.tolist() == [[0, 1, 0, 1]]  # strictly below: a delta equal to the threshold does not vote


# (P, n, N)
SHAPES = [
    pytest.param(0, 5, 7, id="P0"),
    pytest.param(2, 0, 7, id="n0"),
    pytest.param(2, 5, 0, id="N0"),
    pytest.param(1, 1, 1, id="all1"),
    pytest.param(1, 50, 511, id="N511"),
    pytest.param(3, 7, 512, id="N512"),  # the CPU kernel walks examples in chunks of 512
    pytest.param(2, 50, 513, id="N513"),
    pytest.param(3, 50, 5000, id="large"),
]


@pytest.mark.parametrize("threshold", [0.0, -1.0, 0.5, INF, -INF])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("P, n, N", SHAPES)
def test_sign_vote_matches_reference(P, n, N, dtype, threshold):
    for integer in (True, False):
        base, transformed = scores(P, n, N, dtype, seed=P + n + N, integer=integer)
        ref_votes, _ = reference.sign_vote(base, transformed, threshold, 1)
        for min_votes in (0, 1, max(n // 2, 1), n, n + 1):
            votes, flags = ops.sign_vote(base, transformed, threshold, min_votes=min_votes)
            assert votes.dtype == torch.int32 and flags.dtype == torch.bool and flags.shape == base.shape
            assert torch.equal(votes, ref_votes)
            assert torch.equal(flags, ref_votes >= min_votes)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sign_vote_non_contiguous(dtype):
    base, transformed = scores(3, 9, 600, dtype, seed=1)
    base_t = base.T.contiguous().T  # column-major
    trans_t = transformed.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # stored (n, N, P)
    assert not base_t.is_contiguous() and not trans_t.is_contiguous()
    votes, flags = assert_vote_matches(base_t, trans_t, 0.0, 4)
    assert torch.equal(votes, ops.sign_vote(base, transformed, 0.0, min_votes=4)[0])
    # Strided slices (every other test point / copy / example) and a broadcast base.
    assert_vote_matches(base[::2, ::3], transformed[::2, ::2, ::3], 0.5, 2)
    assert_vote_matches(base[:, :1].expand(3, 600), transformed, -1.0, 2)


@settings(max_examples=25, deadline=None)
@given(P=st.integers(0, 4), n=st.integers(0, 12), N=st.integers(0, 1100), dtype=st.sampled_from(DTYPES),
       threshold=st.one_of(st.sampled_from([0.0, -INF, INF]), st.floats(-4, 4)), min_votes=st.integers(0, 14),
       integer=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_sign_vote_random(P, n, N, dtype, threshold, min_votes, integer, seed):
    base, transformed = scores(P, n, N, dtype, seed, integer)
    assert_vote_matches(base, transformed, threshold, min_votes)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sign_vote_nan_never_votes(dtype):
    base, transformed = scores(2, 6, 40, dtype, seed=2, integer=False)
    base[0, 3] = NAN
    transformed[1, :4, 7] = NAN
    for threshold in (0.0, 10.0, INF):
        votes, flags = assert_vote_matches(base, transformed, threshold, 1)
        assert votes[0, 3] == 0 and not flags[0, 3]
        assert votes[1, 7] <= 2  # only the two finite copies can vote
    assert ops.sign_vote(base, transformed, INF, min_votes=1)[0][1, 7] == 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sign_vote_infinite_threshold(dtype):
    base, transformed = scores(2, 5, 30, dtype, seed=3, integer=False)
    transformed[0, 0, 0] = INF  # delta +inf: not < +inf
    transformed[0, 1, 1] = -INF  # delta -inf: not < -inf
    votes, _ = assert_vote_matches(base, transformed, INF, 1)
    expected = torch.full_like(votes, 5)
    expected[0, 0] = 4
    assert torch.equal(votes, expected)  # every finite delta votes
    votes, flags = assert_vote_matches(base, transformed, -INF, 1)
    assert not votes.any() and not flags.any()  # nothing is below -inf
    # A huge finite threshold overflows to +inf in float32 and behaves like it.
    assert_vote_matches(base, transformed, 1e300, 1)
    assert_vote_matches(base, transformed, -1e300, 1)


def test_sign_vote_min_votes_edges():
    base, transformed = scores(2, 4, 50, seed=4)
    base[0, 0] = NAN
    votes, flags = assert_vote_matches(base, transformed, 0.0, 0)
    assert flags.all()  # min_votes=0 flags every example, even one that never votes
    _, flags = assert_vote_matches(base, transformed, 0.0, 5)
    assert not flags.any()  # more votes than copies
    # No copies at all: zero votes; only min_votes=0 flags.
    votes, flags = ops.sign_vote(base, transformed[:, :0], 0.0, min_votes=0)
    assert not votes.any() and flags.all()


@pytest.mark.parametrize("min_votes", [2**31, 2**32 + 1, 2**40])
def test_sign_vote_min_votes_beyond_int32(min_votes):
    base, transformed = torch.zeros(1, 3), torch.full((1, 2, 3), -1.0)
    votes, flags = ops.sign_vote(base, transformed, 0.0, min_votes=min_votes)
    assert votes.tolist() == [[2, 2, 2]]
    assert not flags.any()  # nobody has 2**31 votes


def test_sign_vote_threshold_rounds_to_input_dtype():
    # float32 scores are compared in float32, so the threshold is rounded to float32 first (as torch
    # does for `float32_tensor < python_float`): 0.0999999950 rounds to the delta itself, which is then
    # not strictly below it, although it is below it in float64.
    just_below = torch.nextafter(torch.tensor(0.1, dtype=torch.float32), torch.tensor(0.0)).item()
    base = torch.zeros(1, 1)
    transformed = torch.tensor([[[just_below]]])
    votes, _ = assert_vote_matches(base, transformed, 0.0999999950, 1)
    assert votes.item() == 0
    votes, _ = assert_vote_matches(base.double(), transformed.double(), 0.0999999950, 1)
    assert votes.item() == 1


# --------------------------------------------------------------------------------------- combine_flags


def test_combine_flags_any_all_at_least():
    flags = torch.tensor([
        [True, False, True, False, True],
        [True, False, False, False, True],
        [True, True, False, False, False],
    ])
    assert ops.combine_flags(flags, 1).tolist() == [True, True, True, False, True]  # any
    assert ops.combine_flags(flags, 2).tolist() == [True, False, False, False, True]  # at least 2
    assert ops.combine_flags(flags, 3).tolist() == [True, False, False, False, False]  # all
    assert ops.combine_flags(flags[:1], 1).tolist() == flags[0].tolist()  # P = 1


@pytest.mark.parametrize("P, N", [(1, 0), (1, 1), (3, 7), (5, 4095), (4, 10000)])
def test_combine_flags_matches_reference(P, N):
    gen = torch.Generator().manual_seed(P * N)
    flags = torch.rand(P, N, generator=gen) < 0.4
    for m in range(1, P + 1):
        out = ops.combine_flags(flags, m)
        assert out.dtype == torch.bool and out.shape == (N,)
        assert torch.equal(out, reference.combine_flags(flags, m))
    assert torch.equal(ops.combine_flags(flags, 1), flags.any(0))
    assert torch.equal(ops.combine_flags(flags, P), flags.all(0))
    # Non-contiguous flags (column-major, and a strided slice).
    assert torch.equal(ops.combine_flags(flags.T.contiguous().T, 1), flags.any(0))
    assert torch.equal(ops.combine_flags(flags[:, ::2], P), flags[:, ::2].all(0))


@settings(max_examples=25, deadline=None)
@given(P=st.integers(1, 6), N=st.integers(0, 300), data=st.data())
def test_combine_flags_random(P, N, data):
    flags = torch.tensor(data.draw(st.lists(st.booleans(), min_size=P * N, max_size=P * N)),
                         dtype=torch.bool).reshape(P, N)
    m = data.draw(st.integers(1, P))
    assert torch.equal(ops.combine_flags(flags, m), reference.combine_flags(flags, m))


def test_vote_then_combine_end_to_end():
    # Two affected points, four copies each. Example 0 collapses for both points, example 1 for the
    # first only, example 2 for neither.
    base = torch.tensor([[5.0, 5.0, 5.0], [3.0, 3.0, 3.0]])
    drop = torch.tensor([[9.0, 9.0, 0.0], [9.0, 0.0, 0.0]])
    transformed = (base - drop).unsqueeze(1).expand(2, 4, 3).clone()
    votes, flags = ops.sign_vote(base, transformed, -1.0, min_votes=4)
    assert votes.tolist() == [[4, 4, 0], [4, 0, 0]]
    assert flags.tolist() == [[True, True, False], [True, False, False]]
    assert ops.combine_flags(flags, 1).tolist() == [True, True, False]
    assert ops.combine_flags(flags, 2).tolist() == [True, False, False]


# ------------------------------------------------------------------------------------------ bad input

B, T = torch.zeros(2, 5), torch.zeros(2, 3, 5)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ops.sign_vote(B[0], T, 0.0, min_votes=1), ValueError, r"sign_vote: expected base to be a 2-d tensor"),
        (lambda: ops.sign_vote(B, T[0], 0.0, min_votes=1), ValueError,
         r"sign_vote: expected transformed to be a 3-d tensor"),
        (lambda: ops.sign_vote(B, T[:1], 0.0, min_votes=1), ValueError,
         r"sign_vote: transformed\.size\(0\) must equal base\.size\(0\) \(test points P\)"),
        (lambda: ops.sign_vote(B, T[..., :4], 0.0, min_votes=1), ValueError,
         r"sign_vote: transformed\.size\(2\) must equal base\.size\(1\) \(training examples N\)"),
        (lambda: ops.sign_vote(B, T.double(), 0.0, min_votes=1), TypeError,
         r"sign_vote: transformed has dtype Double but base has dtype Float"),
        (lambda: ops.sign_vote(B.half(), T.half(), 0.0, min_votes=1), TypeError,
         r"sign_vote: base must be float32 or float64 on CPU"),
        (lambda: ops.sign_vote(B.int(), T.int(), 0.0, min_votes=1), TypeError,
         r"sign_vote: base must be float32 or float64.*Int"),
        (lambda: ops.sign_vote(B, T, NAN, min_votes=1), ValueError, r"sign_vote: threshold must be a number, got NaN"),
        (lambda: ops.sign_vote(B, T, 0.0, min_votes=-1), ValueError, r"sign_vote: min_votes must be >= 0, got -1"),
        (lambda: ops.sign_vote(B, T, 0.0), TypeError, r"min_votes"),
        # beyond int64 / the float range: a one-line error naming the argument, not torch's schema error
        (lambda: ops.sign_vote(B, T, 0.0, min_votes=2**63), ValueError,
         r"sign_vote: min_votes must be an int in the int64 range"),
        (lambda: ops.sign_vote(B, T, 10**400, min_votes=1), ValueError,
         r"sign_vote: threshold must be a real number within the float range"),
        (lambda: ops.combine_flags(B > 0, 2**64), ValueError, r"combine_flags: min_points must be an int in the int64"),
        (lambda: ops.combine_flags(B > 0, 0), ValueError,
         r"combine_flags: min_points must be in \[1, P\] = \[1, 2\], got 0"),
        (lambda: ops.combine_flags(B > 0, 3), ValueError,
         r"combine_flags: min_points must be in \[1, P\] = \[1, 2\], got 3"),
        (lambda: ops.combine_flags(B > 0, -1), ValueError, r"combine_flags: min_points must be in"),
        (lambda: ops.combine_flags(B, 1), TypeError, r"combine_flags: flags must be a bool tensor, got Float"),
        (lambda: ops.combine_flags((B > 0).int(), 1), TypeError, r"combine_flags: flags must be a bool tensor"),
        (lambda: ops.combine_flags(B[0] > 0, 1), ValueError, r"combine_flags: expected flags to be a 2-d tensor"),
        (lambda: ops.combine_flags(B[:0] > 0, 1), ValueError,
         r"combine_flags: flags must hold at least one test point"),
    ],
    ids=["base-rank", "transformed-rank", "P-mismatch", "N-mismatch", "mixed-dtype", "float16-cpu", "int",
         "threshold-nan", "min_votes-neg", "min_votes-missing", "min_votes-beyond-int64", "threshold-beyond-float",
         "min_points-beyond-int64", "min_points-0", "min_points-above-P",
         "min_points-neg", "flags-float", "flags-int", "flags-rank", "flags-P0"],
)
def test_sign_vote_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_sign_vote_opcheck():
    base, transformed = scores(2, 5, 9, torch.float32, integer=False)
    torch.library.opcheck(torch.ops.deltainf.sign_vote.default, (base, transformed, 0.0), {"min_votes": 2})
    torch.library.opcheck(torch.ops.deltainf.combine_flags.default, (transformed[:, 0] > 0, 1))


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("P, n, N", SHAPES)
def test_sign_vote_cuda_matches_cpu(P, n, N, dtype):
    for integer in (True, False):
        base, transformed = scores(P, n, N, dtype, seed=N, integer=integer)
        if N:
            base[0 % max(P, 1):, 0] = NAN if P else 0.0
        for threshold in (0.0, -0.5, INF, -INF):
            votes, flags = ops.sign_vote(base.cuda(), transformed.cuda(), threshold, min_votes=max(n // 2, 1))
            assert votes.device.type == "cuda"
            if dtype in (torch.float32, torch.float64):
                cpu = ops.sign_vote(base, transformed, threshold, min_votes=max(n // 2, 1))
            else:
                # Low precision: deltas are formed in float32 (exact ties stay ties), as in the reference.
                cpu = reference.sign_vote(base, transformed, threshold, max(n // 2, 1))
            assert torch.equal(votes.cpu(), cpu[0])
            assert torch.equal(flags.cpu(), cpu[1])
        if P and n and N:  # non-contiguous on the device: column-major base, transformed stored (n, N, P)
            base_t = base.cuda().T.contiguous().T
            trans_t = transformed.cuda().permute(1, 2, 0).contiguous().permute(2, 0, 1)
            votes, _ = ops.sign_vote(base_t, trans_t, 0.0, min_votes=1)
            assert torch.equal(votes.cpu(), reference.sign_vote(base, transformed, 0.0, 1)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("P, N", [(1, 0), (3, 7), (4, 100000)])
def test_combine_flags_cuda_matches_cpu(P, N):
    flags = torch.rand(P, N, generator=torch.Generator().manual_seed(0)) < 0.5
    for m in range(1, P + 1):
        assert torch.equal(ops.combine_flags(flags.cuda(), m).cpu(), ops.combine_flags(flags, m))
    assert torch.equal(ops.combine_flags(flags.cuda().T.contiguous().T, P).cpu(), flags.all(0))


@pytest.mark.cuda
def test_sign_vote_cuda_opcheck_and_errors():
    base, transformed = (t.cuda() for t in scores(2, 5, 9, torch.float32, integer=False))
    torch.library.opcheck(torch.ops.deltainf.sign_vote.default, (base, transformed, 0.0), {"min_votes": 2})
    torch.library.opcheck(torch.ops.deltainf.sign_vote.default, (base.half(), transformed.half(), 0.0),
                          {"min_votes": 2})
    torch.library.opcheck(torch.ops.deltainf.combine_flags.default, (transformed[:, 0] > 0, 1))
    with pytest.raises(ValueError, match=r"sign_vote: transformed is on cpu but base is on cuda"):
        ops.sign_vote(base, transformed.cpu(), 0.0, min_votes=1)
    with pytest.raises(ValueError, match=r"sign_vote: threshold must be a number, got NaN"):
        ops.sign_vote(base, transformed, NAN, min_votes=1)
