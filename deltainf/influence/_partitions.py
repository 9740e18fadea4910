"""Passes over the training data in fixed partitions: the unit of work shared between ranks, of the
reduction order and of resuming.

A pass walks the loader in its order and cuts it into *partitions* of about ``size`` examples (a
partition starts at the first batch that begins ``size`` or more examples after the previous partition
began), numbered 0, 1, 2, ... The layout depends on the loader and ``size`` only, never on the number
of processes. Partition p is computed, from zero, by rank ``p mod K``; every rank still iterates the
whole loader (so every rank sees the same layout) but runs the model only on its own partitions. After
each *round* of K partitions the ranks exchange their results and every rank merges them in partition
order. So the merged result is the same sequence of floating-point operations for any K (K = 1
included): factors, scores and flagged sets do not depend on the world size, bit for bit, on one
machine.

With a checkpoint folder, each finished partition is written there atomically (a self-checking
safetensors file) together with the SHA-256 of the data it was computed on; a rerun of the same pass
finds it, checks that the loader yields the same data for that partition, and loads it instead of
computing it again: a pass killed at any point resumes with the same result, and a partition computed
on other data is refused, never mixed in. A folder serves one run at a time (:func:`folder_lock`).

Under torchrun an error on one rank (its model, its partition file) is held until the next exchange of
results, where every rank raises it: a rank never waits alone for a rank that has stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from deltainf import _dist
from deltainf._files import discard, read_tensors, tensor_digest, write_tensors
from deltainf._util import first_line

__all__ = ["PartitionStore", "run_partitioned", "batch_digest", "remove_partition_files", "folder_lock"]

DEFAULT_PARTITION_SIZE = 4096
_SAME_DATA = ("every rank must read the same examples in the same order and batches: build the same loader (the same "
              "batch size) on every rank, without a per-rank shuffle or shard (deltainf shares the work)")


class PartitionStore:
    """Finished partitions of the passes of one run (``key``) in ``folder``. ``probe``: what the model gives on the
    run's first batch, kept with every partition; a partition whose model gave other values (beyond round-off) is
    refused when resumed, as one of other data is."""

    def __init__(self, folder: str | os.PathLike, key: str, probe: torch.Tensor | None = None):
        self.folder = Path(folder)
        self.key = key[:16]
        self.probe = None if probe is None else probe.detach().to("cpu", torch.float64).contiguous()
        self._read: dict[tuple[str, int], tuple[dict, dict]] = {}  # (kind, p) -> what has() read of it
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"checkpoint_dir: cannot create {str(self.folder)!r} ({err.strerror})") from None

    def path(self, kind: str, p: int) -> Path:
        return self.folder / f"{kind}-{self.key}-{p:06d}.safetensors"

    def has(self, kind: str, p: int) -> bool:
        """Whether partition ``p`` of ``kind`` is stored and readable: a damaged file (a bit flipped on disk, a copy
        cut short) is removed, with a warning, and recomputed (every rerun stopped on it: "not a readable safetensors
        file"). What was read is kept for :meth:`load`."""
        path = self.path(kind, p)
        if not path.is_file():
            return False
        try:
            self._read[(kind, p)] = read_tensors(path, "checkpoint file")
        except ValueError as err:
            warnings.warn(f"checkpoint_dir {str(self.folder)!r}: {first_line(err)}; it is removed and recomputed",
                          stacklevel=2)
            discard(path)
            return False
        return True

    def save(self, kind: str, p: int, tensors: dict[str, torch.Tensor], digest: str) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if self.probe is not None:
            tensors[_PROBE] = self.probe
        write_tensors(self.path(kind, p), tensors, {"data_sha256": digest or ""})

    def load(self, kind: str, p: int, digest: str | None) -> dict[str, torch.Tensor]:
        path = self.path(kind, p)
        read = self._read.pop((kind, p), None)
        tensors, meta = read if read is not None else read_tensors(path, "checkpoint file")
        piece = f"layer {p}'s eigendecomposition" if kind == "eigen" else f"partition {p} of the {kind} pass"
        if digest is not None and meta.get("data_sha256") != digest:
            raise ValueError(
                f"checkpoint_dir {str(self.folder)!r}: {piece} was computed on other data "
                f"(or other batches of it) than the loader yields now ({path.name}); remove the folder or use "
                "another one")
        probe = tensors.pop(_PROBE, None)
        if self.probe is not None and probe is not None and (
                probe.shape != self.probe.shape or not torch.allclose(
                    probe, self.probe, rtol=1e-3, atol=1e-3 * float(self.probe.abs().max().clamp_min(1e-30)))):
            raise ValueError(
                f"checkpoint_dir {str(self.folder)!r}: {piece} was computed by a model that "
                f"gives other outputs on the first batch ({path.name}), although its state dict is the same (an "
                "attribute or a non-persistent buffer changed?); remove the folder or use another one")
        return tensors

    @staticmethod
    def keys_in(folder: str | os.PathLike) -> set[str]:
        """The run keys of the partition files in ``folder`` (none when it does not exist)."""
        folder = Path(folder)
        if not folder.is_dir():
            return set()
        return {m.group(1) for f in folder.iterdir() if (m := _PARTITION_FILE.match(f.name))}

    def clear(self) -> None:
        """Remove every file of this run: finished partitions and the temporary files of killed writes
        (``.<name>.<hex>.tmp``, which the same pattern matches)."""
        for f in self.folder.glob(f"*-{self.key}-*"):
            discard(f)


_PROBE = "_probe_logits"  # a partition file's copy of the run's first-batch logits
_HELD: dict[tuple[str, int], int] = {}  # (folder, rank) -> calls of this process inside folder_lock


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, rank: int, world: int, name: str = "checkpoint_dir"):
    """Hold ``folder`` for this process as rank ``rank`` while inside: ValueError (on every rank) when another
    process holds it. Two runs in one folder would read each other's partitions as they are written and removed
    (the second fails when the first clears them, or resumes from a half-cleared pass); the lock file
    (``.lock-rank<r>``, one per rank, so the ranks of one run may share a folder) is an OS lock that a killed
    process releases, and it is removed on the way out, with the folder when this call created it and nothing
    else was written there (a run refused before its work leaves nothing behind). Re-entrant within a process.
    ``name``: the argument or flag the errors name."""
    folder = Path(folder)
    err, fd, created = None, None, False
    key = (os.path.realpath(folder), rank)
    if _HELD.get(key):
        fd = -1
    else:
        try:
            created = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            fd = _lock_file(folder / f".lock-rank{rank}", name)
        except OSError as e:
            err = ValueError(f"{name}: cannot create {str(folder)!r} ({e.strerror})")
        except ValueError as e:
            err = e
    try:
        _dist.raise_together(err, world)
    except BaseException:
        _release(folder / f".lock-rank{rank}", fd, created)
        raise
    if rank == 0 and fd is not None and fd >= 0:
        _remove_unheld_locks(folder, world)
    _HELD[key] = _HELD.get(key, 0) + 1
    try:
        yield
    finally:
        _HELD[key] -= 1
        if not _HELD[key]:
            del _HELD[key]
            _release(folder / f".lock-rank{rank}", fd, created)


def _remove_unheld_locks(folder: Path, world: int) -> None:
    """Remove the lock files of ranks this run does not have (a killed run of more ranks left them, and the folder
    could never be removed) once no process holds them."""
    import fcntl

    for path in folder.glob(".lock-rank*"):
        r = path.name.removeprefix(".lock-rank")
        if not r.isdigit() or int(r) < world:
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: that process is still on its way out
            os.close(fd)
            continue
        _release(path, fd)


def _lock_file(path: Path, name: str) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock (None where the OS has no ``flock``)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock, as before
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"{name} {str(path.parent)!r} is in use by another run (process {holder}): a "
                             "folder serves one run at a time; wait for it to end or pass another folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file while this process waited to lock it: lock the new one
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


def _release(path: Path, fd: int | None, created: bool = False) -> None:
    if fd is None or fd < 0:
        return
    discard(path)  # removed while still locked: a process that opened it meanwhile sees it gone, and retries
    os.close(fd)
    if created:
        with contextlib.suppress(OSError):  # not empty: the run wrote there, or another rank still holds it
            path.parent.rmdir()


# A partition file of any run (PartitionStore.path; the run's key is group 1), or the temporary file of a killed
# write of one.
_PARTITION_FILE = re.compile(r"^\.?[a-z]+-([0-9a-f]{16})-\d{6}\.safetensors(\.[0-9a-f]{8}\.tmp(\.d)?)?$")


def remove_partition_files(folder: str | os.PathLike) -> None:
    """Remove the partition files of every run from ``folder`` (and the folder, when that leaves it empty); any
    other file there is left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in os.scandir(folder):
        if (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)) \
                and _PARTITION_FILE.match(entry.name):
            discard(entry.path)
    try:
        folder.rmdir()
    except OSError:  # not empty: the user's files stay
        pass


def batch_digest(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> bytes:
    """One batch (inputs, labels, dataset positions) as the bytes a running SHA-256 of the data is fed."""
    return tensor_digest({"idx": idx, "x": x, "y": y}).encode()


def run_partitioned(batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]], *, kind: str,
                    size: int, rank: int, world: int, store: PartitionStore | None,
                    new: Callable[[], Any], work: Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], Any],
                    pack: Callable[[Any], dict], unpack: Callable[[dict], Any],
                    merge: Callable[[Any], None]) -> list[str] | None:
    """Run one pass (module docstring) and merge every partition's result in partition order.

    batches: (x, y, dataset positions, stream position of the batch's first example), in loader order.
    new() -> an empty partition state; work(state, x, y, idx) -> state after one batch; pack(state) -> a
    dict of tensors (what is stored and sent between ranks); unpack(dict) -> state; merge(state) is called
    on every rank for partitions 0, 1, 2, ... in that order.
    Returns the data digests of the partitions in order when a store is used (None otherwise).
    """
    hashing = store is not None
    # under torchrun every rank hashes everything it reads, and the ranks compare at every exchange: ranks whose
    # loaders yield other data (another order, another length) are stopped, never merged
    everything = hashlib.sha256() if world > 1 else None
    digests: list[str] = []
    pending: dict[int, tuple[bool, Any, str | None]] = {}  # p -> (packed?, result, data digest)
    rounds_done = 0
    failure: list[Exception] = []  # under torchrun: this rank's error, raised on every rank at the next exchange

    def close(p: int, state, h, reuse: bool) -> None:
        digest = h.hexdigest() if h is not None else None
        if reuse:
            pending[p] = (True, store.load(kind, p, digest), digest)
            return
        packed = pack(state) if store is not None or world > 1 else None
        if store is not None:
            store.save(kind, p, packed, digest)
        # one process merges the state itself; ranks exchange the packed tensors
        pending[p] = (True, packed, digest) if world > 1 else (False, state, digest)

    def exchange(upto: int, last: bool = False) -> None:
        # rounds [rounds_done, upto): every rank calls the same collectives in the same order
        nonlocal rounds_done
        while rounds_done < upto:
            mine = pending.pop(rounds_done * world + rank, None)
            read = {} if everything is None else \
                {"train_loader": (everything.hexdigest(), last and rounds_done == upto - 1)}
            failed = failure[0] if failure else None
            gathered = _dist.all_gather((read, mine, _dist.describe(failed)), world)
            _dist.raise_any([f for *_, f in gathered], failed)  # before the digests: a failed rank stopped reading
            _dist.require_same([r for r, *_ in gathered], _SAME_DATA)
            for _, item, _ in gathered:
                if item is None:
                    continue
                is_packed, result, digest = item
                merge(unpack(result) if is_packed else result)
                if digest is not None:
                    digests.append(digest)
            rounds_done += 1

    def held(step: Callable, *args):
        # one process raises at once; a rank of several takes its error to the exchange of the current round
        if world == 1:
            return step(*args)
        try:
            return step(*args)
        except Exception as err:
            failure.append(err)
            exchange(p // world + 1)  # raises on every rank

    p, begin = -1, 0
    state, h, reuse, owned = None, None, False, False
    batches = iter(batches)
    while True:
        try:
            x, y, idx, start = next(batches)
        except StopIteration:
            break
        except Exception as err:
            # the loader itself failed on this rank (a file only this machine lacks): the others learn it at the
            # exchange, not from gloo's "Connection reset by peer" when this process ends
            if world == 1:
                raise
            failure.append(err)
            exchange(max(p, 0) // world + 1)  # raises on every rank
            raise
        if p < 0 or start - begin >= size:
            if p >= 0 and owned:
                held(close, p, state, h, reuse)
            p, begin = p + 1, start
            exchange(p // world)
            owned = p % world == rank
            h = hashlib.sha256() if owned and hashing else None
            reuse = owned and hashing and store.has(kind, p)
            state = new() if owned and not reuse else None
        # each batch is hashed once, for the ranks' comparison and its partition's checkpoint alike
        hashed = batch_digest(x, y, idx) if everything is not None or h is not None else None
        if everything is not None:
            everything.update(hashed)
        if not owned:
            continue
        if h is not None:
            h.update(hashed)
        if not reuse:
            state = held(work, state, x, y, idx)
    if p >= 0 and owned:
        held(close, p, state, h, reuse)
    exchange(p // world + 1 if p >= 0 else 0, last=True)
    return digests if hashing else None

