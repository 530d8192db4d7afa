"""The work-directory layout, in one place.

```
W/raw/<Dataset>/<domain>/<class>/*        download / synth (default root)
W/manifest/<Dataset>.parquet (+ .json)    index
W/generations/<Dataset>/results*.sqlite   generate
W/chains/<Dataset>.parquet (+ rejects)    filter
W/reports/<Dataset>/                      filter statistics, generate usage
W/reports/pipeline.yaml                   the pipeline `dbr run` last ran, as written (dataset card)
W/hub/README.md + data/<Dataset>/...      publish
W/runs/<run>/<Dataset>/<heldout>/seed<k>  train; W/runs/<run>/eval for eval
W/view/index.html                         chain viewer (view)
W/models/                                 students built by the project (the tiny one)
W/logs/                                   logs of cluster jobs
W/.stamps/                                `dbr run` up-to-date stamps
W/.locks/                                 per-stage locks
```
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dbr_builder.errors import UserError

PathLike = str | os.PathLike[str]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_name(name: object, what: str = "dataset name") -> str:
    """``name`` if it is a plain name (it becomes one path component); UserError otherwise.

    Dataset and run names are names, never paths: ``../x``, ``/abs/x``, ``a/b``, ``.hidden``
    and the empty string are refused, so no name can place a file outside the work directory.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(f"{what} {name!r} is not a valid name: use letters, digits and . _ + - "
                        "(starting with a letter or digit, e.g. PACS), not a path")
    return name


def raw_dir(workdir: PathLike) -> Path:
    """``W/raw``: the default download / synth root."""
    return Path(workdir) / "raw"


def manifest_dir(workdir: PathLike) -> Path:
    """``W/manifest``."""
    return Path(workdir) / "manifest"


def generations_dir(workdir: PathLike, dataset: str) -> Path:
    """``W/generations/<Dataset>``: the teacher's result store."""
    check_name(dataset)
    return Path(workdir) / "generations" / dataset


def chains_dir(workdir: PathLike) -> Path:
    """``W/chains``."""
    return Path(workdir) / "chains"


def chains_path(workdir: PathLike, dataset: str) -> Path:
    """``W/chains/<Dataset>.parquet``: one kept chain per image."""
    check_name(dataset)
    return chains_dir(workdir) / f"{dataset}.parquet"


def rejects_path(workdir: PathLike, dataset: str) -> Path:
    """``W/chains/<Dataset>.rejects.parquet``: every rejected candidate with its reason."""
    check_name(dataset)
    return chains_dir(workdir) / f"{dataset}.rejects.parquet"


def reports_dir(workdir: PathLike, dataset: str) -> Path:
    """``W/reports/<Dataset>``."""
    check_name(dataset)
    return Path(workdir) / "reports" / dataset


def pipeline_copy_path(workdir: PathLike) -> Path:
    """``W/reports/pipeline.yaml``: the pipeline file `dbr run` last ran, as written (for provenance)."""
    return Path(workdir) / "reports" / "pipeline.yaml"


def view_dir(workdir: PathLike) -> Path:
    """``W/view``: the static chain viewer (``dbr view``)."""
    return Path(workdir) / "view"


def hub_dir(workdir: PathLike) -> Path:
    """``W/hub``: the Hub-layout dataset."""
    return Path(workdir) / "hub"


def runs_dir(workdir: PathLike, run: str) -> Path:
    """``W/runs/<run>``."""
    check_name(run, "run name")
    return Path(workdir) / "runs" / run


def seed_dir(workdir: PathLike, run: str, dataset: str, heldout: str, seed: int) -> Path:
    """``W/runs/<run>/<Dataset>/<heldout_safe>/seed<k>``: one LODO training unit."""
    check_name(dataset)
    return runs_dir(workdir, run) / dataset / safe_split_name(heldout) / f"seed{seed}"


def eval_dir(workdir: PathLike, run: str) -> Path:
    """``W/runs/<run>/eval``."""
    return runs_dir(workdir, run) / "eval"


def models_dir(workdir: PathLike) -> Path:
    """``W/models``."""
    return Path(workdir) / "models"


def logs_dir(workdir: PathLike) -> Path:
    """``W/logs``."""
    return Path(workdir) / "logs"


def stamps_dir(workdir: PathLike) -> Path:
    """``W/.stamps``."""
    return Path(workdir) / ".stamps"


def locks_dir(workdir: PathLike) -> Path:
    """``W/.locks``."""
    return Path(workdir) / ".locks"


def safe_split_name(domain: str) -> str:
    """A Hub-safe split / folder name for a domain (``Real World`` -> ``Real_World``)."""
    name = re.sub(r"[^0-9A-Za-z_]+", "_", domain).strip("_")
    return name or "split"
