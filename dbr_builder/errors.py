"""Errors a user can act on; the bottom layer, imported by every other module.

``cli`` prints them as one line without a traceback (exit 1).
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback (exit 1)."""


class ConfigError(ValueError):
    """A config file is missing, unreadable or does not match its schema."""


def describe_os_error(e: OSError) -> str:
    """One line for an OS error: the path, what went wrong and what to check."""
    if not e.filename or not e.strerror:
        return str(e)  # a stage's own message (e.g. "no manifest ...; run `dbr index` first")
    where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
    hint = {
        errno.EACCES: "check the permissions or choose another folder",
        errno.EPERM: "check the permissions or choose another folder",
        errno.EROFS: "the file system is read-only; choose another folder",
        errno.ENOTDIR: "a part of this path is a file, not a folder; choose another path",
        errno.EEXIST: "a file is in the way of a folder; choose another path or move the file",
        errno.EISDIR: "this is a folder; give a file",
        errno.ENOSPC: "the disk is full; free space and rerun (finished work is kept)",
        errno.EDQUOT: "the disk quota is used up; free space and rerun (finished work is kept)",
        errno.EFBIG: "the file is too large for this file system; choose another folder",
        errno.ENOENT: "check the path",
    }.get(e.errno or 0, "check the path")
    return f"{where}: {e.strerror}; {hint}"
