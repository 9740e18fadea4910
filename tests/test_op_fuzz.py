"""The op fuzzer (tests/op_fuzz.py): a short profile on every run, the long one behind `-m fuzz`.

Every drawn call must succeed identically on the CPU kernel, under FakeTensorMode and on meta tensors
(shapes and dtypes) and match the reference (values and gradients), or fail identically everywhere
with a clear ValueError/TypeError naming the op."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import op_fuzz

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("op", op_fuzz.OPS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=op_fuzz.st.data())
def test_op_contract_short_profile(op, data):
    op_fuzz.check_call(data.draw(op_fuzz.calls((op,))))


@pytest.mark.parametrize("case", [
    # |a| = 1e20, |g| = 1e-20: R is ~1 but a squared projection is not representable in float32
    dict(op="kron_project_square_sum", scale_a=1e20, scale_g=1e-20, T=1),
    dict(op="kron_project_square_sum", scale_a=1e-20, scale_g=1e20, T=1),
    dict(op="kron_project_square_sum", scale_a=1e20, scale_g=1e-20, T=3),
])
def test_square_sum_has_no_intermediate_overflow(case):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, case["T"], 3, generator=gen) * case["scale_a"]
    g = torch.randn(4, case["T"], 5, generator=gen) * case["scale_g"]
    U, V = torch.randn(5, 2, generator=gen), torch.randn(3, 4, generator=gen)
    got = torch.ops.deltainf.kron_project_square_sum(a, g, U, V)
    want = op_fuzz.reference.kron_project_square_sum(a.double(), g.double(), U.double(), V.double())
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_score_without_positions_is_nan_against_non_finite_queries():
    a, g = torch.zeros(3, 0, 2), torch.zeros(3, 0, 4)
    U, V = torch.randn(4, 2), torch.randn(2, 3)
    P = torch.randn(3, 2, 3)
    P[1, 0, 2] = float("inf")
    P[2, 1, 1] = float("nan")
    got = torch.ops.deltainf.kron_project_score(a, g, U, V, P)
    torch.testing.assert_close(got, op_fuzz.reference.kron_project_score(a, g, U, V, P), equal_nan=True)
    assert got[:, 0].eq(0).all() and got[:, 1:].isnan().all()


def test_combine_flags_counts_any_nonzero_byte_as_one():
    raw = torch.tensor([[2, 0, 1], [0, 0, 255], [1, 0, 0]], dtype=torch.uint8)
    flags = raw.view(torch.bool)  # bytes other than 0/1, as a reinterpreted buffer holds
    assert torch.ops.deltainf.combine_flags(flags, 2).tolist() == [True, False, True]
    assert op_fuzz.reference.combine_flags(flags, 2).tolist() == [True, False, True]


def test_jl_project_refuses_sizes_that_can_only_be_mistakes():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="k .* at most max"):
        torch.ops.deltainf.jl_project(x, 2**31, 0)
    with pytest.raises(ValueError, match="k .* at most max"):
        torch.ops.deltainf.jl_project(x.to("meta"), 2**31, 0)
    assert torch.ops.deltainf.jl_project(x, 2**16, 0).shape == (2, 2**16)  # a fixed size on a small layer
    with pytest.raises(ValueError, match="offset"):
        torch.ops.deltainf.jl_project(x, 4, 0, "rademacher", 2**63 - 2)


@pytest.mark.parametrize("call", [
    lambda: op_fuzz.ops.jl_project(None, 4, 0),
    lambda: op_fuzz.ops.kron_ihvp(torch.zeros(1, 2, 2), [1.0], torch.eye(2), torch.ones(2, 2), 0.1),
    lambda: op_fuzz.ops.sign_vote(torch.zeros(1, 2), "scores", min_votes=1),
])
def test_non_tensor_arguments_are_named(call):
    with pytest.raises(TypeError, match=r"(jl_project: x|kron_ihvp: Q_S|sign_vote: transformed) must be a torch.Tensor"):
        call()


@pytest.mark.fuzz
@pytest.mark.slow
def test_op_contract_long_profile(tmp_path):
    """>= 10,000 calls in child processes: a crash or a hang ends one child and is reported with its call."""
    children, calls_each = 8, 1300
    totals, violations, crashes = {}, [], []
    for child in range(children):
        out, last = tmp_path / f"counts{child}.json", tmp_path / f"last{child}.txt"
        cmd = [sys.executable, os.path.join(HERE, "op_fuzz.py"), "--calls", str(calls_each), "--seed", str(child),
               "--out", str(out), "--last", str(last)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            crashes.append(f"child {child} hung in: {last.read_text() if last.exists() else '?'}")
            continue
        if proc.returncode != 0:
            crashes.append(f"child {child} exited {proc.returncode} in: "
                           f"{last.read_text() if last.exists() else '?'}\n{proc.stderr[-2000:]}")
            continue
        report = json.loads(out.read_text())
        violations += report["violations"]
        for op, counts in report["counts"].items():
            for outcome, n in counts.items():
                totals.setdefault(op, {}).setdefault(outcome, 0)
                totals[op][outcome] += n
    summary = json.dumps(totals, indent=1, sort_keys=True)
    print(summary)
    (tmp_path / "summary.json").write_text(summary)
    if os.environ.get("DELTAINF_FUZZ_REPORT"):
        with open(os.environ["DELTAINF_FUZZ_REPORT"], "w") as f:
            f.write(summary)
    assert not crashes, crashes
    assert not violations, violations[:20]
    assert sum(sum(c.values()) for c in totals.values()) >= 10_000
