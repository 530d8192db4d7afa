"""Advisory per-stage locks: two dbr processes never write the same outputs at once.

``stage_lock(W, "publish")`` holds an exclusive ``fcntl`` lock on ``W/.locks/publish.lock``
for the duration of a ``with`` block. A second process asking for the same lock fails at
once with a message naming the holder's PID and command line (written into the lock file
by the holder). The kernel drops the lock when its holder exits, even after ``kill -9``,
so a lock file left on disk never blocks anyone. Lock names are per stage and per unit of
output (``generate-PACS-00001-of-00004``): independent shards never block each other.

The locks are POSIX record locks (``fcntl.lockf``), which belong to the process: child
processes (decode workers, an inference engine) do not inherit them, so a child that
outlives a killed parent never keeps a stage locked. They guard against other processes,
not other threads; and the holder must not open and close its own lock file elsewhere
(closing any descriptor of the file drops a POSIX lock), which only this module does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from dbr_builder.core.sanitize import redact
from dbr_builder.core.workdir import locks_dir
from dbr_builder.errors import UserError

_held: set[str] = set()  # lock files this process holds


class LockHeld(UserError):
    """Another process holds the lock."""


def lock_path(workdir: str | os.PathLike[str], name: str) -> Path:
    """``W/.locks/<name>.lock`` (``name`` made file-name safe)."""
    return locks_dir(workdir) / (re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip(".") + ".lock")


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "a dbr process that is still starting"
    return f"PID {info['pid']}: {info.get('command', '?')}, since {info.get('started', '?')}"


@contextlib.contextmanager
def stage_lock(workdir: str | os.PathLike[str], name: str, what: str | None = None) -> Iterator[Path]:
    """Hold the exclusive lock ``name`` of work directory ``workdir`` (see module doc).

    Raises :class:`LockHeld` naming the holder when another process holds it.
    """
    path = lock_path(workdir, name)
    key = os.path.realpath(path)
    if key in _held:  # already ours (a nested call): POSIX locks are per process, and closing
        yield path  # a second descriptor of the file would drop the outer one
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        # A read-only work directory: no process can write it, so there is nothing to guard;
        # the stage reports the read-only folder itself if it needs to write there.
        yield path
        return
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise LockHeld(
                f"{path}: {what or name} is already running on this work directory ({_holder(fd)}); "
                "wait for it to finish (or stop it), then rerun"
            ) from None
        info = {"pid": os.getpid(), "command": redact(" ".join(["dbr" if i == 0 else a for i, a in enumerate(sys.argv)])),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        except OSError:
            pass  # a full disk: the lock still holds, only the holder's description is missing
        _held.add(key)
        try:
            yield path
        finally:
            _held.discard(key)
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
    finally:
        os.close(fd)  # releases the lock
