"""A non-editable install (wheel) finds prompts/, schemas/ and pipelines/ inside the package."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # builds and installs a wheel: `make test-fast` skips it


def test_wheel_ships_data_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("dbr_builder-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for kind in ("prompts", "schemas", "pipelines"):
        shipped = {n.split(f"dbr_builder/_data/{kind}/", 1)[1] for n in names if f"dbr_builder/_data/{kind}/" in n}
        on_disk = {p.relative_to(REPO / kind).as_posix() for p in (REPO / kind).rglob("*") if p.is_file()}
        assert shipped == on_disk, kind
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    code = (
        "import dbr_builder, sys; from dbr_builder.resources import data_dir; "
        "from dbr_builder.config import load_pipeline; "
        "print(dbr_builder.__file__); print(data_dir('schemas')); "
        "print(len(load_pipeline(data_dir('pipelines') / 'demo.yaml')['stages']))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         check=True, timeout=120).stdout.splitlines()
    assert out[0].startswith(str(target)) and out[1] == str(target / "dbr_builder" / "_data" / "schemas")
    import yaml

    assert int(out[2]) == len(yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())["stages"])
