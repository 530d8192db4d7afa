"""Hugging Face Hub parquet mirrors: fetch the parquet files, materialise them as a DomainBed tree.

A mirror row has an image (a ``datasets`` Image: bytes + original path), a domain value and a
label (ClassLabel or string). Images are written byte for byte (never re-encoded) to
``<domain>/<class>/<original file name>``.
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket
import stat
import urllib.parse
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from dbr_builder.errors import UserError
from dbr_builder.stages.download.http import DownloadError
from dbr_builder.stages.download.registry import DatasetSpec, Source


class MirrorError(UserError):
    """A parquet file does not have the columns / values the registry describes."""


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def probe(url: str, timeout: float) -> None:
    """Fail fast (DownloadError) when the host of ``url`` cannot even be reached."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except socket.gaierror as e:
        raise DownloadError(url, f"DNS lookup failed ({e.strerror or e})") from None
    except OSError as e:
        raise DownloadError(url, f"cannot connect ({e})") from None


def fetch_parquet(src: Source, dest_dir: Path, timeout: float) -> list[Path]:
    """Download the mirror's parquet files with ``huggingface_hub`` into ``dest_dir``.

    HF_TOKEN (for gated mirrors) is read from the environment by huggingface_hub itself.
    """
    endpoint = hub_endpoint()
    where = f"hf://datasets/{src.repo_id}"
    probe(endpoint, timeout)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(max(timeout, 10))))
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id=src.repo_id, repo_type="dataset", revision=src.revision,
            allow_patterns=list(src.patterns), local_dir=str(dest_dir),
        )
    except Exception as e:  # huggingface_hub raises many types (HTTP, repo not found, offline)
        raise DownloadError(where, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    files = parquet_files(Path(local), src.patterns)
    if not files:
        raise DownloadError(where, f"no files matching {list(src.patterns)} in the mirror")
    return files


def parquet_files(base: Path, patterns: tuple[str, ...] | list[str]) -> list[Path]:
    """Parquet files under ``base`` matching any of ``patterns`` (relative posix paths), sorted."""
    out = []
    for p in sorted(base.rglob("*.parquet")):
        if any(part.startswith(".") for part in p.relative_to(base).parts):
            continue  # temporaries and caches (.cache/, .x.parquet.tmp) are never data
        rel = p.relative_to(base).as_posix()
        if not patterns or any(fnmatch.fnmatch(rel, pat) for pat in patterns):
            out.append(p)
    return out


def _norm(s: str) -> str:
    return re.sub(r"[\s_\-]+", "_", str(s).strip().lower())


def _matcher(names: list[str], explicit: dict[str, str], what: str, files: list[Path]):
    by_norm = {_norm(n): n for n in names}

    def match(value: Any) -> str:
        v = str(value)
        if v in explicit:
            return explicit[v]
        if v in names:
            return v
        hit = by_norm.get(_norm(v))
        if hit is None:
            raise MirrorError(
                f"{files[0]}: {what} value {v!r} is not one of the registry's {what}s "
                f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); add a {what}_map to the source"
            )
        return hit

    return match


_MAGIC = [(b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"RIFF", ".webp")]


def _ext(data: bytes) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    return ".jpg"


def materialise(files: list[Path], spec: DatasetSpec, columns: dict[str, str], out: Path,
                cache_dir: Path, domain_map: dict[str, str] | None = None,
                class_map: dict[str, str] | None = None, source_root: Path | None = None) -> dict[str, int]:
    """Write the parquet rows as ``out/<domain>/<class>/<file>``; return images per domain.

    Loaded through ``datasets`` (so Image / ClassLabel features are honoured); the image
    column is read undecoded and its bytes written as they are. A row without bytes may
    point at an image file by ``path``, which must be a regular file inside
    ``source_root`` (default: the folder of the parquet files): a mirror never pulls in
    a file from elsewhere on the machine.
    """
    import datasets
    from tqdm import tqdm

    try:
        ds = datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=str(cache_dir))
    except Exception as e:
        raise MirrorError(f"{files[0]}: cannot read parquet ({type(e).__name__}: {e})") from None
    missing = [c for c in (columns["image"], columns["domain"], columns["label"]) if c not in ds.column_names]
    if missing:
        raise MirrorError(f"{files[0]}: missing column(s) {missing}; columns are {ds.column_names}")
    img_col, dom_col, lab_col = columns["image"], columns["domain"], columns["label"]
    feat = ds.features[img_col]
    if isinstance(feat, datasets.Image):
        ds = ds.cast_column(img_col, datasets.Image(decode=False))
    label_feat = ds.features[lab_col]
    label_names = label_feat.names if isinstance(label_feat, datasets.ClassLabel) else None
    classes = list(spec.classes) if spec.classes else sorted({str(x) for x in label_names or ds.unique(lab_col)})
    for c in classes:  # class names become folder names
        if not c or c in (".", "..") or "/" in c or "\\" in c or "\0" in c:
            raise MirrorError(f"{files[0]}: class name {c!r} cannot be a folder name")
    if source_root is None:
        source_root = Path(os.path.commonpath([str(Path(f).resolve().parent) for f in files]))
    dom_of = _matcher(list(spec.domains), domain_map or {}, "domain", files)
    cls_of = _matcher(classes, class_map or {}, "class", files)
    # Validate every distinct value before writing anything.
    for v in ds.unique(dom_col):
        dom_of(v)
    if label_names is not None:
        label_to_cls = [cls_of(n) for n in label_names]
    else:
        for v in ds.unique(lab_col):
            cls_of(v)
    counts: Counter[str] = Counter()
    used: set[Path] = set()
    made: set[Path] = set()
    i = 0
    for batch in tqdm(ds.iter(batch_size=256), total=(len(ds) + 255) // 256, desc=f"{spec.name} parquet",
                      unit="batch", disable=None, leave=False):
        for img, dom_v, lab_v in zip(batch[img_col], batch[dom_col], batch[lab_col], strict=True):
            dom = dom_of(dom_v)
            cls = label_to_cls[lab_v] if label_names is not None else cls_of(lab_v)
            data, name = _image_bytes(img, source_root)
            stem = PurePosixPath(name).name if name else ""
            if not stem or stem in (".", ".."):
                stem = f"{i:06d}{_ext(data)}"
            d = out / dom / cls
            p = d / stem
            if p in used:
                base, ext = os.path.splitext(stem)
                p = d / f"{base}_{i}{ext}"
            if d not in made:
                d.mkdir(parents=True, exist_ok=True)
                made.add(d)
            p.write_bytes(data)
            used.add(p)
            counts[dom] += 1
            i += 1
    return dict(counts)


def _image_bytes(img: Any, source_root: Path) -> tuple[bytes, str | None]:
    """(bytes, original path) from an undecoded Image value, a {bytes, path} struct or raw bytes.

    Without bytes, ``path`` (relative to ``source_root``, or absolute) is read only when it
    resolves to a regular file inside ``source_root``.
    """
    if isinstance(img, dict):
        data = img.get("bytes")
        path = img.get("path")
        if data is None and path:
            data = _read_inside(str(path), source_root)
        if data is None:
            raise MirrorError(f"image value without bytes (path {path!r})")
        return data, path
    if isinstance(img, (bytes, bytearray)):
        return bytes(img), None
    raise MirrorError(f"unsupported image value of type {type(img).__name__}")


def _read_inside(path: str, source_root: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file inside ``source_root``; MirrorError if outside."""
    root = os.path.realpath(source_root)
    real = os.path.realpath(os.path.join(root, path))
    if not (real == root or real.startswith(root.rstrip(os.sep) + os.sep)):
        raise MirrorError(f"image path {path!r} lies outside the source folder {source_root}; "
                          "refusing to read it (a mirror row must carry its image bytes)")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise MirrorError(f"image path {path!r} is not a regular file")
        return f.read()
