"""``python -m deltainf.info``: what was built, what is available, and a quick self-check of every
kernel against the plain-PyTorch reference on each available device."""

from __future__ import annotations

import platform
import sys

import torch

import deltainf
from deltainf import ops, reference


def _self_check(device: str) -> list[tuple[str, bool, float]]:
    """Run each op on small random inputs and compare with reference.py; returns (op, ok, max error)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    a, g, U, V, P = rand(9, 3, 6), rand(9, 3, 5), rand(5, 4), rand(6, 3), rand(2, 4, 3)
    x = rand(4, 300)
    G, lam = rand(2, 5, 6), rand(5, 6).abs() + 0.1
    Q_S, Q_A = torch.linalg.qr(rand(5, 5))[0], torch.linalg.qr(rand(6, 6))[0]
    base, transformed = rand(2, 50), rand(2, 7, 50)
    flags = rand(3, 50) > 0
    cases = {
        "kron_project": (ops.kron_project(a, g, U, V), reference.kron_project(a, g, U, V)),
        "kron_project_square_sum": (ops.kron_project_square_sum(a, g, U, V), reference.kron_project_square_sum(a, g, U, V)),
        "kron_project_score": (ops.kron_project_score(a, g, U, V, P), reference.kron_project_score(a, g, U, V, P)),
        "jl_project": (ops.jl_project(x, 100, 3), reference.jl_project(x, 100, 3)),
        "kron_ihvp": (ops.kron_ihvp(G, Q_S, Q_A, lam, 0.01), reference.kron_ihvp(G, Q_S, Q_A, lam, 0.01)),
        "sign_vote": (ops.sign_vote(base, transformed, min_votes=4)[0].double(),
                      reference.sign_vote(base, transformed, 0.0, 4)[0].double()),
        "combine_flags": (ops.combine_flags(flags, 2).double(), reference.combine_flags(flags, 2).double()),
    }
    results = []
    for name, (got, want) in cases.items():
        err = (got.cpu() - want.cpu()).abs().max().item() if got.numel() else 0.0
        results.append((name, err <= 1e-8 * (1 + want.abs().max().item()), err))
    return results


def main() -> int:
    info = deltainf.build_info()
    print(f"deltainf {deltainf.__version__} on Python {platform.python_version()} ({platform.machine()})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); extension built against torch "
          f"{info['torch_version']}, CUDA '{info['cuda_version']}', arch list '{info['cuda_arch_list']}'")
    print(f"kernels built for: {', '.join(info['backends'])}")
    devices = ["cpu"]
    if "cuda" in info["backends"] and torch.cuda.is_available():
        devices.append("cuda")
        print(f"GPU: {torch.cuda.get_device_name()}")
    elif "cuda" in info["backends"]:
        print("CUDA kernels are built but no GPU is visible: running the CPU self-check only")
    ok = True
    for device in devices:
        for name, passed, err in _self_check(device):
            ok &= passed
            print(f"  [{device}] {name:<26} {'ok' if passed else 'MISMATCH'}  (max |error| {err:.2e})")
    print("self-check passed" if ok else "self-check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
