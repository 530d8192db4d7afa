"""Bad input to every `dbr` verb: one clear message naming the file or field, exit 1, no traceback.

Most tests call ``dbr_builder.cli.main([...])`` in-process (fast) and read stderr; a few use a
subprocess where the real process boundary matters (Ctrl-C). Each asserts the message names the
offending file / field and that no Python traceback reached the user.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dbr_builder.cli import main


def _err(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 1) -> str:
    """Run ``dbr argv``; assert the exit code and no traceback; return stderr."""
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == code, (rc, out.out[-2000:], out.err[-2000:])
    assert "Traceback" not in out.err and "Traceback" not in out.out
    return out.err


# --- paths that are not usable folders -------------------------------------------------------


def test_output_path_blocked_by_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder\n")
    err = _err(capsys, ["synth", "--root", str(blocker), "--per-class", "1"])
    assert str(blocker) in err and ("file is in the way" in err or "is a file, not a folder" in err)
    assert blocker.read_text() == "not a folder\n"


def test_workdir_below_a_file(synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    err = _err(capsys, ["index", "SynthShapes", "--root", str(synth_root), "--workdir", str(blocker)])
    assert str(blocker) + "/" in err and "is a file, not a folder" in err  # W/.locks or W/manifest


def test_config_that_is_a_folder_or_binary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _err(capsys, ["run", str(tmp_path)])
    assert str(tmp_path) in err and "is a folder" in err
    binary = tmp_path / "p.yaml"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    err = _err(capsys, ["run", str(binary)])
    assert str(binary) in err and "UTF-8" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages: [unclosed\n")
    err = _err(capsys, ["run", str(broken)])
    assert "not valid YAML" in err and f'"{broken}", line 1' in err and "<unicode string>" not in err


# --- a small finished workdir (synth -> index -> generate -> filter -> publish) ---------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir through `publish` on SynthShapes (4 images per class) with the oracle teacher."""
    import contextlib
    import io

    w = tmp_path_factory.mktemp("w")
    steps = [
        ["synth", "--root", str(w / "raw"), "--per-class", "4", "--image-size", "48"],
        ["index", "SynthShapes", "--root", str(w / "raw"), "--workdir", str(w), "--workers", "1"],
        ["generate", "SynthShapes", "--workdir", str(w), "--teacher", "oracle", "--n", "2", "--no-progress"],
        ["filter", "SynthShapes", "--workdir", str(w)],
        ["publish", "--workdir", str(w)],
    ]
    for argv in steps:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(argv) == 0, argv
    return w


# `work` (a private copy of `built`) comes from conftest.py; it copies this module's `built`.


def test_truncated_manifest(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = work / "manifest" / "SynthShapes.parquet"
    with open(manifest, "r+b") as f:
        f.truncate(100)
    for argv in (["generate", "SynthShapes", "-w", str(work), "--teacher", "oracle"],
                 ["filter", "SynthShapes", "-w", str(work)],
                 ["publish", "-w", str(work)]):
        err = _err(capsys, argv)
        assert f"{manifest}: unreadable parquet file" in err and "dbr index SynthShapes" in err


def test_corrupt_manifest_metadata(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta = work / "manifest" / "SynthShapes.json"
    meta.write_text("{garbage")
    err = _err(capsys, ["generate", "SynthShapes", "-w", str(work), "--teacher", "oracle"])
    assert f"{meta}: corrupt manifest metadata" in err and "dbr index SynthShapes" in err


def test_truncated_chains(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chains = work / "chains" / "SynthShapes.parquet"
    with open(chains, "r+b") as f:
        f.truncate(200)
    hub_before = sorted(p.name for p in (work / "hub" / "data" / "SynthShapes").iterdir())
    err = _err(capsys, ["publish", "-w", str(work)])
    assert f"{chains}: unreadable parquet file" in err and "dbr filter SynthShapes" in err
    assert sorted(p.name for p in (work / "hub" / "data" / "SynthShapes").iterdir()) == hub_before


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_generation_store(work: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = work / "generations" / "SynthShapes" / "results.sqlite"
    for side in store.parent.glob("results.sqlite-*"):
        side.unlink()
    if damage == "garbage":
        store.write_bytes(b"this is not a database\n" * 10)
    else:
        with open(store, "r+b") as f:
            f.truncate(8192)
    for argv in (["generate", "SynthShapes", "-w", str(work), "--teacher", "oracle"],
                 ["filter", "SynthShapes", "-w", str(work)],
                 ["generate", "SynthShapes", "-w", str(work), "--merge"]):
        err = _err(capsys, argv)
        assert f"{store}: not a usable generation store" in err and "move it away" in err


def test_merge_from_a_file_that_is_not_a_store(work: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "results-00001-of-00002.sqlite"
    junk.write_text("not sqlite")
    err = _err(capsys, ["generate", "SynthShapes", "-w", str(work), "--merge", "--merge-from", str(junk)])
    assert f"{junk}: not a usable generation store" in err


# --- generate: options ------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "flag"), [
    (["--num-shards", "0"], "--num-shards"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "2"], "--top-p"),
    (["--batch-size", "0"], "--batch-size"),
    (["--passes", "0"], "--passes"),
    (["--limit", "-1"], "--limit"),
    (["--max-pixels", "-5"], "--max-pixels"),
])
def test_generate_rejects_out_of_range_numbers(work: Path, args: list[str], flag: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from dbr_builder.core.store import read_results

    before = read_results(work, "SynthShapes").height
    err = _err(capsys, ["generate", "SynthShapes", "-w", str(work), "--teacher", "oracle", "--no-progress", *args])
    assert f"{flag}:" in err
    assert read_results(work, "SynthShapes").height == before  # nothing generated with the bad value


@pytest.mark.parametrize(("spec", "needle"), [
    ("oracle,p_wrong=abc", "p_wrong='abc' must be a number"),
    ("oracle,seed=1.5", "seed=1.5 must be an integer"),
    ("oracle,nosuch=1", "unknown option(s) nosuch"),
    ("oracle,garbage", "inline option 1 is not key=value"),
    ("bogus:model", "unknown backend 'bogus'"),
])
def test_generate_bad_teacher_specs(work: Path, spec: str, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _err(capsys, ["generate", "SynthShapes", "-w", str(work), "--teacher", spec, "--no-progress"])
    assert needle in err


def test_generate_shard_out_of_range(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _err(capsys, ["generate", "SynthShapes", "-w", str(work), "--teacher", "oracle",
                        "--shard", "2", "--num-shards", "2"])
    assert "shard 2 of num_shards 2 is out of range" in err
    assert not list((work / "generations" / "SynthShapes").glob("results-*.sqlite"))


@pytest.mark.parametrize("spec", [
    "openai:gpt-4o,api_key=sk-SEKRET123",
    "openai:gpt-4o,sk-SEKRET123",
    "nosuch:m@https://user:sk-SEKRET123@host/v1",
])
def test_secrets_typed_into_a_spec_are_not_echoed(work: Path, spec: str, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ENVKEY456")
    for verb in (["generate", "SynthShapes", "-w", str(work), "--teacher", spec],
                 ["eval", "-w", str(work), "--model", spec, "--dataset", "SynthShapes", "--limit", "1"]):
        err = _err(capsys, verb)
        assert "SEKRET" not in err and "ENVKEY" not in err and "***" in err


# --- train ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "flag"), [
    (["--trial-seed", "-1"], "--trial-seed"),
    (["--max-steps", "-1"], "--max-steps"),
    (["--run", "a/b"], "--run"),
])
def test_train_rejects_bad_overrides_before_work(work: Path, args: list[str], flag: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    err = _err(capsys, ["train", "-c", "pipelines/demo.yaml", "-w", str(work), *args])
    assert f"{flag}:" in err
    assert not (work / "runs").exists() and not (work / "models").exists()


def test_train_unknown_heldout_domain_leaves_no_run_folder(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _err(capsys, ["train", "-c", "pipelines/demo.yaml", "-w", str(work), "--heldout", "nosuch"])
    assert "'nosuch' not a domain of SynthShapes" in err and "sketch" in err
    assert not (work / "runs").exists()


def test_train_config_with_wrong_types(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text("stage: train\nbatch_size: abc\nepochs: -1\n")
    err = _err(capsys, ["train", "-c", str(cfg), "-w", str(work)])
    assert str(cfg) in err and "batch_size" in err and "epochs" in err


# --- index, publish, run ----------------------------------------------------------------------


@pytest.mark.parametrize(("args", "flag"), [
    (["--max-pixels", "-1"], "--max-pixels"),
    (["--workers", "0"], "--workers"),
    (["--holdout-fraction", "1.5"], "--holdout-fraction"),
    (["--trial-seed", "-1"], "--trial-seed"),
])
def test_index_rejects_bad_numbers(synth_root: Path, tmp_path: Path, args: list[str], flag: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    err = _err(capsys, ["index", "SynthShapes", "--root", str(synth_root), "-w", str(tmp_path / "w"), *args])
    assert f"{flag}:" in err
    assert not (tmp_path / "w").exists()


def _hub_state(work: Path) -> dict[str, int]:
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in (work / "hub").rglob("*") if p.is_file()}


@pytest.mark.parametrize(("args", "needle"), [
    (["--max-shard-mb", "0"], "--max-shard-mb:"),
    (["--push", "not a repo id", "--dry-run"], "--push 'not a repo id': expected a dataset repo id"),
    (["--push", "user/repo"], "no Hugging Face token: run `hf auth login`"),
    (["--dry-run"], "only apply with --push"),
])
def test_publish_checks_before_rewriting_hub(work: Path, args: list[str], needle: str,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(work / "no-saved-login"))
    before = _hub_state(work)
    err = _err(capsys, ["publish", "-w", str(work), *args])
    assert needle in err
    assert _hub_state(work) == before  # W/hub untouched


def test_run_from_after_until(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _err(capsys, ["run", "pipelines/demo.yaml", "-w", str(work), "--from", "publish", "--until", "synth"])
    assert "--from publish comes after --until synth" in err


def test_filter_bad_rationalize_spec_fails_before_writing(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chains = work / "chains" / "SynthShapes.parquet"
    before = chains.stat().st_mtime_ns
    err = _err(capsys, ["filter", "SynthShapes", "-w", str(work), "--rationalize", "bogus"])
    assert "rationalize.teacher" in err and "unknown backend 'bogus'" in err
    assert chains.stat().st_mtime_ns == before


# --- Ctrl-C in the middle of generate, then resume -------------------------------------------


def test_sigint_during_generate_then_rerun_resumes(work: Path) -> None:
    """A real process and a real SIGINT; the teacher is a slow loopback OpenAI-compatible server."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from dbr_builder.core.store import read_results
    from tests.openai_replay_server import ReplayServer

    store = work / "generations" / "SynthShapes" / "results.sqlite"
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-SEKRET"}
    with ReplayServer(delay_s=0.05) as srv:
        argv = [sys.executable, "-m", "dbr_builder", "generate", "SynthShapes", "-w", str(work), "--n", "1",
                "--teacher", f"openai:gpt-4o@{srv.base_url},concurrency=1", "--batch-size", "1",
                "--limit", "24", "--no-progress"]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 60
        while len(srv.log) < 5 and time.monotonic() < deadline:  # a few requests answered: mid-run
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 130, (out, err)
        assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
        assert "SEKRET" not in out + err
        rows = read_results(work, "SynthShapes")
        n_first = rows.filter(rows["model"] == "gpt-4o").height
        assert 0 < n_first < 24  # stopped mid-run, finished requests kept
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{n_first} candidates already stored" in r.stdout
    assert store.exists()


# --- model paths that do not exist ------------------------------------------------------------


def test_missing_model_folders(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-model"
    err = _err(capsys, ["generate", "SynthShapes", "-w", str(work), "--teacher", f"hf:{missing}"])
    assert f"model folder '{missing}' not found" in err
    err = _err(capsys, ["train", "-c", "pipelines/demo.yaml", "-w", str(work), "--student", str(missing)])
    assert f"student '{missing}': no such model folder" in err
    assert not (work / "runs").exists()


def test_train_sees_a_damaged_hub_shard_not_a_stale_cache(work: Path, built: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`datasets` caches a local folder by name + card only; a damaged shard must still be seen."""
    from trainers.data import load_published

    assert sum(len(v) for v in load_published(built / "hub", "SynthShapes").values()) > 0  # warm the cache
    shard = next((work / "hub" / "data" / "SynthShapes").glob("cartoon-*.parquet"))
    with open(shard, "r+b") as f:
        f.truncate(200)
    err = _err(capsys, ["train", "-c", "pipelines/demo.yaml", "-w", str(work), "--max-steps", "1"])
    assert f"{shard}: cannot read the published SynthShapes data" in err and "dbr publish" in err
    assert not (work / "runs").exists()
