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
