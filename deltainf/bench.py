"""Benchmarks of deltainf's kernels against the plain-PyTorch reference and the hardware's practical limits.

Every op family has one function that, in the same run and on the same inputs, times

* our kernel (``deltainf.ops``),
* the oracle (``deltainf.reference``), and
* the practical limit: torch's own GEMM (``torch.mm`` of the equivalent shapes) for the GEMM-bound
  ops, memory-copy bandwidth (``Tensor.copy_``) for the memory-bound sign vote,
* for the JL projection also TRAK's CPU projector (``trak.projectors.BasicProjector``) when traker is
  importable,

after checking the kernel against the reference with ``torch.testing.assert_close``. Times are medians
of ``torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time=...)`` (which synchronises CUDA and
warms up), run with torch's current intra-op thread count for every contender (``--threads`` sets it;
Timer's own default would be one thread). Rates come from the formulas documented on each function, so
kernel, reference and limit are compared on the same work count.

Each function returns one ``dict`` per case (see :func:`bench_jl_project` for the fields); ``run_all``
runs them all and ``format_table`` renders the rows as Markdown tables. ``main`` is the command line
(``python -m deltainf.bench``; the ``deltainf bench`` command and ``benchmarks/bench_*.py`` call it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.benchmark import Timer

from deltainf import ops, reference

__all__ = [
    "OPS",
    "DEFAULT_SIZES",
    "QUICK_SIZES",
    "machine_info",
    "bench_jl_project",
    "bench_kron_ihvp",
    "bench_kron_project",
    "bench_sign_vote",
    "run_all",
    "format_table",
    "parse_sizes",
    "save_json",
    "main",
]

# Cases per op family. Size tuples: jl_project (N, p, k); kron_ihvp (B, d_out, d_in);
# kron_project (N, T, d_in, d_out) with full ranks r = d, or (N, T, d_in, d_out, r_in, r_out);
# sign_vote (P, n, N).
DEFAULT_SIZES: dict[str, list[tuple[int, ...]]] = {
    "jl_project": [(64, 2**16, 2048), (256, 2**16, 2048)],
    "kron_ihvp": [(8, 512, 512), (64, 512, 512), (8, 1024, 1024), (16, 1024, 1024)],
    # The reference materialises R (N, r_out, r_in): N = 1024 at r = 512 keeps that at 1 GiB (float32).
    "kron_project": [(1024, 1, 512, 512), (4096, 1, 256, 256), (256, 64, 288, 64)],
    "sign_vote": [(1, 50, 50_000), (4, 50, 50_000), (1, 50, 1_000_000), (4, 50, 1_000_000)],
}
QUICK_SIZES: dict[str, list[tuple[int, ...]]] = {
    "jl_project": [(4, 300, 130)],
    "kron_ihvp": [(3, 24, 20)],
    "kron_project": [(16, 1, 12, 10), (8, 5, 12, 10)],
    "sign_vote": [(2, 5, 1000)],
}
SIZE_FIELDS = {
    "jl_project": "NxPxK",
    "kron_ihvp": "BxD_OUTxD_IN",
    "kron_project": "NxTxD_INxD_OUT[xR_INxR_OUT]",
    "sign_vote": "PxnxN",
}
SCORE_QUERIES = (8, 51)

# Targets of issue 2 (fractions are of the practical limit, speedups over the named baseline).
JL_TRAKER_SPEEDUP = 10.0
JL_GEMM_FRACTION = 0.5
JL_GEMM_MIN_BATCH = 64
IHVP_GEMM_FRACTION = 0.7
IHVP_MIN_WIDTH = 512
PROJECT_REFERENCE_SPEEDUP = 3.0
VOTE_COPY_FRACTION = 0.7

# assert_close tolerances: rtol, and atol as a multiple of max |reference| (sums over thousands of
# terms make absolute errors scale with the output's magnitude).
_TOLERANCES = {
    torch.float64: 1e-9,
    torch.float32: 2e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# machine, timing and checking helpers


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16",
                                           "amx_tile", "neon", "asimd"})
    except OSError:
        pass
    return []


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where the numbers come from: CPU model, cores, SIMD flags, load, library versions, GPU, git commit.

    Returns a JSON-serialisable dict. ``device`` (``"cpu"`` or ``"cuda"``) adds the GPU's name and
    compute capability when it is ``"cuda"`` and a GPU is visible.
    """
    import numpy

    import deltainf

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_simd_flags": _cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "deltainf": deltainf.__version__,
        "deltainf_build": deltainf.build_info(),
        "git_commit": _git_commit(),
        "traker": _traker_version(),
        "gpu": None,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count}
    return info


def _traker_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("traker")
    except Exception:  # not installed, or installed without metadata
        return None


def _time(fn: Callable[[], Any], min_run_time: float) -> tuple[float, float]:
    """Median seconds per call of fn and the relative spread (IQR / median), with all intra-op threads.

    Timer defaults to one thread; the kernels and the baselines must all get the same thread count."""
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return m.median, (m.iqr / m.median if m.median > 0 else 0.0)


def _check(name: str, actual: Any, expected: Any, dtype: torch.dtype) -> float:
    """assert_close with a dtype-dependent tolerance; returns the max abs error (0 for exact ints/bools)."""
    if isinstance(actual, (tuple, list)):
        return max(_check(f"{name}[{i}]", a, e, dtype) for i, (a, e) in enumerate(zip(actual, expected)))
    if not actual.is_floating_point():
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        return 0.0
    tol = _TOLERANCES[dtype]
    expected = expected.to(actual.dtype)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-30),
                               msg=lambda m: f"{name}: kernel disagrees with deltainf.reference: {m}")
    return float((actual - expected).abs().max()) if actual.numel() else 0.0


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(err).lower()


def _target(name: str, achieved: float | None, required: float) -> dict[str, Any]:
    return {"name": name, "required": required, "achieved": achieved,
            "met": None if achieved is None else bool(achieved >= required)}


def _row(op: str, variant: str, device: str, dtype: torch.dtype, shape: dict[str, int], *, unit: str,
         work: float, work_formula: str, kernel: tuple[float, float], reference_t: float | None,
         limit_t: float | None, limit_work: float | None, limit_name: str, max_abs_err: float, check: str,
         targets: list[dict[str, Any]], notes: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One result row. Rates are work / seconds in ``unit`` (GFLOP/s or GB/s, 1e9 based)."""
    kernel_t, kernel_spread = kernel

    def rate(w: float | None, t: float | None) -> float | None:
        return None if w is None or t is None or t <= 0 else w / t / 1e9

    limit_rate = rate(limit_work, limit_t)
    kernel_rate = rate(work, kernel_t)
    row = {
        "op": op, "variant": variant, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "shape": shape, "unit": unit, "work": work, "work_formula": work_formula,
        "kernel_s": kernel_t, "kernel_spread": kernel_spread, "reference_s": reference_t, "limit_s": limit_t,
        "limit": limit_name, "limit_work": limit_work, "kernel_rate": kernel_rate,
        "reference_rate": rate(work, reference_t), "limit_rate": limit_rate,
        "speedup_vs_reference": None if reference_t is None else reference_t / kernel_t,
        "fraction_of_limit": None if limit_rate is None or kernel_rate is None else kernel_rate / limit_rate,
        "checked": True, "check": check, "max_abs_err": max_abs_err,
        "targets": targets, "target_met": None, "notes": notes, "skipped": None,
        # 1-minute load average when the row finished: other processes on the machine skew timings.
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if extra:
        row.update(extra)
    return row


def _finish_targets(row: dict[str, Any], quick: bool = False) -> dict[str, Any]:
    """Fills each target's achieved value from the row field named by its "source", and the verdicts.

    Quick (tiny) sizes are not the shapes the targets are about: achieved values are kept, verdicts
    are left undecided (None)."""
    for t in row["targets"]:
        source = t.pop("source", None)
        if source is not None:
            t.update(_target(t["name"], row.get(source), t["required"]))
        if quick:
            t["met"] = None
    if quick and row["targets"]:
        row["notes"].append("quick sizes: targets not evaluated")
    decided = [t["met"] for t in row["targets"] if t["met"] is not None]
    row["target_met"] = all(decided) if decided else None
    return row


def _skipped(op: str, variant: str, device: str, dtype: torch.dtype, shape: dict[str, int], why: str) -> dict:
    return {"op": op, "variant": variant, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "shape": shape, "skipped": why, "checked": False, "targets": [], "target_met": None, "notes": [why]}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(*shape: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    # Generated on the CPU from an explicit generator so CPU and CUDA runs see the same inputs.
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _orthogonal(d: int, r: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q[:, :r].to(device=device, dtype=dtype).contiguous()


# ----------------------------------------------------------------------------------------------
# JL projection


def _traker_projector(p: int, k: int, dist: str, device: str, dtype: torch.dtype):
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except Exception as err:  # traker is optional
        return None, f"traker not importable ({type(err).__name__}: {err}); TRAK comparison skipped"
    proj_type = ProjectionType.rademacher if dist == "rademacher" else ProjectionType.normal
    proj = BasicProjector(grad_dim=p, proj_dim=k, seed=0, proj_type=proj_type, device=device, dtype=dtype)
    return proj, None


def bench_jl_project(device: str = "cpu", dtype: torch.dtype = torch.float32,
                     sizes: Sequence[tuple[int, int, int]] | None = None, quick: bool = False,
                     min_run_time: float | None = None, dists: Sequence[str] = ("rademacher", "gaussian"),
                     traker: bool = True) -> list[dict[str, Any]]:
    """Dense JL projection x (N, p) -> x Omega (N, k) with Omega generated on the fly.

    Work: 2 N p k FLOPs (the GEMM; generating Omega is overhead the kernel must hide). Limit: torch.mm
    of x (N, p) by a materialised (p, k) matrix. Baselines: reference.jl_project (skipped above 2**24
    matrix entries: it materialises several p x k int64 temporaries) and TRAK's BasicProjector
    (``project(x, model_id=0)``; it regenerates its Omega in blocks of 100 columns on every call).
    Correctness: the kernel on the last min(p, 1024) features with ``offset`` set accordingly (same N,
    k and dist as the timed call) against the reference; the full-size reference is too slow to build.
    Targets (issue 2): >= 10x traker, and >= 50% of GEMM throughput at N >= 64.

    Returns rows (dicts) with: op, variant (dist), device, dtype, shape {N, p, k}, unit, work,
    work_formula, kernel_s / reference_s / limit_s (median seconds; None = not timed), kernel_rate /
    reference_rate / limit_rate, speedup_vs_reference, fraction_of_limit, traker_s, speedup_vs_traker,
    checked, check, max_abs_err, targets [{name, required, achieved, met}], target_met, notes, skipped.
    """
    sizes = list(sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)["jl_project"])
    mrt = min_run_time if min_run_time is not None else (0.02 if quick else 0.5)
    rows = []
    for N, p, k in sizes:
        shape = {"N": N, "p": p, "k": k}
        gen = _gen(1)
        x = _randn(N, p, dtype=dtype, device=device, gen=gen)
        for dist in dists:
            notes: list[str] = []
            try:
                # correctness on a feature window that exercises the offset path
                p_chk = min(p, 1024)
                off = p - p_chk
                xc = x[:, off:].contiguous()
                err = _check(f"jl_project[{dist}]", ops.jl_project(xc, k, 0, dist, off),
                             reference.jl_project(xc, k, 0, dist, off), dtype)
                check = "assert_close vs reference.jl_project" + (
                    "" if off == 0 else f" on the last {p_chk} features (offset={off}), same N, k")
                kernel = _time(lambda: ops.jl_project(x, k, 0, dist), mrt)
                ref_t = None
                if p * k <= 2**24:
                    ref_t = _time(lambda: reference.jl_project(x, k, 0, dist), mrt)[0]
                else:
                    notes.append("reference not timed (p*k > 2**24: it builds several p x k int64 temporaries)")
                omega = reference.jl_matrix(min(p, 4096), k, 0, dist, dtype=torch.float32).to(device, dtype)
                if p > omega.shape[0]:  # the GEMM's speed does not depend on the values: tile a small matrix
                    omega = omega.repeat(math.ceil(p / omega.shape[0]), 1)[:p].contiguous()
                limit_t = _time(lambda: torch.mm(x, omega), mrt)[0]
                del omega
                trak_t = None
                if traker:
                    proj, why = _traker_projector(p, k, dist, device, dtype)
                    if proj is None:
                        notes.append(why)
                    else:
                        trak_t = _time(lambda: proj.project(x, model_id=0), mrt)[0]
                        del proj
                flops = 2.0 * N * p * k
                targets = []
                if traker:
                    targets.append({"name": f">= {JL_TRAKER_SPEEDUP:g}x traker BasicProjector",
                                    "required": JL_TRAKER_SPEEDUP, "source": "speedup_vs_traker"})
                if N >= JL_GEMM_MIN_BATCH:
                    targets.append({"name": f">= {JL_GEMM_FRACTION:.0%} of GEMM", "required": JL_GEMM_FRACTION,
                                    "source": "fraction_of_limit"})
                row = _row("jl_project", dist, device, dtype, shape, unit="GFLOP/s", work=flops,
                           work_formula="2*N*p*k", kernel=kernel, reference_t=ref_t, limit_t=limit_t,
                           limit_work=flops, limit_name="torch.mm (N,p)@(p,k)", max_abs_err=err, check=check,
                           targets=targets, notes=notes,
                           extra={"traker_s": trak_t,
                                  "speedup_vs_traker": None if trak_t is None else trak_t / kernel[0]})
                rows.append(_finish_targets(row, quick))
            except (RuntimeError, MemoryError) as err:
                if not _is_oom(err):
                    raise
                rows.append(_skipped("jl_project", dist, device, dtype, shape, f"out of memory: {err}"))
    return rows


# ----------------------------------------------------------------------------------------------
# Kronecker iHVP


def bench_kron_ihvp(device: str = "cpu", dtype: torch.dtype = torch.float32,
                    sizes: Sequence[tuple[int, int, int]] | None = None, quick: bool = False,
                    min_run_time: float | None = None, eigenbasis_too: bool = True) -> list[dict[str, Any]]:
    """Kronecker eigenbasis iHVP  Q_S [(Q_S^T G Q_A) / (lam + damping)] Q_A^T  over B query gradients.

    Work: 4 GEMMs, 2 B (d_out^2 d_in + d_out d_in^2) * 2 FLOPs (half that for the eigenbasis form).
    Limit: the same GEMMs as four (two) torch.mm calls on contiguous, pre-laid-out operands of the same
    shapes ((d, d) @ (d, B d) and (B d, d) @ (d, d)), i.e. no permutes and no division.
    Target (issue 2): >= 70% of GEMM throughput on layers >= 512 wide. Row fields as in
    :func:`bench_jl_project`.
    """
    sizes = list(sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)["kron_ihvp"])
    mrt = min_run_time if min_run_time is not None else (0.02 if quick else 0.5)
    rows = []
    for B, d_out, d_in in sizes:
        shape = {"B": B, "d_out": d_out, "d_in": d_in}
        gen = _gen(2)
        try:
            G = _randn(B, d_out, d_in, dtype=dtype, device=device, gen=gen)
            Q_S = _orthogonal(d_out, d_out, dtype, device, gen)
            Q_A = _orthogonal(d_in, d_in, dtype, device, gen)
            lam = torch.rand(d_out, d_in, generator=gen).to(device=device, dtype=dtype)
            damping = 0.1
            wide_out = _randn(d_out, B * d_in, dtype=dtype, device=device, gen=gen)
            tall_in = _randn(B * d_out, d_in, dtype=dtype, device=device, gen=gen)
            Q_S_t, Q_A_t = Q_S.t().contiguous(), Q_A.t().contiguous()
            for eigenbasis in ((False, True) if eigenbasis_too else (False,)):
                variant = "eigenbasis" if eigenbasis else "ihvp"
                err = _check(f"kron_ihvp[{variant}]", ops.kron_ihvp(G, Q_S, Q_A, lam, damping, eigenbasis),
                             reference.kron_ihvp(G, Q_S, Q_A, lam, damping, eigenbasis), dtype)
                kernel = _time(lambda: ops.kron_ihvp(G, Q_S, Q_A, lam, damping, eigenbasis), mrt)
                ref_t = _time(lambda: reference.kron_ihvp(G, Q_S, Q_A, lam, damping, eigenbasis), mrt)[0]
                if eigenbasis:
                    def gemms():
                        torch.mm(Q_S_t, wide_out)
                        torch.mm(tall_in, Q_A)
                else:
                    def gemms():
                        torch.mm(Q_S_t, wide_out)
                        torch.mm(tall_in, Q_A)
                        torch.mm(Q_S, wide_out)
                        torch.mm(tall_in, Q_A_t)
                limit_t = _time(gemms, mrt)[0]
                n_gemm = 2 if eigenbasis else 4
                flops = n_gemm * B * (d_out * d_out * d_in + d_out * d_in * d_in)  # = n_gemm/2 * 2B(...)
                targets = []
                if min(d_out, d_in) >= IHVP_MIN_WIDTH and not eigenbasis:
                    targets.append({"name": f">= {IHVP_GEMM_FRACTION:.0%} of GEMM", "required": IHVP_GEMM_FRACTION,
                                    "source": "fraction_of_limit"})
                row = _row("kron_ihvp", variant, device, dtype, shape, unit="GFLOP/s", work=flops,
                           work_formula=("2*B*(d_out^2*d_in + d_out*d_in^2)" if eigenbasis
                                         else "2*B*(d_out^2*d_in + d_out*d_in^2)*2"),
                           kernel=kernel, reference_t=ref_t, limit_t=limit_t, limit_work=flops,
                           limit_name=f"{n_gemm} x torch.mm, same shapes", max_abs_err=err,
                           check="assert_close vs reference.kron_ihvp", targets=targets, notes=[])
                rows.append(_finish_targets(row, quick))
            del G, wide_out, tall_in
        except (RuntimeError, MemoryError) as err:
            if not _is_oom(err):
                raise
            rows.append(_skipped("kron_ihvp", "ihvp", device, dtype, shape, f"out of memory: {err}"))
    return rows


# ----------------------------------------------------------------------------------------------
# Fused per-example projection (features, square-sum and score epilogues)


def _project_flops(N: int, T: int, d_in: int, d_out: int, r_in: int, r_out: int, epilogue: str, Q: int = 0) -> float:
    proj = 2.0 * N * T * (d_out * r_out + d_in * r_in)
    form = 2.0 * N * T * r_out * r_in
    if epilogue == "square_sum":
        return proj + form + 2.0 * N * r_out * r_in
    if epilogue == "score":
        return proj + form + 2.0 * N * Q * r_out * r_in
    return proj + form


def bench_kron_project(device: str = "cpu", dtype: torch.dtype = torch.float32,
                       sizes: Sequence[tuple[int, ...]] | None = None, quick: bool = False,
                       min_run_time: float | None = None, queries: Sequence[int] = SCORE_QUERIES,
                       features: bool = True) -> list[dict[str, Any]]:
    """Fused per-example projection R_i = sum_t (U^T g_it)(V^T a_it)^T and its epilogues.

    Variants: ``features`` (kron_project, returns R), ``square_sum`` (sum_i R_i * R_i) and ``score
    Q=..`` (S_iq = <R_i, P_q>). U, V are orthonormal bases (full eigenbasis r = d unless sizes give
    ranks). Work (nominal FLOPs of the unfused algorithm, the same count for kernel and reference):
    2 N T (d_out r_out + d_in r_in) + 2 N T r_out r_in, plus 2 N r_out r_in (square-sum) or
    2 N Q r_out r_in (score). Limit: GEMM throughput of the two projection GEMMs (N T, d_out) @ (d_out,
    r_out) and (N T, d_in) @ (d_in, r_in) — context only, the target is against the reference.
    Target (issue 2): square-sum and score >= 3x reference.py at equal results. Row fields as in
    :func:`bench_jl_project`.
    """
    sizes = list(sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)["kron_project"])
    mrt = min_run_time if min_run_time is not None else (0.02 if quick else 0.5)
    rows = []
    for size in sizes:
        if len(size) == 4:
            N, T, d_in, d_out = size
            r_in, r_out = d_in, d_out
        else:
            N, T, d_in, d_out, r_in, r_out = size
        shape = {"N": N, "T": T, "d_in": d_in, "d_out": d_out, "r_in": r_in, "r_out": r_out}
        gen = _gen(3)
        a = _randn(N, T, d_in, dtype=dtype, device=device, gen=gen)
        g = _randn(N, T, d_out, dtype=dtype, device=device, gen=gen)
        U = _orthogonal(d_out, r_out, dtype, device, gen)
        V = _orthogonal(d_in, r_in, dtype, device, gen)
        a2, g2 = a.reshape(N * T, d_in), g.reshape(N * T, d_out)

        def proj_gemms():
            torch.mm(g2, U)
            torch.mm(a2, V)

        limit_t = _time(proj_gemms, mrt)[0]
        limit_flops = 2.0 * N * T * (d_out * r_out + d_in * r_in)
        cases: list[tuple[str, Callable, Callable, float]] = []
        if features:
            cases.append(("features", lambda: ops.kron_project(a, g, U, V),
                          lambda: reference.kron_project(a, g, U, V),
                          _project_flops(N, T, d_in, d_out, r_in, r_out, "features")))
        cases.append(("square_sum", lambda: ops.kron_project_square_sum(a, g, U, V),
                      lambda: reference.kron_project_square_sum(a, g, U, V),
                      _project_flops(N, T, d_in, d_out, r_in, r_out, "square_sum")))
        for Q in queries:
            P = _randn(Q, r_out, r_in, dtype=dtype, device=device, gen=gen)
            cases.append((f"score Q={Q}", (lambda P=P: ops.kron_project_score(a, g, U, V, P)),
                          (lambda P=P: reference.kron_project_score(a, g, U, V, P)),
                          _project_flops(N, T, d_in, d_out, r_in, r_out, "score", Q)))
        for variant, kern, ref, flops in cases:
            try:
                err = _check(f"kron_project[{variant}]", kern(), ref(), dtype)
                kernel = _time(kern, mrt)
                ref_t = _time(ref, mrt)[0]
                targets = []
                if variant != "features":
                    targets.append({"name": f">= {PROJECT_REFERENCE_SPEEDUP:g}x reference",
                                    "required": PROJECT_REFERENCE_SPEEDUP, "source": "speedup_vs_reference"})
                formula = "2NT(d_out r_out + d_in r_in) + 2NT r_out r_in" + {
                    "features": "", "square_sum": " + 2N r_out r_in"}.get(variant, " + 2NQ r_out r_in")
                row = _row("kron_project", variant, device, dtype, shape, unit="GFLOP/s", work=flops,
                           work_formula=formula, kernel=kernel, reference_t=ref_t, limit_t=limit_t,
                           limit_work=limit_flops, limit_name="torch.mm of the 2 projections",
                           max_abs_err=err, check="assert_close vs reference", targets=targets, notes=[])
                rows.append(_finish_targets(row, quick))
            except (RuntimeError, MemoryError) as err:
                if not _is_oom(err):
                    raise
                rows.append(_skipped("kron_project", variant, device, dtype, shape, f"out of memory: {err}"))
    return rows


# ----------------------------------------------------------------------------------------------
# Sign vote


def bench_sign_vote(device: str = "cpu", dtype: torch.dtype = torch.float32,
                    sizes: Sequence[tuple[int, int, int]] | None = None, quick: bool = False,
                    min_run_time: float | None = None) -> list[dict[str, Any]]:
    """Batched sign vote over base (P, N) and transformed (P, n, N) scores.

    Work (bytes): the scores read once, (P n N + P N) * element size. Limit: memory-copy bandwidth of
    ``dst.copy_(transformed)``, counted STREAM-style as read + write bytes (2 * P n N * element size)
    per copy. Target (issue 2): >= 70% of copy bandwidth. Row fields as in :func:`bench_jl_project`.
    """
    sizes = list(sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)["sign_vote"])
    mrt = min_run_time if min_run_time is not None else (0.02 if quick else 0.5)
    rows = []
    for P, n, N in sizes:
        shape = {"P": P, "n": n, "N": N}
        gen = _gen(4)
        try:
            base = _randn(P, N, dtype=dtype, device=device, gen=gen)
            transformed = _randn(P, n, N, dtype=dtype, device=device, gen=gen)
            min_votes = max(1, n // 2)
            err = _check("sign_vote", ops.sign_vote(base, transformed, 0.0, min_votes=min_votes),
                         reference.sign_vote(base, transformed, 0.0, min_votes), dtype)
            kernel = _time(lambda: ops.sign_vote(base, transformed, 0.0, min_votes=min_votes), mrt)
            ref_t = _time(lambda: reference.sign_vote(base, transformed, 0.0, min_votes), mrt)[0]
            dst = torch.empty_like(transformed)
            limit_t = _time(lambda: dst.copy_(transformed), mrt)[0]
            del dst
            esize = transformed.element_size()
            work = float((P * n * N + P * N) * esize)
            row = _row("sign_vote", f"min_votes={min_votes}", device, dtype, shape, unit="GB/s", work=work,
                       work_formula="(P*n*N + P*N) * element_size", kernel=kernel, reference_t=ref_t,
                       limit_t=limit_t, limit_work=2.0 * P * n * N * esize,
                       limit_name="copy_ of transformed (read+write bytes)", max_abs_err=err,
                       check="votes and flags equal to reference.sign_vote",
                       targets=[{"name": f">= {VOTE_COPY_FRACTION:.0%} of copy bandwidth",
                                 "required": VOTE_COPY_FRACTION, "source": "fraction_of_limit"}], notes=[])
            rows.append(_finish_targets(row, quick))
            del base, transformed
        except (RuntimeError, MemoryError) as err:
            if not _is_oom(err):
                raise
            rows.append(_skipped("sign_vote", "", device, dtype, shape, f"out of memory: {err}"))
    return rows


OPS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "jl_project": bench_jl_project,
    "kron_ihvp": bench_kron_ihvp,
    "kron_project": bench_kron_project,
    "sign_vote": bench_sign_vote,
}


def run_all(device: str = "cpu", quick: bool = False, dtype: torch.dtype = torch.float32,
            ops_: Sequence[str] | None = None, min_run_time: float | None = None) -> list[dict[str, Any]]:
    """Runs every op family's benchmark (or those named in ``ops_``) and returns all rows.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"`` etc.); CUDA needs a GPU and the CUDA kernels.
        quick: tiny sizes and short timing, for smoke tests (the numbers mean nothing).
        dtype: input dtype (float32/float64; also float16/bfloat16 on CUDA).
    Returns: list of row dicts (see :func:`bench_jl_project`).
    """
    _validate_device(device)
    rows: list[dict[str, Any]] = []
    for name in ops_ or OPS:
        if name not in OPS:
            raise ValueError(f"run_all: ops_ must name ops among {sorted(OPS)}, got {name!r}")
        rows += OPS[name](device=device, dtype=dtype, quick=quick, min_run_time=min_run_time)
    return rows


def _validate_device(device: str) -> None:
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for, but torch sees no CUDA GPU")


# ----------------------------------------------------------------------------------------------
# output


def _fmt_shape(shape: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _fmt_ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.3g}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one table per op with times (ms), rates (GFLOP/s or GB/s), ratios and target verdicts."""
    out = []
    by_device = len({r["device"] for r in rows}) > 1  # e.g. the CLI's --device all
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        unit = next((r["unit"] for r in op_rows if not r.get("skipped")), "")
        limit = next((r["limit"] for r in op_rows if not r.get("skipped")), "")
        has_trak = any(r.get("traker_s") is not None for r in op_rows)
        head = (["device"] if by_device else []) + ["variant", "shape", "dtype", "kernel ms", "reference ms", "limit ms",
                f"kernel {unit}", f"reference {unit}", f"limit {unit}", "x reference", "% of limit"]
        if has_trak:
            head += ["traker ms", "x traker"]
        head += ["targets"]
        lines = [f"### {op} (limit: {limit})", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        for r in op_rows:
            lead = [r["device"]] if by_device else []
            if r.get("skipped"):
                cells = lead + [r["variant"], _fmt_shape(r["shape"]), r["dtype"]]
                cells += ["-"] * (len(head) - len(cells) - 1) + [f"skipped: {r['skipped']}"]
                lines.append("| " + " | ".join(cells) + " |")
                continue
            frac = r["fraction_of_limit"]
            cells = lead + [r["variant"], _fmt_shape(r["shape"]), r["dtype"], _fmt_ms(r["kernel_s"]),
                     _fmt_ms(r["reference_s"]), _fmt_ms(r["limit_s"]), _fmt(r["kernel_rate"], ".1f"),
                     _fmt(r["reference_rate"], ".1f"), _fmt(r["limit_rate"], ".1f"),
                     _fmt(r["speedup_vs_reference"], ".2f"), "-" if frac is None else f"{frac:.0%}"]
            if has_trak:
                cells += [_fmt_ms(r.get("traker_s")), _fmt(r.get("speedup_vs_traker"), ".2f")]
            verdicts = []
            for t in r["targets"]:
                if t["met"] is None:
                    verdicts.append(f"{t['name']}: n/a")
                else:
                    got = f"{t['achieved']:.1%}" if "%" in t["name"] else f"{t['achieved']:.2f}x"
                    verdicts.append(f"{t['name']}: {got} {'met' if t['met'] else 'MISSED'}")
            cells.append("; ".join(verdicts) or "-")
            lines.append("| " + " | ".join(cells) + " |")
        if any((r.get("fraction_of_limit") or 0) > 1 for r in op_rows):
            lines += ["", "% of limit: the kernel's rate on the work its formula counts, against the limit's rate on "
                          "its own work; above 100 % the kernel did less arithmetic than the formula counts (T > 1 "
                          "scores fold the bases into the queries), so the column is no ceiling there."]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def parse_sizes(op: str, text: str | None) -> list[tuple[int, ...]] | None:
    """'64x65536x2048,256x65536x2048' -> [(64, 65536, 2048), (256, 65536, 2048)]; None passes through.

    Fields per op: jl_project NxPxK, kron_ihvp BxD_OUTxD_IN, kron_project NxTxD_INxD_OUT[xR_INxR_OUT],
    sign_vote PxnxN (underscores allowed in numbers: 1_000_000)."""
    if text is None:
        return None
    if op not in SIZE_FIELDS:
        raise ValueError(f"parse_sizes: op must be one of {sorted(SIZE_FIELDS)}, got {op!r}")
    allowed = (4, 6) if op == "kron_project" else (3,)
    sizes = []
    for case in text.split(","):
        try:
            fields = tuple(int(v.replace("_", "")) for v in case.strip().lower().split("x"))
        except ValueError:
            fields = ()
        if len(fields) not in allowed or any(v < 1 for v in fields):
            raise ValueError(f"--sizes for {op}: each case must be {SIZE_FIELDS[op]} with positive integers, "
                             f"got {case!r}")
        sizes.append(fields)
    return sizes


def save_json(path: str, rows: Sequence[dict[str, Any]], machine: dict[str, Any], command: str) -> None:
    """Writes {machine, command, rows} as JSON (the record a RESULTS.md table is made from)."""
    from deltainf._files import write_json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, {"machine": machine, "command": command, "rows": list(rows)}, indent=1, default=str)


def main(argv: Sequence[str] | None = None, ops_: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command line: run benchmarks, print Markdown tables, optionally save JSON.

    ``ops_`` fixes the op families (the per-op scripts pass one); otherwise ``--ops`` picks them."""
    parser = argparse.ArgumentParser(prog=prog, description="Benchmark deltainf kernels vs reference and "
                                     "the practical limits (torch GEMM, memory copy).")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="input dtype (default float32)")
    fields = SIZE_FIELDS if ops_ is None else {k: SIZE_FIELDS[k] for k in ops_ if k in SIZE_FIELDS}
    parser.add_argument("--sizes", default=None,
                        help="comma-separated cases (default: the issue-2 shapes), fields per op: "
                        + "; ".join(f"{k} {v}" for k, v in fields.items()))
    parser.add_argument("--out", default=None, help="write the rows and machine info as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, short timing (smoke test)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds per blocked_autorange measurement (default 0.5; quick 0.02)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's default, usually one per core)")
    if ops_ is None:
        parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    args = parser.parse_args(argv)
    names = list(ops_) if ops_ is not None else [s.strip() for s in args.ops.split(",") if s.strip()]
    for name in names:
        if name not in OPS:
            parser.error(f"--ops: unknown op {name!r}; choose from {','.join(OPS)}")
    if args.sizes is not None and len(names) != 1:
        parser.error("--sizes needs exactly one op (its fields differ per op)")
    try:
        _validate_device(args.device)
        sizes = parse_sizes(names[0], args.sizes) if args.sizes is not None else None
    except ValueError as err:
        parser.error(str(err))
    if args.dtype in ("float16", "bfloat16") and not args.device.startswith("cuda"):
        parser.error(f"--dtype {args.dtype}: the CPU kernels take float32 or float64 (half precision needs "
                     "--device cuda)")
    if args.min_run_time is not None and not args.min_run_time > 0:
        parser.error(f"--min-run-time must be > 0 seconds, got {args.min_run_time}")
    if args.out is not None:  # before the benchmarks run, not after them
        from deltainf._files import output_file

        try:
            output_file(args.out, "--out", make_folder=True)
        except ValueError as err:
            parser.error(str(err))
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype]
    machine = machine_info(args.device)
    rows: list[dict[str, Any]] = []
    for name in names:
        rows += OPS[name](device=args.device, dtype=dtype, sizes=sizes, quick=args.quick,
                          min_run_time=args.min_run_time)
    print(f"# {machine['cpu_model']} ({machine['cpu_cores']} cores, {machine['torch_threads']} threads), "
          f"torch {machine['torch']}, load {machine['load_average']}"
          + (f", GPU {machine['gpu']['name']}" if machine["gpu"] else ""))
    print(format_table(rows))
    if args.out:
        command = " ".join([prog or "deltainf.bench", *(argv if argv is not None else sys.argv[1:])])
        save_json(args.out, rows, machine, command)
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
