"""`dbr run`: stages in order, up-to-date stages skipped, changes rerun, --from/--until/--force."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dbr_builder.errors import ConfigError
from dbr_builder.pipeline import run_pipeline

PIPE = """
name: t
datasets: [SynthShapes]
stages:
  - stage: synth
    per_class: {n}
    image_size: 48
  - stage: index
"""


def _pipe(tmp_path: Path, n: int = 1) -> Path:
    p = tmp_path / "pipe.yaml"
    p.write_text(PIPE.format(n=n))
    return p


def test_run_skip_and_rerun(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    log: list[str] = []
    r1 = run_pipeline(_pipe(tmp_path), wd, log=log.append)
    assert r1 == {"synth": "ran", "index (SynthShapes)": "ran"}
    assert (wd / "raw" / "SynthShapes" / "scenes.jsonl").exists()
    assert (wd / "manifest" / "SynthShapes.parquet").exists()
    assert run_pipeline(_pipe(tmp_path), wd, log=log.append) == {"synth": "skipped", "index (SynthShapes)": "skipped"}
    # a config change reruns that stage and everything downstream of it
    assert run_pipeline(_pipe(tmp_path, 2), wd) == {"synth": "ran", "index (SynthShapes)": "ran"}
    # an output changed behind the pipeline's back reruns its stage
    m = wd / "manifest" / "SynthShapes.json"
    os.utime(m, ns=(m.stat().st_atime_ns, m.stat().st_mtime_ns + 10**9))
    assert run_pipeline(_pipe(tmp_path, 2), wd) == {"synth": "skipped", "index (SynthShapes)": "ran"}
    # a deleted output reruns its stage
    (wd / "manifest" / "SynthShapes.parquet").unlink()
    assert run_pipeline(_pipe(tmp_path, 2), wd)["index (SynthShapes)"] == "ran"


def test_from_until_force(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    assert run_pipeline(_pipe(tmp_path), wd, until="synth") == {"synth": "ran", "index (SynthShapes)": "not selected"}
    assert not (wd / "manifest").exists()
    assert run_pipeline(_pipe(tmp_path), wd, start="index") == {"synth": "not selected", "index (SynthShapes)": "ran"}
    assert run_pipeline(_pipe(tmp_path), wd, force=True) == {"synth": "ran", "index (SynthShapes)": "ran"}
    with pytest.raises(ConfigError, match="no such stage"):
        run_pipeline(_pipe(tmp_path), wd, start="nope")


def test_failed_stage_leaves_no_fresh_stamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dbr_builder.stages.index as index_mod

    wd = tmp_path / "w"
    run_pipeline(_pipe(tmp_path), wd)
    assert (wd / ".stamps" / "index--SynthShapes.json").exists()

    def boom(cfg, workdir):
        raise RuntimeError("crash mid-stage")

    monkeypatch.setattr(index_mod, "run", boom)
    with pytest.raises(RuntimeError, match="crash mid-stage"):
        run_pipeline(_pipe(tmp_path), wd, force=True)
    assert not (wd / ".stamps" / "index--SynthShapes.json").exists()
    monkeypatch.undo()
    assert run_pipeline(_pipe(tmp_path), wd)["index (SynthShapes)"] == "ran"
