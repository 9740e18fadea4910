"""Smoke tests of deltainf.bench: tiny sizes, rows well-formed, correctness checks run (no timing asserts)."""

import json
import math

import pytest
import torch

from deltainf import bench

ROW_FIELDS = {
    "op", "variant", "device", "dtype", "shape", "unit", "work", "work_formula", "kernel_s", "kernel_spread",
    "reference_s", "limit_s", "limit", "limit_work", "kernel_rate", "reference_rate", "limit_rate", "speedup_vs_reference",
    "fraction_of_limit", "checked", "check", "max_abs_err", "targets", "target_met", "notes", "skipped",
    "load_average",
}
MRT = 1e-3  # seconds per measurement: the numbers are not looked at


@pytest.fixture(scope="module")
def quick_rows():
    return bench.run_all("cpu", quick=True, min_run_time=MRT)


def test_bench_run_all_rows_have_fields(quick_rows):
    assert {r["op"] for r in quick_rows} == set(bench.OPS)
    for r in quick_rows:
        assert r["skipped"] is None, r
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["unit"] in ("GFLOP/s", "GB/s")
        assert r["kernel_s"] > 0 and r["limit_s"] > 0 and r["work"] > 0
        assert math.isfinite(r["kernel_rate"]) and math.isfinite(r["fraction_of_limit"])
        assert r["limit_rate"] == pytest.approx(r["limit_work"] / r["limit_s"] / 1e9)  # the limit's work is kept
        for t in r["targets"]:
            assert set(t) == {"name", "required", "achieved", "met"}
            assert t["met"] is None  # quick sizes are not the shapes the targets are about
        json.dumps(r)  # rows are JSON-serialisable as they are


def test_bench_correctness_checks_ran(quick_rows):
    for r in quick_rows:
        assert r["checked"] is True and r["check"]
        assert 0.0 <= r["max_abs_err"] < 1e-3


def test_bench_jl_compares_against_traker(quick_rows):
    jl = [r for r in quick_rows if r["op"] == "jl_project"]
    assert {r["variant"] for r in jl} == {"rademacher", "gaussian"}
    pytest.importorskip("trak")
    for r in jl:
        assert r["traker_s"] > 0 and r["speedup_vs_traker"] > 0
        assert any("traker" in t["name"] for t in r["targets"])


def test_bench_targets_follow_issue_2():
    # N >= 64 adds the GEMM target for JL; layers >= 512 wide add it for the iHVP.
    rows = bench.bench_jl_project(sizes=[(64, 96, 64)], min_run_time=MRT, dists=("rademacher",), traker=False)
    assert [t["required"] for t in rows[0]["targets"]] == [bench.JL_GEMM_FRACTION]
    assert rows[0]["target_met"] in (True, False)
    rows = bench.bench_kron_project(sizes=[(4, 2, 6, 5, 3, 2)], min_run_time=MRT, queries=(3,), features=False)
    assert [r["variant"] for r in rows] == ["square_sum", "score Q=3"]
    assert all(r["targets"][0]["required"] == bench.PROJECT_REFERENCE_SPEEDUP for r in rows)


def test_bench_detects_wrong_kernel(monkeypatch):
    def wrong(base, transformed, threshold=0.0, *, min_votes):
        votes = torch.zeros(base.shape, dtype=torch.int32)
        return votes, votes >= min_votes

    monkeypatch.setattr(bench.ops, "sign_vote", wrong)
    with pytest.raises(AssertionError, match="sign_vote"):
        bench.bench_sign_vote(quick=True, min_run_time=MRT)


def test_bench_format_table_and_machine_info(quick_rows):
    text = bench.format_table(quick_rows)
    for op in bench.OPS:
        assert f"### {op}" in text
    assert "GFLOP/s" in text and "GB/s" in text
    info = bench.machine_info("cpu")
    for key in ("cpu_model", "cpu_cores", "torch", "numpy", "deltainf", "git_commit", "gpu", "date_utc"):
        assert key in info
    assert info["torch"] == torch.__version__ and info["gpu"] is None


def test_bench_parse_sizes():
    assert bench.parse_sizes("jl_project", "64x65536x2048, 8x1_000x16") == [(64, 65536, 2048), (8, 1000, 16)]
    assert bench.parse_sizes("kron_project", "4x1x8x6,4x2x8x6x3x2") == [(4, 1, 8, 6), (4, 2, 8, 6, 3, 2)]
    assert bench.parse_sizes("sign_vote", None) is None
    with pytest.raises(ValueError, match="PxnxN"):
        bench.parse_sizes("sign_vote", "4x50")
    with pytest.raises(ValueError, match="positive"):
        bench.parse_sizes("kron_ihvp", "0x8x8")
    with pytest.raises(ValueError, match="op must be"):
        bench.parse_sizes("nope", "1x2x3")


def test_bench_main_writes_json(tmp_path, capsys):
    out = tmp_path / "sv.json"
    assert bench.main(["--quick", "--sizes", "2x3x50", "--min-run-time", str(MRT), "--out", str(out)],
                      ops_=["sign_vote"]) == 0
    assert "### sign_vote" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert set(saved) == {"machine", "command", "rows"}
    assert saved["rows"][0]["shape"] == {"P": 2, "n": 3, "N": 50}


def test_bench_rejects_bad_device():
    with pytest.raises(ValueError, match="device"):
        bench.run_all("tpu", quick=True)


@pytest.mark.parametrize("argv, said", [(["--dtype", "float16"], "--dtype float16: the CPU kernels take"),
                                        (["--min-run-time", "-1"], "--min-run-time must be > 0"),
                                        (["--out", "/dev/null"], "--out: '/dev/null' exists and is not a regular "),
                                        (["--out", "."], "--out: '.' is a folder")])
def test_bench_flags_the_cpu_cannot_run(argv, said, capsys):
    """float16 on the CPU ended in a 28-line traceback; a negative measuring time was accepted."""
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and said in capsys.readouterr().err
