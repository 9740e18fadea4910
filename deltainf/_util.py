"""Small helpers shared across deltainf: the one home of each.

Messages go through the ``deltainf`` logger (the command line shows INFO and up; ``--quiet`` warnings
only, ``--verbose`` DEBUG too); a library user sees nothing until they configure logging. Progress bars
honour ``TQDM_DISABLE`` as well as each function's ``progress`` argument.
"""
from __future__ import annotations

import logging
import os
import sys

import torch
from tqdm.auto import tqdm

__all__ = ["log", "progress_bar", "model_device", "first_line", "log_to_console"]

log = logging.getLogger("deltainf")
log.addHandler(logging.NullHandler())


def _tqdm_disabled_by_env() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress_bar(iterable=None, enabled: bool = True, **kwargs):
    """``tqdm(iterable, **kwargs)``, hidden when ``enabled`` is false or ``TQDM_DISABLE`` is set."""
    return tqdm(iterable, disable=not enabled or _tqdm_disabled_by_env(), **kwargs)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model without either."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class _ConsoleHandler(logging.Handler):
    """Writes records to stdout through tqdm, so that a message does not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def log_to_console(level: int = logging.INFO) -> None:
    """Show the ``deltainf`` logger's messages of ``level`` and above on the console (the command line
    does this; a library user configures logging as they like)."""
    for h in [h for h in log.handlers if isinstance(h, _ConsoleHandler)]:
        log.removeHandler(h)
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
