"""Pipeline config validation: every error names the file and the field path."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbr_builder.config import ConfigError, load_pipeline, load_stage_config
from dbr_builder.resources import data_dir


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def test_shipped_pipelines_are_valid() -> None:
    files = sorted(data_dir("pipelines").glob("*.yaml"))
    pipes = [f for f in files if "stages:" in f.read_text()]
    assert any(f.name == "demo.yaml" for f in pipes)
    for f in pipes:
        assert load_pipeline(f)["stages"]


@pytest.mark.parametrize("text,field,what", [
    ("stages: []", "stages", "should be non-empty"),
    ("stages:\n  - stage: synth\n    per_class: -1\n", "stages[0].per_class", "minimum of 1"),
    ("stages:\n  - stage: synth\n  - stage: index\n    holdout_fraction: 1.5\n", "stages[1].holdout_fraction", "1.5"),
    ("stages:\n  - stage: frobnicate\n", "stages[0].stage", "frobnicate"),
    ("stages:\n  - {stage: synth, sede: 1}\n", "stages[0]", "sede"),
    ("workdir: 3\nstages:\n  - stage: synth\n", "workdir", "is not of type 'string'"),
    ("stages:\n  - stage: synth\n  - stage: synth\n", "", "unique"),
])
def test_invalid_configs_name_the_field(tmp_path: Path, text: str, field: str, what: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_pipeline(p)
    msg = str(e.value)
    assert str(p) in msg and what in msg
    if field:
        assert f"  {field}:" in msg


def test_yaml_syntax_error_names_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "stages: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(p)
    with pytest.raises(ConfigError, match="not found"):
        load_pipeline(tmp_path / "missing.yaml")


def test_env_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBR_TEST_WD", "somewhere")
    monkeypatch.delenv("DBR_UNSET", raising=False)
    p = _write(tmp_path, "workdir: ${DBR_TEST_WD}/w\nname: ${DBR_UNSET:-fallback}\nstages:\n  - stage: synth\n")
    cfg = load_pipeline(p)
    assert cfg["workdir"] == "somewhere/w" and cfg["name"] == "fallback"
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    p = _write(tmp_path, "name: ${HF_TOKEN}\nstages:\n  - stage: synth\n")
    with pytest.raises(ConfigError) as e:
        load_pipeline(p)
    assert "hf_secret_value" not in str(e.value) and "secret" in str(e.value)


def test_stage_config_from_pipeline_or_mapping(tmp_path: Path) -> None:
    p = _write(tmp_path, "datasets: [SynthShapes]\nstages:\n  - {stage: synth, per_class: 2}\n  - {stage: index}\n")
    cfg = load_stage_config(p, "synth")
    assert cfg["per_class"] == 2 and cfg["datasets"] == ["SynthShapes"]
    with pytest.raises(ConfigError, match="no `train` stage"):
        load_stage_config(p, "train")
    q = tmp_path / "s.yaml"
    q.write_text("per_class: 0\n")
    with pytest.raises(ConfigError, match="per_class"):
        load_stage_config(q, "synth")


def test_named_stages_validate_against_stage_schema(tmp_path: Path) -> None:
    p = _write(tmp_path, "datasets: [SynthShapes]\nstages:\n  - {stage: synth, name: s1}\n  - {stage: index, name: idx}\n")
    assert [st["name"] for st in load_pipeline(p)["stages"]] == ["s1", "idx"]
    p = _write(tmp_path, "stages:\n  - {stage: synth, name: s1, per_clas: 2}\n")
    with pytest.raises(ConfigError, match="per_clas"):
        load_pipeline(p)
