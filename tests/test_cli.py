"""The `dbr` console script: help everywhere, clear errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dbr_builder import pipeline
from dbr_builder.cli import main

DBR = [sys.executable, "-m", "dbr_builder"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DBR, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_top_level_help_lists_every_verb() -> None:
    r = _run("--help")
    assert r.returncode == 0
    for verb in [*pipeline.STAGES, "run"]:
        assert f"    {verb}" in r.stdout


@pytest.mark.parametrize("verb", [*pipeline.STAGES, "run"])
def test_verb_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert f"usage: dbr {verb}" in capsys.readouterr().out


def test_synth_index_via_cli(tmp_path: Path) -> None:
    r = _run("synth", "--root", str(tmp_path / "raw"), "--per-class", "2", "--image-size", "48")
    assert r.returncode == 0, r.stderr
    assert "48 images" in r.stdout
    r = _run("index", "SynthShapes", "--root", str(tmp_path / "raw"), "--workdir", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "w" / "manifest" / "SynthShapes.parquet").exists()
    assert "cartoon" in r.stdout


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    r = _run("index", "PACS", "--root", str(tmp_path), "--workdir", str(tmp_path / "w"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "dbr download PACS" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - stage: synth\n    per_class: zero\n")
    r = _run("run", str(bad))
    assert r.returncode == 1 and "stages[0].per_class" in r.stderr and "Traceback" not in r.stderr
    r = _run("synth", "--root", str(tmp_path), "--per-class", "0")
    assert r.returncode == 1 and "--per-class" in r.stderr


def test_every_verb_names_its_module() -> None:
    """The verb table is explicit: each verb maps to an imported module with the stage protocol."""
    for verb, mod in pipeline.STAGES.items():
        for attr in ("add_arguments", "main", "run", "outputs"):
            assert callable(getattr(mod, attr)), f"{verb}: {mod.__name__} lacks {attr}"
        assert verb in pipeline.HELP
