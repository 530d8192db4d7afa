"""Every stage's outputs follow the user's umask (labmates on a shared cluster can read them).

The whole small pipeline (synth, index, generate, filter, publish, train on the tiny student,
eval, view) runs in a child process under umask 022 and then 002; every file and folder it leaves
in the work directory must have mode 0666 / 0777 less the umask (``mkstemp``/``mkdtemp`` alone
would give 0600 / 0700).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_demo import demo_pipeline

# Files that are meant to be executable (none today); everything else is a data file.
EXECUTABLE: set[str] = set()


def _pipeline(tmp_path: Path) -> Path:
    """pipelines/demo.yaml, as small as it goes: 2 images per class, 1 training step, no SARR round."""
    # the plain tiny student: the shipped tiny:shapes pretrains its tower per workdir (~2 min),
    # which a file-mode test does not need (tests/test_demo.py runs the shipped student)
    return demo_pipeline(tmp_path, {
        "synth": {"per_class": 2}, "generate": {"n": 2}, "eval": {"student_modes": ["direct"]},
        "train": {"student": "tiny", "max_steps": 1, "batch_size": 8, "micro_batch_size": 8,
                  "sarr": {"rounds": 0}, "select": {"max_images": 4}}})


def _bad_modes(root: Path, umask: int) -> list[str]:
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    bad = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            rel = p.relative_to(root).as_posix()
            if stat.S_ISDIR(st.st_mode):
                want = want_dir
            else:
                want = want_dir if rel in EXECUTABLE else want_file
            if mode != want:
                bad.append(f"{rel}: {oct(mode)} (want {oct(want)})")
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_stage_output_follows_the_umask(tmp_path: Path, umask: int) -> None:
    pipe = _pipeline(tmp_path)
    wd = tmp_path / "w"
    env = {**os.environ, "DBR_CACHE_DIR": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    code = ("import sys; from pathlib import Path; from dbr_builder.pipeline import run_pipeline; "
            "from dbr_builder.stages import view; "
            "run_pipeline(sys.argv[1], sys.argv[2]); view.run({'stage': 'view'}, Path(sys.argv[2]))")
    r = subprocess.run([sys.executable, "-c", code, str(pipe), str(wd)], env=env, capture_output=True, text=True,
                       preexec_fn=lambda: os.umask(umask), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # every stage left something behind
    for sub in ("raw", "manifest", "generations", "chains", "reports", "hub/data", "runs", "models", "view"):
        assert (wd / sub).exists(), sub
    assert list((wd / "runs").glob("*/SynthShapes/*/seed*/final/student.json"))
    assert list((wd / "runs").glob("*/eval/results.md"))
    assert list((wd / "runs").glob("*/SynthShapes/*/seed*/tensorboard/mtct/events.out.tfevents.*"))
    bad = _bad_modes(wd, umask) + _bad_modes(tmp_path / "cache", umask)
    assert not bad, f"umask {oct(umask)}: " + "; ".join(bad[:40])


def test_atomic_dir_fixes_files_libraries_wrote_privately(tmp_path: Path) -> None:
    """safetensors writes 0600; atomic_dir gives the umask's modes before the swap, but never changes a
    file that is hard-linked from outside (its mode is the source's too) or a symlink's target."""
    from dbr_builder.core.fsutil import atomic_dir

    outside = tmp_path / "theirs.bin"
    outside.write_bytes(b"x")
    outside.chmod(0o600)
    old = os.umask(0o002)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "model.safetensors").write_bytes(b"w")
            (tmp / "model.safetensors").chmod(0o600)
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
            os.link(outside, tmp / "linked.bin")
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o664
    assert stat.S_IMODE((out / "run.sh").stat().st_mode) == 0o775
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o775 and stat.S_IMODE(out.stat().st_mode) == 0o775
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # the hard-linked source is not touched
