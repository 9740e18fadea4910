"""Ways to damage a safetensors file, for the tests of the files that check themselves."""
from __future__ import annotations

import random
import struct
from pathlib import Path

import torch


def header_span(path) -> tuple[int, int]:
    """(start, end) byte offsets of the JSON header; the tensor data run from ``end`` to the end of the file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8, 8 + n


def tensor_start(path, name: str) -> int:
    """Byte offset in the file of the first byte of tensor ``name``'s data."""
    import json

    start, end = header_span(path)
    with open(path, "rb") as f:
        f.seek(start)
        return end + json.loads(f.read(end - start))[name]["data_offsets"][0]


def flip_bit(path, bit: int) -> None:
    """Flip bit ``bit`` (counted from the start of the file) in place."""
    data = bytearray(Path(path).read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    Path(path).write_bytes(bytes(data))


def random_bits(path, count: int, seed: int, where: str) -> list[int]:
    """``count`` distinct bit positions drawn with ``seed`` from the file's header (the JSON after the
    length field) or its tensor data."""
    start, end = header_span(path)
    size = Path(path).stat().st_size
    lo, hi = (start, end) if where == "header" else (end, size)
    return random.Random(seed).sample(range(8 * lo, 8 * hi), count)


def read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def rewrite(path, out, tensors: dict | None = None, metadata: dict | None = None, drop=(), rehash: bool = True):
    """Write ``out``: the file at ``path`` with some tensors and metadata entries replaced (``tensors`` /
    ``metadata``) or removed (``drop``, names of either), and its content hash recomputed when ``rehash``
    (so that only the loader's other checks can find the change), else kept as it was."""
    from safetensors.torch import save_file

    from deltainf._files import DIGEST_KEY, tensor_digest

    t, m = read(path)
    t.update(tensors or {})
    m.update(metadata or {})
    for name in drop:
        t.pop(name, None)
        m.pop(name, None)
    if rehash and DIGEST_KEY in m:
        m[DIGEST_KEY] = tensor_digest(t, m)
    save_file({k: v.contiguous() for k, v in t.items()}, str(out), metadata=m)
    return out
