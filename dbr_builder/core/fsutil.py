"""Small filesystem helpers shared by every stage: atomic files and folders, fingerprints.

Every finished output is made under a hidden temporary name beside its destination and
renamed into place, so a crash never leaves a half-written file or folder that looks
finished. Outputs get the user's umask (``mkstemp``/``mkdtemp`` alone would make them
private), so labmates on a shared cluster can read them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dbr_builder.errors import UserError


def temp_beside(dest: str | os.PathLike[str], suffix: str = "") -> Path:
    """A new hidden temporary file ``.<name>.XXXX<suffix>`` beside ``dest`` (umask permissions).

    Readers skip names starting with ``.`` (:func:`is_temp_name`); the caller renames or removes it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~current_umask())
    return tmp_path


def is_temp_name(name: str) -> bool:
    """True for the hidden names temporary outputs get (``.X.parquet.abc123.parquet``, ``.X.old``)."""
    return name.startswith(".")


# write-side errno values: the output, not some input, is what the message must name
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)|errno[ =:]+(\d+)", re.I)
_TEXT_ERRNO = {"no space left on device": errno.ENOSPC, "read-only file system": errno.EROFS,
               "disk quota exceeded": errno.EDQUOT, "database or disk is full": errno.ENOSPC}


def os_error_of(e: BaseException, path: str | os.PathLike[str]) -> OSError | None:
    """An ``OSError`` naming ``path`` for a disk-level write failure (full, read-only, quota).

    Native writers (polars, pyarrow, SQLite) report these as their own exception types, or as
    an OSError naming a temporary file; this gives the CLI one line naming the real output.
    None when ``e`` is not such a failure.
    """
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        text = str(e)
        m = _OS_ERROR_TEXT.search(text)
        if m:
            code = int(m.group(1) or m.group(2))
        else:
            low = text.lower()
            code = next((v for k, v in _TEXT_ERRNO.items() if k in low), None)
    if code is None and not isinstance(e, (KeyboardInterrupt, MemoryError)):
        code = _disk_state(Path(path))  # some writers only say "transport error"
    if code not in _DISK_ERRNOS:
        return None
    return OSError(code, os.strerror(code), str(path))


def _disk_state(path: Path) -> int | None:
    """ENOSPC / EROFS when the file system holding ``path`` is full / read-only, else None."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail == 0:
        return errno.ENOSPC
    return None


@contextlib.contextmanager
def naming(dest: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise a disk-level failure inside the block as an ``OSError`` naming ``dest``.

    Whatever did the writing (polars, pyarrow, SQLite, a temporary file), the user reads the
    output it was for and what to do (see :func:`dbr_builder.errors.describe_os_error`).
    """
    try:
        yield
    except Exception as e:
        err = os_error_of(e, dest)
        if err is not None and not (isinstance(e, OSError) and e.filename == str(dest)):
            raise err from None
        raise


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only on success.

    A crash or exception leaves ``dest`` untouched (never half-written). A full or read-only
    disk surfaces as an ``OSError`` naming ``dest`` (whatever library did the writing).
    """
    dest = Path(dest)
    tmp_path: Path | None = None
    try:
        with naming(dest):
            tmp_path = temp_beside(dest, suffix)
            yield tmp_path
            os.replace(tmp_path, dest)
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(tree: str | os.PathLike[str]) -> None:
    """Give every file and folder under ``tree`` (and ``tree``) the modes the umask allows.

    Libraries that write through their own private temporary files (``safetensors``, for one,
    leaves ``model.safetensors`` at 0600) would otherwise make outputs unreadable to labmates.
    Executable files stay executable; symbolic and hard links are left alone (a hard link shares
    its mode with a file outside the tree).
    """
    mask = current_umask()
    tree = Path(tree)
    for root, dirs, files in os.walk(tree):
        for name in dirs:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, 0o777 & ~mask)
        for name in files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:  # a hard link's mode is its source's too
                os.chmod(p, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)
    if tree.is_dir() and not tree.is_symlink():
        tree.chmod(0o777 & ~mask)


def make_temp_dir(parent: str | os.PathLike[str], name: str) -> Path:
    """A new hidden temporary folder ``parent/.name.XXXX.tmp`` with umask permissions."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    tmp.chmod(0o777 & ~current_umask())
    return tmp


_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _old_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old")


def recover_dir(dest: str | os.PathLike[str], clean_temps: bool = False) -> None:
    """Finish or undo a folder swap that a crash interrupted (see :func:`swap_dir`).

    With ``clean_temps`` also remove the hidden temporary folders and files a killed writer
    left beside ``dest`` (``.<name>.XXXX.tmp``); only safe while holding the writer's lock.
    """
    dest = Path(dest)
    old = _old_name(dest)
    if old.exists():
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, dest)  # the crash came between the two renames: put the old copy back
    if clean_temps and dest.parent.is_dir():
        remove_temps(dest.parent, dest.name)


def remove_temps(folder: str | os.PathLike[str], name: str) -> list[Path]:
    """Delete the leftovers of killed writers of ``folder/name``: ``.<name>.*`` (files or folders).

    Only call while holding the lock of whatever writes ``name``.
    """
    gone = []
    for p in Path(folder).glob(f".{glob.escape(name)}.*"):
        if p.name == _old_name(Path(folder) / name).name:
            continue  # recover_dir's business
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def swap_dir(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Put the finished folder ``src`` at ``dest``, replacing any old ``dest``.

    Readers see the old folder or the new one, never neither: with ``renameat2`` the two
    are exchanged in one step; elsewhere the old one is moved to ``.dest.old`` first and a
    crash between the two renames is undone by the next :func:`recover_dir`.
    """
    src, dest = Path(src), Path(dest)
    recover_dir(dest)
    if not dest.exists():
        os.replace(src, dest)
        return
    if _exchange(src, dest):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old copy
        return
    old = _old_name(dest)
    os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; swap it in (:func:`swap_dir`) only on success."""
    dest = Path(dest)
    tmp = make_temp_dir(dest.parent, dest.name)
    try:
        yield tmp
        honour_umask(tmp)  # files that libraries wrote privately (e.g. safetensors' 0600) included
        swap_dir(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_COMMIT_MARK = ".commit"


def commit_moves(moves: list[tuple[Path, Path]], journal: str | os.PathLike[str]) -> None:
    """Move finished temporaries (files or folders) onto their destinations as one unit.

    The list of moves is written to ``journal`` first (atomically: that is the commit point),
    then carried out, then the journal is removed. A crash at any point leaves either the
    old outputs (no journal yet) or a journal that :func:`recover_moves` completes: readers
    never see a mix of old and new outputs once recovery has run.
    """
    token = uuid.uuid4().hex
    for src, _ in moves:
        if Path(src).is_dir():
            (Path(src) / _COMMIT_MARK).write_text(token)
    write_json_atomic(journal, {"token": token, "moves": [[str(a), str(b)] for a, b in moves]})
    recover_moves(journal)


def recover_moves(journal: str | os.PathLike[str]) -> bool:
    """Finish the moves of an interrupted :func:`commit_moves`; True if there was one."""
    journal = Path(journal)
    if not journal.exists():
        return False
    try:
        data = json.loads(journal.read_text(encoding="utf-8"))
        token, moves = data["token"], data["moves"]
    except (ValueError, KeyError, TypeError):
        journal.unlink()  # written atomically, so never torn; an unknown file: nothing to finish
        return False
    for src_s, dest_s in moves:
        src, dest = Path(src_s), Path(dest_s)
        if src.is_dir():
            mark = src / _COMMIT_MARK
            if mark.exists() and mark.read_text() == token:
                swap_dir(src, dest)
            else:  # the swap happened: src holds the old copy
                shutil.rmtree(src, ignore_errors=True)
        elif src.exists():
            os.replace(src, dest)
        elif dest.is_dir():
            recover_dir(dest)
    journal.unlink()
    return True


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


def read_json(path: str | os.PathLike[str], remedy: str) -> Any:
    """``json.loads`` of a file we wrote, with a one-line error naming it when it is corrupt.

    ``remedy`` says how to rebuild it (e.g. "rerun `dbr filter PACS`").
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt JSON file ({e}); {remedy}") from None


def read_parquet(path: str | os.PathLike[str], remedy: str) -> Any:
    """``polars.read_parquet`` with a clear error naming ``path`` if it is truncated or not parquet.

    ``remedy`` says how to rebuild the file (e.g. "rerun `dbr index PACS ...`").
    """
    import polars as pl

    try:
        return pl.read_parquet(path)
    except pl.exceptions.PolarsError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: unreadable parquet file ({reason}); {remedy}") from None
