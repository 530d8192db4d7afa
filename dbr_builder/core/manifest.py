"""The image manifest and DomainBed's exact environment / split rules.

DomainBed builds one torchvision ``ImageFolder`` per domain (domains = sorted
sub-folders) and splits each with ``misc.split_dataset(env, int(len(env) * 0.2),
misc.seed_hash(trial_seed, env_i))``: the first 20% of a seeded
``numpy.random.RandomState`` shuffle is the ``out`` (validation) split.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from dbr_builder.config import load_schema
from dbr_builder.core.fsutil import read_parquet
from dbr_builder.core.workdir import check_name
from dbr_builder.errors import UserError

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# One manifest row is defined by schemas/manifest_row.schema.json (columns, types, ranges).
ROW_SCHEMA: dict[str, Any] = load_schema("manifest_row.schema.json")
MANIFEST_COLUMNS: list[str] = list(ROW_SCHEMA["properties"])


def seed_hash(*args: Any) -> int:
    """DomainBed's ``misc.seed_hash``: an int seed derived from the args' repr."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def holdout_keys(n: int, trial_seed: int, env_index: int, holdout_fraction: float = 0.2) -> set[int]:
    """Indices (in ImageFolder order) of the ``out`` split of environment ``env_index``."""
    import numpy as np

    keys = list(range(n))
    np.random.RandomState(seed_hash(trial_seed, env_index)).shuffle(keys)
    return set(keys[: int(n * holdout_fraction)])


def find_classes(domain_dir: Path) -> list[str]:
    """Sorted class folder names of one domain (ImageFolder's ``find_classes``)."""
    return sorted(e.name for e in os.scandir(domain_dir) if e.is_dir())


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def decodable(name: str) -> bool:
    """False for a file name that is not valid UTF-8 (Python holds it with surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(path: str) -> str:
    """A printable form of a path that may hold undecodable bytes (shown as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def walk_class(domain_dir: Path, cls: str, root: str | Path | None = None,
               ) -> tuple[list[tuple[str, str | None]], list[tuple[str, str]]]:
    """The image files of one class folder, walked safely, in ImageFolder's order.

    Returns ``(files, skipped_folders)``: ``files`` are ``(path relative to domain_dir,
    reason or None)``, where a reason marks a file ImageFolder would list but that must not
    be read (a link leaving ``root``, a FIFO or other non-regular file, an undecodable name,
    a broken link); ``skipped_folders`` are ``(relative path, reason)`` of folders not
    walked (a link leaving ``root``, a link loop, an undecodable name). A link that stays
    inside ``root`` (default: the domain's parent, the dataset folder) is followed, and each
    real folder is walked at most once.
    """
    real_root = os.path.realpath(root if root is not None else Path(domain_dir).parent)
    base = os.path.join(domain_dir, cls)
    walked: list[tuple[str, list[tuple[str, str | None]]]] = []
    skipped: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    stack = [base]

    def rel(p: str) -> str:
        return os.path.relpath(p, domain_dir)

    while stack:
        d = stack.pop()
        real_d = os.path.realpath(d)
        if not _inside(real_d, real_root):
            skipped.append((rel(d), f"folder link leads out of the dataset folder (to {shown(real_d)})"))
            continue
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in seen:
            skipped.append((rel(d), "folder link loop (this folder was already walked)"))
            continue
        seen.add((st.st_dev, st.st_ino))
        files: list[tuple[str, str | None]] = []
        subdirs: list[str] = []
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            skipped.append((rel(d), f"unreadable folder: {e.strerror or e}"))
            continue
        for e in entries:
            full = os.path.join(d, e.name)
            try:
                is_dir = e.is_dir()  # follows links, as os.walk(followlinks=True) does
            except OSError:
                is_dir = False
            if is_dir:
                if not decodable(e.name):
                    skipped.append((rel(full), "folder name is not valid UTF-8"))
                else:
                    subdirs.append(full)
                continue
            if not e.name.lower().endswith(IMG_EXTENSIONS):
                continue
            reason = None
            if not decodable(e.name):
                reason = "file name is not valid UTF-8; rename it"
            elif e.is_symlink() and not _inside(os.path.realpath(full), real_root):
                reason = "link leads out of the dataset folder"
            else:
                try:
                    mode = os.stat(full).st_mode
                    if not stat.S_ISREG(mode):
                        reason = "not a regular file (FIFO, socket or device)"
                except OSError:
                    reason = "broken link"
            files.append((e.name, reason))
        walked.append((d, files))
        stack.extend(reversed(subdirs))  # sorted order: first subfolder walked first
    out: list[tuple[str, str | None]] = []
    for d, files in sorted(walked):  # os.walk's listing, sorted by folder as ImageFolder does
        out.extend((rel(os.path.join(d, name)), reason) for name, reason in files)
    return out, skipped


def list_images(domain_dir: Path, classes: list[str]) -> list[tuple[str, str]]:
    """(relative path from the domain folder, class) in ImageFolder's ``make_dataset`` order.

    Only files that can be read safely (see :func:`walk_class`).
    """
    out: list[tuple[str, str]] = []
    for cls in classes:
        files, _ = walk_class(domain_dir, cls)
        out.extend((r, cls) for r, why in files if why is None)
    return out


def manifest_paths(workdir: str | Path, dataset: str) -> tuple[Path, Path, Path]:
    """(parquet, meta JSON, quarantine JSONL) paths of a dataset's manifest."""
    check_name(dataset)
    d = Path(workdir) / "manifest"
    return d / f"{dataset}.parquet", d / f"{dataset}.json", d / f"{dataset}.quarantine.jsonl"


def load_manifest(workdir: str | Path, dataset: str):
    """Load ``W/manifest/<dataset>.parquet`` and its meta; clear error if ``dbr index`` has not run."""
    parquet, meta_path, _ = manifest_paths(workdir, dataset)
    if not parquet.exists() or not meta_path.exists():
        raise FileNotFoundError(
            f"{parquet}: no manifest for {dataset}; run `dbr index {dataset} --root ROOT --workdir {workdir}` first"
        )
    remedy = f"rebuild it with `dbr index {dataset} --root ROOT --workdir {workdir}`"
    df = read_parquet(parquet, remedy)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path}: corrupt manifest metadata ({e}); {remedy}") from None
    return df, meta


def image_path(meta: dict[str, Any], rel_path: str) -> Path:
    """Absolute path of a manifest row's image."""
    return Path(meta["root"]) / rel_path


def check_rows(rows: list[dict[str, Any]], sample: int = 1000) -> None:
    """Validate an even sample of manifest rows against the row schema; raise ValueError naming the first bad one."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(ROW_SCHEMA)
    step = max(1, len(rows) // sample)
    for row in rows[::step]:
        err = next(iter(validator.iter_errors(row)), None)
        if err is not None:
            where = ".".join(map(str, err.absolute_path)) or "<row>"
            raise ValueError(f"manifest row {row.get('path')!r}: {where}: {err.message}")


def _listing_key(cls: str, path: str) -> tuple[str, str, str]:
    """Sort key of a ``<domain>/<class>/.../<file>`` path in ImageFolder's ``make_dataset`` order."""
    d, _, f = path.rpartition("/")
    return (cls, d, f)


def load_quarantine(workdir: str | Path, dataset: str) -> list[dict[str, Any]]:
    """The images ``dbr index`` set aside (they still count in DomainBed's listing)."""
    path = manifest_paths(workdir, dataset)[2]
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def splits_for_seed(rows: list[dict[str, Any]], quarantined: list[dict[str, Any]], trial_seed: int,
                    holdout_fraction: float = 0.2) -> list[str]:
    """DomainBed's in/out split of every manifest row for ``trial_seed`` (same order as ``rows``).

    DomainBed draws each environment's split from ``seed_hash(trial_seed, env_index)`` over the
    whole ImageFolder listing of that domain, so every trial seed has its own split. The listing
    is rebuilt from the rows plus the quarantined (unreadable) images, which DomainBed's listing
    also holds.
    """
    envs: dict[str, int] = {}
    listing: dict[int, list[tuple[tuple[str, str, str], int | None]]] = {}
    for i, r in enumerate(rows):
        env = int(r["domain_index"])
        envs[r["domain"]] = env
        listing.setdefault(env, []).append((_listing_key(r["class_name"], r["path"]), i))
    for q in quarantined:
        env = envs.get(q.get("domain", ""))
        if env is not None:
            listing[env].append((_listing_key(q["class_name"], q["path"]), None))
    out = ["in"] * len(rows)
    for env, items in listing.items():
        items.sort(key=lambda t: t[0])
        held = holdout_keys(len(items), trial_seed, env, holdout_fraction)
        for k, (_, i) in enumerate(items):
            if i is not None and k in held:
                out[i] = "out"
    return out


def manifest_splits(workdir: str | Path, dataset: str, trial_seed: int) -> dict[tuple[str, str], list[str]]:
    """``{(domain, image_id): [split, ...]}`` for ``trial_seed`` from ``W/manifest`` (listing order).

    Checks first that the rule reproduces the split stored by ``dbr index`` for its own trial
    seed, so a manifest whose listing cannot be rebuilt is refused rather than split wrongly.
    """
    df, meta = load_manifest(workdir, dataset)
    rows = df.to_dicts()
    quarantined = load_quarantine(workdir, dataset)
    frac = float(meta.get("holdout_fraction", 0.2))
    stored = [r["split"] for r in rows]
    if splits_for_seed(rows, quarantined, int(meta.get("trial_seed", 0)), frac) != stored:
        raise UserError(f"{manifest_paths(workdir, dataset)[0]}: the stored in/out split cannot be reproduced "
                        f"from the listing; rebuild it with `dbr index {dataset}`")
    splits = stored if int(meta.get("trial_seed", 0)) == trial_seed else splits_for_seed(rows, quarantined, trial_seed, frac)
    out: dict[tuple[str, str], list[str]] = {}
    for r, s in zip(rows, splits, strict=True):
        out.setdefault((r["domain"], r["image_id"]), []).append(s)
    return out
