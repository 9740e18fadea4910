"""The files deltainf writes and reads back: the one home of atomic writes, run-folder markers and
self-checking tensor files.

* **Atomic writes.** Every file is written under a temporary name in its own folder
  (``.<name>.<8 hex>.tmp``), flushed, ``fsync``-ed and renamed onto its final name, so a reader (or a
  rerun after ``kill -9`` or a power cut) sees the old file or the new one, never half of one. A failed
  write removes its temporary file; one left by a killed process is removed by the next write of the same
  file and by :func:`remove_stale_temps` when a run starts in that folder.
* **Run folders.** ``run.json`` says ``"status": "running"`` from a run's start and ``"complete"`` only
  after its last file is written; anything else (a kill, an error) leaves the folder marked incomplete.
* **Tensor files.** safetensors files written by :func:`write_tensors` carry a SHA-256 digest of their
  content (every tensor's name, dtype, shape and bytes in name order, and the other metadata entries) in
  their metadata; :func:`read_tensors` checks it. A damaged file is a ValueError naming the file.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["atomic_path", "atomic_open", "write_json", "write_text", "temp_beside", "commit", "discard",
           "remove_stale_temps", "RUN_FILE", "output_folder", "output_file", "mark_running", "mark_complete",
           "run_status", "run_folder",
           "DIGEST_KEY", "tensor_digest", "write_tensors", "read_tensors", "require_digest", "file_error"]

_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.d)?$")  # .d: the folder a tensor file is written in
# names of temporary files written by deltainf before this module existed (a killed run may have left them)
# (the visible ones only for the names deltainf gives its own files: a user's "draft.md.tmp" beside them stays)
_LEGACY_TEMP = re.compile(r"^(\.scores-.+\.npy|\.ekfac-.+\.tmp|(report|RESULTS|results|flagged|run|ekfac|victim|"
                          r"unlearned|clean|poison|cell|model|seed\d+|[a-z0-9-]+-seed\d+)\.(json|safetensors|md|png)"
                          r"\.tmp)$")


# ------------------------------------------------------------------------------------------ atomic writes

def temp_beside(path: str | os.PathLike) -> Path:
    """Create an empty temporary file in ``path``'s folder (which must exist) for a write of ``path``,
    after removing any temporary file an earlier, killed write of ``path`` left there."""
    path = Path(path)
    folder = path.parent  # Path("x").parent is Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(path)!r}: folder {str(folder)!r} does not exist")
    remove_stale_temps(folder, name=path.name)
    while True:
        tmp = folder / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - 2**32 names
            continue


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make the written temporary file ``tmp`` durable and rename it onto ``path`` (atomic on POSIX)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_folder(Path(path).parent)


def discard(tmp: str | os.PathLike | None) -> None:
    """Remove a temporary file (or a temporary folder of :func:`write_tensors`) if it is still there."""
    if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp)
            else:
                os.remove(tmp)


def _fsync_folder(folder: Path) -> None:
    # the rename itself lives in the folder's entry list; without this a power cut can undo it
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform or file system that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write the whole file to ``tmp``; it replaces ``p`` when the block
    ends without error and is removed otherwise (``p`` is left as it was)."""
    tmp = temp_beside(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        discard(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs):
    """``open`` for writing through :func:`atomic_path` (mode ``"w"`` or ``"wb"``)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode: expected 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
    """``json.dump(obj)`` into ``path``, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **dump_kwargs)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` into ``path``, atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None, suffix: str | None = None) -> list[str]:
    """Remove the temporary files deltainf writes through (only those: ``.<file>.<8 hex>.tmp`` and
    the names older versions used) from ``folder``, or only those of the file ``name``, or of any file whose name
    ends in ``suffix``. A folder is written by one run at a time, so any such file found when a run starts is an
    orphan of a killed one, unless a live writer holds it (:func:`hold`: a long pass writing a score file while
    another run starts beside it). Returns the names removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in os.scandir(folder):
        if not (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)):
            continue
        if name is not None:
            stale = re.fullmatch(rf"\.{re.escape(name)}\.[0-9a-f]{{8}}\.tmp(\.d)?", entry.name) is not None
        elif suffix is not None:
            stale = re.fullmatch(rf"\..+{re.escape(suffix)}\.[0-9a-f]{{8}}\.tmp", entry.name) is not None
        else:
            stale = bool(_TEMP.match(entry.name) or _LEGACY_TEMP.match(entry.name))
        if stale and not _held(entry.path):
            discard(entry.path)
            removed.append(entry.name)
    return removed


def hold(path: str | os.PathLike) -> int | None:
    """Hold the temporary file ``path`` for its writer: an OS lock (released when the returned descriptor is closed,
    or the process dies) that :func:`remove_stale_temps` leaves alone. None where the filesystem has no such locks
    (the file is then unheld, as before there were any)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _held(path: str) -> bool:
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder (.tmp.d), or gone meanwhile
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without locks: nothing is held there
        return False
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------------- run folders

RUN_FILE = "run.json"


def output_file(path, argument: str, make_folder: bool = False) -> str:
    """``path`` as a file to be written (atomically, beside it), checked before any work: FileNotFoundError naming
    ``argument`` when its folder does not exist (unless ``make_folder``: then it is made when the file is written,
    and the nearest existing folder must be writable), ValueError for an empty path, a folder, anything there that
    is not a regular file (a device, a link: the write would replace it), or a folder that cannot be written."""
    if path is None or not str(os.fspath(path)).strip():
        raise ValueError(f"{argument}: expected a file path, got {path!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{argument}: {path!r} is a folder, not a file")
    if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
        raise ValueError(f"{argument}: {path!r} exists and is not a regular file (a link or a device would be "
                         "replaced by the file written)")
    nearest = str(_nearest_existing(Path(folder))) if make_folder else folder
    if not os.path.isdir(nearest):
        if make_folder:
            raise ValueError(f"{argument}: {path!r} cannot be written ({nearest!r} is not a folder)")
        raise FileNotFoundError(f"{argument}: directory {folder!r} does not exist")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ValueError(f"{argument}: {path!r} cannot be written (its folder {nearest!r} is not writable)")
    _try_writing(nearest, path, argument)
    return path


def _nearest_existing(path: Path) -> Path:
    """``path`` or the nearest of its parents that exists (what a folder to be made would be made in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _try_writing(folder, path, argument: str) -> None:
    """ValueError naming ``argument`` when nothing can be made in ``folder``: access() grants root every folder,
    /proc and read-only mounts included, so a folder is made there and removed."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".deltainf-probe-", dir=folder))
    except OSError as err:
        raise ValueError(f"{argument}: {str(path)!r} cannot be written ({err.strerror or err} in {str(folder)!r})") \
            from err


def output_folder(out, flag: str = "--out", files: tuple[str, ...] = ()) -> Path:
    """``out`` as the folder a command writes into, checked before any work (nothing is created here): a ValueError
    naming ``flag`` for an empty path, a path that exists and is not a folder, one that cannot be written, or one
    where a file the command writes (``files``, names inside ``out``) is taken by a folder or another non-file."""
    if out is None or not str(os.fspath(out)).strip():
        raise ValueError(f"{flag}: expected a folder path, got {out!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag}: {str(out)!r} exists and is not a folder")
    nearest = _nearest_existing(out)
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: {str(out)!r} cannot be written ({str(nearest)!r} is not a writable folder)")
    _try_writing(nearest, out, flag)
    for name in files:
        taken = out / name
        # found only when the run writes it, after the work, as a raw IsADirectoryError
        if taken.exists() and not taken.is_file():
            raise ValueError(f"{flag}: {str(taken)!r} is a {'folder' if taken.is_dir() else 'non-regular file'}, "
                             f"where the run writes its {name} (remove it, or pass another {flag})")
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def mark_running(folder: str | os.PathLike, command: str, **info) -> None:
    """Create ``folder`` if needed, remove stale temporary files and mark it incomplete: ``run.json``
    with ``"status": "running"`` (the files beside it may be from this run or an earlier one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    write_json(folder / RUN_FILE, {"status": "running", "command": command, "started_utc": _now(), **info},
               indent=1, default=str)


def mark_complete(folder: str | os.PathLike, status: str = "complete", **info) -> None:
    """Mark ``folder`` with ``status`` (``"complete"`` once its last file is written; ``"failed"`` /
    ``"interrupted"`` otherwise), keeping what :func:`mark_running` recorded."""
    folder = Path(folder)
    record = run_status(folder) or {}
    record.update(info, status=status, finished_utc=_now())
    write_json(folder / RUN_FILE, record, indent=1, default=str)


def run_status(folder: str | os.PathLike) -> dict | None:
    """The ``run.json`` record of ``folder`` (``record["status"] == "complete"`` for a finished run), or
    None when it has none or it cannot be read."""
    try:
        with open(Path(folder) / RUN_FILE) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@contextlib.contextmanager
def run_folder(folder: str | os.PathLike, command: str, **info) -> Iterator[dict]:
    """Mark ``folder`` running for the block and complete at its end (``"failed"`` with the error on an
    exception, ``"interrupted"`` on Ctrl-C). The block may add entries to the yielded dict; they are
    recorded with the completion."""
    from deltainf._util import first_line

    extra: dict = {}
    try:
        # the marks inside the try: a stop that comes just after run.json is written still marks the folder
        mark_running(folder, command, **info)
        yield extra
        mark_complete(folder, **extra)
    except KeyboardInterrupt:
        _mark_stopped(folder, "interrupted", **extra)
        raise
    except BaseException as err:
        _mark_stopped(folder, "failed", error=f"{type(err).__name__}: {first_line(err)}", **extra)
        raise


def _mark_stopped(folder: str | os.PathLike, status: str, **info) -> None:
    """:func:`mark_complete` for a run that stopped, where ``run.json`` says running: not where the stop came
    before its mark (the folder is as the last run left it) or after its completion."""
    if (run_status(folder) or {}).get("status") == "running":
        mark_complete(folder, status, **info)


# ------------------------------------------------------------------------------------------- tensor files

DIGEST_KEY = "deltainf_sha256"


def file_error(what: str, path: str | os.PathLike, problem: str) -> ValueError:
    """The one-line ValueError for a defect of a file: ``<what> '<path>': <problem>``."""
    return ValueError(f"{what} {os.fspath(path)!r}: {problem}")


def tensor_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """SHA-256 (hex) of every tensor's name, dtype, shape and bytes, in name order, then of the metadata
    entries other than the digest itself, in key order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()  # a view: no copy of the tensor
        h.update(json.dumps([name, str(t.dtype), list(t.shape), int(raw.nbytes)]).encode() + b"\n")
        h.update(memoryview(raw))
    for key in sorted(metadata or {}):
        if key != DIGEST_KEY:
            h.update(json.dumps([key, metadata[key]]).encode() + b"\n")
    return h.hexdigest()


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU, contiguous) and string ``metadata`` to a safetensors file, atomically, with
    the content digest added to the metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    meta[DIGEST_KEY] = tensor_digest(tensors, meta)
    with atomic_path(path) as tmp:
        mode = os.stat(tmp).st_mode & 0o777  # a new file's, under the umask
        # safetensors writes through a temporary file of its own beside its target (".tmp" and six random
        # characters), which a kill leaves where no cleaner knows it: it writes in a folder of ours instead, named
        # after our temporary
        private = Path(f"{tmp}.d")
        private.mkdir()
        try:
            try:
                save_file(dict(tensors), os.fspath(private / "tensors"), metadata=meta)
            except SafetensorError as err:  # its I/O errors (a full disk) say neither the file nor "OSError"
                raise OSError(f"{os.fspath(path)!r} could not be written ({err})") from None
            os.replace(private / "tensors", tmp)
        finally:
            discard(private)
        os.chmod(tmp, mode)  # safetensors writes its files owner-only; every other output of a run is readable


def read_tensors(path: str | os.PathLike, what: str, *,
                 verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, checked against its recorded digest when it has one
    (files deltainf writes always do: callers that know the file is theirs add :func:`require_digest`).

    what: how errors name the file (``"factor file"``, ``"checkpoint"``, ...).
    verify: check the digest (False skips the hash, for huge files; callers keep their other checks).

    Raises FileNotFoundError (no such file) or ValueError naming the file: not a readable safetensors
    file (a damaged header, a truncated file) or content that does not match its digest. Tensor sizes
    come from the header, which safetensors checks against the file's length before reading."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r}: no such file")
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        from deltainf._util import first_line

        with open(path, "rb") as fh:
            head = fh.read(4)
        # torch.save writes a zip archive (or, in old versions, a pickle): safetensors read it as "header too large"
        hint = ("; it is a torch.save file: save the state dict with safetensors.torch.save_file(model.state_dict(), "
                "path)") if head[:2] == b"PK" or head[:1] == b"\x80" else ""
        raise file_error(what, path, f"not a readable safetensors file ({type(err).__name__}: "
                                     f"{first_line(err)}){hint}") from err
    recorded = metadata.get(DIGEST_KEY)
    if verify and recorded is not None and tensor_digest(tensors, metadata) != recorded:
        raise file_error(what, path, "its content does not match its recorded hash (the file is damaged or "
                                     "was altered)")
    return tensors, metadata


def require_digest(metadata: Mapping[str, str], what: str, path: str | os.PathLike) -> None:
    """A ValueError naming the file when a file deltainf wrote has no digest to check."""
    if DIGEST_KEY not in metadata:
        raise file_error(what, path, f"no content hash in its metadata (key {DIGEST_KEY!r}): it was altered "
                                     "or written by an older deltainf; re-create it, or skip the check "
                                     "explicitly (verify=False, --no-verify)")
