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
from pathlib import Path
from typing import Any

from dbr_builder.config import load_schema
from dbr_builder.core.fsutil import read_parquet
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


def list_images(domain_dir: Path, classes: list[str]) -> list[tuple[str, str]]:
    """(relative path from the domain folder, class) in ImageFolder's ``make_dataset`` order."""
    out: list[tuple[str, str]] = []
    for cls in classes:
        base = domain_dir / cls
        for root, _, fnames in sorted(os.walk(base, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    out.append((os.path.relpath(os.path.join(root, fname), domain_dir), cls))
    return out


def manifest_paths(workdir: str | Path, dataset: str) -> tuple[Path, Path, Path]:
    """(parquet, meta JSON, quarantine JSONL) paths of a dataset's manifest."""
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
