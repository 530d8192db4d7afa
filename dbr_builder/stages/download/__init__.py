"""Download a DomainBed dataset into ROOT in DomainBed's layout, verified and safely extracted.

Sources come from the dataset registry (``pipelines/datasets.yaml``) in priority order: the
original DomainBed sources, Hugging Face Hub parquet mirrors; or ``--from`` a local archive,
folder, parquet file or URL. Downloads resume, the lock file ``ROOT/.dbr-download.lock.json``
pins every artifact's size + sha256, and the finished tree is checked against the expected
per-domain counts. See docs/download.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dbr_builder.config import add_option, flags_of, options_from_args, resolve, validate_options
from dbr_builder.core.fsutil import swap_dir
from dbr_builder.core.locks import stage_lock
from dbr_builder.errors import UserError
from dbr_builder.log import get_logger
from dbr_builder.stages.download.extract import Budget, CorruptArchive, parse_size
from dbr_builder.stages.download.http import DownloadError, FetchOptions
from dbr_builder.stages.download.hub import MirrorError
from dbr_builder.stages.download.layouts import LayoutError, confine_links
from dbr_builder.stages.download.registry import DatasetSpec, dataset_folder, get_dataset, load_registry
from dbr_builder.stages.download.sources import Context, build_archives, build_from, build_hub
from dbr_builder.stages.download.verify import (
    CountMismatch,
    Lock,
    count_report,
    count_tree,
    find_duplicates,
)

PER_DATASET = True
STAGING = ".staging"

__all__ = ["PER_DATASET", "add_arguments", "main", "run", "outputs", "inputs", "dataset_folder",
           "load_registry", "get_dataset"]

# Errors after which the next source is worth trying; anything else (checksum mismatch against
# the lock file, an unsafe archive, the size limit) stops the run so the user can look at it.
_FALLBACK_ERRORS = (DownloadError, CorruptArchive, LayoutError, MirrorError)

log = get_logger(__name__)


def _root(cfg: dict[str, Any], workdir: Path) -> Path:
    return Path(cfg.get("root") or Path(workdir) / "raw")


def outputs(cfg: dict[str, Any], workdir: Path) -> list[Path]:
    """The dataset folder ``ROOT/<DomainBed folder>``."""
    return [_root(cfg, workdir) / dataset_folder(cfg["dataset"], cfg.get("registry"))]


def inputs(cfg: dict[str, Any], workdir: Path) -> list[Path]:
    """A local ``from`` archive/folder (so that replacing it makes the stage stale)."""
    src = cfg.get("from")
    if src and "://" not in src:
        return [Path(src).expanduser()]
    return []


def _options(cfg: dict[str, Any]) -> FetchOptions:
    o = resolve("download", cfg)
    return FetchOptions(timeout=float(o.timeout), retries=int(o.retries), progress=True)


def _check(spec: DatasetSpec, dest: Path, strict: bool, duplicates: bool) -> dict[str, Any]:
    """Count table (printed), problems (warnings, or an error with strict), duplicate groups."""
    counts, classes = count_tree(dest, list(spec.domains))
    table, problems = count_report(f"{spec.name} ({dest})", spec.domains, counts, classes, spec.classes,
                                   spec.num_classes)
    log.info(table)
    for p in problems:
        log.warning(f"{spec.name} {p}")
    if problems and strict:
        raise CountMismatch(f"{dest}: the tree does not match the registry ({'; '.join(problems)}); "
                            "rerun without --strict to accept it")
    dups: list[list[str]] = find_duplicates(dest) if duplicates else []
    if dups:
        extra = sum(len(g) - 1 for g in dups)
        log.warning(f"{spec.name}: {len(dups)} groups of byte-identical files ({extra} redundant), e.g. "
                    f"{dups[0][:2]}")
    return {"counts": counts, "problems": problems, "duplicate_groups": len(dups),
            "duplicates": dups[:50]}


def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Make ``ROOT/<folder>`` hold the dataset; no network work when it is already complete."""
    cfg = resolve("download", cfg)
    spec = get_dataset(cfg["dataset"], cfg.get("registry"))
    root = _root(cfg, workdir)
    with stage_lock(root, f"download-{spec.name}", f"download {spec.name}"):
        return _run(cfg, spec, root)


def _run(cfg: dict[str, Any], spec: DatasetSpec, root: Path) -> dict[str, Any]:
    dest = root / spec.folder
    strict, force, dups = bool(cfg.strict), bool(cfg.force), bool(cfg.check_duplicates)
    lock = Lock.load(root)
    rec = lock.data["datasets"].get(spec.name)

    if dest.exists() and not force:
        counts, _ = count_tree(dest, list(spec.domains))
        if rec and rec.get("complete") and rec.get("counts") == counts:
            log.info(f"{spec.name}: {dest} is complete ({sum(counts.values())} images); nothing to do")
            return {"dataset": spec.name, "path": str(dest), "status": "up to date", "counts": counts,
                    "source": rec.get("source"), "bytes_downloaded": 0}
        if all(counts.get(d, 0) > 0 for d in spec.domains):
            # A tree the user already has (or one whose files changed): check it, no network.
            log.info(f"{spec.name}: using the existing tree {dest}")
            check = _check(spec, dest, strict, dups)
            _record(lock, spec, dest, "existing tree", check, [])
            return {"dataset": spec.name, "path": str(dest), "status": "present", "bytes_downloaded": 0,
                    **check}
        missing = [d for d in spec.domains if not counts.get(d)]
        raise UserError(f"{dest} exists but is incomplete (no images for {', '.join(missing)}); "
                        "move it away or rerun with --force to rebuild it")

    budget = Budget(parse_size(cfg.max_extract_bytes))
    opts = _options(cfg)
    if cfg.get("from"):
        attempts: list[Any] = ["--from"]
    elif cfg.get("source"):
        attempts = [spec.source(cfg["source"])]
    else:
        attempts = list(spec.sources)
    if not attempts:
        raise UserError(f"{spec.name} has no download source; pass --from PATH (e.g. `dbr synth` makes SynthShapes)")

    root.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    t0 = time.perf_counter()
    for src in attempts:
        label = "--from" if src == "--from" else f"source {src.name!r}"
        staging = root / STAGING / f"{spec.folder}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        new = staging / "out"  # becomes dest only once complete
        ctx = Context(spec, root, staging, lock, opts, budget)
        try:
            log.info(f"{spec.name}: trying {label}" + (f" ({src.description})" if src != "--from" and src.description
                                                   else ""))
            if src == "--from":
                used = build_from(ctx, cfg["from"], new)
            elif src.kind == "hub":
                build_hub(ctx, src, new)
                used = f"hub:{src.repo_id}"
            else:
                build_archives(ctx, src, new)
                used = src.name
            lock.save()  # artifact records survive even if the count check below fails
            dropped = confine_links(new)
            if dropped:
                log.warning(f"{spec.name}: removed {len(dropped)} link(s) that lead out of the dataset folder "
                            f"(e.g. {dropped[0]})")
            check = _check(spec, new, strict, dups)
            _install(new, dest)
            _record(lock, spec, dest, used, check, ctx.artifacts)
            if cfg.get("delete_archives"):
                shutil.rmtree(ctx.download_dir, ignore_errors=True)
            log.info(f"{spec.name}: ready at {dest} (from {used}, {ctx.bytes_fetched} bytes downloaded, "
                  f"{time.perf_counter() - t0:.1f}s)")
            return {"dataset": spec.name, "path": str(dest), "status": "built", "source": used,
                    "bytes_downloaded": ctx.bytes_fetched, "failed_sources": failures, **check}
        except _FALLBACK_ERRORS as e:
            if ctx.artifacts:
                lock.save()  # keep the records of what was downloaded and verified
            msg = f"{label}: {e}"
            failures.append(msg)
            log.warning(f"{spec.name}: {msg}")
            if src != attempts[-1]:
                log.warning(f"{spec.name}: trying the next source")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                (root / STAGING).rmdir()
            except OSError:
                pass
    names = ", ".join(s.name for s in spec.sources) or "none"
    raise UserError(
        f"could not get {spec.name}:\n" + "\n".join(f"  - {f}" for f in failures)
        + f"\nIf you already have the data, pass it with --from PATH (archive, folder or parquet file) "
        f"or --from URL; or pick another source with --source NAME (sources: {names}). See docs/download.md."
    )


def _install(new: Path, dest: Path) -> None:
    """Move the finished tree into place; an old tree (``--force``) is removed only afterwards."""
    swap_dir(new, dest)


def _record(lock: Lock, spec: DatasetSpec, dest: Path, used: str, check: dict[str, Any],
            artifacts: list[str]) -> None:
    lock.data["datasets"][spec.name] = {
        "folder": spec.folder, "source": used, "complete": True, "counts": check["counts"],
        "problems": check["problems"], "duplicate_groups": check["duplicate_groups"],
        "artifacts": artifacts, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    lock.save()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dbr download``."""
    p.add_argument("dataset", help="registry name: PACS, VLCS, OfficeHome, TerraIncognita, DomainNet")
    p.add_argument("--root", default="work/raw", help="data root; the dataset lands in ROOT/<DomainBed folder> "
                   "(default: work/raw)")
    add_option(p, "download", "source")
    add_option(p, "download", "from", "--from", metavar="PATH_OR_URL")
    add_option(p, "download", "strict", action="store_true")
    add_option(p, "download", "force", action="store_true")
    for key in ("registry", "max_extract_bytes", "timeout", "retries"):
        add_option(p, "download", key)
    add_option(p, "download", "delete_archives", action="store_true")
    add_option(p, "download", "check_duplicates", "--no-duplicate-check", action="store_false",
               help="skip the exact-duplicate report (hashes files sharing a size)")


def main(args: argparse.Namespace) -> int:
    """``dbr download DATASET --root ROOT ...``"""
    cfg = {"dataset": args.dataset, "root": args.root, **options_from_args(args)}
    validate_options(cfg, "download", "command line", flags_of(args))
    run(cfg, Path("work"))
    return 0
