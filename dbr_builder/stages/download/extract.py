"""Safe archive extraction (zip, tar, tar.gz/bz2/xz).

Every member is checked before it is written: an absolute path, a ``..`` component, a link
that points outside the target, or a device / FIFO member is refused with an error naming the
member. File bytes are streamed and counted, so a decompression bomb stops at the configured
limit however small the archive claims its members are.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from dbr_builder.config import schema_defaults
from dbr_builder.errors import UserError

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
    """Where member ``name`` goes under ``target``; UnsafeArchive if it would land outside."""
    n = name.replace("\\", "/")
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
        raise UnsafeArchive(f"{archive}: refusing member {name!r}: absolute path")
    parts = [p for p in n.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"{archive}: refusing member {name!r}: '..' in path")
    if not parts:
        return None
    dest = target.joinpath(*parts)
    # Resolving catches escapes through a link that an earlier member created.
    if not _inside(dest.parent.resolve(), target.resolve()):
        raise UnsafeArchive(f"{archive}: refusing member {name!r}: path leaves the target folder")
    return dest


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _check_link(target: Path, dest: Path, link: str, name: str, archive: Path) -> None:
    if link.startswith("/") or re.match(r"^[A-Za-z]:", link):
        raise UnsafeArchive(f"{archive}: refusing link {name!r} -> {link!r}: absolute link target")
    resolved = Path(os.path.normpath(dest.parent / link))
    if not _inside(resolved, Path(os.path.normpath(target))):
        raise UnsafeArchive(f"{archive}: refusing link {name!r} -> {link!r}: points outside the target folder")


def _copy_stream(src, dest: Path, budget: Budget, archive: Path, member: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        while block := src.read(1 << 20):
            budget.take(len(block), archive, member)
            out.write(block)


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
    n = 0
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # Check every name first: a bad zip writes nothing at all.
        plan = [(zi, safe_member_path(target, zi.filename, archive)) for zi in infos]
        for zi, dest in plan:
            if dest is None:
                continue
            mode = (zi.external_attr >> 16) & 0o170000
            if mode and mode not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                raise UnsafeArchive(f"{archive}: refusing member {zi.filename!r}: special file (mode {oct(mode)})")
            if mode == stat.S_IFLNK:
                _check_link(target, dest, zf.read(zi).decode("utf-8", "replace"), zi.filename, archive)
        for zi, dest in plan:
            if dest is None:
                continue
            mode = (zi.external_attr >> 16) & 0o170000
            if zi.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            elif mode == stat.S_IFLNK:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(zf.read(zi).decode("utf-8"), dest)
            else:
                with zf.open(zi) as src:
                    _copy_stream(src, dest, budget, archive, zi.filename)
            n += 1
    return n


def _extract_tar(archive: Path, target: Path, budget: Budget) -> int:
    n = 0
    # Stream mode ("r|*"): one pass over a multi-GB .tar.gz, no seeking.
    with tarfile.open(archive, "r|*") as tf:
        for m in tf:
            dest = safe_member_path(target, m.name, archive)
            if dest is None:
                continue
            if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
                raise UnsafeArchive(f"{archive}: refusing member {m.name!r}: device or FIFO file")
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
            elif m.issym():
                _check_link(target, dest, m.linkname, m.name, archive)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(m.linkname, dest)
            elif m.islnk():
                src = safe_member_path(target, m.linkname, archive)
                if src is None or not src.is_file():
                    raise UnsafeArchive(f"{archive}: refusing hard link {m.name!r} -> {m.linkname!r}: "
                                        "target is not an earlier file of the archive")
                budget.take(src.stat().st_size, archive, m.name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
            elif m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                _copy_stream(f, dest, budget, archive, m.name)
            else:
                raise UnsafeArchive(f"{archive}: refusing member {m.name!r}: unsupported member type {m.type!r}")
            n += 1
    return n
