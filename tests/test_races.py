"""Races and atomicity: stage locks, shard completion markers, publish's swap, filter's unit, train's log.

Another process holding a lock is a real child process (``fcntl`` locks belong to open files
of a process); kills between two renames are simulated by leaving the state such a kill
leaves (the same files and hidden leftovers), then rerunning.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dbr_builder.cli import main
from dbr_builder.core import fsutil, store
from dbr_builder.core.locks import LockHeld, lock_path, stage_lock
from dbr_builder.stages import filter as filter_stage
from dbr_builder.stages import generate

DS = "SynthShapes"
ROOT = Path(__file__).resolve().parents[1]


def _quiet(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


class Holder:
    """A child process holding ``stage_lock(workdir, name)`` until stopped."""

    def __init__(self, workdir: Path, name: str):
        code = textwrap.dedent(f"""
            import sys, time
            sys.argv = ["dbr", "publish", "--workdir", {str(workdir)!r}]
            from dbr_builder.core.locks import stage_lock
            with stage_lock({str(workdir)!r}, {name!r}):
                print("held", flush=True)
                time.sleep(120)
        """)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.proc.kill()  # kill -9: the kernel drops the lock
        self.proc.wait()


@pytest.fixture
def holder():
    made: list[Holder] = []

    def make(workdir: Path, name: str) -> Holder:
        h = Holder(workdir, name)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


# --- locks ----------------------------------------------------------------------------------


def test_lock_names_the_holder_and_is_freed_by_kill_9(tmp_path, holder):
    h = holder(tmp_path, "publish")
    with pytest.raises(LockHeld) as ei, stage_lock(tmp_path, "publish"):
        pass
    msg = str(ei.value)
    assert f"PID {h.proc.pid}" in msg and "dbr publish --workdir" in msg
    assert str(lock_path(tmp_path, "publish")) in msg
    h.stop()
    with stage_lock(tmp_path, "publish"):  # free again: no stale lock after kill -9
        pass


def test_lock_is_not_inherited_by_child_processes(tmp_path):
    """A child (an engine, a decode worker) outliving its killed parent never keeps the lock."""
    code = textwrap.dedent(f"""
        import os, sys, time
        from dbr_builder.core.locks import stage_lock
        with stage_lock({str(tmp_path)!r}, "generate-X"):
            if os.fork() == 0:
                time.sleep(60)  # the orphan
                os._exit(0)
            print("held", flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld):
            with stage_lock(tmp_path, "generate-X"):
                pass
        p.kill()
        p.wait()
        with stage_lock(tmp_path, "generate-X"):  # the orphan child still runs, the lock is free
            pass
    finally:
        os.killpg(p.pid, 9)


def test_nested_acquisition_in_one_process_keeps_the_lock(tmp_path, holder):
    with stage_lock(tmp_path, "publish"):
        with stage_lock(tmp_path, "publish"):
            pass
        code = f"from dbr_builder.core.locks import stage_lock\nwith stage_lock({str(tmp_path)!r}, 'publish'): pass"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert r.returncode != 0 and "already running" in r.stderr  # still held after the inner block


def test_lock_file_never_holds_a_pasted_key(tmp_path):
    key = "sk-proj-" + "A1b2C3d4" * 4
    old = sys.argv
    sys.argv = ["dbr", "generate", "X", "--teacher", key]
    try:
        with stage_lock(tmp_path, "generate-X") as p:
            text = p.read_text()
    finally:
        sys.argv = old
    assert key not in text and "***" in text


def test_concurrent_publish_is_refused_cleanly(work, holder, capsys):
    before = {p.name: p.read_bytes() for p in (work / "hub" / "data" / DS).iterdir()}
    h = holder(work, "publish")
    assert main(["publish", "-w", str(work)]) == 1
    err = capsys.readouterr().err
    assert "already running" in err and f"PID {h.proc.pid}" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (work / "hub" / "data" / DS).iterdir()} == before


def test_concurrent_dbr_run_is_refused(tmp_path, holder, capsys):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"stages:\n  - stage: synth\n    root: {tmp_path / 'raw'}\n    per_class: 1\n")
    w = tmp_path / "w"
    h = holder(w, "run")
    assert main(["run", str(pipe), "-w", str(w)]) == 1
    err = capsys.readouterr().err
    assert f"PID {h.proc.pid}" in err and "Traceback" not in err
    assert not (tmp_path / "raw").exists()


def test_concurrent_generate_of_one_store_is_refused_but_shards_are_not(work, holder, capsys):
    h = holder(work, generate.lock_name(DS))
    assert main(["generate", DS, "-w", str(work), "--teacher", "oracle", "--n", "3", "--no-progress"]) == 1
    assert f"PID {h.proc.pid}" in capsys.readouterr().err
    # another shard's lock is another file: shards run side by side
    assert _quiet(["generate", DS, "-w", str(work), "--teacher", "oracle", "--n", "3", "--no-progress",
                   "--shard", "0", "--num-shards", "2"]) == 0


# --- shards ---------------------------------------------------------------------------------


def _shard(work: Path, i: int, n: int = 2) -> dict:
    return generate.run({"dataset": DS, "teacher": "oracle", "n": 3, "shard": i, "num_shards": n,
                         "progress": False}, work)


def test_merge_refuses_an_unfinished_shard_and_loses_nothing(work, capsys):
    _shard(work, 0)
    _shard(work, 1)
    # shard 1 is being written again (or was killed): its next batch cleared the marker
    f1 = store.shard_file(work, DS, 1, 2)
    with store.Store(f1) as st:
        st.incomplete_on_write()
        st.add([store.Row("extra-key", "img", "teacher", "p", "m", "{}", 9, "late row", "stop", 1)])
    before = store.read_results(work, DS).height
    assert main(["generate", DS, "-w", str(work), "--merge"]) == 1
    err = capsys.readouterr().err
    assert str(f1) in err and "has not finished" in err and "Traceback" not in err
    assert f1.exists() and store.read_results(work, DS).height == before  # nothing merged, nothing lost
    _shard(work, 1)  # finishing the shard (nothing left to generate) marks it complete
    assert _quiet(["generate", DS, "-w", str(work), "--merge"]) == 0
    assert store.read_results(work, DS).height == before
    assert [f.name for f in store.store_files(work, DS)] == ["results.sqlite"]


def test_merge_refuses_a_shard_whose_writer_holds_its_lock(work, holder, capsys):
    _shard(work, 0)
    _shard(work, 1)
    h = holder(work, generate.lock_name(DS, 1, 2))
    assert main(["generate", DS, "-w", str(work), "--merge"]) == 1
    assert f"PID {h.proc.pid}" in capsys.readouterr().err
    assert store.shard_file(work, DS, 1, 2).exists()


def test_rerunning_a_shard_after_the_merge_does_not_redo_its_work(work):
    s0 = _shard(work, 0)
    _shard(work, 1)
    assert s0["generated"] > 0
    assert _quiet(["generate", DS, "-w", str(work), "--merge"]) == 0
    again = _shard(work, 0)
    assert again["generated"] == 0 and again["already_done"] == s0["generated"] + s0["already_done"]


# --- publish --------------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_publish_recovers_a_swap_killed_between_its_renames(work):
    data = work / "hub" / "data"
    ref = _tree(data / DS)
    # the state a kill between the two renames of a non-exchanging swap leaves: only the old copy
    os.replace(data / DS, data / f".{DS}.old")
    # and a half-written copy of a killed run, plus a killed card write
    (data / f".{DS}.abc123.tmp").mkdir()
    (data / f".{DS}.abc123.tmp" / "photo-00000-of-00001.parquet").write_bytes(b"half")
    (work / "hub" / ".README.md.xyz.tmp").write_text("half")
    assert _quiet(["publish", "-w", str(work)]) == 0
    assert _tree(data / DS) == ref
    assert sorted(p.name for p in data.iterdir()) == [DS]
    assert not list((work / "hub").glob(".README.md.*"))


def test_publish_ignores_temp_files_of_a_killed_filter(work):
    (work / "chains" / f".{DS}.parquet.k1ll3d.parquet").write_bytes(b"not parquet")
    (work / "chains" / f".{DS}.rejects.parquet.k1ll3d.parquet").write_bytes(b"not parquet")
    assert _quiet(["publish", "-w", str(work)]) == 0
    assert sorted(p.name for p in (work / "hub" / "data").iterdir()) == [DS]


def test_swap_dir_exchanges_in_one_step(tmp_path):
    a, b = tmp_path / "new", tmp_path / "dest"
    a.mkdir()
    (a / "f").write_text("new")
    b.mkdir()
    (b / "f").write_text("old")
    fsutil.swap_dir(a, b)
    assert (b / "f").read_text() == "new" and not a.exists() and not (tmp_path / ".dest.old").exists()


# --- filter ---------------------------------------------------------------------------------


def _outputs(work: Path) -> dict[str, bytes]:
    out = {"chains": (work / "chains" / f"{DS}.parquet").read_bytes(),
           "rejects": (work / "chains" / f"{DS}.rejects.parquet").read_bytes()}
    out |= {f"report/{k}": v for k, v in _tree(work / "reports" / DS).items() if not k.startswith(".")}
    return out


@pytest.mark.parametrize("kill_after", [0, 1, 2])
def test_filter_outputs_are_one_unit_across_a_kill(work, monkeypatch, kill_after):
    """A kill after ``kill_after`` of the three moves: the next run finishes them (no mixed pair)."""
    old = _outputs(work)
    # a new generation round makes the next filter's outputs differ from the old ones
    assert _quiet(["generate", DS, "-w", str(work), "--teacher", "oracle", "--n", "4", "--no-progress"]) == 0
    real_swap = fsutil.swap_dir

    def killed_midway(journal):  # commit_moves' own call: the kill comes after `kill_after` moves
        for src, dest in json.loads(Path(journal).read_text())["moves"][:kill_after]:
            real_swap(src, dest) if Path(src).is_dir() else os.replace(src, dest)
        raise KeyboardInterrupt

    monkeypatch.setattr(fsutil, "recover_moves", killed_midway)
    with pytest.raises(KeyboardInterrupt), contextlib.redirect_stdout(io.StringIO()):
        filter_stage.run({"dataset": DS}, work)
    monkeypatch.undo()
    assert filter_stage.journal_path(work, DS).exists()
    # the next reader (publish) finishes the interrupted commit first: all new, nothing mixed
    assert _quiet(["publish", "-w", str(work)]) == 0
    new = _outputs(work)
    assert new["chains"] != old["chains"] and not filter_stage.journal_path(work, DS).exists()
    ref = work.parent / "ref"
    shutil.copytree(work, ref)
    assert _quiet(["filter", DS, "-w", str(ref)]) == 0
    assert _outputs(ref) == new  # exactly what one uninterrupted run writes
    leftovers = [p.name for p in (work / "chains").iterdir() if p.name.startswith(".")]
    leftovers += [p.name for p in (work / "reports").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_concurrent_filter_is_refused(work, holder, capsys):
    h = holder(work, f"filter-{DS}")
    assert main(["filter", DS, "-w", str(work)]) == 1
    assert f"PID {h.proc.pid}" in capsys.readouterr().err


# --- train's log ----------------------------------------------------------------------------


def test_train_log_is_trimmed_to_the_checkpoint_on_resume(tmp_path):
    pytest.importorskip("torch")
    from trainers.loop import trim_log

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    trim_log(log, 5)  # the checkpoint was taken after step 5: steps 6, 7 (and the torn 8) are replayed
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4, 5]
    trim_log(log, 0)  # a fresh start
    assert not log.exists()
