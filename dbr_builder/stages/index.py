"""``dbr index``: scan ``ROOT/DATASET/<domain>/<class>/*`` into ``W/manifest/DATASET.parquet``.

Every image is read once: its bytes are hashed (``image_id`` = sha256) and fully
decoded to verify it. Broken files (empty, truncated, not an image, decompression
bomb) go to ``W/manifest/DATASET.quarantine.jsonl`` with a reason and never stop
the run. The in/out split is computed over the full ImageFolder listing, exactly as
DomainBed does, and broken files are dropped afterwards, so a good image always
gets the split DomainBed would give it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import stat
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from dbr_builder.config import (
    add_option,
    flags_of,
    options_from_args,
    resolve,
    schema_defaults,
    validate_options,
)
from dbr_builder.core.fsutil import atomic_path, write_json_atomic, write_text_atomic
from dbr_builder.core.locks import stage_lock
from dbr_builder.core.manifest import (
    IMG_EXTENSIONS,
    MANIFEST_COLUMNS,
    ROW_SCHEMA,
    check_rows,
    decodable,
    find_classes,
    holdout_keys,
    manifest_paths,
    shown,
    walk_class,
)
from dbr_builder.core.workdir import check_name
from dbr_builder.errors import UserError
from dbr_builder.log import show_progress
from dbr_builder.stages.download import dataset_folder

PER_DATASET = True
_D = schema_defaults("index")  # the option defaults, defined once in schemas/stages/index.schema.json
DEFAULT_MAX_PIXELS: int = _D["max_pixels"]  # PIL's own bomb limit (~0.25 GiB of RGBA)


class LayoutError(ValueError):
    """The dataset folder is not in DomainBed layout."""


def dataset_dir(root: str | Path, dataset: str) -> Path:
    """Folder of ``dataset`` under ``root`` (registry folder name when the download stage knows it)."""
    root = Path(root)
    names = [dataset_folder(dataset), dataset]
    for name in dict.fromkeys(names):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(
        f"{root / names[0]}: dataset folder not found; run `dbr download {dataset} --root {root}` "
        f"(or `dbr synth --root {root}` for SynthShapes)"
    )


def _check_folder(path: Path, real_root: str, what: str) -> None:
    if not decodable(path.name):
        raise LayoutError(f"{shown(str(path))}: {what} folder name is not valid UTF-8; rename it")
    real = os.path.realpath(path)
    if not (real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)):
        raise LayoutError(f"{path}: {what} folder is a link out of the dataset folder (to {shown(real)}); "
                          "move the files into the dataset folder")


def scan_layout(ds_dir: Path) -> tuple[list[str], list[str], dict[str, list[tuple[str, str, str | None]]],
                                       list[dict[str, Any]]]:
    """Check the DomainBed layout and walk it safely.

    Returns (domains, classes, {domain: [(rel path, class, skip reason or None)]}, skipped
    folders as quarantine records). Links are followed only while they stay inside the
    dataset folder (see :func:`dbr_builder.core.manifest.walk_class`).
    """
    real_root = os.path.realpath(ds_dir)
    domains = sorted(e.name for e in os.scandir(ds_dir) if e.is_dir() and not e.name.startswith("."))
    if not domains:
        raise LayoutError(f"{ds_dir}: no domain folders; expected {ds_dir}/<domain>/<class>/<image>")
    per_domain: dict[str, list[tuple[str, str, str | None]]] = {}
    class_sets: dict[str, list[str]] = {}
    skipped: list[dict[str, Any]] = []
    for dom in domains:
        ddir = ds_dir / dom
        _check_folder(ddir, real_root, "domain")
        stray = sorted(e.name for e in os.scandir(ddir) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        if stray:
            raise LayoutError(
                f"{ddir}: images directly in a domain folder ({shown(stray[0])}, ...); expected {ddir}/<class>/<image>"
            )
        classes = find_classes(ddir)
        if not classes:
            raise LayoutError(f"{ddir}: domain has no class folders; expected {ddir}/<class>/<image>")
        files: list[tuple[str, str, str | None]] = []
        counts = {c: 0 for c in classes}
        for c in classes:
            _check_folder(ddir / c, real_root, "class")
            found, skipped_dirs = walk_class(ddir, c, real_root)
            files.extend((r, c, why) for r, why in found)
            counts[c] += sum(why is None for _, why in found)
            skipped.extend({"path": Path(dom, shown(r)).as_posix(), "domain": dom, "class_name": c, "reason": why}
                           for r, why in skipped_dirs)
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            raise LayoutError(f"{ddir / empty[0]}: class folder has no images (empty classes: {', '.join(empty)})")
        class_sets[dom], per_domain[dom] = classes, files
    ref = class_sets[domains[0]]
    for dom in domains[1:]:
        if class_sets[dom] != ref:
            missing = sorted(set(ref) - set(class_sets[dom]))
            extra = sorted(set(class_sets[dom]) - set(ref))
            raise LayoutError(
                f"{ds_dir / dom}: classes differ from {domains[0]!r} (missing: {missing or '-'}, extra: {extra or '-'}); "
                "DomainBed needs the same classes in every domain"
            )
    return domains, ref, per_domain, skipped


def check_image(args: tuple[str, int]) -> tuple[str | None, int, int, str | None]:
    """Hash and fully decode one file: (sha256, width, height, error reason or None)."""
    path, max_pixels = args
    from PIL import Image, UnidentifiedImageError

    try:
        # O_NONBLOCK: a FIFO that appeared after the walk must not hang the run.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None, 0, 0, "not a regular file (FIFO, socket or device)"
            data = f.read()
    except OSError as e:
        return None, 0, 0, f"unreadable: {e.strerror or e}"
    if not data:
        return None, 0, 0, "empty file (0 bytes)"
    sha = hashlib.sha256(data).hexdigest()
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return sha, w, h, f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}"
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return sha, 0, 0, f"decompression bomb: {e}"
    except UnidentifiedImageError:
        return sha, 0, 0, "not an image (unrecognised format)"
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        return sha, 0, 0, ("truncated: " if "truncated" in msg.lower() else "undecodable: ") + msg
    return sha, w, h, None


def build_manifest(ds_dir: Path, dataset: str, trial_seed: int = 0, holdout_fraction: float = schema_defaults("index")["holdout_fraction"],
                   max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None,
                   progress: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Scan, verify and split a dataset folder: (rows, quarantined, meta)."""
    from tqdm import tqdm

    domains, classes, per_domain, skipped = scan_layout(ds_dir)
    label_of = {c: i for i, c in enumerate(classes)}
    # env index, domain, rel path, class, is_out, skip reason
    items: list[tuple[int, str, str, str, bool, str | None]] = []
    for env_i, dom in enumerate(domains):
        files = per_domain[dom]
        out_keys = holdout_keys(len(files), trial_seed, env_i, holdout_fraction)
        for k, (rel, cls, why) in enumerate(files):
            items.append((env_i, dom, Path(dom, shown(rel)).as_posix(), cls, k in out_keys, why))
    # Files the walk marked (links out, FIFOs, undecodable names) keep their place in the
    # listing (the split is DomainBed's) but are never opened.
    todo = [i for i, it in enumerate(items) if it[5] is None]
    jobs = [(str(ds_dir / items[i][2]), max_pixels) for i in todo]
    workers = workers or min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc=f"index {dataset}", unit="img", disable=not show_progress(progress))
    if workers > 1 and len(jobs) > 256:
        with ProcessPoolExecutor(workers) as ex:
            checked = []
            for r in ex.map(check_image, jobs, chunksize=256):
                checked.append(r)
                bar.update()
    else:
        checked = []
        for j in jobs:
            checked.append(check_image(j))
            bar.update()
    bar.close()
    results: list[tuple[str | None, int, int, str | None]] = [(None, 0, 0, it[5]) for it in items]
    for i, r in zip(todo, checked, strict=True):
        results[i] = r
    rows, quarantined = [], list(skipped)
    for (env_i, dom, rel, cls, is_out, _), (sha, w, h, err) in zip(items, results, strict=True):
        if err:
            quarantined.append({"path": rel, "domain": dom, "class_name": cls, "reason": err})
            continue
        rows.append({"image_id": sha, "dataset": dataset, "domain": dom, "domain_index": env_i,
                     "class_name": cls, "label": label_of[cls], "path": rel, "width": w, "height": h,
                     "split": "out" if is_out else "in"})
    counts = {d: sum(1 for r in rows if r["domain"] == d) for d in domains}
    meta = {"dataset": dataset, "root": str(ds_dir.resolve()), "domains": domains, "classes": classes,
            "trial_seed": trial_seed, "holdout_fraction": holdout_fraction, "counts": counts,
            "images": len(rows), "quarantined": len(quarantined)}
    return rows, quarantined, meta


def write_manifest(workdir: Path, dataset: str, rows: list[dict[str, Any]], quarantined: list[dict[str, Any]],
                   meta: dict[str, Any]) -> Path:
    """Write the manifest parquet, meta JSON and quarantine JSONL atomically."""
    import polars as pl

    parquet, meta_path, q_path = manifest_paths(workdir, dataset)
    check_rows(rows)
    schema = {c: pl.Int32 if ROW_SCHEMA["properties"][c].get("type") == "integer" else pl.String
              for c in MANIFEST_COLUMNS}
    df = pl.DataFrame(rows, schema=schema).select(MANIFEST_COLUMNS)
    with atomic_path(parquet, ".parquet") as tmp:
        df.write_parquet(tmp, statistics=False)
    write_text_atomic(q_path, "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantined))
    write_json_atomic(meta_path, meta)  # written last: its presence marks a complete manifest
    return parquet


def index_dataset(root: str | Path, dataset: str, workdir: str | Path, trial_seed: int = _D["trial_seed"],
                  holdout_fraction: float = _D["holdout_fraction"], max_pixels: int = DEFAULT_MAX_PIXELS,
                  workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Index one dataset; return its meta (counts, quarantined)."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    check_name(dataset)
    ds_dir = dataset_dir(root, dataset)
    with stage_lock(workdir, f"index-{dataset}", f"index {dataset}"):
        rows, quarantined, meta = build_manifest(ds_dir, dataset, trial_seed, holdout_fraction, max_pixels,
                                                 workers, progress)
        if not rows:
            raise LayoutError(f"{ds_dir}: every image is broken; see the quarantine list")
        write_manifest(Path(workdir), dataset, rows, quarantined, meta)
    return meta


# --- stage protocol -------------------------------------------------------------------------

def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    o = resolve("index", cfg)
    meta = index_dataset(o.root, o.dataset, workdir, o.trial_seed, o.holdout_fraction, o.max_pixels, o.workers)
    return {"images": meta["images"], "quarantined": meta["quarantined"]}


def outputs(cfg: dict[str, Any], workdir: Path) -> list[Path]:
    return list(manifest_paths(workdir, cfg["dataset"]))


def inputs(cfg: dict[str, Any], workdir: Path) -> list[Path]:
    try:
        return [dataset_dir(cfg["root"], cfg["dataset"])]
    except FileNotFoundError:
        return [Path(cfg["root"]) / cfg["dataset"]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="dataset name, e.g. PACS or SynthShapes")
    p.add_argument("--root", required=True, help="data root holding ROOT/<dataset>/<domain>/<class>/<image>")
    p.add_argument("--workdir", "-w", required=True, help="work directory; writes W/manifest/<dataset>.parquet")
    for key in ("trial_seed", "holdout_fraction", "max_pixels", "workers"):
        add_option(p, "index", key)


def main(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    validate_options(opts, "index", "command line", flags_of(args))
    o = resolve("index", opts)
    try:
        meta = index_dataset(args.root, args.dataset, args.workdir, o.trial_seed, o.holdout_fraction,
                             o.max_pixels, o.workers)
    except (LayoutError, ValueError) as e:
        raise UserError(str(e)) from None
    parquet, _, q_path = manifest_paths(args.workdir, args.dataset)
    print(f"{args.dataset}: {meta['images']} images, {len(meta['domains'])} domains, {len(meta['classes'])} classes "
          f"-> {parquet}")
    for dom, n in meta["counts"].items():
        print(f"  {dom:<24} {n:>7}")
    if meta["quarantined"]:
        print(f"  {meta['quarantined']} broken file(s) quarantined, reasons in {q_path}")
    return 0
