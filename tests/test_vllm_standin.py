"""The vLLM backend's failure behaviour, with a stand-in engine (no GPU here).

``tests/stand_ins/vllm`` mimics vLLM 0.33's API and its real start-up errors (the boundary that
cannot be reached without a GPU); everything above it - backend, generate stage, SARR child
process - is the real code. ``tests/contract/test_vllm_contract.py`` checks the API assumptions
against the real package (``make test-vllm``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from dbr_builder.backends import EngineStartError, Request, TooManyErrors, make_backend
from dbr_builder.config import ConfigError, load_pipeline
from dbr_builder.core import store
from dbr_builder.stages import generate
from dbr_builder.stages.index import index_dataset

STAND_INS = Path(__file__).parent / "stand_ins"
DS = "SynthShapes"
QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.fixture()
def standin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Put the stand-in ``vllm`` first on the path; return a function (re)configuring it + its log."""
    monkeypatch.syspath_prepend(str(STAND_INS))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    log = tmp_path / "vllm-events.jsonl"

    def configure(**cfg) -> Path:
        monkeypatch.setenv("DBR_STANDIN_VLLM", json.dumps({"log": str(log), **cfg}))
        return log

    configure()
    yield configure
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        sys.modules.pop(name, None)


def events(log: Path, kind: str | None = None) -> list[dict]:
    if not log.exists():
        return []
    out = [json.loads(line) for line in log.read_text().splitlines()]
    return [e for e in out if kind is None or e["event"] == kind]


@pytest.fixture(scope="module")
def workdir(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("vllm-gen")
    index_dataset(synth_root, DS, wd)
    return wd


def _fresh(workdir: Path, tmp_path: Path) -> Path:
    wd = tmp_path / "w"
    (wd / "manifest").mkdir(parents=True)
    for f in (workdir / "manifest").iterdir():
        (wd / "manifest" / f.name).write_bytes(f.read_bytes())
    return wd


def _gen_cfg(**kw) -> dict:
    return {"dataset": DS, "teacher": f"vllm:{QWEN}", "n": 2, "progress": False, "batch_size": 16, **kw}


# ------------------------------------------------------------------------------- engine start


@pytest.mark.parametrize("failure,cause", [("engine_core", "engine process failed to start"),
                                           ("oom", "out of GPU memory"), ("arch", "unknown or unsupported model")])
def test_engine_start_is_one_attempt_and_fatal(standin, workdir: Path, tmp_path: Path, failure: str, cause: str):
    log = standin(fail_start=failure)
    wd = _fresh(workdir, tmp_path)
    with pytest.raises(EngineStartError) as ei:
        generate.run(_gen_cfg(passes=3), wd)
    msg = str(ei.value)
    assert "\n" not in msg and QWEN in msg and cause in msg
    assert len(events(log, "construct")) == 1  # not once per request, batch or pass
    rows = store.read_results(wd, DS) if store.shard_file(wd, DS).exists() else None
    assert rows is None or rows.height == 0  # no errors stored for a start failure


def test_start_failure_is_remembered(standin):
    log = standin(fail_start="oom")
    b = make_backend(f"vllm:{QWEN}")
    req = Request("k", [{"type": "text", "text": "x"}, {"type": "image", "path": "/nonexistent.png"}])
    for _ in range(3):
        with pytest.raises(EngineStartError, match="gpu_memory_utilization"):
            b.generate([req])
    assert len(events(log, "construct")) == 1
    b.close()  # nothing started: closing is a no-op
    assert events(log, "shutdown") == []


def test_cli_prints_one_line_for_a_start_failure(standin, workdir: Path, tmp_path: Path, capsys):
    from dbr_builder.cli import main

    standin(fail_start="engine_core")
    wd = _fresh(workdir, tmp_path)
    assert main(["generate", DS, "-w", str(wd), "--teacher", f"vllm:{QWEN}", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failed to start" in err[0] and "Traceback" not in err[0]


# ------------------------------------------------------------------------------- per request


def test_request_failures_are_isolated_and_counted(standin, tmp_path: Path):
    from PIL import Image

    standin(fail_text="BAD")
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    b = make_backend(f"vllm:{QWEN}")
    reqs = [Request(f"k{i}", [{"type": "text", "text": "BAD" if i in (1, 3) else "ok"},
                              {"type": "image", "path": str(img)}], n=2) for i in range(5)]
    res = b.generate(reqs)
    assert [r.key for r in res] == [r.key for r in reqs]
    assert [r.error is not None for r in res] == [False, True, False, True, False]
    assert all(len(r.texts) == 2 for r in res if r.error is None)
    assert b.stats["errors"] == 2 and b.stats["requests"] == 5 and b.stats["batch_failures"] == 1
    b.close()


def test_error_share_stops_the_run(standin, workdir: Path, tmp_path: Path):
    # every prompt contains the class list; make the stand-in reject them all
    standin(fail_text="circle")
    wd = _fresh(workdir, tmp_path)
    with pytest.raises(TooManyErrors, match=r"16 of 16 requests .* failed .*max_error_share") as ei:
        generate.run(_gen_cfg(error_check_after=16, max_error_share=0.5), wd)
    assert "ValueError" in str(ei.value)
    df = store.read_results(wd, DS)
    assert df.height == 16 * 2  # only the first batch (2 candidates each) was stored, not every image
    assert df["error"].is_not_null().all()


def test_error_share_can_be_switched_off(standin, workdir: Path, tmp_path: Path):
    standin(fail_text="circle")
    wd = _fresh(workdir, tmp_path)
    s = generate.run(_gen_cfg(max_error_share=None, passes=1, limit=40), wd)
    assert s["failed_images"] == 40 and s["failed_requests"] == 40


# ------------------------------------------------------------------------------- close, kwargs


def test_engines_closed_between_units(standin, workdir: Path, tmp_path: Path):
    log = standin()
    wd = _fresh(workdir, tmp_path)
    generate.run(_gen_cfg(limit=4), wd)
    generate.generate_for_images(wd, DS, store.read_results(wd, DS)["image_id"].unique().to_list()[:2],
                                 f"vllm:{QWEN}", n=1, progress=False)
    order = [e["event"] for e in events(log) if e["event"] in ("construct", "shutdown")]
    assert order == ["construct", "shutdown", "construct", "shutdown"]


def test_engine_kwargs_inline_json_and_family_mm_kwargs(standin, tmp_path: Path):
    spec = f'vllm:{QWEN},max_pixels=200704,engine_kwargs={{"enforce_eager": true, "limit_mm_per_prompt": {{"image": 2}}}}'
    b = make_backend(spec)
    kw = b.engine_kwargs
    assert kw["enforce_eager"] is True and kw["limit_mm_per_prompt"] == {"image": 2}
    assert kw["mm_processor_kwargs"] == {"max_pixels": 200704}  # Qwen-VL processors read it
    internvl = make_backend("vllm:OpenGVLab/InternVL3-8B-hf,max_pixels=200704")
    assert "mm_processor_kwargs" not in internvl.engine_kwargs  # its processor has no max_pixels
    assert internvl.max_pixels == 200704  # images are still resized before the engine
    tp = make_backend(f"vllm:{QWEN}", engine_kwargs='{"tensor_parallel_size": 4}')  # from YAML / -O as JSON text
    assert tp.engine_kwargs["tensor_parallel_size"] == 4


def test_greedy_with_several_candidates_is_refused_at_config_time(tmp_path: Path):
    from dbr_builder.backends import check_sampling

    with pytest.raises(ConfigError, match="n=4 with temperature=0"):
        check_sampling(4, 0.0, 1.0, "generate")
    check_sampling(1, 0.0, 1.0, "eval")
    check_sampling(4, 0.7, 0.95, "generate")
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nstages:\n  - stage: generate\n    teacher: oracle\n    n: 4\n    temperature: 0\n")
    with pytest.raises(ConfigError, match=r"temperature.*0 is less than or equal to the minimum of 0"):
        load_pipeline(bad)
    bad.write_text("name: x\nstages:\n  - stage: train\n    sarr: {n: 2, temperature: 0}\n")
    with pytest.raises(ConfigError, match="temperature"):
        load_pipeline(bad)
    bad.write_text("name: x\nstages:\n  - stage: filter\n    rationalize: {enabled: true, teacher: oracle, "
                   "temperature: 0}\n")
    with pytest.raises(ConfigError, match="n"):
        load_pipeline(bad)


def test_closing_a_started_engine(standin, tmp_path: Path):
    from PIL import Image

    log = standin()
    img = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(img)
    b = make_backend(f"vllm:{QWEN}")
    assert b.generate([Request("k", [{"type": "image", "path": str(img)}, {"type": "text", "text": "q"}])])[0].texts
    b.close()
    b.close()
    assert len(events(log, "shutdown")) == 1


def test_every_backend_has_close():
    from dbr_builder.backends import BACKENDS

    for kind, cls in BACKENDS.items():
        assert callable(getattr(cls, "close", None)), kind
    assert os.environ.get("DBR_STANDIN_VLLM") is None  # the fixture's setting never leaks


# ------------------------------------------------------------------------------- adapters


def test_adapter_plan_never_drops_modules(standin, tmp_path: Path):
    """InternVL's vision LoRA cannot be served by vLLM 0.33 (tests/contract checks this with vLLM's code):
    auto merges, direct refuses before any engine starts; an LM-only adapter is served directly."""
    from dbr_builder.backends import BackendError
    from dbr_builder.backends.vllm_backend import adapter_parts, plan_adapter
    from tests.contract.families import build, train_adapter

    arch = "InternVLForConditionalGeneration"
    model = build(arch, tmp_path / "ivl")
    full = train_adapter(model, tmp_path / "full")
    parts = adapter_parts(full)
    assert {"projection_layer", "fc1"} <= parts["tower"] and parts["connector"] == {"linear_1", "linear_2"}
    plan = plan_adapter(arch, parts, "auto")
    assert plan.action == "merge" and "projection_layer" in plan.reason
    log = standin()
    with pytest.raises(BackendError, match="cannot serve adapter .*projection_layer.*adapter_mode=merge"):
        make_backend(f"vllm:{tmp_path / 'ivl'}", adapter=str(full), adapter_mode="direct")
    assert events(log, "construct") == []  # refused before any work
    lm_only = train_adapter(build(arch, tmp_path / "ivl2"), tmp_path / "lm", vision=False)
    b = make_backend(f"vllm:{tmp_path / 'ivl2'}", adapter=str(lm_only))
    assert b.plan.action == "direct" and b.engine_kwargs["enable_lora"] is True
    assert "enable_tower_connector_lora" not in b.engine_kwargs
    assert plan_adapter(None, parts, "auto").action == "merge"  # unknown architecture: never served as is
    assert plan_adapter(None, parts, "direct").action == "refuse"


def test_merge_serves_a_merged_copy(standin, tiny_model_path: Path, tmp_path: Path):
    """adapter_mode=merge: PEFT merge_and_unload into a copy; vLLM then serves that folder without LoRA."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_path)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    b = make_backend(f"vllm:{tiny_model_path}", adapter=str(tmp_path / "adapter"), adapter_mode="merge")
    merged_dir = Path(b.engine_kwargs["model"])
    assert merged_dir == tmp_path / "adapter.merged-vllm" and "enable_lora" not in b.engine_kwargs
    assert b.lora is None and (merged_dir / "merged_from.json").exists()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_model_path),
                                         tmp_path / "adapter")(input_ids=ids).logits
        got = AutoModelForImageTextToText.from_pretrained(merged_dir)(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-4)  # the merged copy computes what base + adapter computes
    stamp = (merged_dir / "merged_from.json").stat().st_mtime_ns
    make_backend(f"vllm:{tiny_model_path}", adapter=str(tmp_path / "adapter"), adapter_mode="merge")
    assert (merged_dir / "merged_from.json").stat().st_mtime_ns == stamp  # same inputs: reused, not redone
