"""Which module implements each stage / CLI verb.

A stage module exposes:

- ``add_arguments(parser)``: its CLI options;
- ``main(args) -> int``: the CLI verb;
- ``run(cfg, workdir) -> dict``: the pipeline stage (cfg is the stage's YAML entry,
  with ``dataset`` set for per-dataset stages and ``root`` defaulted);
- ``outputs(cfg, workdir) -> list[Path]``: what ``run`` writes (for up-to-date checks);
- optionally ``inputs(cfg, workdir) -> list[Path]``: files outside the work dir it reads;
- ``PER_DATASET: bool``: whether ``dbr run`` calls it once per dataset.

A verb whose module does not exist yet exits 2 with a message saying so.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES: dict[str, str] = {
    "synth": "dbr_builder.synth",
    "download": "dbr_builder.download",
    "index": "dbr_builder.index",
    "generate": "dbr_builder.generate",
    "filter": "dbr_builder.filter",
    "publish": "dbr_builder.publish",
    "train": "trainers.train",
    "eval": "dbr_builder.evaluate",
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
}


REQUIRED = ("add_arguments", "main", "run", "outputs")


class StageNotBuilt(RuntimeError):
    """The module implementing a stage is not part of this version."""


def load_stage(stage: str) -> ModuleType:
    """Import the module implementing ``stage``."""
    modname = STAGES[stage]
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and (e.name == modname or modname.startswith(e.name + ".")):
            raise StageNotBuilt(
                f"the `{stage}` stage is not built in this version of dbr-builder ({modname} is missing)"
            ) from None
        raise
    lacking = [a for a in REQUIRED if not hasattr(mod, a)]
    if lacking:
        raise StageNotBuilt(f"the `{stage}` stage is not built yet ({modname} lacks {', '.join(lacking)})")
    return mod
