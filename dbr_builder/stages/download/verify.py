"""Checks: the lock file (size + sha256 per artifact), per-domain counts, exact duplicates."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbr_builder.core.fsutil import sha256_file, write_json_atomic
from dbr_builder.core.manifest import walk_class
from dbr_builder.errors import UserError

LOCK_NAME = ".dbr-download.lock.json"
# torchvision ImageFolder's extensions (case-insensitive), as DomainBed reads the tree.
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


class ChecksumMismatch(UserError):
    """An artifact differs from the size/sha256 recorded in the lock file or pinned in the registry."""


class CountMismatch(UserError):
    """``--strict``: the per-domain image counts differ from the registry's."""


@dataclass
class Lock:
    """``ROOT/.dbr-download.lock.json``: what was downloaded, and what each dataset build found."""

    root: Path
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.root / LOCK_NAME

    @classmethod
    def load(cls, root: Path) -> Lock:
        p = Path(root) / LOCK_NAME
        if not p.exists():
            return cls(Path(root), {"version": 1, "artifacts": {}, "datasets": {}})
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{p}: lock file is not valid JSON ({e}); fix or delete it") from None
        data.setdefault("artifacts", {})
        data.setdefault("datasets", {})
        return cls(Path(root), data)

    def save(self) -> None:
        # Re-read so that entries written meanwhile by another dataset's run survive.
        current = Lock.load(self.root).data if self.path.exists() else {}
        for key in ("artifacts", "datasets"):
            merged = dict(current.get(key, {}))
            merged.update(self.data[key])
            self.data[key] = merged
        self.data["version"] = 1
        write_json_atomic(self.path, self.data)

    def verify_artifact(self, key: str, path: Path, url: str, pinned_size: int | None = None,
                        pinned_sha256: str | None = None) -> dict[str, Any]:
        """Check ``path`` against the registry pin and the lock entry ``key``; record it if new."""
        size = path.stat().st_size
        if pinned_size is not None and size != pinned_size:
            raise ChecksumMismatch(
                f"{path}: size {size} differs from the registry's {pinned_size} bytes; the download is "
                "incomplete or the file changed upstream. Delete it to download again, or use --from"
            )
        digest = sha256_file(path)
        if pinned_sha256 and digest != pinned_sha256:
            raise ChecksumMismatch(f"{path}: sha256 {digest} differs from the registry's {pinned_sha256}")
        rec = self.data["artifacts"].get(key)
        if rec and (rec.get("size") != size or rec.get("sha256") != digest):
            raise ChecksumMismatch(
                f"{path}: does not match {self.path} entry {key!r} "
                f"(recorded size {rec.get('size')} sha256 {rec.get('sha256')}, found size {size} sha256 {digest}). "
                "The file is corrupt or changed upstream: delete it to download again, or remove the "
                "lock entry if the change is expected"
            )
        entry = {"size": size, "sha256": digest, "url": url,
                 "recorded": rec.get("recorded") if rec else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.data["artifacts"][key] = entry
        return entry


def count_tree(dest: Path, domains: list[str]) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Images per domain (ImageFolder rules: files under class folders) and classes per domain."""
    counts: dict[str, int] = {}
    classes: dict[str, list[str]] = {}
    present = sorted(p.name for p in dest.iterdir() if p.is_dir()) if dest.is_dir() else []
    for dom in sorted(set(domains) | set(present)):
        d = dest / dom
        n = 0
        cls: list[str] = []
        if d.is_dir():
            for c in sorted(p for p in d.iterdir() if p.is_dir()):
                cls.append(c.name)
                # the index's walk: links followed only inside the tree, each folder once (no loops)
                files, _ = walk_class(d, c.name, dest)
                n += sum(1 for _, why in files if why is None)
        counts[dom] = n
        classes[dom] = cls
    return counts, classes


def count_report(name: str, expected: dict[str, int | None], counts: dict[str, int],
                 classes: dict[str, list[str]], want_classes: tuple[str, ...] | None,
                 num_classes: int | None) -> tuple[str, list[str]]:
    """A found-vs-expected table and the list of problems (missing/extra domains, counts, classes)."""
    problems: list[str] = []
    rows = [("domain", "found", "expected", "")]
    for dom in sorted(set(expected) | set(counts)):
        exp = expected.get(dom)
        got = counts.get(dom, 0)
        if dom not in expected:
            mark = "unexpected domain"
        elif got == 0:
            mark = "MISSING"
        elif exp is not None and got != exp:
            mark = f"{got - exp:+d}"
        else:
            mark = "ok"
        if mark != "ok":
            problems.append(f"{dom}: {mark} (found {got}, expected {exp if exp is not None else 'any'})")
        rows.append((dom, str(got), "?" if exp is None else str(exp), mark))
        have = classes.get(dom, [])
        if dom in expected and got:
            if want_classes is not None and sorted(have) != sorted(want_classes):
                miss = sorted(set(want_classes) - set(have))
                extra = sorted(set(have) - set(want_classes))
                problems.append(f"{dom}: class folders differ (missing {miss[:5]}, unexpected {extra[:5]})")
            elif want_classes is None and num_classes is not None and len(have) != num_classes:
                problems.append(f"{dom}: {len(have)} class folders, expected {num_classes}")
    tot_exp = sum(v for v in expected.values() if v is not None)
    rows.append(("total", str(sum(counts.values())), str(tot_exp) if tot_exp else "?", ""))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{name}:"] + [f"  {r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]}".rstrip() for r in rows]
    return "\n".join(lines), problems


def find_duplicates(dest: Path) -> list[list[str]]:
    """Groups of files with identical bytes (relative posix paths), found by size then sha256."""
    by_size: dict[int, list[Path]] = defaultdict(list)
    for dirpath, _, files in os.walk(dest):
        for f in files:
            p = Path(dirpath) / f
            # regular files only: never a FIFO (reading it would hang) or a link (maybe leading out)
            if p.suffix.lower() in IMAGE_EXTS and not p.is_symlink() and p.is_file():
                by_size[p.stat().st_size].append(p)
    groups: list[list[str]] = []
    for paths in by_size.values():
        if len(paths) < 2:
            continue  # a unique size cannot have an exact duplicate: no need to hash it
        by_hash: dict[str, list[str]] = defaultdict(list)
        for p in paths:
            by_hash[hashlib.sha256(p.read_bytes()).hexdigest()].append(p.relative_to(dest).as_posix())
        groups.extend(sorted(g) for g in by_hash.values() if len(g) > 1)
    return sorted(groups)
