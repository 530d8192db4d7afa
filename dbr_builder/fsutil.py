"""Small filesystem helpers shared by every stage: atomic writes and fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only on success.

    A crash or exception leaves ``dest`` untouched (never half-written).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(dest: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``dest`` atomically (temporary file, then rename)."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_json_atomic(dest: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as pretty, key-sorted JSON atomically."""
    return write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of ``obj`` (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_VOLATILE = ("-wal", "-shm", "-journal")


def tree_fingerprint(paths: list[Path]) -> str:
    """Cheap fingerprint of files/folders: relative names, sizes and mtimes.

    Used by ``dbr run`` to tell whether a stage's inputs or outputs changed.
    A missing path contributes ``None`` so that its later appearance changes the hash.
    SQLite's ``-wal``/``-shm``/``-journal`` sidecars are skipped: merely reading a store
    in WAL mode touches them, which would make every rerun look like a change.
    """
    items: list[Any] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            items.append([str(p), None])
        elif p.is_file():
            st = p.stat()
            items.append([str(p), st.st_size, st.st_mtime_ns])
        else:
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    if name.endswith(_VOLATILE):
                        continue
                    fp = Path(root) / name
                    st = fp.stat()
                    items.append([str(fp), st.st_size, st.st_mtime_ns])
    return stable_hash(items)


def read_parquet(path: str | os.PathLike[str], remedy: str) -> Any:
    """``polars.read_parquet`` with a clear error naming ``path`` if it is truncated or not parquet.

    ``remedy`` says how to rebuild the file (e.g. "rerun `dbr index PACS ...`").
    """
    import polars as pl

    try:
        return pl.read_parquet(path)
    except pl.exceptions.PolarsError as e:
        from dbr_builder.cli import UserError

        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: unreadable parquet file ({reason}); {remedy}") from None
