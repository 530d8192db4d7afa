"""The shipped demo pipeline end to end on a small SynthShapes, then a rerun that skips everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dbr_builder.pipeline import run_pipeline
from dbr_builder.resources import resource_path

pytestmark = pytest.mark.slow  # minutes on 2 cores: `make test-fast` skips it


def demo_pipeline(tmp_path: Path, stages: dict[str, dict], **top: object) -> Path:
    """pipelines/demo.yaml with per-stage overrides (dict values merged one level deep) and top-level
    keys, written to ``tmp_path/pipe.yaml``; every other setting as shipped. Shared by the slow
    pipeline tests (test_umask.py, test_launch.py)."""
    cfg = yaml.safe_load(resource_path("pipelines", "demo.yaml").read_text())
    for st in cfg["stages"]:
        for k, v in stages.get(st["stage"], {}).items():
            st[k] = {**st[k], **v} if isinstance(v, dict) and isinstance(st.get(k), dict) else v
    cfg.update(top)
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _small_demo(tmp_path: Path) -> Path:
    """pipelines/demo.yaml with fewer images and training steps."""
    return demo_pipeline(tmp_path, {"synth": {"per_class": 3},
                                    "train": {"max_steps": 3, "sarr": {"rounds": 1}, "select": {"max_images": 8}}})


def test_demo_pipeline_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setenv("DBR_CACHE_DIR", str(tmp_path / "cache"))
    wd = tmp_path / "w"
    pipe = _small_demo(tmp_path)
    report = run_pipeline(pipe, wd)
    stages = [s["stage"] for s in yaml.safe_load(pipe.read_text())["stages"]]
    assert set(report.values()) == {"ran"} and len(report) == len(stages)
    # the published dataset loads through `datasets` with images and chains
    ds = datasets.load_dataset(str(wd / "hub"), "SynthShapes", split="photo")
    assert ds.num_rows == 4 * 3  # the shortcut variant: circle, square, star, triangle
    row = ds[0]
    assert row["image"].size[0] > 0 and "<CONCLUSION>" in row["chain"]
    # the student was trained with the held-out domain excluded, and evaluated on it
    students = list((wd / "runs").glob("*/SynthShapes/*/seed*/final/student.json"))
    assert len(students) == 1
    student = json.loads(students[0].read_text())
    assert student["heldout_domain"] not in student["train_domains"]
    results = json.loads(next((wd / "runs").glob("*/eval/results.json")).read_text())
    assert student["heldout_domain"] in json.dumps(results)
    # a rerun finds everything up to date
    assert set(run_pipeline(pipe, wd).values()) == {"skipped"}
