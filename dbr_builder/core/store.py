"""The generation store: an append-only, crash-proof record of every teacher candidate.

One row per candidate, keyed by ``request_key`` = content hash of (image_id, prompt id,
model, sampling params, sample index). Rows live in SQLite databases in WAL mode under
``W/generations/<Dataset>/``:

- ``results.sqlite``                     an unsharded run (and the target of a merge)
- ``results-<I>-of-<N>.sqlite``          shard I of N (``--shard I --num-shards N``)

Every batch of results is committed in one transaction, so ``kill -9`` at any moment loses
at most the batch in flight and never leaves a torn row; a rerun skips every key already
stored without error. A failed request is stored with ``error`` set and ``text`` null; a
later success replaces it (a good row is never overwritten). Shards are separate files so
that N processes (one per GPU, a Slurm array, several nodes) never contend for a lock;
``read_results`` reads them all, ``merge`` folds them into ``results.sqlite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbr_builder.core.sanitize import clean_text, redact
from dbr_builder.core.workdir import generations_dir
from dbr_builder.errors import UserError

COLUMNS = (
    "request_key", "image_id", "prompt_name", "prompt_id", "model", "params",
    "sample_index", "text", "finish_reason", "out_tokens", "error",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    request_key   TEXT NOT NULL UNIQUE,
    image_id      TEXT NOT NULL,
    prompt_name   TEXT NOT NULL,
    prompt_id     TEXT NOT NULL,
    model         TEXT NOT NULL,
    params        TEXT NOT NULL,
    sample_index  INTEGER NOT NULL,
    text          TEXT,
    finish_reason TEXT,
    out_tokens    INTEGER,
    error         TEXT,
    attempts      INTEGER NOT NULL DEFAULT 1,
    created       REAL NOT NULL
);
-- The resume scan reads only this small index, never the row pages holding the texts.
CREATE INDEX IF NOT EXISTS results_done ON results(request_key) WHERE error IS NULL;
-- Run state; key 'complete' is set when a generate run over this file ended (the shard's
-- completion marker: it travels with the file when a shard is copied to another node).
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# A good row is final; an error row is replaced by the next attempt (good or not).
_UPSERT = f"""
INSERT INTO results ({", ".join(COLUMNS)}, attempts, created)
VALUES ({", ".join("?" * len(COLUMNS))}, 1, ?)
ON CONFLICT(request_key) DO UPDATE SET
    text = excluded.text, finish_reason = excluded.finish_reason,
    out_tokens = excluded.out_tokens, error = excluded.error,
    attempts = results.attempts + excluded.attempts, created = excluded.created
WHERE results.error IS NOT NULL
"""


# Merging: same rule as _UPSERT; attempts are the max because shards never share keys' attempts.
_MERGE = f"""
INSERT INTO results ({", ".join(COLUMNS)}, attempts, created)
SELECT {", ".join(COLUMNS)}, attempts, created FROM src.results WHERE true
ON CONFLICT(request_key) DO UPDATE SET
    text = excluded.text, finish_reason = excluded.finish_reason,
    out_tokens = excluded.out_tokens, error = excluded.error,
    attempts = MAX(results.attempts, excluded.attempts), created = excluded.created
WHERE results.error IS NOT NULL
"""


def request_key(image_id: str, prompt_id: str, model: str, params: str, sample_index: int) -> str:
    """Content hash identifying one candidate (32 hex chars = 128 bits)."""
    blob = "\x1f".join((image_id, prompt_id, model, params, str(sample_index))).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]


def params_json(params: dict[str, Any]) -> str:
    """Canonical JSON of sampling params (key order and int/float spelling do not matter)."""
    norm = {k: (float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v)
            for k, v in params.items() if v is not None}
    return json.dumps(norm, sort_keys=True, separators=(",", ":"))


@dataclass
class Row:
    """One candidate (or one failed attempt) to record."""

    request_key: str
    image_id: str
    prompt_name: str
    prompt_id: str
    model: str
    params: str
    sample_index: int
    text: str | None
    finish_reason: str | None
    out_tokens: int | None
    error: str | None = None

    def values(self, now: float) -> tuple:
        # Text from a backend may hold lone surrogates (refused by SQLite) or an echoed secret.
        return (self.request_key, self.image_id, self.prompt_name, self.prompt_id, self.model, self.params,
                self.sample_index, clean_text(self.text), self.finish_reason, self.out_tokens,
                clean_text(redact(self.error)), now)


def store_dir(workdir: str | os.PathLike[str], dataset: str) -> Path:
    """``W/generations/<Dataset>``."""
    return generations_dir(workdir, dataset)


def shard_file(workdir: str | os.PathLike[str], dataset: str, shard: int = 0, num_shards: int = 1) -> Path:
    """The database a shard writes to (``results.sqlite`` when unsharded)."""
    d = store_dir(workdir, dataset)
    if num_shards <= 1:
        return d / "results.sqlite"
    return d / f"results-{shard:05d}-of-{num_shards:05d}.sqlite"


def store_files(workdir: str | os.PathLike[str], dataset: str) -> list[Path]:
    """Every database of a dataset's store (merged and shard files), sorted."""
    d = store_dir(workdir, dataset)
    return sorted(d.glob("results*.sqlite")) if d.is_dir() else []


def _unusable(path: Path, e: sqlite3.Error, remedy: str | None = None) -> Exception:
    """The user-facing error for a store file that is not a readable SQLite store."""
    msg = str(e).lower()
    try:
        no_space = os.statvfs(path.parent).f_bavail == 0
    except OSError:
        no_space = False
    if "disk is full" in msg or (no_space and ("i/o" in msg or "unable to open" in msg)):
        return UserError(f"{path}: the disk is full ({e}); free space and rerun (stored work is kept)")
    if "readonly" in msg or "read-only" in msg:
        return UserError(f"{path}: cannot write the store ({e}); the folder or file system is read-only: "
                         "make it writable or use another --workdir (stored work is kept)")
    if "unable to open" in msg:
        return UserError(f"{path}: cannot open the store ({e}); check that the folder exists and is writable")
    if "locked" in msg:
        return UserError(f"{path}: the store is locked by another process ({e}); wait for it and rerun")
    remedy = remedy or (f"move it away (e.g. `mv {path} {path}.bad`) and rerun `dbr generate`, "
                        "which regenerates what it held")
    return UserError(f"{path}: not a usable generation store ({e}); {remedy}")


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:
            con.close()
            # Reading a WAL-mode file needs a -shm file beside it, which a full or read-only
            # disk cannot hold. With no WAL content left (every writer closed cleanly), the
            # main file is the whole store: read it as immutable instead.
            wal = Path(f"{path}-wal")
            if not isinstance(e, sqlite3.OperationalError) or (wal.exists() and wal.stat().st_size > 0):
                raise _unusable(path, e) from None
            con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, timeout=60)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # SQLite would create it 0644 whatever the umask (and its -wal/-shm alike)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))
        con = sqlite3.connect(path, timeout=60, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed transaction survives a killed process; only an
        # OS crash / power loss can drop the last few commits (never corrupts the file).
        con.execute("PRAGMA synchronous=NORMAL")
        # Checkpoint (copy WAL into the main file, with an fsync) every ~80 MB, not every 4 MB:
        # fewer, larger checkpoints keep the writer fast; the WAL is truncated on close.
        con.execute("PRAGMA wal_autocheckpoint=20000")
        con.execute("PRAGMA cache_size=-65536")
        con.executescript(_SCHEMA)
    con.execute("PRAGMA busy_timeout=60000")
    return con


class Store:
    """One writable store database (open for a run; use as a context manager)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._clear_on_write = False
        try:
            self.con = _connect(self.path)
        except sqlite3.DatabaseError as e:
            raise _unusable(self.path, e) from None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (WAL content stays valid; SQLite checkpoints on next open)."""
        self.con.close()

    def add(self, rows: Sequence[Row]) -> None:
        """Record a batch of rows in one transaction (all or nothing)."""
        if not rows:
            return
        now = time.time()
        con = self.con
        values = [r.values(now) for r in rows]
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                if self._clear_on_write:
                    con.execute("DELETE FROM state WHERE key = 'complete'")
                con.executemany(_UPSERT, values)
                con.execute("COMMIT")
                self._clear_on_write = False
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:  # disk full, read-only file system
            raise _unusable(self.path, e) from None

    def incomplete_on_write(self) -> None:
        """Clear the completion marker with the next batch written (a run that only finds its work
        done leaves the file untouched)."""
        self._clear_on_write = True

    def get_state(self, key: str) -> str | None:
        """A run-state entry, or None."""
        row = self.con.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_state(self, key: str, value: str | None) -> None:
        """Set (or with None, clear) a run-state entry (e.g. the ``complete`` marker); no write if unchanged."""
        if self.get_state(key) == value:
            return
        try:
            if value is None:
                self.con.execute("DELETE FROM state WHERE key = ?", (key,))
            else:
                self.con.execute("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", (key, value))
        except sqlite3.OperationalError as e:
            raise _unusable(self.path, e) from None

    def done_keys(self) -> set[str]:
        """Keys stored without error (the resume scan)."""
        return {k for (k,) in self.con.execute("SELECT request_key FROM results WHERE error IS NULL")}

    def failed(self) -> dict[str, tuple[str, int]]:
        """``{key: (last error, attempts)}`` for requests whose latest attempt failed."""
        return {k: (e, a) for k, e, a in
                self.con.execute("SELECT request_key, error, attempts FROM results WHERE error IS NOT NULL")}

    def count(self) -> tuple[int, int]:
        """(good rows, error rows)."""
        good, bad = self.con.execute(
            "SELECT COALESCE(SUM(error IS NULL), 0), COALESCE(SUM(error IS NOT NULL), 0) FROM results"
        ).fetchone()
        return int(good), int(bad)


def done_keys_of(path: str | os.PathLike[str]) -> set[str]:
    """Keys stored without error in one store file."""
    f = Path(path)
    try:
        con = _connect(f, readonly=True)
    except sqlite3.DatabaseError as e:
        raise _unusable(f, e) from None
    try:
        return {k for (k,) in con.execute("SELECT request_key FROM results WHERE error IS NULL")}
    except sqlite3.DatabaseError as e:
        raise _unusable(f, e) from None
    finally:
        con.close()


def done_keys(workdir: str | os.PathLike[str], dataset: str) -> set[str]:
    """Keys stored without error in any of a dataset's store files."""
    keys: set[str] = set()
    for f in store_files(workdir, dataset):
        keys |= done_keys_of(f)
    return keys


def _rows(files: Iterable[Path]) -> list[tuple]:
    """All rows of several files; per key a good row wins over an error row."""
    best: dict[str, tuple] = {}
    for f in files:
        con = _connect(f, readonly=True)
        try:
            for row in con.execute(f"SELECT {', '.join(COLUMNS)} FROM results"):
                old = best.get(row[0])
                if old is None or (old[10] is not None and row[10] is None):
                    best[row[0]] = row
        except sqlite3.DatabaseError as e:
            raise _unusable(f, e) from None
        finally:
            con.close()
    return list(best.values())


def read_results(workdir: str | os.PathLike[str], dataset: str):
    """Every stored candidate of a dataset as a polars DataFrame (one row per request key).

    Columns: request_key, image_id, prompt_name, prompt_id, model, params (JSON str),
    sample_index, text, finish_reason, out_tokens, error (null for a good result).
    Shard files are read along with the merged file, so merging is optional.
    """
    import polars as pl

    schema = {
        "request_key": pl.Utf8, "image_id": pl.Utf8, "prompt_name": pl.Utf8, "prompt_id": pl.Utf8,
        "model": pl.Utf8, "params": pl.Utf8, "sample_index": pl.Int64, "text": pl.Utf8,
        "finish_reason": pl.Utf8, "out_tokens": pl.Int64, "error": pl.Utf8,
    }
    rows = _rows(store_files(workdir, dataset))
    df = pl.DataFrame(rows, schema=schema, orient="row")
    return df.sort(["image_id", "prompt_name", "model", "sample_index", "request_key"])


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether the generate run that wrote store file ``path`` ended (its completion marker)."""
    con = _connect(Path(path), readonly=True)
    try:
        row = con.execute("SELECT value FROM state WHERE key = 'complete'").fetchone()
    except sqlite3.OperationalError:
        return False  # a store written before markers existed, or not finished
    except sqlite3.DatabaseError as e:
        raise _unusable(Path(path), e) from None
    finally:
        con.close()
    return row is not None


class UnfinishedShard(UserError):
    """A shard store to merge has no completion marker (its run is still going or was killed)."""


def merge(dest: str | os.PathLike[str], sources: Sequence[str | os.PathLike[str]],
          remove: bool | Sequence[bool] = True, require_complete: bool = True) -> dict[str, int]:
    """Fold store files ``sources`` into ``dest`` (created if needed); idempotent.

    Every source must carry the completion marker of its generate run (``require_complete``):
    merging a shard that is still being written would lose the rows it writes afterwards.
    Each source is merged in one transaction and only then (optionally) deleted, so a
    crash mid-merge is repaired by running the merge again.
    """
    if require_complete:
        dest_r = Path(dest).resolve()
        for src in sources:
            src = Path(src)
            if src.exists() and src.resolve() != dest_r and not is_complete(src):
                raise UnfinishedShard(
                    f"{src}: this shard's `dbr generate` run has not finished (no completion marker); "
                    "wait for it, or rerun that shard's command to finish it (stored work is kept), then merge")
    dest = Path(dest)
    added = 0
    merged = 0
    removes = [remove] * len(sources) if isinstance(remove, bool) else list(remove)
    with Store(dest) as st:
        for src, rm in zip(sources, removes, strict=True):
            src = Path(src)
            if src.resolve() == dest.resolve():
                continue
            if not src.exists():
                raise FileNotFoundError(f"{src}: store file to merge not found")
            try:
                st.con.execute("ATTACH DATABASE ? AS src", (f"file:{src}?mode=ro",))
                st.con.execute("SELECT COUNT(*) FROM src.results").fetchone()  # fail before BEGIN
            except sqlite3.DatabaseError as e:
                raise _unusable(src, e, "copy it again from the node that wrote it, or leave it out") from None
            try:
                before = st.con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
                st.con.execute("BEGIN IMMEDIATE")
                st.con.execute(_MERGE)
                st.con.execute("COMMIT")
                added += st.con.execute("SELECT COUNT(*) FROM results").fetchone()[0] - before
            finally:
                st.con.execute("DETACH DATABASE src")
            merged += 1
            if rm:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{src}{suffix}").unlink(missing_ok=True)
    return {"files": merged, "new_rows": added}


def merge_dataset(workdir: str | os.PathLike[str], dataset: str, extra: Sequence[str | os.PathLike[str]] = ()) -> dict[str, int]:
    """Merge a dataset's shard files (plus ``extra`` store files or folders) into ``results.sqlite``.

    Local shard files are deleted once merged; ``extra`` files (copied from other nodes) are kept.
    """
    dest = shard_file(workdir, dataset)
    sources: list[Path] = [f for f in store_files(workdir, dataset) if f != dest]
    removes = [True] * len(sources)
    for e in extra:
        e = Path(e)
        if not e.exists():
            raise FileNotFoundError(f"{e}: store file or folder to merge not found")
        more = sorted(e.glob("results*.sqlite")) if e.is_dir() else [e]
        sources.extend(more)
        removes.extend([False] * len(more))
    return merge(dest, sources, remove=removes)
