"""`dbr run --executor local|slurm`: stage units as submitit jobs (dbr_builder.launch).

The local executor is real (one process per unit on this machine). Slurm cannot run here: its test
stubs the `sbatch` and `srun` commands at their boundary (PATH) and checks the sbatch script
submitit writes for the configured parameters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_demo import demo_pipeline

from dbr_builder import launch
from dbr_builder.cli import build_parser
from dbr_builder.errors import ConfigError, UserError
from dbr_builder.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _small_pipeline(tmp_path: Path) -> Path:
    """pipelines/demo.yaml, small: 2 training units (held out: photo, sketch), 3 steps, no SARR round."""
    # student `tiny`: the shipped tiny:shapes pretrains its tower per workdir (~2 min each)
    return demo_pipeline(tmp_path, {
        "synth": {"per_class": 2},
        "train": {"student": "tiny", "heldout": ["photo", "sketch"], "max_steps": 3, "checkpoint_every": 1,
                  "batch_size": 4, "micro_batch_size": 4, "max_train_images": 12, "sarr": {"rounds": 0},
                  "select": {"max_images": 4}},
        "eval": {"student_modes": ["direct"], "max_new_tokens": {"direct": 8}, "limit": 4, "batch_size": 4},
    }, executor={"shards": 4, "max_parallel": 2, "poll_s": 0.2})


def _dbr(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dbr_builder.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _done(wd: Path, stage: str) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (wd / "logs" / stage).glob("*/done.json")}


def _kill_first_checkpointed_unit(wd: Path, proc: subprocess.Popen, timeout: float = 900) -> str:
    """SIGKILL the training unit that first wrote a checkpoint mid-stage; return its unit id."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        for ck in (wd / "runs" / "demo" / "SynthShapes").glob("*/seed0/_work/mtct/checkpoint/state.json"):
            unit = f"SynthShapes-{ck.parents[4].name}-seed0"
            running = wd / "logs" / "train" / unit / "running.json"
            step = json.loads(ck.read_text())["step"]
            if running.exists() and step < 3:
                os.kill(json.loads(running.read_text())["pid"], signal.SIGKILL)
                return unit
        if proc.poll() is not None:
            pytest.fail("dbr run ended before any training unit could be killed mid-way:\n" + proc.stdout.read())
        time.sleep(0.05)
    pytest.fail("no training checkpoint appeared")


@pytest.mark.slow
def test_local_executor_matches_inline_one_process_per_unit_and_resumes_a_killed_unit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBR_CACHE_DIR", str(tmp_path / "cache"))
    pipe = _small_pipeline(tmp_path)
    # the reference: today's behaviour, every stage in this process
    inline = tmp_path / "inline"
    assert set(run_pipeline(pipe, inline, executor="inline").values()) == {"ran"}
    assert not (inline / "logs").exists()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "DBR_CACHE_DIR": str(tmp_path / "cache")}
    wd = tmp_path / "local"
    args = ["run", str(pipe), "--workdir", str(wd), "--executor", "local"]
    proc = _dbr(args, env)
    killed = _kill_first_checkpointed_unit(wd, proc)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 1, out
    assert f"unit {killed} failed" in out and "1 of 2 unit(s) of stage `train` failed" in out
    assert "resume (finished units are kept) with: dbr run" in out and "--executor local" in out
    # the killed unit's log tail is shown: submitit's start line, its last progress, how it ended
    assert "Starting with JobEnvironment" in out and "mtct:" in out and "[job] UncompletedJobError" in out
    # generate ran as 4 shard jobs before, each in its own process, merged afterwards
    gen = _done(wd, "generate")
    assert sorted(gen) == [f"SynthShapes-shard{i:05d}-of-00004" for i in range(4)]
    assert len({d["pid"] for d in gen.values()}) == 4 and os.getpid() not in {d["pid"] for d in gen.values()}
    import polars as pl

    images = pl.read_parquet(wd / "manifest" / "SynthShapes.parquet").height
    assert images > 0 and sum(d["summary"]["images"] for d in gen.values()) == images  # every image, once
    gdir = wd / "generations" / "SynthShapes"
    assert (gdir / "results.sqlite").exists() and not list(gdir.glob("results-*-of-00004.sqlite"))  # merged
    assert (gdir / "summary-00003-of-00004.json").exists()

    # the second run resubmits only the killed unit, which resumes from its checkpoint
    proc = _dbr(args, env)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert "[train] 2 unit(s) on the local executor: 1 already done, 1 to run" in out
    assert "[train] 1/1 done, 0 running, 0 queued, 0 failed" in out
    assert "resuming from checkpoint at step" in (wd / "logs" / "train" / killed / "stdout").read_text()
    train_done, eval_done = _done(wd, "train"), _done(wd, "eval")
    assert sorted(train_done) == ["SynthShapes-photo-seed0", "SynthShapes-sketch-seed0"]
    assert sorted(eval_done) == sorted(train_done)
    pids = [d["pid"] for d in [*train_done.values(), *eval_done.values()]]
    assert len(set(pids)) == 4 and os.getpid() not in pids

    # the same outputs as the inline run
    chains = [pl.read_parquet(w / "chains" / "SynthShapes.parquet") for w in (inline, wd)]
    assert chains[0].height > 0 and chains[0].equals(chains[1])
    res = [json.loads((w / "runs" / "demo" / "eval" / "results.json").read_text()) for w in (inline, wd)]
    assert res[0] == res[1]
    md = [(w / "runs" / "demo" / "eval" / "results.md").read_text() for w in (inline, wd)]
    assert md[0] == md[1] and "photo" in md[0] and "sketch" in md[0]
    for unit in train_done:
        seed_dir = Path("runs") / "demo" / "SynthShapes" / unit.split("-")[1] / "seed0"
        sj = [json.loads((w / seed_dir / "final" / "student.json").read_text()) for w in (inline, wd)]
        assert sj[0]["val_accuracy"] == sj[1]["val_accuracy"]
        # the same training, the killed unit included (resumed exactly from its checkpoint)
        losses = [json.loads((w / seed_dir / "mtct" / "stage.json").read_text())["train"]["final_loss"]
                  for w in (inline, wd)]
        assert losses[0] == losses[1]

    def answers(w: Path) -> set[tuple[str, str]]:
        return {(r["image_id"], r["text"]) for f in (w / "runs" / "demo" / "eval" / "predictions").glob("*.jsonl")
                for r in map(json.loads, f.read_text().splitlines())}

    assert len(answers(inline)) == 2 * 4 and answers(inline) == answers(wd)  # the students' raw answers

    # a third run: everything up to date, nothing submitted
    proc = _dbr(args, env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "pipeline done: 0 ran, 7 up to date" in out, out


def _stub_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake `sbatch` (keeps the script, answers like Slurm) and `srun` (submitit checks it exists)."""
    bindir, scripts = tmp_path / "bin", tmp_path / "sbatch-scripts"
    bindir.mkdir()
    scripts.mkdir()
    (bindir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {scripts}/script-$$.sh\necho "Submitted batch job 4242"\n')
    (bindir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def test_slurm_sbatch_script_has_the_configured_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = _stub_slurm(tmp_path, monkeypatch)
    section = {
        "kind": "slurm", "max_parallel": 2,
        "resources": {"timeout_min": 720, "cpus_per_task": 12, "mem_gb": 256},
        "slurm": {"partition": "gpu", "account": "yaml-account", "qos": "high",
                  "additional_parameters": {"reservation": "big-run"}, "setup": ["source .venv/bin/activate"]},
        "stages": {"train": {"resources": {"gpus_per_node": 8, "tasks_per_node": 8}}},
    }
    # `dbr run --slurm account=cli-account --resource mem_gb=300` overrides the YAML
    args = build_parser().parse_args(["run", "p.yaml", "--executor", "slurm", "--slurm", "account=cli-account",
                                      "--resource", "mem_gb=300"])
    ex = launch.executor_config(section, args.executor, dict(args.slurm), dict(args.resource))
    opts = ex.for_stage("train", "train")
    executor = launch.make_executor("slurm", tmp_path / "logs", opts, "train")
    units = [{"id": f"SynthShapes-d{i}-seed0"} for i in range(3)]
    with executor.batch():
        jobs = [executor.submit(launch.UnitJob(), "train", {}, str(tmp_path), u, "k", "train") for u in units]
    assert [j.job_id for j in jobs] == ["4242_0", "4242_1", "4242_2"]
    (script,) = list(scripts.iterdir())
    text = script.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=cli-account", "#SBATCH --qos=high",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --cpus-per-task=12",
                 "#SBATCH --mem=300GB", "#SBATCH --time=720", "#SBATCH --array=0-2%2",
                 "#SBATCH --reservation=big-run", "#SBATCH --job-name=dbr-train", "source .venv/bin/activate"):
        assert line in text.splitlines(), f"{line!r} not in:\n{text}"
    assert "-m submitit.core._submit" in text
    # the command line also wins over a stage's own YAML values
    over = launch.executor_config(section | {"stages": {"train": {"resources": {"mem_gb": 64}, "shards": 2}}},
                                  "slurm", resources={"mem_gb": 300}, shards=5).for_stage("train", "train")
    assert over["resources"]["mem_gb"] == 300 and over["shards"] == 5
    # the generate stage keeps the shared defaults (no 8-GPU request)
    gen = launch.make_executor("slurm", tmp_path / "logs-g", ex.for_stage("generate", "generate"), "generate")
    gen.submit(launch.UnitJob(), "generate", {}, str(tmp_path), {"id": "x"}, "k", "generate")
    newest = max(scripts.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert "#SBATCH --gpus-per-node=8" not in newest.read_text()
    assert "#SBATCH --array" not in newest.read_text()


def test_unit_job_is_checkpointable_with_the_same_call() -> None:
    job = launch.UnitJob()
    args = ("generate", {"dataset": "D"}, "/w", {"id": "D-shard00000-of-00002", "shard": 0}, "key", "generate")
    delayed = job.checkpoint(*args)
    assert delayed.function is job and tuple(delayed.args) == args


def test_executor_config_errors_name_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="executor: 'cloud' is not one of inline, local, slurm"):
        launch.executor_config({"kind": "cloud"})
    with pytest.raises(ConfigError, match=r"executor.resources: unknown key\(s\) partition"):
        launch.executor_config({"resources": {"partition": "gpu"}})
    with pytest.raises(ConfigError, match="executor.shards: 0 must be >= 1"):
        launch.executor_config(None, shards=0)
    ex = launch.executor_config({"slurm": {"partitionn": "gpu"}}, "slurm")
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun: not a Slurm machine
    with pytest.raises(UserError, match="no `srun`"):
        launch.make_executor("slurm", tmp_path / "l", ex.for_stage("train", "train"), "train")
    _stub_slurm(tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match="partitionn"):
        launch.make_executor("slurm", tmp_path / "l", ex.for_stage("train", "train"), "train")


def test_inline_closes_each_engine_it_builds(synth_root: Path, tmp_path: Path, monkeypatch) -> None:
    """An inline run builds a teacher per stage / rationalization round: each is closed before the next.

    A GPU engine cannot be built here; the oracle (a real backend) is subclassed to count the
    engines that are open at once, standing in for vLLM's memory.
    """
    from dbr_builder import backends
    from dbr_builder.backends.oracle import OracleBackend
    from dbr_builder.stages import generate
    from dbr_builder.stages.index import index_dataset

    live: list[int] = []
    built: list[int] = []

    class Engine(OracleBackend):
        def __init__(self, **kw) -> None:
            super().__init__(**kw)
            assert not live, "a second engine was built while one was still open"
            live.append(id(self))
            built.append(id(self))

        def close(self) -> None:
            live.remove(id(self))

    monkeypatch.setitem(backends.BACKENDS, "oracle", Engine)
    index_dataset(synth_root, "SynthShapes", tmp_path)
    generate.run({"dataset": "SynthShapes", "teacher": "oracle", "n": 1, "limit": 4, "progress": False}, tmp_path)
    import polars as pl

    ids = pl.read_parquet(tmp_path / "manifest" / "SynthShapes.parquet")["image_id"].head(3).to_list()
    generate.generate_for_images(tmp_path, "SynthShapes", ids, "oracle", n=1, progress=False)
    assert len(built) == 2 and live == []


def _ranks() -> tuple[int, int, int]:
    """What a multi-task unit job sees: submitit's task count, then accelerate's world (gloo on CPU)."""
    from accelerate import PartialState

    n = launch.export_distributed()
    state = PartialState(cpu=True)  # no GPU here: gloo; on GPUs accelerate takes NCCL from the same variables
    out = (n, state.num_processes, state.process_index)
    state.wait_for_everyone()
    return out


@pytest.mark.slow
def test_a_multi_task_unit_job_is_one_data_parallel_world(tmp_path: Path) -> None:
    """tasks_per_node=2 on the local executor: two processes that accelerate joins into one world.

    The same environment reaches the training loop on a multi-GPU Slurm node (there with NCCL).
    """
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job's process cannot import this test file
    ex = launch.make_executor("local", tmp_path / "logs", {"resources": {"timeout_min": 10, "tasks_per_node": 2},
                                                           "slurm": {}}, "train")
    job = ex.submit(_ranks)
    assert sorted(job.results()) == [(2, 2, 0), (2, 2, 1)]
