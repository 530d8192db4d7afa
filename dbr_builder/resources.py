"""Locate the project's data folders (prompts/, schemas/, pipelines/).

In a source checkout (or an editable install) they sit at the repository top
level, beside the package; a wheel ships them as ``dbr_builder/_data/<kind>``.
The packaged copy is looked up first so that an unrelated top-level folder in
site-packages can never shadow it.
"""

from __future__ import annotations

from pathlib import Path

KINDS = ("prompts", "schemas", "pipelines")
_PKG = Path(__file__).resolve().parent


def data_dir(kind: str) -> Path:
    """Return the folder holding the project's ``kind`` files."""
    if kind not in KINDS:
        raise ValueError(f"unknown data folder {kind!r}; expected one of {KINDS}")
    for cand in (_PKG / "_data" / kind, _PKG.parent / kind):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"dbr-builder data folder {kind!r} not found (looked in {_PKG / '_data' / kind} and "
        f"{_PKG.parent / kind}); reinstall the package with `pip install .`"
    )


def resource_path(kind: str, name: str) -> Path:
    """Return the path of one data file, with an actionable error if it is missing."""
    path = data_dir(kind) / name
    if not path.exists():
        available = sorted(p.name for p in data_dir(kind).iterdir())
        raise FileNotFoundError(f"{kind}/{name} not found; available: {', '.join(available)}")
    return path
