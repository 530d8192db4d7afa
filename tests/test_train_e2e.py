"""End to end: `dbr train` on a W/hub-layout SynthShapes dataset with the tiny student:
MTCT, one SARR round, model selection, resume of finished stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.slow  # minutes on 2 cores: `make test-fast` skips it


def write_hub(rows: list[dict], hub: Path, dataset: str) -> None:
    """The publish layout (docs/ARCHITECTURE.md): README.md with `configs:` + one parquet per domain."""
    import datasets

    from trainers.data import safe_split_name

    domains = sorted({r["domain"] for r in rows})
    lines = ["---", "configs:", f"- config_name: {dataset}", "  data_files:"]
    for d in domains:
        split = safe_split_name(d)
        part = [dict(r, image={"path": r["image"], "bytes": Path(r["image"]).read_bytes()}) for r in rows if r["domain"] == d]
        ds = datasets.Dataset.from_list(part).cast_column("image", datasets.Image())
        out = hub / "data" / dataset / f"{split}-00000-of-00001.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(out))
        lines += [f"  - split: {split}", f"    path: data/{dataset}/{split}-*.parquet"]
    (hub / "README.md").write_text("\n".join(lines + ["---", "", "test dataset"]) + "\n")


@pytest.fixture(scope="module")
def workdir(synth_root, tmp_path_factory):
    from trainers.data import rows_from_synth

    w = tmp_path_factory.mktemp("W")
    write_hub(rows_from_synth(synth_root / "SynthShapes"), w / "hub", "SynthShapes")
    return w


def test_dbr_train_end_to_end(workdir, tiny_model_path, tmp_path, capsys):
    from dbr_builder.cli import main

    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"student: {tiny_model_path}\nbatch_size: 8\nmicro_batch_size: 4\nepochs: 1\nmax_steps: 2\n"
        "max_length: 512\nsarr: {rounds: 1, max_new_tokens: 16, batch_size: 16, no_correct: keep_teacher}\nselect: {max_images: 12}\n"
        # this hub has no W/manifest to re-split trial seed 1 from (tests/test_protocol.py covers re-splitting)
        "resplit: false\n"
    )
    argv = ["train", "--config", str(cfg), "--workdir", str(workdir), "--dataset", "SynthShapes",
            "--heldout", "sketch", "--trial-seed", "1"]
    assert main(argv) == 0
    seed = workdir / "runs" / "mtct_sarr" / "SynthShapes" / "sketch" / "seed1"
    for stage in ("mtct", "sarr1", "final"):
        assert (seed / stage / "adapter_model.safetensors").exists()
        assert (seed / stage / "adapter_config.json").exists()
    sj = json.loads((seed / "final" / "student.json").read_text())
    assert sj["heldout_domain"] == "sketch" and sj["train_domains"] == ["cartoon", "painting", "photo"]
    assert sj["trial_seed"] == 1 and sj["classes"][0] == "circle" and sj["base_model"] == str(tiny_model_path)
    assert sj["selected_stage"] in ("mtct", "sarr1")
    assert set(sj["val_accuracy"]) == {"mtct", "sarr1"} and 0.0 <= sj["rejection_rate"]["sarr1"] <= 1.0
    sarr = json.loads((seed / "sarr1" / "stage.json").read_text())
    assert sarr["sarr"]["images"] == 3 * (24 - int(24 * 0.2))  # `in` images of the 3 training domains
    assert sum(1 for _ in open(seed / "sarr1" / "self_chains.jsonl")) == sarr["sarr"]["images"]
    assert sarr["val"]["images"] == 12 and sarr["train"]["steps"] == 2
    assert sarr["sarr"]["teacher_chains"] + sarr["sarr"]["self_chains"] == sarr["sarr"]["images"]
    assert not (seed / "_work" / "mtct" / "checkpoint").exists()

    # The selected adapter loads through peft onto the base model (what `dbr eval` does).
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_model_path), seed / "final")

    # Rerun: everything is reused, nothing retrained.
    capsys.readouterr()
    assert main(argv) == 0
    assert "done" in capsys.readouterr().out

    # Changed settings never silently return the old model: the run folder is refused.
    cfg.write_text(cfg.read_text().replace("max_steps: 2", "max_steps: 3"))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "trained with other settings (changed: max_steps)" in err and "--run" in err
    assert json.loads((seed / "final" / "student.json").read_text()) == sj


def test_missing_hub_is_a_clear_error(tmp_path, capsys):
    from dbr_builder.cli import main

    assert main(["train", "--workdir", str(tmp_path), "--dataset", "PACS", "--data", str(tmp_path)]) == 1
    assert "dbr publish" in capsys.readouterr().err
