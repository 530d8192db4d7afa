"""The dataset registry (``pipelines/datasets.yaml``): datasets, their domains, classes and sources.

The registry is data, validated against ``schemas/registry.schema.json``; this module only
loads it into plain dataclasses and answers look-ups.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbr_builder.config import ConfigError, load_schema, load_yaml, validate
from dbr_builder.errors import UserError
from dbr_builder.resources import resource_path


@dataclass(frozen=True)
class Artifact:
    """One file of an archive source."""

    name: str
    url: str
    size: int | None = None
    sha256: str | None = None
    extract: bool = True


@dataclass(frozen=True)
class Source:
    """One way to obtain a dataset (an ``archives`` download or a ``hub`` mirror)."""

    name: str
    kind: str  # "archives" | "hub"
    description: str = ""
    artifacts: tuple[Artifact, ...] = ()
    layout: dict[str, Any] = field(default_factory=dict)
    repo_id: str | None = None
    revision: str | None = None
    patterns: tuple[str, ...] = ()
    columns: dict[str, str] = field(default_factory=dict)
    domain_map: dict[str, str] = field(default_factory=dict)
    class_map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry."""

    name: str
    folder: str
    domains: dict[str, int | None]
    classes: tuple[str, ...] | None
    num_classes: int | None
    sources: tuple[Source, ...]
    optional: bool = False

    def source(self, name: str) -> Source:
        """The source called ``name``; a UserError lists the known ones otherwise."""
        for s in self.sources:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.sources) or "none (use --from PATH)"
        raise UserError(f"--source {name}: {self.name} has no such source (known: {known})")


def default_registry_path() -> Path:
    """``pipelines/datasets.yaml`` of this installation."""
    return resource_path("pipelines", "datasets.yaml")


def _source(d: dict[str, Any]) -> Source:
    arts = tuple(
        Artifact(a["name"], a["url"], a.get("size"), a.get("sha256"), a.get("extract", True))
        for a in d.get("artifacts", [])
    )
    return Source(
        name=d["name"], kind=d["kind"], description=d.get("description", ""), artifacts=arts,
        layout=dict(d.get("layout", {})), repo_id=d.get("repo_id"), revision=d.get("revision"),
        patterns=tuple(d.get("patterns", [])), columns=dict(d.get("columns", {})),
        domain_map=dict(d.get("domain_map", {})), class_map=dict(d.get("class_map", {})),
    )


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> dict[str, DatasetSpec]:
    raw = load_yaml(path)
    validate(raw, load_schema("registry.schema.json"), path)
    out: dict[str, DatasetSpec] = {}
    for name, d in raw["datasets"].items():
        out[name] = DatasetSpec(
            name=name, folder=d["folder"], domains=dict(d["domains"]),
            classes=tuple(d["classes"]) if d.get("classes") else None,
            num_classes=d.get("num_classes") or (len(d["classes"]) if d.get("classes") else None),
            sources=tuple(_source(s) for s in d["sources"]), optional=bool(d.get("optional", False)),
        )
        names = [s.name for s in out[name].sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}: datasets.{name}.sources: source names must be unique ({names})")
    return out


def load_registry(path: str | Path | None = None) -> dict[str, DatasetSpec]:
    """Load and validate a registry file (default ``pipelines/datasets.yaml``)."""
    p = Path(path) if path else default_registry_path()
    if not p.exists():
        raise ConfigError(f"{p}: dataset registry not found")
    return _load_cached(str(p), p.stat().st_mtime_ns)


def get_dataset(name: str, registry: str | Path | None = None) -> DatasetSpec:
    """The registry entry of ``name``; a UserError lists the known datasets otherwise."""
    reg = load_registry(registry)
    if name in reg:
        return reg[name]
    # Accept DomainBed's folder name too (office_home -> OfficeHome).
    for spec in reg.values():
        if spec.folder == name:
            return spec
    raise UserError(f"unknown dataset {name!r}; known: {', '.join(reg)} (registry: {registry or default_registry_path()})")


def dataset_folder(name: str, registry: str | Path | None = None) -> str:
    """DomainBed folder name of registry dataset ``name`` (``OfficeHome`` -> ``office_home``).

    Unknown names map to themselves, so locally made datasets keep working.
    """
    try:
        reg = load_registry(registry)
    except (ConfigError, FileNotFoundError):
        return name
    spec = reg.get(name)
    return spec.folder if spec else name
