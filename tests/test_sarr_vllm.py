"""SARR self-labelling through a backend, as its own step (child process), with the vLLM stand-in.

The stand-in (tests/stand_ins/vllm, see tests/test_vllm_standin.py) replaces only the GPU engine;
the child process, the request building, the error accounting and the trainer around it are real.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dbr_builder.errors import UserError

STAND_INS = Path(__file__).parent / "stand_ins"
CLASSES = ["circle", "hexagon", "pentagon", "square", "star", "triangle"]


@pytest.fixture()
def child_standin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The stand-in on the child's PYTHONPATH; returns a configure(**cfg) -> log path function."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STAND_INS), os.environ.get("PYTHONPATH", "")]))
    log = tmp_path / "vllm-events.jsonl"

    def configure(**cfg) -> Path:
        monkeypatch.setenv("DBR_STANDIN_VLLM", json.dumps({"log": str(log), **cfg}))
        return log

    configure()
    return configure


def events(log: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == kind] if log.exists() else []


@pytest.fixture(scope="module")
def examples(synth_root):
    from trainers.data import examples_from_rows, rows_from_synth

    return examples_from_rows(rows_from_synth(synth_root / "SynthShapes"))[::16][:5]


@pytest.fixture(scope="module")
def qwen_adapter(tiny_model_path, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny Qwen2.5-VL as `dbr train` writes it (all-linear, vision included)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    out = tmp_path_factory.mktemp("adapter") / "sarr1"
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path)
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).save_pretrained(out)
    return out


def _encoder(tiny_model_path, **processor_kwargs):
    from transformers import AutoProcessor

    from trainers.data import SampleEncoder

    return SampleEncoder(AutoProcessor.from_pretrained(tiny_model_path), CLASSES, processor_kwargs=processor_kwargs)


def test_child_serves_base_plus_adapter_with_training_processor_settings(
        child_standin, examples, tiny_model_path, qwen_adapter, tmp_path):
    from trainers.sarr import SarrConfig, generate_in_subprocess

    log = child_standin()
    enc = _encoder(tiny_model_path, max_pixels=50176)
    texts = generate_in_subprocess(f"vllm:{tiny_model_path}", examples, enc, SarrConfig(n=2), 7, tmp_path / "img",
                                   tmp_path / "job", adapter=str(qwen_adapter))
    assert len(texts) == len(examples) and all(len(t) == 2 for t in texts)
    [built] = events(log, "construct")
    kw = built["kwargs"]
    assert built["model"] == str(tiny_model_path)
    assert kw["enable_lora"] is True and kw["enable_tower_connector_lora"] is True  # vision LoRA served, not dropped
    assert kw["mm_processor_kwargs"] == {"max_pixels": 50176}  # the training processor setting
    assert {e["lora"] for e in events(log, "chat")} == {str(qwen_adapter)}
    assert len(events(log, "shutdown")) == 1  # engine closed before the child exits


def test_child_start_failure_is_one_clear_error(child_standin, examples, tiny_model_path, qwen_adapter, tmp_path):
    from trainers.sarr import SarrConfig, generate_in_subprocess

    log = child_standin(fail_start="engine_core")
    with pytest.raises(UserError, match=r"sarr generation with vllm:.* failed \(exit 2\): vllm engine for .* failed "
                                        r"to start: engine process failed to start"):
        generate_in_subprocess(f"vllm:{tiny_model_path}", examples, _encoder(tiny_model_path), SarrConfig(),
                               0, tmp_path / "img", tmp_path / "job", adapter=str(qwen_adapter))
    assert len(events(log, "construct")) == 1


def test_generation_errors_above_the_share_fail_the_round(child_standin, examples, tiny_model_path, tmp_path):
    from trainers.sarr import SarrConfig, generate_in_subprocess

    enc = _encoder(tiny_model_path)
    child_standin(fail_text=enc.q_reason[:30])  # every request is rejected
    with pytest.raises(UserError, match=r"5 of 5 requests failed .*sarr.max_error_share 5%.*teacher chains"):
        generate_in_subprocess(f"vllm:{tiny_model_path}", examples, enc, SarrConfig(), 0, tmp_path / "img",
                               tmp_path / "job")


@pytest.mark.slow
def test_train_round_with_vllm_generator_stops_loudly_then_resumes(child_standin, tiny_model_path, synth_root,
                                                                   tmp_path, capsys):
    """`dbr train` with `sarr.generator: vllm`: a start failure stops the run (no silent teacher-chain
    round); fixed, the rerun reuses MTCT and runs the round through the child process."""
    from dbr_builder.cli import main
    from tests.test_train_e2e import write_hub
    from trainers.data import rows_from_synth

    w = tmp_path / "W"
    write_hub(rows_from_synth(synth_root / "SynthShapes"), w / "hub", "SynthShapes")
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"student: {tiny_model_path}\nbatch_size: 8\nmicro_batch_size: 4\nepochs: 1\nmax_steps: 1\n"
                   "max_length: 512\nsarr: {rounds: 1, max_new_tokens: 16, generator: vllm}\n"
                   "select: {max_images: 6}\nmax_train_images: 8\n")
    argv = ["train", "--config", str(cfg), "--workdir", str(w), "--dataset", "SynthShapes", "--heldout", "sketch"]
    log = child_standin(fail_start="oom")
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "out of GPU memory" in err and "Traceback" not in err
    seed = w / "runs" / "mtct_sarr" / "SynthShapes" / "sketch" / "seed0"
    assert (seed / "mtct" / "stage.json").exists() and not (seed / "sarr1").exists()
    assert len(events(log, "construct")) == 1

    child_standin()
    assert main(argv) == 0
    stage = json.loads((seed / "sarr1" / "stage.json").read_text())
    # the stand-in writes no chains: every image is rejected, and the record says so
    assert stage["sarr"]["images"] == 8 and stage["sarr"]["rejection_rate"] == 1.0
    [built] = events(log, "construct")[1:]
    assert built["kwargs"]["enable_lora"] is True
    assert {e["lora"] for e in events(log, "chat")} == {str(seed / "_work" / "sarr1" / "adapter_for_generation")}
    assert len(events(log, "shutdown")) == 1
