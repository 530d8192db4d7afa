"""Logging for the library and the ``dbr`` command: one ``dbr`` logger tree, rank 0 only under DDP.

Stage code logs progress with ``get_logger(__name__)``; the CLI configures the handler (plain
messages on stdout, warnings and errors on stderr). Under a distributed launch (``torchrun``,
``accelerate launch``, submitit's distributed environment: all set ``RANK``) only rank 0 logs
INFO messages and shows progress bars; warnings and errors of every rank are kept, tagged with
the rank, because a failing rank must never be silent.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT_LOGGER = "dbr"


def rank() -> int:
    """This process's global rank under a distributed launch (0 when not distributed)."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed)."""
    return rank() == 0


def show_progress(progress: bool = True) -> bool:
    """Whether a progress bar should be drawn here: asked for, and on rank 0 only."""
    return bool(progress) and is_main_process()


class RankZeroFilter(logging.Filter):
    """Pass INFO and below on rank 0 only; pass warnings from every rank, tagged with the rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        r = rank()
        if r == 0:
            return True
        if record.levelno >= logging.WARNING:
            record.msg = f"[rank {r}] {record.msg}"
            return True
        return False


class _MaxLevel(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class _ConsoleHandler(logging.StreamHandler):
    """A handler writing to the *current* ``sys.stdout``/``sys.stderr`` (they may be swapped later)."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self._which = which

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return getattr(sys, self._which)

    @stream.setter
    def stream(self, _value) -> None:
        pass


def get_logger(name: str) -> logging.Logger:
    """The logger of a module: ``dbr.<module path without the package>``."""
    short = name.removeprefix("dbr_builder.").removeprefix("dbr_builder")
    return logging.getLogger(f"{ROOT_LOGGER}.{short}" if short else ROOT_LOGGER)


def setup_logging(level: int = logging.INFO) -> None:
    """Plain messages to stdout (INFO) and stderr (WARNING+), rank 0 only for INFO; idempotent."""
    root = logging.getLogger(ROOT_LOGGER)
    for h in list(root.handlers):
        if getattr(h, "_dbr", False):
            root.removeHandler(h)
    out = _ConsoleHandler("stdout")
    out.addFilter(_MaxLevel(logging.WARNING))
    err = _ConsoleHandler("stderr")
    err.setLevel(logging.WARNING)
    for h, fmt in ((out, "%(message)s"), (err, "%(levelname)s: %(message)s")):
        h.setFormatter(logging.Formatter(fmt))
        h.addFilter(RankZeroFilter())
        h._dbr = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)
