"""Publish stage: write the Hub-layout dataset ``W/hub`` (and optionally push it).

Layout (loadable with ``datasets.load_dataset("W/hub", "PACS", split="photo")``)::

    W/hub/README.md                                         dataset card, YAML header with configs
    W/hub/data/<Dataset>/<safe_split>-NNNNN-of-NNNNN.parquet one config per dataset, one split per domain

Each shard embeds the image file bytes unchanged (``datasets`` Image feature) with the chain
columns; shards are cut so that each holds at most ``max_shard_mb`` of payload (and at
least one row). Rows keep manifest order; parquet is written with fixed settings and no
timestamps, so the same inputs give byte-identical files. Each dataset's folder is written
beside the old one and swapped in by rename, so a crash never leaves a half-written config.
"""

from __future__ import annotations

import argparse
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
from dbr_builder.core.fsutil import atomic_dir, read_parquet, write_text_atomic
from dbr_builder.core.manifest import image_path, load_manifest
from dbr_builder.core.workdir import chains_dir, chains_path, safe_split_name
from dbr_builder.errors import UserError
from dbr_builder.log import show_progress
from dbr_builder.stages.filter.stats import load_stats
from dbr_builder.stages.publish.card import features_for, render_card
from dbr_builder.stages.publish.push import check_push, push_folder

PER_DATASET = False
_D = schema_defaults("publish")  # the option defaults, defined once in schemas/stages/publish.schema.json
DEFAULT_MAX_SHARD_MB: float = _D["max_shard_mb"]
ROW_GROUP_ROWS = 100  # small row groups: images are large, readers stream them

COLUMNS = ["image", "image_id", "dataset", "domain", "class_name", "label", "dg_split", "chain", "summary",
           "caption", "reasoning", "reflection", "conclusion", "hinted", "teacher"]


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


def _arrow_table(rows: Any, image_bytes: list[bytes], features) -> Any:
    import pyarrow as pa

    schema = features.arrow_schema
    names = rows.get_column("path").map_elements(lambda p: p.rsplit("/", 1)[-1], return_dtype=str).to_list() \
        if rows.height else []
    cols = {
        "image": pa.array([{"bytes": b, "path": n} for b, n in zip(image_bytes, names, strict=True)],
                          type=schema.field("image").type),
        "dg_split": pa.array(rows.get_column("split").to_list(), pa.string()),
        "label": pa.array(rows.get_column("label").to_list(), pa.int64()),
        "hinted": pa.array(rows.get_column("hinted").to_list(), pa.bool_()),
    }
    for c in COLUMNS:
        if c not in cols:
            cols[c] = pa.array(rows.get_column(c).to_list(), pa.string())
    return pa.Table.from_arrays([cols[c] for c in COLUMNS], schema=schema)


def write_dataset(chains: Any, meta: dict[str, Any], dest: Path, max_shard_bytes: int,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Write one dataset's shards into ``dest`` (a fresh folder); return per-split info."""
    import polars as pl
    import pyarrow.parquet as pq
    from tqdm import tqdm


    features = features_for(meta["classes"])
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
        sizes = [os.path.getsize(p) + 2 * t for p, t in zip(paths, text, strict=True)]
        shards = plan_shards(sizes, max_shard_bytes)
        num_bytes = 0
        for k, (a, b) in enumerate(shards):
            blobs = [Path(p).read_bytes() for p in paths[a:b]]
            table = _arrow_table(rows.slice(a, b - a), blobs, features)
            out = dest / f"{split}-{k:05d}-of-{len(shards):05d}.parquet"
            pq.write_table(table, out, compression="zstd", row_group_size=ROW_GROUP_ROWS, write_statistics=False,
                           store_schema=True)
            num_bytes += table.nbytes
            bar.update(b - a)
        splits.append({"domain": domain, "split": split, "num_examples": rows.height, "num_bytes": num_bytes,
                       "num_shards": len(shards)})
    bar.close()
    return splits


def publish(workdir: str | Path, datasets: list[str], out: str | Path | None = None,
            max_shard_mb: float = DEFAULT_MAX_SHARD_MB, progress: bool = True,
            card_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out`` (default ``W/hub``) for ``datasets``; return ``{dataset: [split info]}``."""


    workdir = Path(workdir)
    hub = Path(out) if out else wdl.hub_dir(workdir)
    if not datasets:
        raise ValueError("publish: no datasets given (set `datasets:` in the pipeline or pass --datasets)")
    infos: dict[str, Any] = {}
    for ds in datasets:
        cp = chains_path(workdir, ds)
        if not cp.exists():
            raise FileNotFoundError(f"{cp}: no chains for {ds}; run `dbr filter {ds} --workdir {workdir}` first")
        _, meta = load_manifest(workdir, ds)
        meta = {**meta, "dataset": ds}
        chains = read_parquet(cp, f"rebuild it with `dbr filter {ds} --workdir {workdir}`")
        with atomic_dir(hub / "data" / ds) as tmp:
            splits = write_dataset(chains, meta, tmp, int(max_shard_mb * 1e6), progress)
        infos[ds] = {"classes": meta["classes"], "splits": splits, "stats": load_stats(workdir, ds),
                     "teachers": sorted(set(chains.get_column("teacher").to_list()))}
    # Folders of datasets no longer published would be loadable configs without a card entry.
    for stale in sorted((hub / "data").iterdir()):
        if stale.is_dir() and not stale.name.startswith(".") and stale.name not in infos:
            shutil.rmtree(stale)
    write_text_atomic(hub / "README.md", render_card(infos, **(card_extra or {})))
    return infos


# --- stage protocol -------------------------------------------------------------------------

def hub_dir(cfg: dict[str, Any], workdir: Path) -> Path:
    return Path(cfg.get("out") or wdl.hub_dir(workdir))


def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Publish ``cfg["datasets"]`` into W/hub; push when ``cfg["push"]`` names a repo."""
    hub = hub_dir(cfg, workdir)
    o = resolve("publish", cfg)
    infos = publish(workdir, list(o.get("datasets") or []), hub, float(o.max_shard_mb),
                    card_extra={"pretty_name": o.pretty_name, "repo_id": o.push})
    summary: dict[str, Any] = {
        ds: {s["split"]: s["num_examples"] for s in info["splits"]} for ds, info in infos.items()
    }
    if o.push:
        res = push_folder(hub, o.push, private=o.private, dry_run=o.dry_run)
        summary["_push"] = {k: res[k] for k in ("repo_id", "files", "dry_run")}
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
    add_option(p, "publish", "push", metavar="REPO_ID")
    add_option(p, "publish", "private", action="store_true")
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
        check_push(cfg.push, dry_run=cfg.dry_run)
    elif cfg.dry_run or cfg.private:
        raise UserError("--dry-run and --private only apply with --push REPO_ID")
    hub = hub_dir(cfg, wd)
    if not args.no_write:
        datasets = cfg.get("datasets") or sorted(p.name[: -len(".parquet")] for p in (chains_dir(wd)).glob("*.parquet")
                                           if not p.name.endswith(".rejects.parquet"))
        if not datasets:
            raise UserError(f"{wd / 'chains'}: no chains to publish; run `dbr filter DATASET` first")
        try:
            infos = publish(wd, datasets, hub, cfg.max_shard_mb,
                            card_extra={"pretty_name": cfg.pretty_name, "repo_id": cfg.push})
        except ValueError as e:
            raise UserError(str(e)) from None
        for ds, info in infos.items():
            print(f"{ds}: " + ", ".join(f"{s['split']} {s['num_examples']}" for s in info["splits"]))
        print(f"published -> {hub}  (load: datasets.load_dataset({str(hub)!r}, {datasets[0]!r}, "
              f"split={infos[datasets[0]]['splits'][0]['split']!r}))")
    if cfg.push:
        push_folder(hub, cfg.push, private=cfg.private, dry_run=cfg.dry_run)
    return 0


def load_card_yaml(hub: str | Path) -> dict[str, Any]:
    """The YAML header of ``hub/README.md`` as a dict (for tests and tools)."""
    import yaml

    text = (Path(hub) / "README.md").read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError(f"{hub}/README.md: no YAML header")
    return yaml.safe_load(text.split("---\n", 2)[1])
