"""Publish stage: write the Hub-layout dataset ``W/hub`` (and optionally push it).

Layout (loadable with ``datasets.load_dataset("W/hub", "PACS", split="photo")``)::

    W/hub/README.md                                         dataset card, YAML header with configs
    W/hub/data/<Dataset>/<safe_split>-NNNNN-of-NNNNN.parquet one config per dataset, one split per domain

Each shard embeds the image file bytes unchanged (``datasets`` Image feature) with the chain
columns; shards are cut so that each holds at most ``max_shard_mb`` of payload (and at
least one row). Rows keep manifest order; parquet is written with fixed settings and no
timestamps, so the same inputs give byte-identical files. Each dataset's folder is written
beside the old one and swapped in by rename, so a crash never leaves a half-written config.

Shards are written the way the ``datasets`` ecosystem writes them, so the Hub's dataset viewer
and streaming readers work well: row groups of at most 100 rows and about 100 MB (a reader
fetches one row group for one row), a page index (readers skip pages), the image column stored
as read (no compression, PLAIN encoding: JPEG/PNG bytes do not compress, and equal images stay
byte-equal across files) and content-defined chunking of data pages where the installed pyarrow
supports it (``use_content_defined_chunking``, pyarrow >= 21), so that a re-publish uploads
only the pages that changed to the Hub's Xet storage.

``mode``: ``full`` (default) embeds the images; ``gated`` embeds them too and makes the card
ask users to accept the source datasets' terms before downloading (the Hub gates the repo on
push); ``chains_only`` publishes no pixels: the chains with each image's id (sha256 of its
bytes) and its path in the source dataset's own layout (``source_path``), for sources whose
terms forbid redistribution (the card says how to download the images from their source).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
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
from dbr_builder.core import workdir as wdl
from dbr_builder.core.fsutil import (
    atomic_dir,
    is_temp_name,
    naming,
    read_parquet,
    recover_dir,
    remove_temps,
    write_text_atomic,
)
from dbr_builder.core.locks import stage_lock
from dbr_builder.core.manifest import image_path, load_manifest
from dbr_builder.core.workdir import chains_dir, chains_path, check_name, safe_split_name
from dbr_builder.errors import UserError
from dbr_builder.log import show_progress
from dbr_builder.stages.filter import outputs_lock, recover_outputs
from dbr_builder.stages.filter.stats import load_stats
from dbr_builder.stages.publish.card import features_for, provenance, render_card
from dbr_builder.stages.publish.push import check_push, push_folder

PER_DATASET = False
_D = schema_defaults("publish")  # the option defaults, defined once in schemas/stages/publish.schema.json
DEFAULT_MAX_SHARD_MB: float = _D["max_shard_mb"]
ROW_GROUP_ROWS = 100  # small row groups: images are large, the viewer and streaming readers fetch one
ROW_GROUP_BYTES = 100_000_000  # ... and at most ~100 MB of payload (datasets' MAX_ROW_GROUP_SIZE)
MODES = ("full", "gated", "chains_only")
# datasets' DEFAULT_CDC_OPTIONS: the same page boundaries as `push_to_hub`, for Xet deduplication
CDC_OPTIONS = {"min_chunk_size": 256 * 1024, "max_chunk_size": 1024 * 1024, "norm_level": 0}

COLUMNS = ["image", "image_id", "dataset", "domain", "class_name", "label", "dg_split", "chain", "summary",
           "caption", "reasoning", "reflection", "conclusion", "hinted", "teacher"]
CHAINS_ONLY_COLUMNS = ["image_id", "source_path", *COLUMNS[2:]]


def cdc_supported() -> bool:
    """Whether the installed pyarrow writes parquet with content-defined chunking (pyarrow >= 21.0)."""
    import pyarrow

    try:
        return int(pyarrow.__version__.split(".")[0]) >= 21
    except ValueError:
        return False


def parquet_options(schema: Any) -> dict[str, Any]:
    """``pq.ParquetWriter`` options: page index, CDC when available, image bytes stored as read.

    The image bytes (already JPEG/PNG-compressed) get no compression and PLAIN encoding, as
    ``datasets`` writes embedded files; every other column zstd with dictionaries.
    """
    leaves: list[str] = []
    for f in schema:
        if hasattr(f.type, "num_fields") and f.type.num_fields:  # a struct: the image column
            leaves += [f"{f.name}.{f.type.field(i).name}" for i in range(f.type.num_fields)]
        else:
            leaves.append(f.name)
    raw = [leaf for leaf in leaves if leaf.endswith(".bytes")]
    opts: dict[str, Any] = {
        "compression": {leaf: ("none" if leaf in raw else "zstd") for leaf in leaves},
        "use_dictionary": [leaf for leaf in leaves if leaf not in raw],
        "column_encoding": {leaf: "PLAIN" for leaf in raw},
        "write_statistics": [leaf for leaf in leaves if leaf not in raw],  # min/max of image bytes: useless
        "write_page_index": True,
        "store_schema": True,
    }
    if cdc_supported():
        opts["use_content_defined_chunking"] = CDC_OPTIONS
    return opts


def plan_row_groups(sizes: list[int], max_rows: int = ROW_GROUP_ROWS,
                    max_bytes: int = ROW_GROUP_BYTES) -> list[tuple[int, int]]:
    """Cut rows into [start, end) row groups of at most ``max_rows`` rows and ``max_bytes`` payload."""
    groups: list[tuple[int, int]] = []
    start, acc = 0, 0
    for i, n in enumerate(sizes):
        if i > start and (i - start >= max_rows or acc + n > max_bytes):
            groups.append((start, i))
            start, acc = i, 0
        acc += n
    if start < len(sizes):
        groups.append((start, len(sizes)))
    return groups


def write_parquet(table: Any, dest: Path, sizes: list[int]) -> None:
    """Write ``table`` to ``dest`` with :func:`parquet_options`, one row group per :func:`plan_row_groups`."""
    import json as _json

    import pyarrow.parquet as pq

    opts = parquet_options(table.schema)
    with pq.ParquetWriter(dest, table.schema, **opts) as writer:
        for a, b in plan_row_groups(sizes) or [(0, 0)]:
            writer.write_table(table.slice(a, b - a), row_group_size=max(1, b - a))
        if "use_content_defined_chunking" in opts:  # as `datasets` marks its files
            writer.add_key_value_metadata({"content_defined_chunking": _json.dumps(opts["use_content_defined_chunking"])})


def plan_shards(sizes: list[int], max_bytes: int) -> list[tuple[int, int]]:
    """Cut rows (with payload ``sizes``) into consecutive [start, end) shards of at most ``max_bytes``."""
    shards: list[tuple[int, int]] = []
    start, acc = 0, 0
    for i, n in enumerate(sizes):
        if i > start and acc + n > max_bytes:
            shards.append((start, i))
            start, acc = i, 0
        acc += n
    if start < len(sizes):
        shards.append((start, len(sizes)))
    return shards


def _arrow_table(rows: Any, image_bytes: list[bytes] | None, features, source_prefix: str = "") -> Any:
    """The shard's arrow table; ``image_bytes`` None = chains only (``source_path`` instead of pixels)."""
    import pyarrow as pa

    schema = features.arrow_schema
    paths = rows.get_column("path").to_list()
    cols: dict[str, Any] = {
        "dg_split": pa.array(rows.get_column("split").to_list(), pa.string()),
        "label": pa.array(rows.get_column("label").to_list(), pa.int64()),
        "hinted": pa.array(rows.get_column("hinted").to_list(), pa.bool_()),
    }
    if image_bytes is None:
        cols["source_path"] = pa.array([f"{source_prefix}{p}" for p in paths], pa.string())
    else:
        names = [p.rsplit("/", 1)[-1] for p in paths]
        cols["image"] = pa.array([{"bytes": b, "path": n} for b, n in zip(image_bytes, names, strict=True)],
                                 type=schema.field("image").type)
    for c in schema.names:
        if c not in cols:
            cols[c] = pa.array(rows.get_column(c).to_list(), pa.string())
    return pa.Table.from_arrays([cols[c] for c in schema.names], schema=schema)


def write_dataset(chains: Any, meta: dict[str, Any], dest: Path, max_shard_bytes: int,
                  progress: bool = True, mode: str = "full") -> list[dict[str, Any]]:
    """Write one dataset's shards into ``dest`` (a fresh folder); return per-split info."""
    import polars as pl
    from tqdm import tqdm

    pixels = mode != "chains_only"
    features = features_for(meta["classes"], pixels=pixels)
    source_prefix = f"{Path(meta['root']).name}/" if meta.get("root") else ""
    dest.mkdir(parents=True, exist_ok=True)
    splits = []
    domains = [d for d in meta["domains"] if d in set(chains.get_column("domain").to_list())]
    safe = [safe_split_name(d) for d in domains]
    if len(set(safe)) != len(safe):
        raise ValueError(f"{meta.get('dataset')}: domains {domains} give clashing split names {safe}")
    bar = tqdm(total=chains.height, desc=f"publish {meta.get('dataset', '')}", unit="img", disable=not show_progress(progress))
    for domain, split in zip(domains, safe, strict=True):
        rows = chains.filter(pl.col("domain") == domain)
        paths = [image_path(meta, p) for p in rows.get_column("path").to_list()]
        # payload: image bytes + the text columns (the stages repeat the chain: about twice its size)
        text = rows.get_column("chain").str.len_bytes().fill_null(0).to_list()
        sizes = [(os.path.getsize(p) if pixels else 0) + 2 * t for p, t in zip(paths, text, strict=True)]
        shards = plan_shards(sizes, max_shard_bytes)
        num_bytes = 0
        ids = rows.get_column("image_id").to_list()
        for k, (a, b) in enumerate(shards):
            blobs = ([_verified_bytes(p, i, meta.get("dataset", "")) for p, i in zip(paths[a:b], ids[a:b], strict=True)]
                     if pixels else None)  # as read: no re-encoding
            table = _arrow_table(rows.slice(a, b - a), blobs, features, source_prefix)
            write_parquet(table, dest / f"{split}-{k:05d}-of-{len(shards):05d}.parquet", sizes[a:b])
            num_bytes += table.nbytes
            bar.update(b - a)
        splits.append({"domain": domain, "split": split, "num_examples": rows.height, "num_bytes": num_bytes,
                       "num_shards": len(shards)})
    bar.close()
    return splits


def _verified_bytes(path: Path, image_id: str, dataset: str) -> bytes:
    """The bytes of an indexed image, checked against its id (sha256) from the manifest."""
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != image_id:
        raise UserError(f"{path}: the file changed since `dbr index` (its sha256 is not the indexed id "
                        f"{image_id[:16]}...); restore it, or rerun `dbr index {dataset}` and the stages after it")
    return data


def _clean_leftovers(hub: Path) -> None:
    """Undo or finish an interrupted folder swap in ``hub/data`` and remove killed runs' temporaries."""
    data = hub / "data"
    if data.is_dir():
        for p in sorted(data.iterdir()):
            if not is_temp_name(p.name) or not os.path.lexists(p):
                continue
            if p.name.endswith(".old") and len(p.name) > 5:
                recover_dir(data / p.name[1:-4])  # put back, or drop, the old copy of a swap
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)  # a killed run's half-written folder
            else:
                p.unlink(missing_ok=True)
    if hub.is_dir():
        remove_temps(hub, "README.md")


def _read_chains(workdir: Path, ds: str) -> Any:
    """The chains of ``ds``, read under the filter's lock (one consistent filter output)."""
    cp = chains_path(workdir, ds)
    with outputs_lock(workdir, ds):
        recover_outputs(workdir, ds)
        if not cp.exists():
            raise FileNotFoundError(f"{cp}: no chains for {ds}; run `dbr filter {ds} --workdir {workdir}` first")
        chains = read_parquet(cp, f"rebuild it with `dbr filter {ds} --workdir {workdir}`")
    if chains.height == 0:
        raise UserError(f"{cp}: no chains (0 rows: the filter accepted no candidate of {ds}); see "
                        f"{wdl.reports_dir(workdir, ds) / 'stats.md'} for the reasons, fix the teacher or the "
                        "filter rules and rerun `dbr filter`, or leave the dataset out with --datasets")
    return chains


def publish(workdir: str | Path, datasets: list[str], out: str | Path | None = None,
            max_shard_mb: float = DEFAULT_MAX_SHARD_MB, progress: bool = True,
            card_extra: dict[str, Any] | None = None, mode: str = "full") -> dict[str, Any]:
    """Write ``out`` (default ``W/hub``) for ``datasets``; return ``{dataset: [split info]}``."""
    if mode not in MODES:
        raise ValueError(f"publish mode {mode!r}: expected one of {', '.join(MODES)}")
    workdir = Path(workdir)
    hub = Path(out) if out else wdl.hub_dir(workdir)
    if not datasets:
        raise ValueError("publish: no datasets given (set `datasets:` in the pipeline or pass --datasets)")
    for ds in datasets:
        check_name(ds)
    with stage_lock(workdir, "publish", "publish"):
        _clean_leftovers(hub)
        # Read (and check) every dataset's inputs before anything in the hub is replaced.
        loaded = {}
        for ds in datasets:
            _, meta = load_manifest(workdir, ds)
            loaded[ds] = (_read_chains(workdir, ds), {**meta, "dataset": ds}, load_stats(workdir, ds))
        prov = provenance(workdir, datasets)
        infos: dict[str, Any] = {}
        for ds, (chains, meta, stats) in loaded.items():
            with naming(hub / "data" / ds), atomic_dir(hub / "data" / ds) as tmp:
                splits = write_dataset(chains, meta, tmp, int(max_shard_mb * 1e6), progress, mode)
            infos[ds] = {"classes": meta["classes"], "splits": splits, "stats": stats,
                         "teachers": sorted(set(chains.get_column("teacher").to_list())),
                         "source_folder": Path(meta["root"]).name if meta.get("root") else ds}
        write_text_atomic(hub / "README.md", render_card(infos, mode=mode, provenance=prov, **(card_extra or {})))
        # Folders of datasets no longer published would be loadable configs without a card entry.
        # Hidden first (one rename), then deleted: a kill mid-delete leaves only a hidden leftover.
        for stale in sorted((hub / "data").iterdir()):
            if stale.is_dir() and not is_temp_name(stale.name) and stale.name not in infos:
                gone = stale.with_name(f".{stale.name}.{os.getpid()}.tmp")
                os.replace(stale, gone)
                shutil.rmtree(gone, ignore_errors=True)
    return infos


# --- stage protocol -------------------------------------------------------------------------

def hub_dir(cfg: dict[str, Any], workdir: Path) -> Path:
    return Path(cfg.get("out") or wdl.hub_dir(workdir))


def _push_options(o: dict[str, Any]) -> dict[str, Any]:
    return {"private": bool(o.get("private")), "dry_run": bool(o.get("dry_run")), "revision": o.get("revision"),
            "create_pr": bool(o.get("create_pr")), "tag": o.get("tag"),
            "gated": "manual" if o.get("mode") == "gated" else None}


def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Publish ``cfg["datasets"]`` into W/hub; push when ``cfg["push"]`` names a repo."""
    hub = hub_dir(cfg, workdir)
    o = resolve("publish", cfg)
    infos = publish(workdir, list(o.get("datasets") or []), hub, float(o.max_shard_mb),
                    card_extra={"pretty_name": o.pretty_name, "repo_id": o.push}, mode=o.mode)
    summary: dict[str, Any] = {
        ds: {s["split"]: s["num_examples"] for s in info["splits"]} for ds, info in infos.items()
    }
    if o.push:
        res = push_folder(hub, o.push, **_push_options(o))
        summary["_push"] = {k: res[k] for k in ("repo_id", "files", "dry_run", "commit")}
    return summary


def outputs(cfg: dict[str, Any], workdir: Path) -> list[Path]:
    # Only the card and data: huggingface_hub keeps its resume cache in W/hub/.cache.
    hub = hub_dir(cfg, workdir)
    return [hub / "README.md", hub / "data"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", "-w", required=True, help="work directory (reads chains/, manifest/, reports/)")
    add_option(p, "publish", "datasets", metavar="DATASET",
               help="datasets to publish (default: every W/chains/<Dataset>.parquet)")
    add_option(p, "publish", "out")
    add_option(p, "publish", "max_shard_mb")
    add_option(p, "publish", "pretty_name")
    add_option(p, "publish", "mode")
    add_option(p, "publish", "push", metavar="REPO_ID")
    add_option(p, "publish", "private", action="store_true")
    add_option(p, "publish", "revision", metavar="BRANCH")
    add_option(p, "publish", "create_pr", action="store_true")
    add_option(p, "publish", "tag")
    add_option(p, "publish", "dry_run", action="store_true")
    p.add_argument("--no-write", action="store_true", help="push an existing W/hub as is, without rewriting it")


def main(args: argparse.Namespace) -> int:
    wd = Path(args.workdir)
    given = options_from_args(args)
    # Everything that can be checked is checked before W/hub is rewritten.
    validate_options({k: v for k, v in given.items() if k != "push"},  # check_push words --push errors better
                     "publish", "command line", flags_of(args))
    cfg = resolve("publish", given)
    if cfg.push:
        check_push(cfg.push, dry_run=cfg.dry_run, create_pr=cfg.create_pr, tag=cfg.tag)
    elif cfg.dry_run or cfg.private or cfg.revision or cfg.create_pr or cfg.tag:
        raise UserError("--dry-run, --private, --revision, --create-pr and --tag only apply with --push REPO_ID")
    hub = hub_dir(cfg, wd)
    if not args.no_write:
        datasets = cfg.get("datasets") or sorted(p.name[: -len(".parquet")] for p in (chains_dir(wd)).glob("*.parquet")
                                           if not p.name.endswith(".rejects.parquet") and not is_temp_name(p.name))
        if not datasets:
            raise UserError(f"{wd / 'chains'}: no chains to publish; run `dbr filter DATASET` first")
        try:
            infos = publish(wd, datasets, hub, cfg.max_shard_mb,
                            card_extra={"pretty_name": cfg.pretty_name, "repo_id": cfg.push}, mode=cfg.mode)
        except ValueError as e:
            raise UserError(str(e)) from None
        for ds, info in infos.items():
            print(f"{ds}: " + ", ".join(f"{s['split']} {s['num_examples']}" for s in info["splits"]))
        print(f"published -> {hub}  (load: datasets.load_dataset({str(hub)!r}, {datasets[0]!r}, "
              f"split={infos[datasets[0]]['splits'][0]['split']!r}))")
    if cfg.push:
        if args.no_write and (hub / "README.md").exists():  # the mode the folder was written in decides gating
            cfg["mode"] = (load_card_yaml(hub).get("dbr_builder") or {}).get("mode", "full")
        push_folder(hub, cfg.push, **_push_options(cfg))
    return 0


def load_card_yaml(hub: str | Path) -> dict[str, Any]:
    """The YAML header of ``hub/README.md`` as a dict (for tests and tools)."""
    import yaml

    text = (Path(hub) / "README.md").read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError(f"{hub}/README.md: no YAML header")
    return yaml.safe_load(text.split("---\n", 2)[1])
