"""Obtain a dataset from one source (registry archives, a Hub mirror, or ``--from``) into a staging tree."""

from __future__ import annotations

import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dbr_builder.errors import UserError
from dbr_builder.log import get_logger
from dbr_builder.stages.download import hub
from dbr_builder.stages.download.extract import Budget, archive_kind, extract_archive
from dbr_builder.stages.download.http import DownloadError, FetchOptions, fetch
from dbr_builder.stages.download.layouts import LayoutError, apply_layout, copy_tree, find_domain_root
from dbr_builder.stages.download.registry import Artifact, DatasetSpec, Source
from dbr_builder.stages.download.verify import Lock

DOWNLOADS = ".downloads"

log = get_logger(__name__)


@dataclass
class Context:
    """Everything a build needs: where things go, how to fetch, what to verify against."""

    spec: DatasetSpec
    root: Path
    staging: Path  # scratch folder of this build (removed afterwards)
    lock: Lock
    opts: FetchOptions
    budget: Budget
    bytes_fetched: int = 0
    artifacts: list[str] = field(default_factory=list)

    @property
    def download_dir(self) -> Path:
        return self.root / DOWNLOADS / self.spec.name


def is_url(s: str) -> bool:
    return urllib.parse.urlsplit(s).scheme in ("http", "https", "file")


def obtain_artifact(ctx: Context, art: Artifact, key_prefix: str = "") -> Path:
    """The artifact's local file: reused when already downloaded, fetched (resumably) otherwise.

    Either way it is checked against the registry pin and the lock file.
    """
    parts = urllib.parse.urlsplit(art.url)
    if parts.scheme == "file":
        path = Path(urllib.request.url2pathname(parts.path))
        if not path.is_file():
            raise DownloadError(art.url, "no such file")
    else:
        path = ctx.download_dir / art.name
        if path.exists():
            log.info(f"  reusing {path}")
        else:
            log.info(f"  fetching {art.url}")
            res = fetch(art.url, path, ctx.opts, desc=art.name)
            ctx.bytes_fetched += res.bytes_fetched
    key = f"{ctx.spec.name}/{key_prefix}{art.name}"
    ctx.lock.verify_artifact(key, path, art.url, art.size, art.sha256)
    ctx.artifacts.append(key)
    return path


def build_archives(ctx: Context, src: Source, dest: Path, local: dict[str, Path] | None = None) -> None:
    """Download (or take from ``local``) every artifact, extract safely, apply the layout."""
    paths: dict[str, Path] = {}
    for art in src.artifacts:
        if local and art.name in local:
            key = f"{ctx.spec.name}/from:{art.name}"
            ctx.lock.verify_artifact(key, local[art.name], local[art.name].resolve().as_uri(), art.size, art.sha256)
            ctx.artifacts.append(key)
            paths[art.name] = local[art.name]
        else:
            paths[art.name] = obtain_artifact(ctx, art)
    work = ctx.staging / "work"
    work.mkdir(parents=True, exist_ok=True)
    plain = {}
    for art in src.artifacts:
        if art.extract:
            log.info(f"  extracting {paths[art.name].name}")
            extract_archive(paths[art.name], work, ctx.budget)
        else:
            plain[art.name] = paths[art.name]
    apply_layout(src.layout, work, dest, list(ctx.spec.domains), plain)


def build_hub(ctx: Context, src: Source, dest: Path) -> None:
    """Fetch the mirror's parquet files and materialise them."""
    local = ctx.download_dir / "hub" / src.repo_id.replace("/", "__")
    files = hub.fetch_parquet(src, local, ctx.opts.timeout)
    for f in files:
        key = f"{ctx.spec.name}/hub:{src.repo_id}/{f.name}"
        ctx.lock.verify_artifact(key, f, f"hf://datasets/{src.repo_id}/{f.name}")
        ctx.artifacts.append(key)
    _materialise(ctx, files, src, dest, local)


def _materialise(ctx: Context, files: list[Path], src: Source | None, dest: Path, source_root: Path) -> None:
    """``source_root``: the only folder whose files a row's image ``path`` may name."""
    columns = src.columns if src else {"image": "image", "domain": "domain", "label": "label"}
    staging_out = ctx.staging / "parquet-out"
    hub.materialise(files, ctx.spec, columns, staging_out, ctx.staging / "hf-cache",
                    src.domain_map if src else None, src.class_map if src else None, source_root=source_root)
    staging_out.rename(dest)


def _first(spec: DatasetSpec, kind: str) -> Source | None:
    return next((s for s in spec.sources if s.kind == kind), None)


def build_from(ctx: Context, from_: str, dest: Path) -> str:
    """``--from PATH_OR_URL``: an archive, a parquet file, a folder (tree, archives, or parquet), a URL.

    Returns a short description of what was used.
    """
    spec = ctx.spec
    if is_url(from_) and not from_.startswith("file:"):
        name = Path(urllib.parse.urlsplit(from_).path).name or "download"
        art = Artifact(name=name, url=from_)
        path = obtain_artifact_to(ctx, art, ctx.download_dir / "from-url" / name)
        return _from_file(ctx, path, dest, key=None)
    path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(from_).path)) if from_.startswith("file:") \
        else Path(from_).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--from {from_}: no such file or folder")
    if path.is_file():
        return _from_file(ctx, path, dest, key=f"{spec.name}/from:{path.name}")
    # A folder: an existing DomainBed tree, the registry's archives, extracted archives, or parquet.
    root = find_domain_root(path, spec.domains)
    if root is not None:
        log.info(f"  copying the DomainBed tree at {root}")
        copy_tree(root, dest)
        return f"folder {root}"
    for src in spec.sources:
        if src.kind == "archives" and all((path / a.name).is_file() for a in src.artifacts):
            build_archives(ctx, src, dest, {a.name: path / a.name for a in src.artifacts})
            return f"archives of source {src.name} in {path}"
    arch = _first(spec, "archives")
    if arch and arch.layout.get("type") == "terra":
        try:
            apply_layout(arch.layout, path, dest, list(spec.domains))
            return f"extracted camera-trap files in {path}"
        except UserError:
            if dest.exists():
                import shutil

                shutil.rmtree(dest)
    files = hub.parquet_files(path, ())
    if files:
        _lock_local(ctx, files)
        _materialise(ctx, files, _first(spec, "hub"), dest, path)
        return f"{len(files)} parquet file(s) in {path}"
    raise UserError(
        f"--from {path}: found neither the {spec.name} domain folders ({', '.join(spec.domains)}) "
        f"nor its archives ({', '.join(a.name for s in spec.sources for a in s.artifacts) or 'none'}) "
        "nor parquet files in it"
    )


def obtain_artifact_to(ctx: Context, art: Artifact, path: Path) -> Path:
    """Fetch ``art`` to ``path`` unless present; verify against the lock file."""
    if not path.exists():
        log.info(f"  fetching {art.url}")
        ctx.bytes_fetched += fetch(art.url, path, ctx.opts, desc=art.name).bytes_fetched
    key = f"{ctx.spec.name}/url:{art.url}"
    ctx.lock.verify_artifact(key, path, art.url)
    ctx.artifacts.append(key)
    return path


def _lock_local(ctx: Context, files: list[Path]) -> None:
    for f in files:
        key = f"{ctx.spec.name}/from:{f.name}"
        ctx.lock.verify_artifact(key, f, f.resolve().as_uri())
        ctx.artifacts.append(key)


def _from_file(ctx: Context, path: Path, dest: Path, key: str | None) -> str:
    spec = ctx.spec
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PAR1":
        if key:
            _lock_local(ctx, [path])
        _materialise(ctx, [path], _first(spec, "hub"), dest, path.parent)
        return f"parquet {path}"
    if archive_kind(path) is None:
        raise UserError(f"--from {path}: not a zip / tar archive or parquet file")
    if key:
        ctx.lock.verify_artifact(key, path, path.resolve().as_uri())
        ctx.artifacts.append(key)
    work = ctx.staging / "work"
    work.mkdir(parents=True, exist_ok=True)
    log.info(f"  extracting {path}")
    extract_archive(path, work, ctx.budget)
    arch = _first(spec, "archives")
    if arch is not None and arch.layout.get("type") == "rename" and (work / arch.layout["from"]).is_dir():
        apply_layout(arch.layout, work, dest, list(spec.domains))
        return f"archive {path}"
    found = find_domain_root(work, spec.domains)
    if found is not None:
        found.rename(dest)
        return f"archive {path}"
    raise LayoutError(
        f"--from {path}: the archive holds no folder with the {spec.name} domains ({', '.join(spec.domains)})"
        + ("; TerraIncognita needs both camera-trap archives: pass the folder holding them" if arch and
           arch.layout.get("type") == "terra" else "")
    )
