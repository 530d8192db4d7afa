"""Shared fixtures: a small SynthShapes tree and the tiny student model, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SynthShapes tree (4 domains x 6 classes x 4 images); returns the data root."""
    from dbr_builder.stages.synth import write_synthshapes

    root = tmp_path_factory.mktemp("raw")
    write_synthshapes(root, seed=0, per_class=4)
    return root


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir through `publish` on SynthShapes (2 images per class, oracle teacher); read only.

    Modules that need other sizes define their own ``built`` (test_cli_errors.py).
    """
    import contextlib
    import io

    from dbr_builder.cli import main

    w = tmp_path_factory.mktemp("w")
    ds = "SynthShapes"
    for argv in (["synth", "--root", str(w / "raw"), "--per-class", "2", "--image-size", "32"],
                 ["index", ds, "--root", str(w / "raw"), "-w", str(w), "--workers", "1"],
                 ["generate", ds, "-w", str(w), "--teacher", "oracle", "--n", "2", "--no-progress"],
                 ["filter", ds, "-w", str(w)],
                 ["publish", "-w", str(w)]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(argv) == 0, argv
    return w


@pytest.fixture
def work(built: Path, tmp_path: Path) -> Path:
    """A private copy of ``built`` (tests may break it); the manifest's root still points at built/raw."""
    import shutil

    w = tmp_path / "w"
    shutil.copytree(built, w, symlinks=True)
    return w


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2-VL-family student, built from a config with a locally trained tokenizer."""
    from trainers.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when no CUDA device is visible (CI and dev machines)."""
    gpu_items = [it for it in items if it.get_closest_marker("gpu")]
    if not gpu_items:
        return
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
        for it in gpu_items:
            it.add_marker(skip)
