"""Tracked and published students: TensorBoard event files from a tiny run, the loss PNG, the model card,
Trackio/W&B only when chosen (faked here: no network), and `dbr train --push` (the Hub mocked at
HfApi.create_commit) with its dry run."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from hubfake import FakeHub, no_saved_login_fixture  # noqa: F401  (the no_saved_login fixture)

pytest.importorskip("torch")

DS = "SynthShapes"


@pytest.fixture(scope="module")
def trained(synth_root, tiny_model_path, tmp_path_factory):
    """One tiny LODO unit (held-out sketch, seed 1), MTCT only, 2 steps; returns (workdir, config, seed folder)."""
    from test_train_e2e import write_hub

    from dbr_builder.cli import main
    from trainers.data import rows_from_synth

    w = tmp_path_factory.mktemp("W")
    write_hub(rows_from_synth(synth_root / DS), w / "hub", DS)
    cfg = w / "train.yaml"
    cfg.write_text(f"student: {tiny_model_path}\nbatch_size: 8\nmicro_batch_size: 4\nepochs: 1\nmax_steps: 2\n"
                   "max_length: 512\nsarr: {rounds: 0}\nselect: {max_images: 8}\nrun: tracked\n"
                   "resplit: false\n")  # the test hub has no manifest to re-split from
    assert main(["train", "--config", str(cfg), "--workdir", str(w), "--dataset", DS, "--heldout", "sketch",
                 "--trial-seed", "1"]) == 0
    return w, cfg, w / "runs" / "tracked" / DS / "sketch" / "seed1"


def test_tensorboard_event_files_by_default(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, seed = trained
    tb = seed / "tensorboard" / "mtct"
    assert list(tb.glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(tb))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/accuracy"} <= tags
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in ea.Scalars("val/accuracy")] == [2]


def test_loss_png_and_model_card(trained):
    _, _, seed = trained
    final = seed / "final"
    png = final / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    card = (final / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card
    assert "held-out domain `sketch`" in card and "training domains: cartoon, painting, photo" in card
    assert "revision sha256" in card  # the data it saw, pinned by content
    assert "| mtct (selected) | 2 |" in card and "max_steps: 2" in card  # the recipe
    assert card.count("| mtct") == 1 and ".tmp" not in card and "student: tiny-model" in card
    assert "`dbr eval` has not been run" in card and "![training loss" in card
    assert "PeftModel.from_pretrained" in card


def test_push_dry_run_then_one_commit(trained, monkeypatch, capsys, no_saved_login):
    from huggingface_hub import CommitOperationAdd

    from dbr_builder.cli import main

    w, cfg, seed = trained
    # `dbr eval` results for this unit: the pushed card shows the held-out accuracy
    ev = w / "runs" / "tracked" / "eval"
    ev.mkdir(parents=True)
    (ev / "results.json").write_text(json.dumps({"cells": [
        {"method": "tracked [direct]", "dataset": DS, "heldout_domain": "sketch", "trial_seed": 1, "acc": 37.5,
         "n": 24, "unparseable_rate": 0.0}]}))
    base = ["train", "--config", str(cfg), "--workdir", str(w), "--dataset", DS, "--heldout", "sketch", "--trial-seed", "1"]
    fake = FakeHub(monkeypatch)
    assert main([*base, "--push", "me/students", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "add    SynthShapes/sketch/seed1/adapter_model.safetensors" in out and "add    README.md" in out
    assert "add    SynthShapes/sketch/seed1/README.md" in out and "training.png" in out
    assert not fake.named("create_commit") and not (seed / "mtct" / "x").exists()  # nothing trained or written
    assert main([*base, "--push", "me/students"]) == 1  # no token
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert main([*base, "--push", "me/students"]) == 0
    (args, kw), = fake.named("create_commit")
    assert fake.named("create_repo")[0][1]["repo_type"] == "model" and kw["repo_type"] == "model"
    adds = {o.path_in_repo: o for o in args[1] if isinstance(o, CommitOperationAdd)}
    assert {"README.md", "SynthShapes/sketch/seed1/README.md", "SynthShapes/sketch/seed1/adapter_config.json",
            "SynthShapes/sketch/seed1/adapter_model.safetensors", "SynthShapes/sketch/seed1/training.png"} <= set(adds)
    # create_commit read every file before the staging folder went away (the fake records the objects only)
    unit_card = adds["SynthShapes/sketch/seed1/README.md"]
    assert unit_card.upload_info.size > 0


def test_pushed_card_and_student_json_have_no_local_paths(trained, tmp_path):
    from trainers.card import finished_units, stage_push_folder

    w, _, seed = trained
    units = finished_units(w, "tracked")
    assert units == [seed]
    subs = stage_push_folder(w, "tracked", units, tmp_path / "stage", "me/students", w / "hub")
    unit = tmp_path / "stage" / subs[0]
    sj = json.loads((unit / "student.json").read_text())
    assert sj["adapter"] == "." and not str(sj["base_model"]).startswith("/")
    text = "".join(p.read_text() for p in (tmp_path / "stage").rglob("*.md")) + (unit / "student.json").read_text()
    assert str(w) not in text
    top = (tmp_path / "stage" / "README.md").read_text()
    assert "| `SynthShapes/sketch/seed1` |" in top


def test_trackio_and_wandb_only_when_chosen(tmp_path, monkeypatch):
    from dbr_builder.errors import ConfigError, UserError
    from trainers.tracking import check_report_to, make_tracker

    calls = []
    fake = types.ModuleType("trackio")
    fake.init = lambda **kw: calls.append(("init", kw))
    fake.log = lambda metrics, step=None: calls.append(("log", metrics, step))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    with make_tracker(["trackio"], tmp_path / "tb", "proj", "run/x", {"lr": 1}) as t:
        t.log({"train/loss": 2.0, "bad": float("nan"), "flag": True}, 3)
    assert calls == [("init", {"project": "proj", "name": "run/x", "config": {"lr": 1}}),
                     ("log", {"train/loss": 2.0}, 3), ("finish",)]
    assert not (tmp_path / "tb").exists()  # tensorboard was not chosen
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(UserError, match=r"dbr-builder\[tracking\]"):
        make_tracker(["wandb"], tmp_path, "p", "n", {})
    assert check_report_to(None) == ["tensorboard"] and check_report_to(["none"]) == []
    with pytest.raises(ConfigError, match="mlflow"):
        check_report_to(["mlflow"])


def test_plot_survives_a_resumed_log(tmp_path):
    from trainers.tracking import plot_run, read_log

    log = tmp_path / "log.jsonl"
    recs = [{"step": s, "loss": 3.0 - 0.1 * s} for s in (1, 2, 3, 2, 3, 4)]  # resumed after step 1
    log.write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"step\": 5, \"lo")  # torn last line
    got = read_log(log)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    out = plot_run([("mtct", got, 0.5), ("sarr1", [], None)], tmp_path / "t.png", "title")
    assert Path(out).read_bytes()[:4] == b"\x89PNG"
