"""Turn extracted archives into DomainBed's folder layout ``<Dataset>/<domain>/<class>/<image>``.

``rename``  one extracted folder becomes the dataset folder (PACS ``kfold`` -> ``PACS``,
            ``OfficeHomeDataset_10072016`` -> ``office_home``, the prebuilt ``VLCS`` tree);
``merge``   archives unpack straight into the dataset folder (DomainNet's per-domain zips),
            then the files named in a list artifact are removed (DomainBed's duplicates);
``terra``   TerraIncognita rebuilt from camera-trap images + annotations (see ``terra.py``).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dbr_builder.errors import UserError
from dbr_builder.log import get_logger
from dbr_builder.stages.download.terra import build_terra

log = get_logger(__name__)


class LayoutError(UserError):
    """The extracted files do not have the structure the registry describes."""


def find_domain_root(base: Path, domains: Iterable[str], max_depth: int = 3) -> Path | None:
    """The shallowest folder under ``base`` holding every domain folder, or None."""
    want = set(domains)
    level = [base]
    for _ in range(max_depth + 1):
        nxt: list[Path] = []
        for d in sorted(level):
            try:
                subs = [p for p in d.iterdir() if p.is_dir() and not p.is_symlink()]
            except OSError:
                continue
            if want <= {p.name for p in subs}:
                return d
            nxt.extend(subs)
        level = nxt
    return None


def apply_layout(layout: dict[str, Any], work: Path, dest: Path, domains: Iterable[str],
                 plain_files: dict[str, Path] | None = None) -> Path:
    """Move/rebuild the extracted tree in ``work`` into ``dest`` (which must not exist yet)."""
    kind = layout["type"]
    if kind == "rename":
        src = work / layout["from"]
        if not src.is_dir():
            # Tolerate a repacked archive: look for the folder that holds the domains.
            src = find_domain_root(work, domains)
            if src is None:
                raise LayoutError(
                    f"extracted archive has no {layout['from']!r} folder and no folder holding the "
                    f"domains {sorted(domains)} (found: {sorted(p.name for p in work.iterdir())[:10]})"
                )
        os.replace(src, dest)
    elif kind == "merge":
        src = find_domain_root(work, domains) or work
        os.replace(src, dest)
        listed = layout.get("remove_listed")
        if listed:
            remove_listed(dest, (plain_files or {})[listed])
    elif kind == "terra":
        dest.mkdir(parents=True)
        build_terra(work, dest, layout)
    else:  # the schema allows nothing else
        raise LayoutError(f"unknown layout type {kind!r}")
    return dest


def confine_links(tree: Path) -> list[str]:
    """Remove the links in a finished dataset tree that lead out of it (or nowhere); return them.

    Extraction keeps links inside the extraction folder, but the layout then moves one
    sub-folder into place: a link that climbed above it now points outside the dataset
    (into the staging area, soon deleted, or further). Such links are dropped.
    """
    real = os.path.realpath(tree)
    dropped = []
    for folder, dirs, files in os.walk(tree):  # links are not followed
        for name in dirs + files:
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                continue
            r = os.path.realpath(p)
            if not (r == real or r.startswith(real.rstrip(os.sep) + os.sep)) or not os.path.exists(p):
                os.unlink(p)
                dropped.append(os.path.relpath(p, tree))
    return dropped


def remove_listed(dest: Path, listing: Path) -> int:
    """Delete the files listed (paths relative to ``dest``) in ``listing``; return how many existed."""
    n = 0
    for line in listing.read_text(encoding="utf-8").splitlines():
        rel = line.strip()
        if not rel or rel.startswith("#"):
            continue
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise LayoutError(f"{listing}: refusing listed path {rel!r} (absolute or '..')")
        try:
            (dest / p).unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


def copy_tree(src: Path, dest: Path) -> None:
    """Copy a DomainBed tree the user already has (hard links when on the same file system).

    Links inside the tree are followed; links that lead out of it and anything that is not a
    regular file or folder (FIFOs, sockets, devices) are left out, with a warning.
    """
    real = os.path.realpath(src)

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = set()
        for n in names:
            p = os.path.join(folder, n)
            r = os.path.realpath(p)
            if not (r == real or r.startswith(real.rstrip(os.sep) + os.sep)):
                log.warning(f"{p}: leaves {src} through a link; not copied")
                skip.add(n)
                continue
            here = os.path.realpath(folder)
            if os.path.islink(p) and os.path.isdir(p) and (here == r or here.startswith(r.rstrip(os.sep) + os.sep)):
                log.warning(f"{p}: a link to a folder above it (a loop); not copied")
                skip.add(n)
                continue
            try:
                mode = os.stat(p).st_mode
            except OSError:
                skip.add(n)
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                log.warning(f"{p}: not a regular file; not copied")
                skip.add(n)
        return skip

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(os.path.realpath(s), d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dest, copy_function=link_or_copy, symlinks=False, ignore=ignore)
