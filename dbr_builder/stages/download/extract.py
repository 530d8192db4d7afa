"""Safe archive extraction (zip, tar, tar.gz/bz2/xz).

One rule for every member, checked when it is written, with an error naming the member:

- its name may not be absolute or hold ``..``; its folder is resolved against the real target
  *after* the links earlier members made, and must lie inside it;
- a symlink's target must resolve (through earlier members) inside the target, and may use
  ``..`` only as leading components, so no later member can change where it points;
- nothing is written through a link: a member whose name is an earlier link is refused, and
  a link never replaces an earlier member;
- a hard link may only name an earlier regular file (never a link) and is copied;
- device and FIFO members are refused.

File bytes are streamed and counted, so a decompression bomb stops at the configured limit
however small the archive claims its members are.
"""

from __future__ import annotations

import errno
import itertools
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dbr_builder.config import schema_defaults
from dbr_builder.errors import UserError

_MAX_LINK = 4096  # bytes of a zip symlink member (its target path)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class UnsafeArchive(UserError):
    """An archive member would escape the target folder or is not a plain file/dir/link."""


class CorruptArchive(UserError):
    """An archive cannot be read (truncated, wrong format, CRC error)."""


class ExtractLimit(UserError):
    """Extraction would exceed the configured total size."""


def parse_size(value: int | str) -> int:
    """``"200G"`` / ``"512M"`` / ``1000`` -> bytes (binary units)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(value), re.I)
    if not m:
        raise UserError(f"--max-extract-bytes {value!r}: expected a size such as 200G, 512M or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class Budget:
    """Total bytes extraction may still write (shared by all archives of one build)."""

    limit: int
    used: int = 0

    def take(self, n: int, archive: Path, member: str) -> None:
        self.used += n
        if self.used > self.limit:
            raise ExtractLimit(
                f"{archive}: extracting {member!r} passes the limit of {self.limit} bytes "
                f"(possible decompression bomb); raise it with --max-extract-bytes if the archive is genuine"
            )



# The cap only stops bombs (DomainNet unpacks to ~20 GB); defined once, in the download schema.
DEFAULT_MAX_EXTRACT_BYTES = parse_size(schema_defaults("download")["max_extract_bytes"])

def archive_kind(path: Path) -> str | None:
    """``zip``, ``tar`` or None, from the file's magic bytes (not its name)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return "tar"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


def safe_member_path(target: Path, name: str, archive: Path) -> Path | None:
    """Where member ``name`` goes under ``target``; UnsafeArchive if it would land outside.

    Only the name is checked here (absolute, ``..``); :class:`_Writer` also resolves the
    parent folder through the links earlier members made before it writes anything.
    """
    n = name.replace("\\", "/")
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
        raise UnsafeArchive(f"{archive}: refusing member {name!r}: absolute path")
    parts = [p for p in n.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"{archive}: refusing member {name!r}: '..' in path")
    if not parts:
        return None
    return target.joinpath(*parts)


def _inside(path: str | Path, root: str | Path) -> bool:
    path, root = str(path), str(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _Writer:
    """Writes members under ``target`` by one rule (see the module doc).

    Every member's folder is resolved against the real target *after* the links that
    earlier members made, and must stay inside it. A symlink's target must resolve inside
    too, and may use ``..`` only as leading components (so no later link can change where
    it points). A member never replaces a link (nothing is written through one), a link
    never replaces anything, and a hard link may only name an earlier regular file.
    """

    def __init__(self, archive: Path, target: Path, budget: Budget):
        self.archive, self.budget = archive, budget
        target.mkdir(parents=True, exist_ok=True)
        self.target = target
        self.real = os.path.realpath(target)
        self.n = 0

    def _refuse(self, name: str, why: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self.archive}: refusing member {name!r}: {why}")

    def _place(self, name: str) -> str | None:
        """The real path member ``name`` is written at (its folder resolved through earlier links)."""
        dest = safe_member_path(self.target, name, self.archive)
        if dest is None:
            return None
        parent = os.path.realpath(dest.parent)
        if not _inside(parent, self.real):
            raise self._refuse(name, "path leaves the target folder through a link")
        path = os.path.join(parent, dest.name)
        if os.path.islink(path):
            raise self._refuse(name, "an earlier member made a link there; refusing to write through it")
        return path

    def _mkdirs(self, name: str, path: str) -> None:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        if not _inside(os.path.realpath(parent), self.real):  # a link raced in; cannot happen in one process
            raise self._refuse(name, "path leaves the target folder")

    def directory(self, name: str) -> None:
        path = self._place(name)
        if path is None:
            return
        if os.path.lexists(path) and not os.path.isdir(path):
            raise self._refuse(name, "a folder member replaces an earlier file")
        os.makedirs(path, exist_ok=True)
        self.n += 1

    def file(self, name: str, src: IO[bytes]) -> None:
        path = self._place(name)
        if path is None:
            return
        self._mkdirs(name, path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
        except IsADirectoryError:
            raise self._refuse(name, "a file member replaces an earlier folder") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise self._refuse(name, "an earlier member made a link there") from None
            raise
        with os.fdopen(fd, "wb") as out:
            while block := src.read(1 << 20):
                self.budget.take(len(block), self.archive, name)
                out.write(block)
        self.n += 1

    def symlink(self, name: str, link: str) -> None:
        path = self._place(name)
        if path is None:
            return
        link_n = link.replace("\\", "/")
        if link_n.startswith("/") or re.match(r"^[A-Za-z]:", link_n) or not link_n.strip():
            raise self._refuse(name, f"link -> {link!r}: absolute or empty link target")
        parts = [p for p in link_n.split("/") if p not in ("", ".")]
        ups = len(list(itertools.takewhile(lambda p: p == "..", parts)))
        if ".." in parts[ups:]:
            raise self._refuse(name, f"link -> {link!r}: '..' after a folder name in the link target")
        resolved = os.path.realpath(os.path.join(os.path.dirname(path), *parts) if parts else os.path.dirname(path))
        if not _inside(resolved, self.real):
            raise self._refuse(name, f"link -> {link!r} points outside the target folder")
        if os.path.lexists(path):
            raise self._refuse(name, "a link member replaces an earlier member")
        self._mkdirs(name, path)
        os.symlink(link, path)
        self.n += 1

    def hardlink(self, name: str, link: str) -> None:
        """A tar hard link: a copy of an earlier regular file of the archive (never of a link)."""
        path = self._place(name)
        if path is None:
            return
        what = f"hard link -> {link!r}"
        src = safe_member_path(self.target, link, self.archive)
        if src is None:
            raise self._refuse(name, f"{what}: empty target")
        real_parent = os.path.realpath(src.parent)
        if not _inside(real_parent, self.real):
            raise self._refuse(name, f"{what}: target leaves the target folder through a link")
        src_path = os.path.join(real_parent, src.name)
        try:
            st = os.lstat(src_path)
        except FileNotFoundError:
            raise self._refuse(name, f"{what}: target is not an earlier file of the archive") from None
        if not stat.S_ISREG(st.st_mode):
            raise self._refuse(name, f"{what}: target is a link or folder, not an earlier regular file")
        if src_path == path:
            raise self._refuse(name, f"{what}: links to itself")
        with open(src_path, "rb") as f:
            self.file(name, f)


def extract_archive(archive: Path, target: Path, budget: Budget | None = None) -> int:
    """Extract ``archive`` into ``target`` safely; return the number of members written."""
    archive, target = Path(archive), Path(target)
    budget = budget or Budget(DEFAULT_MAX_EXTRACT_BYTES)
    target.mkdir(parents=True, exist_ok=True)
    kind = archive_kind(archive)
    try:
        if kind == "zip":
            return _extract_zip(archive, target, budget)
        if kind == "tar":
            return _extract_tar(archive, target, budget)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, ValueError) as e:
        raise CorruptArchive(
            f"{archive}: corrupt or incomplete archive ({type(e).__name__}: {e}); "
            "delete it to download it again, or pass a good copy with --from"
        ) from None
    except OSError as e:
        if e.errno is not None:
            raise  # disk full, permissions: not the archive's fault
        # gzip.BadGzipFile / lzma errors are OSErrors without errno
        raise CorruptArchive(f"{archive}: corrupt or incomplete archive ({e}); delete it and retry") from None
    raise CorruptArchive(f"{archive}: not a zip or tar archive (first bytes: {open(archive, 'rb').read(8)!r})")


def _extract_zip(archive: Path, target: Path, budget: Budget) -> int:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # Check every name and type first: a zip with a bad name writes nothing at all.
        for zi in infos:
            safe_member_path(target, zi.filename, archive)
            mode = (zi.external_attr >> 16) & 0o170000
            if mode and mode not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                raise UnsafeArchive(f"{archive}: refusing member {zi.filename!r}: special file (mode {oct(mode)})")
        w = _Writer(archive, target, budget)
        for zi in infos:
            mode = (zi.external_attr >> 16) & 0o170000
            if zi.is_dir():
                w.directory(zi.filename)
            elif mode == stat.S_IFLNK:
                if zi.file_size > _MAX_LINK:
                    raise UnsafeArchive(f"{archive}: refusing member {zi.filename!r}: link target too long")
                w.symlink(zi.filename, zf.read(zi).decode("utf-8", "replace"))
            else:
                with zf.open(zi) as src:
                    w.file(zi.filename, src)
    return w.n


def _extract_tar(archive: Path, target: Path, budget: Budget) -> int:
    w = _Writer(archive, target, budget)
    # Stream mode ("r|*"): one pass over a multi-GB .tar.gz, no seeking.
    with tarfile.open(archive, "r|*") as tf:
        for m in tf:
            if safe_member_path(target, m.name, archive) is None:
                continue
            if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
                raise UnsafeArchive(f"{archive}: refusing member {m.name!r}: device or FIFO file")
            if m.isdir():
                w.directory(m.name)
            elif m.issym():
                w.symlink(m.name, m.linkname)
            elif m.islnk():
                w.hardlink(m.name, m.linkname)
            elif m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                w.file(m.name, f)
            else:
                raise UnsafeArchive(f"{archive}: refusing member {m.name!r}: unsupported member type {m.type!r}")
    return w.n
