"""torch.distributed, when deltainf runs under ``torchrun`` (or in a process group the user started).

Nothing here is needed by a single process: without a process group every function is the identity of
world size 1. Under ``torchrun --nproc-per-node K`` the environment names the group
(``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` ...) and :func:`group` joins it on first use: gloo for a
model on the CPU, NCCL for one on a GPU. Objects travel between ranks as CPU tensors inside pickles
(:func:`all_gather`), so ranks on different GPUs never receive a tensor bound to another rank's device.
"""
from __future__ import annotations

import atexit
import builtins
import contextlib
import os
import signal
import sys
from typing import Any

import torch

__all__ = ["group", "one_process", "all_gather", "agree", "require_same", "describe", "raise_any", "raise_together",
           "broadcast", "barrier", "is_main", "shutdown"]


def _launched() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an int, got {os.environ['WORLD_SIZE']!r}") from None


_ALONE = [0]  # depth of one_process() blocks in this process


@contextlib.contextmanager
def one_process():
    """Inside, deltainf runs in this process alone, as if there were no process group: for a job that already runs
    under torchrun and calls deltainf on one rank (``if rank == 0: ...``), where the other ranks would never join
    its passes and this one would wait for them (gloo's timeout, 30 minutes)."""
    _ALONE[0] += 1
    try:
        yield
    finally:
        _ALONE[0] -= 1


def group(device: torch.device | str | None = None) -> tuple[int, int]:
    """(rank, world size) of this process; joins the group ``torchrun`` described if nobody has yet; (0, 1) inside
    :func:`one_process`."""
    import torch.distributed as dist

    if not dist.is_available() or _ALONE[0]:
        return 0, 1
    if not dist.is_initialized():
        if not _launched():
            return 0, 1
        _end_with_launcher()
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
        # A group left to the interpreter's teardown can abort its process (SIGABRT, "terminate called without an
        # active exception") after a run that succeeded: the group deltainf joined, it also leaves.
        atexit.register(shutdown)
    return dist.get_rank(), dist.get_world_size()


def _end_with_launcher() -> None:
    """Have the kernel stop this torchrun worker (SIGTERM) when its launcher dies. torchrun starts each worker in a
    session of its own, so a launcher killed with kill -9 left its workers running, waiting for their rendezvous or
    their peers until gloo's 30-minute timeout (seen: 30 minutes and more); what they finished is stored, and a
    rerun resumes. Linux only (prctl)."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl in this C library: the worker waits for the timeout, as before
        return
    # a job runner that blocks SIGTERM passes the blocked mask on to the launcher and its workers: the signal
    # would wait, unseen, until the worker exits
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if os.getppid() == 1:  # the launcher died before the request above: nothing will send the signal
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def all_gather(obj: Any, world: int) -> list:
    """Every rank's ``obj`` (tensors moved to the CPU), in rank order; ``[obj]`` for one process."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world
    try:
        dist.all_gather_object(out, _to_cpu(obj))
    except RuntimeError as err:  # gloo's or NCCL's words for a rank that went away ("Connection reset by peer")
        from deltainf._util import first_line

        raise RuntimeError(f"torchrun: the exchange with the other ranks failed, most likely because one of them "
                           f"stopped ({first_line(err)[:160]}); every rank must make the same calls. Rerun the same "
                           "command (with checkpoint_dir, or deltainf detect's --out, it resumes from the stored "
                           "partitions)") from err
    return out


def agree(items: dict[str, Any], world: int, needed: str) -> None:
    """ValueError on every rank unless every rank passed equal ``items`` (name -> a comparable value: a digest, a
    size): :func:`require_same` on them, gathered."""
    if world > 1:
        require_same(all_gather(items, world), needed)


def require_same(every: list[dict[str, Any]], needed: str) -> None:
    """ValueError unless every rank's dict in ``every`` (in rank order, as gathered) equals rank 0's: the message
    names the first differing item, says what is ``needed``, and names the first rank that differs. Ranks that
    disagree would otherwise merge unrelated results without a word, or wait for each other forever; every rank
    checks the same gathered values, so all of them stop together."""
    for name, value in every[0].items():
        for r, theirs in enumerate(every[1:], start=1):
            if theirs.get(name) != value:
                raise ValueError(f"{name}: under torchrun {needed} (rank {r} differs from rank 0)")


def describe(err: BaseException | None) -> tuple[str, str] | None:
    """What :func:`raise_any` needs of a rank's error to raise it on another rank: (class name, message), or None."""
    return None if err is None else (type(err).__name__, str(err))


def raise_any(every: list[tuple[str, str] | None], own: BaseException | None) -> None:
    """Raise ``own`` if this rank failed, else the first error among ``every`` (:func:`describe` of each rank's,
    gathered in rank order) as the same built-in class (RuntimeError for any other), its message prefixed with the
    rank; nothing when no rank failed. An error raised on one rank alone leaves the others waiting in their next
    collective until the backend's timeout: ranks that gather their errors with their results stop together."""
    if own is not None:
        raise _on_every_rank(own)
    for r, failure in enumerate(every):
        if failure is not None:
            name, message = failure
            cls = getattr(builtins, name, None)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                cls = RuntimeError
            raise _on_every_rank(cls(f"rank {r}: {message}"))


def _on_every_rank(err: BaseException) -> BaseException:
    """``err``, marked as one that every rank raises (:func:`reported_elsewhere`)."""
    try:
        err.deltainf_every_rank = True
    except AttributeError:  # an exception class with __slots__: it is then reported on every rank
        pass
    return err


def reported_elsewhere(err: BaseException) -> bool:
    """True on ranks other than 0 for an error that every rank raised together: rank 0 reports it, once."""
    return getattr(err, "deltainf_every_rank", False) and not is_main()


def raise_together(err: Exception | None, world: int) -> None:
    """:func:`raise_any` on every rank's ``err`` (None where a rank succeeded): every rank raises, or none."""
    if world == 1:
        if err is not None:
            raise err
        return
    raise_any(all_gather(describe(err), world), err)


def broadcast(obj: Any, world: int, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [_to_cpu(obj)]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def is_main() -> bool:
    """True on rank 0 (and in a single process, or inside :func:`one_process`): the rank that writes shared files
    and reports."""
    import torch.distributed as dist

    if _ALONE[0]:
        return True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def shutdown() -> None:
    """Leave the process group joined by :func:`group` (the end of a command-line run, and at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
