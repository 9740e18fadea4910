"""splitmix64 (Steele, Lea & Flood 2014), the counter-based mixer behind every seeded draw that must not
depend on batching or device: the JL matrix (csrc/include/deltainf/rng.h and its twin in reference.py),
the true-Fisher labels, the TRAK projection seeds."""
from __future__ import annotations

import torch

__all__ = ["GOLDEN", "signed64", "mix64", "mix64_int", "row_key"]

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def signed64(u: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch's int64 wraps modulo 2^64)."""
    u &= MASK64
    return u - (1 << 64) if u >= (1 << 63) else u


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (logical shifts emulated with masks)."""

    def shr(v: torch.Tensor, s: int) -> torch.Tensor:
        return (v >> s) & ((1 << (64 - s)) - 1)

    z = (z ^ shr(z, 30)) * signed64(_MIX1)
    z = (z ^ shr(z, 27)) * signed64(_MIX2)
    return z ^ shr(z, 31)


def mix64_int(z: int) -> int:
    """splitmix64's finaliser on a Python int (unsigned 64-bit result)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & MASK64
    return z ^ (z >> 31)


def row_key(seed: int, rows: torch.Tensor, salt: int) -> torch.Tensor:
    """The int64 key of each row (a JL feature row, a dataset position) for the stream (seed, salt):
    mix64(mix64(seed ^ salt) + (row + 1) * GOLDEN), as the kernels compute it."""
    key = mix64(torch.tensor(signed64(seed ^ salt), dtype=torch.int64))
    return mix64(key + (rows + 1) * signed64(GOLDEN))
