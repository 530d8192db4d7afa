"""End to end: `dbr eval` on a small SynthShapes manifest with the tiny student (+ a LoRA adapter),
the oracle backend for known accuracies, resumability, and every report format."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dbr_builder.cli import main as cli_main
from dbr_builder.errors import ConfigError
from dbr_builder.stages import evaluate


@pytest.fixture(scope="module")
def workdir(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dbr_builder.stages.index import index_dataset

    w = tmp_path_factory.mktemp("evalwork")
    index_dataset(synth_root, "SynthShapes", w, trial_seed=0, progress=False)
    return w


@pytest.fixture(scope="module")
def student(workdir: Path, tiny_model_path: Path) -> Path:
    """A student as `dbr train` leaves it: an (untrained) PEFT LoRA adapter plus student.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    final = workdir / "runs" / "tiny" / "SynthShapes" / "photo" / "seed0" / "final"
    net = AutoModelForImageTextToText.from_pretrained(tiny_model_path)
    peft = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(final / "adapter")
    domains = ["cartoon", "painting", "photo", "sketch"]
    (final / "student.json").write_text(json.dumps({
        "base_model": str(tiny_model_path), "dataset": "SynthShapes", "heldout_domain": "photo",
        "train_domains": [d for d in domains if d != "photo"], "trial_seed": 0,
        "classes": ["circle", "hexagon", "pentagon", "square", "star", "triangle"], "adapter": "adapter",
    }))
    return final


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_tiny_student_and_baseline_all_modes(workdir: Path, student: Path, tiny_model_path: Path) -> None:
    cfg = {
        "stage": "eval", "run": "tiny", "datasets": ["SynthShapes"], "heldout_domains": ["photo"],
        "student_modes": ["direct", "reasoning"],
        "models": [{"name": "tiny-base", "spec": f"hf:{tiny_model_path}", "modes": ["choice", "icl"],
                    "shots": [2]}],
        "limit": 3, "batch_size": 3, "max_new_tokens": 6,
    }
    s1 = evaluate.run(cfg, workdir, progress=False)
    assert s1["jobs"] == 4 and s1["generated"] == 12 and s1["errors"] == 0 and s1["records"] == 12
    out = workdir / "runs" / "tiny" / "eval"
    for name in ("results.json", "results.md", "results.tex", "SynthShapes.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "SynthShapes.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((out / "results.json").read_text())
    methods = res["summary"]["datasets"]["SynthShapes"]["methods"]
    assert set(methods) == {"tiny [direct]", "tiny [reasoning]", "tiny-base [choice]", "tiny-base [icl k=2]"}
    for m in methods.values():
        cell = m["per_domain"]["photo"]
        assert cell["n_images"] == [3] and 0.0 <= cell["mean"] <= 100.0
        assert 0.0 <= cell["unparseable_rate"] <= 100.0
    md = (out / "results.md").read_text()
    assert "| tiny [reasoning] |" in md and "(paper)" in md and "Unparseable" in md
    assert "Only 1 of the 4 domains" in md and "| Method | photo | Avg |" in md
    assert "tiny [icl k=2]" not in md and "\\begin{tabular}" in (out / "results.tex").read_text()

    # ICL prompts used 2 examples each, class-balanced, never from the held-out domain
    icl_file = next((out / "predictions").glob("tiny-base__SynthShapes__photo__seed0__icl2__*.jsonl"))
    from dbr_builder.core.manifest import load_manifest

    df, _ = load_manifest(workdir, "SynthShapes")
    by_id = {r["image_id"]: r for r in df.to_dicts()}
    for rec in _lines(icl_file):
        exs = [by_id[i] for i in rec["examples"]]
        assert len(exs) == 2 and all(e["domain"] != "photo" for e in exs)
        assert len({e["class_name"] for e in exs}) == 2

    # a rerun with everything stored loads no model and generates nothing
    stamp = {p: p.stat().st_mtime_ns for p in (out / "predictions").glob("*.jsonl")}
    s2 = evaluate.run(cfg, workdir, progress=False)
    assert s2["generated"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "predictions").glob("*.jsonl")} == stamp

    # a crash mid-write (last record lost, a torn line left) is resumed: only that item is redone
    direct = next((out / "predictions").glob("tiny__SynthShapes__photo__seed0__direct__*.jsonl"))
    lines = direct.read_text().splitlines()
    direct.write_text("\n".join(lines[:-1]) + '\n{"image_id": "torn')
    s3 = evaluate.run(cfg, workdir, progress=False)
    assert s3["generated"] == 1
    assert len({r["image_id"] for r in _lines_ok(direct)}) == 3


def _lines_ok(path: Path) -> list[dict]:
    out = []
    for x in path.read_text().splitlines():
        try:
            out.append(json.loads(x))
        except json.JSONDecodeError:
            pass
    return out


@pytest.mark.parametrize("p_wrong,want", [(0.0, 100.0), (1.0, 0.0)])
def test_known_accuracy_with_oracle_backend(workdir: Path, p_wrong: float, want: float) -> None:
    """The oracle backend (real, deterministic) writes chains whose conclusion is right (p_wrong=0)
    or wrong (p_wrong=1): reasoning-mode accuracy must come out at exactly 100 / 0 on every domain."""
    cfg = {"stage": "eval", "run": f"oracle{int(p_wrong)}", "students": False, "datasets": ["SynthShapes"],
           "models": [{"name": "oracle", "spec": "oracle", "modes": ["reasoning"], "trial_seeds": [0, 1],
                       "options": {"p_wrong": p_wrong, "p_missing": 0.0, "p_reorder": 0.0, "p_malformed": 0.0}}],
           "batch_size": 16}
    s = evaluate.run(cfg, workdir, progress=False)
    # the `in` split (DomainBed: 24 - int(24 * 0.2) = 20 images) of every domain as held-out, two trial seeds
    assert s["records"] == 80 * 2
    res = json.loads((workdir / "runs" / cfg["run"] / "eval" / "results.json").read_text())
    m = res["summary"]["datasets"]["SynthShapes"]["methods"]["oracle [reasoning]"]
    assert list(m["per_domain"]) == ["cartoon", "painting", "photo", "sketch"]
    for cell in m["per_domain"].values():
        assert cell["mean"] == want and cell["err"] == 0.0 and cell["unparseable_rate"] == 0.0
        assert cell["n_images"] == [20, 20]
    assert m["avg"] == want
    statuses = Counter(c["status_counts"].get("ok", 0) for c in res["cells"])
    assert statuses == Counter({20: 8})


def test_cli_adapter_and_errors(workdir: Path, student: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["eval", "--adapter", str(student), "--workdir", str(workdir), "--mode", "direct",
                   "--limit", "2", "--max-new-tokens", "4", "--run", "cli", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "| tiny [direct] |" in out and "## SynthShapes" in out
    assert (workdir / "runs" / "cli" / "eval" / "results.md").exists()
    with pytest.raises(ConfigError, match="give --config"):
        evaluate.config_from_args(_ns())
    assert cli_main(["eval", "--adapter", str(workdir), "--workdir", str(workdir)]) == 1
    assert "no student.json" in capsys.readouterr().err
    cfg = {"stage": "eval", "run": "none", "datasets": ["SynthShapes"]}
    with pytest.raises(ConfigError, match="no trained students"):
        evaluate.run(cfg, workdir, progress=False)
    bad = {**cfg, "students": False, "models": [{"spec": "oracle"}], "heldout_domains": ["moon"]}
    with pytest.raises(ConfigError, match="moon"):
        evaluate.run(bad, workdir, progress=False)


def _ns(**kw):
    import argparse

    p = argparse.ArgumentParser()
    evaluate.add_arguments(p)
    return p.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def test_student_adapter_resolution(tmp_path: Path) -> None:
    final = tmp_path / "final"
    final.mkdir()
    # fully fine-tuned student: no adapter, the base model is the folder itself
    assert evaluate.student_adapter(final, {"adapter": None, "base_model": str(final)}) is None
    # the absolute path recorded at training time is gone (work dir moved): use final/ itself
    (final / "adapter_config.json").write_text("{}")
    assert evaluate.student_adapter(final, {"adapter": "/moved/away/final"}) == str(final.resolve())
    assert evaluate._student_spec("OpenGVLab/InternVL3-8B-hf", "hf") == "hf:OpenGVLab/InternVL3-8B-hf"
    assert evaluate._student_spec("vllm:Qwen/Qwen2.5-VL-7B-Instruct", "hf") == "vllm:Qwen/Qwen2.5-VL-7B-Instruct"


def test_eval_stage_in_a_pipeline(workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dbr run` validates the eval entry against its schema, runs it, then finds it up to date."""
    from dbr_builder.pipeline import run_pipeline

    pipe = tmp_path / "p.yaml"
    pipe.write_text(
        "datasets: [SynthShapes]\n"
        "stages:\n"
        "  - stage: eval\n"
        "    run: piped\n"
        "    students: false\n"
        "    models: [{name: oracle, spec: oracle, modes: [reasoning, direct]}]\n"
        "    heldout_domains: [sketch]\n")
    logs: list[str] = []
    assert run_pipeline(pipe, workdir, log=logs.append) == {"eval": "ran"}
    assert "| oracle [reasoning] |" in capsys.readouterr().out  # `dbr run` prints the table
    assert run_pipeline(pipe, workdir, log=logs.append) == {"eval": "skipped"}
    assert (workdir / "runs" / "piped" / "eval" / "SynthShapes.png").exists()
    pipe.write_text(pipe.read_text() + "    modez: [direct]\n")
    with pytest.raises(ConfigError, match="modez"):
        run_pipeline(pipe, workdir, log=logs.append)
