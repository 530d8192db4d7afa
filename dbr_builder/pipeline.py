"""``dbr run``: execute a pipeline's stages in order, skipping those that are up to date.

A stage unit (one stage, for one dataset where the stage is per-dataset) is up to date
when its stamp in ``W/.stamps/`` records the same config hash, the same fingerprint of
everything run before it in this pipeline, and outputs that are still exactly as that
run left them (names, sizes, mtimes).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from dbr_builder.config import load_pipeline
from dbr_builder.core import workdir as wdl
from dbr_builder.core.fsutil import stable_hash, tree_fingerprint, write_json_atomic, write_text_atomic
from dbr_builder.core.locks import stage_lock
from dbr_builder.errors import ConfigError
from dbr_builder.log import get_logger
from dbr_builder.stages import download, filter, generate, index, publish, synth, view
from dbr_builder.stages import evaluate as evaluate_stage
from trainers import train

# Verb -> the module that implements it (the stage protocol is in dbr_builder/stages/__init__.py).
STAGES: dict[str, ModuleType] = {
    "synth": synth,
    "download": download,
    "index": index,
    "generate": generate,
    "filter": filter,
    "publish": publish,
    "train": train,
    "eval": evaluate_stage,
    "view": view,
}

HELP: dict[str, str] = {
    "synth": "write the embedded SynthShapes DG benchmark (DomainBed layout)",
    "download": "download a DomainBed dataset into ROOT in DomainBed layout",
    "index": "scan ROOT/DATASET into W/manifest/DATASET.parquet with DomainBed splits",
    "generate": "generate teacher reasoning chains (resumable, shardable)",
    "filter": "parse, validate and select one chain per image",
    "publish": "write the Hub-layout dataset W/hub (and optionally push it)",
    "train": "fine-tune a student with MTCT + SARR, leave-one-domain-out",
    "eval": "evaluate held-out-domain accuracy and write result tables",
    "view": "write a static HTML chain viewer W/view/index.html (images, kept chains, rejected candidates)",
}

logger = get_logger(__name__)


def load_stage(stage: str) -> ModuleType:
    """The module implementing ``stage`` (a verb of ``STAGES``)."""
    return STAGES[stage]


@dataclass
class Unit:
    """One executable step: a stage entry, for one dataset if the stage is per-dataset."""

    name: str  # stage entry name (unique within the pipeline)
    stage: str
    cfg: dict[str, Any]
    dataset: str | None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.dataset})" if self.dataset else self.name

    @property
    def stamp_name(self) -> str:
        return f"{self.name}--{self.dataset}" if self.dataset else self.name


def plan(pipe: dict[str, Any], workdir: Path) -> list[Unit]:
    """Expand the pipeline's stage entries into units with defaults applied."""
    units: list[Unit] = []
    default_root = pipe.get("root") or str(wdl.raw_dir(workdir))
    for entry in pipe["stages"]:
        stage = entry["stage"]
        mod = load_stage(stage)
        cfg = {k: v for k, v in entry.items() if k not in ("name",)}
        cfg.setdefault("root", default_root)
        name = entry.get("name", stage)
        if getattr(mod, "PER_DATASET", False):
            if "dataset" in entry:
                datasets = [entry["dataset"]]
            else:
                datasets = entry.get("datasets") or pipe.get("datasets")
            if not datasets:
                raise ConfigError(f"stage `{name}` runs per dataset: give it `dataset:` or set top-level `datasets:`")
            for ds in datasets:
                wdl.check_name(ds)
            for ds in datasets:
                c = {k: v for k, v in cfg.items() if k != "datasets"}
                c["dataset"] = ds
                units.append(Unit(name, stage, c, ds))
        else:
            cfg.setdefault("datasets", pipe.get("datasets") or [])
            units.append(Unit(name, stage, cfg, None))
    return units


def _select(units: list[Unit], start: str | None, until: str | None) -> list[bool]:
    names = [u.name for u in units]
    for which, val in (("--from", start), ("--until", until)):
        if val is not None and val not in names and val not in {u.stage for u in units}:
            raise ConfigError(f"{which} {val}: no such stage in this pipeline (have: {', '.join(dict.fromkeys(names))})")

    def index_of(val: str, last: bool) -> int:
        hits = [i for i, u in enumerate(units) if val in (u.name, u.stage)]
        return hits[-1] if last else hits[0]

    lo = index_of(start, False) if start else 0
    hi = index_of(until, True) if until else len(units) - 1
    if lo > hi:
        raise ConfigError(f"--from {start} comes after --until {until} in this pipeline: nothing would run "
                          f"(order: {', '.join(dict.fromkeys(u.name for u in units))})")
    return [lo <= i <= hi for i in range(len(units))]


def run_pipeline(
    path: str | Path,
    workdir: str | Path | None = None,
    start: str | None = None,
    until: str | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run a pipeline config; return ``{unit label: "ran" | "skipped" | "not selected"}``."""
    log = log or logger.info
    pipe = load_pipeline(path)
    wd = Path(workdir or pipe.get("workdir") or "work")
    wd.mkdir(parents=True, exist_ok=True)
    units = plan(pipe, wd)
    with stage_lock(wd, "run", f"`dbr run {path}`"):
        return _run_units(path, units, wd, start, until, force, log)


def _read_stamp(stamp_file: Path, log) -> dict[str, Any] | None:
    """A unit's stamp, or None when missing or unreadable (a corrupt stamp only means: run again)."""
    if not stamp_file.exists():
        return None
    try:
        stamp = json.loads(stamp_file.read_text(encoding="utf-8"))
        if not isinstance(stamp, dict):
            raise ValueError("not a JSON object")
        return stamp
    except (ValueError, UnicodeDecodeError) as e:
        log(f"note: {stamp_file}: corrupt stamp ({e}); ignoring it, the stage runs again")
        return None


def _run_units(path: str | Path, units: list[Unit], wd: Path, start: str | None, until: str | None,
               force: bool, log) -> dict[str, Any]:
    selected = _select(units, start, until)
    # The pipeline as written (variables unexpanded, so no secret from the environment): card provenance.
    text, copy = Path(path).read_text(encoding="utf-8"), wdl.pipeline_copy_path(wd)
    if not copy.exists() or copy.read_text(encoding="utf-8") != text:
        write_text_atomic(copy, text)
    stamps = wdl.stamps_dir(wd)
    upstream: list[str] = []  # output fingerprints of earlier units, in order
    report: dict[str, Any] = {}
    produced: dict[str, list[Path]] = {}
    for unit, sel in zip(units, selected, strict=True):
        mod = load_stage(unit.stage)
        out_paths = [Path(p) for p in mod.outputs(unit.cfg, wd)]
        in_paths = [Path(p) for p in getattr(mod, "inputs", lambda c, w: [])(unit.cfg, wd)]
        key = {
            "config": stable_hash(unit.cfg),
            "upstream": stable_hash(upstream),
            "inputs": tree_fingerprint(in_paths),
        }
        stamp_file = stamps / f"{unit.stamp_name}.json"
        stamp = _read_stamp(stamp_file, log)
        fresh = (
            stamp is not None
            and stamp.get("key") == key
            and all(p.exists() for p in out_paths)
            and stamp.get("outputs") == tree_fingerprint(out_paths)
        )
        if not sel:
            report[unit.label] = "not selected"
        elif fresh and not force:
            log(f"[skip] {unit.label}: up to date")
            report[unit.label] = "skipped"
        else:
            log(f"[run ] {unit.label}")
            t0 = time.perf_counter()
            stamp_file.unlink(missing_ok=True)  # a crash mid-stage must not leave a stale "fresh" stamp
            summary = mod.run(unit.cfg, wd)
            write_json_atomic(
                stamp_file,
                {"key": key, "outputs": tree_fingerprint(out_paths), "summary": summary,
                 "seconds": round(time.perf_counter() - t0, 3)},
            )
            report[unit.label] = "ran"
        if sel:
            produced[unit.label] = [p for p in out_paths if p.exists()]
        upstream.append(tree_fingerprint(out_paths))
    log("outputs:")
    for label, paths in produced.items():
        log(f"  {label:<28} " + ", ".join(str(p) for p in paths))
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline config (YAML), e.g. pipelines/demo.yaml")
    p.add_argument("--workdir", "-w", help="work directory (default: the config's `workdir`)")
    p.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage (by name or kind)")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage (by name or kind)")
    p.add_argument("--force", action="store_true", help="rerun selected stages even if up to date")


def main(args: argparse.Namespace) -> int:
    report = run_pipeline(args.pipeline, args.workdir, args.start, args.until, args.force)
    ran = sum(v == "ran" for v in report.values())
    skipped = sum(v == "skipped" for v in report.values())
    print(f"pipeline done: {ran} ran, {skipped} up to date")
    return 0
