"""Loads deltainf._C and checks it was built against the torch that is running.

The build records its torch version twice on purpose: in ``_build_info.json`` beside the binary, read
*before* the import (loading an extension built against another torch can fail with an undefined
symbol or crash outright, so the check must not need the binary), and compiled into ``_C`` itself,
which :func:`build_info` reports together with the backends whose kernels are registered."""

from __future__ import annotations

import contextlib
import json
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_BUILD_HINT = "rebuild it from the repository root: pip install --no-build-isolation -e ."


def _read_build_info() -> dict | None:
    path = os.path.join(_HERE, "_build_info.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load():
    """Import the compiled extension, raising an ImportError that says how to fix a missing or stale build."""
    meta = _read_build_info()
    if meta is not None and meta.get("torch_version") != torch.__version__:
        raise ImportError(
            f"deltainf's extension was built against torch {meta.get('torch_version')} but torch "
            f"{torch.__version__} is running; a compiled extension only works with the torch it was built "
            f"against: {_BUILD_HINT}"
        )
    try:
        from deltainf import _C
    except ImportError as err:
        raise ImportError(f"deltainf's compiled extension deltainf._C could not be imported ({err}); {_BUILD_HINT}") from err
    return _C


_C = load()


def build_info() -> dict:
    """What the extension was built with: torch/CUDA versions, CUDA arch list, backends ('cpu', 'cuda')."""
    return dict(_C.build_info())


def has_cuda_kernels() -> bool:
    """True when the extension holds the CUDA kernels (built with CUDA), whether or not a GPU is present."""
    return "cuda" in build_info()["backends"]


@contextlib.contextmanager
def denormals_flushed():
    """Subnormal floats flushed to zero on the CPU (this thread and ATen's threads) for the duration, the previous
    mode restored after. Below float32's smallest normal number (1.2e-38) such values add nothing a float32 sum
    can hold, but an x86 CPU computes with them, and with products that underflow to them inside a GEMM, through
    a microcode assist: the well-fitted examples of a trained network have gradients that small."""
    was = _C.flush_denormals(True)
    try:
        yield
    finally:
        if was is False:
            _C.flush_denormals(False)
