"""The built extension: metadata, the import-time version check, the op registry, torch.compile."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import deltainf
from deltainf import _extension, ops, reference

OPS = ["kron_project", "kron_project_square_sum", "kron_project_score", "jl_project", "kron_ihvp", "sign_vote",
       "combine_flags"]


def test_build_info_keys_and_backends():
    info = deltainf.build_info()
    assert {"torch_version", "cuda_version", "cuda_arch_list", "backends"} <= set(info)
    assert "cpu" in info["backends"]
    assert set(info["backends"]) <= {"cpu", "cuda"}
    assert deltainf.has_cuda_kernels() == ("cuda" in info["backends"])
    # The loaded extension was built against the running torch (else the import would have failed).
    assert info["torch_version"] == torch.__version__
    if deltainf.has_cuda_kernels():
        assert info["cuda_version"], "a CUDA build records its CUDA version"


def test_build_info_returns_a_copy():
    deltainf.build_info()["backends"].append("tpu")
    assert "tpu" not in deltainf.build_info()["backends"]


def _write_meta(directory, **meta):
    (directory / "_build_info.json").write_text(json.dumps(meta))


def test_load_rejects_extension_built_for_another_torch(tmp_path, monkeypatch):
    _write_meta(tmp_path, torch_version="1.13.1+cu117", cuda_version="11.7", with_cuda=True, cuda_arch_list="8.0")
    monkeypatch.setattr(_extension, "_HERE", str(tmp_path))
    with pytest.raises(ImportError) as info:
        _extension.load()
    message = str(info.value)
    assert "built against torch 1.13.1+cu117" in message
    assert f"torch {torch.__version__} is running" in message
    assert "pip install --no-build-isolation -e ." in message  # says how to fix it


def test_load_accepts_matching_metadata(tmp_path, monkeypatch):
    _write_meta(tmp_path, torch_version=torch.__version__, cuda_version=None, with_cuda=False, cuda_arch_list=None)
    monkeypatch.setattr(_extension, "_HERE", str(tmp_path))
    assert _extension.load() is _extension._C


def test_load_without_metadata_file(tmp_path, monkeypatch):
    # No _build_info.json (e.g. a build tree without the metadata step): nothing to compare, just import.
    monkeypatch.setattr(_extension, "_HERE", str(tmp_path))
    assert _extension._read_build_info() is None
    assert _extension.load() is _extension._C


def test_load_explains_a_missing_extension(tmp_path, monkeypatch):
    monkeypatch.setattr(_extension, "_HERE", str(tmp_path))
    monkeypatch.delattr(deltainf, "_C")
    monkeypatch.setitem(sys.modules, "deltainf._C", None)  # makes `from deltainf import _C` fail
    with pytest.raises(ImportError, match=r"deltainf\._C could not be imported .*pip install --no-build-isolation"):
        _extension.load()


def test_installed_metadata_file_matches_the_running_torch():
    meta = _extension._read_build_info()
    if meta is None:
        pytest.skip("no _build_info.json next to the extension")
    assert meta["torch_version"] == torch.__version__


def test_every_op_is_registered_with_its_public_signature():
    assert sorted(ops.__all__) == sorted(OPS)
    assert set(OPS) <= set(reference.__all__)
    args = {
        "kron_project": ["a", "g", "U", "V"],
        "kron_project_square_sum": ["a", "g", "U", "V"],
        "kron_project_score": ["a", "g", "U", "V", "P"],
        "jl_project": ["x", "k", "seed", "dist", "offset"],
        "kron_ihvp": ["G", "Q_S", "Q_A", "lam", "damping", "eigenbasis"],
        "sign_vote": ["base", "transformed", "threshold", "min_votes"],
        "combine_flags": ["flags", "min_points"],
    }
    for name in OPS:
        schema = getattr(torch.ops.deltainf, name).default._schema
        assert [a.name for a in schema.arguments] == args[name], name
    sign_vote = torch.ops.deltainf.sign_vote.default._schema
    assert [a.name for a in sign_vote.arguments if a.kwarg_only] == ["min_votes"]


def _all_ops(a, g, U, V, P, x, G, Q_S, Q_A, lam, base, transformed):
    votes, flags = ops.sign_vote(base, transformed, -0.5, min_votes=2)
    return (
        ops.kron_project(a, g, U, V),
        ops.kron_project_square_sum(a, g, U, V),
        ops.kron_project_score(a, g, U, V, P),
        ops.jl_project(x, 37, 5, "gaussian", offset=3),
        ops.jl_project(x, 37, 5),
        ops.kron_ihvp(G, Q_S, Q_A, lam, 0.1),
        ops.kron_ihvp(G, Q_S, Q_A, lam, 0.1, eigenbasis=True),
        votes,
        flags,
        ops.combine_flags(flags, 1),
    )


def test_ops_compile_fullgraph(device):
    # One compile covering every op (compiling is the slow part): no graph breaks, eager results.
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    args = (randn(5, 2, 6), randn(5, 2, 4), randn(4, 3), randn(6, 2), randn(3, 3, 2), randn(5, 40),
            randn(2, 4, 6), torch.linalg.qr(randn(4, 4)).Q, torch.linalg.qr(randn(6, 6)).Q, randn(4, 6).abs(),
            randn(2, 9), randn(2, 4, 9))
    compiled = torch.compile(_all_ops, fullgraph=True, mode="reduce-overhead" if device != "cpu" else None)
    eager = _all_ops(*args)
    for _ in range(2 if device != "cpu" else 1):  # CUDA graphs record on the first call, replay after
        got = compiled(*args)
        for e, c in zip(eager, got):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def test_devices_fixture(devices):
    assert devices[0] == "cpu"
    assert ("cuda" in devices) == (torch.cuda.is_available() and deltainf.has_cuda_kernels())


@pytest.mark.skipif(_extension._C.flush_denormals(False) is None, reason="the CPU has no flush-to-zero mode")
@pytest.mark.parametrize("threads", [1, 2])
def test_denormals_flushed_on_every_cpu_thread_and_restored(threads):
    """Inside the context a product that underflows to a subnormal is 0 and a subnormal operand counts as 0, in the
    GEMM's threads too (torch.set_flush_denormal alone leaves half of the
    product below to a thread that still computes with them); outside, both keep their value."""
    tiny = torch.finfo(torch.float32).tiny
    a = torch.full((64, 256), tiny / 4)  # subnormal operands; two threads share this GEMM's rows
    b = torch.full((256, 256), 0.5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _extension.denormals_flushed():
            assert float((torch.tensor([1e-20]) * torch.tensor([1e-20])).item()) == 0.0
            assert torch.count_nonzero(a @ b) == 0
            with _extension.denormals_flushed():  # nested: the outer context restores
                pass
            assert torch.count_nonzero(a @ b) == 0
        assert float((torch.tensor([1e-20]) * torch.tensor([1e-20])).item()) > 0
        assert torch.count_nonzero(a @ b) == 64 * 256
    finally:
        torch.set_num_threads(before)


def test_info_self_check_covers_every_op():
    """`python -m deltainf.info` checks each op of deltainf.ops against its plain-PyTorch twin (combine_flags was
    left out)."""
    from deltainf import info, ops

    results = info._self_check("cpu")
    assert {name for name, _, _ in results} == set(ops.__all__)
    assert all(ok for _, ok, _ in results)
