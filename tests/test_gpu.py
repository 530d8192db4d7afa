"""GPU checks (skipped without CUDA): the tiny student trains on the GPU and matches its CPU loss."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def examples(synth_root):
    from trainers.data import examples_from_rows, rows_from_synth

    exs = examples_from_rows(rows_from_synth(synth_root / "SynthShapes"))
    return [e for e in exs if e.dg_split == "in"][::8][:8]


def _loss_after_steps(path, examples, device: str, work) -> list[float]:
    from trainers.data import SampleEncoder
    from trainers.loop import LoopConfig, train_stage
    from trainers.train import _cfg, load_student

    torch.manual_seed(0)
    processor, model = load_student(str(path), _cfg({"precision": "fp32"}), torch.device(device))
    enc = SampleEncoder(processor, sorted({e.class_name for e in examples} | {"hexagon", "star"}))
    lc = LoopConfig(lr=1e-2, batch_size=4, micro_batch_size=2, epochs=1, warmup_ratio=0.0, max_steps=3,
                    precision="fp32")
    return train_stage(model, enc, examples, lc, work).losses


def test_tiny_student_trains_on_gpu_like_on_cpu(tiny_model_path, examples, tmp_path) -> None:
    gpu = _loss_after_steps(tiny_model_path, examples, "cuda", tmp_path / "gpu")
    cpu = _loss_after_steps(tiny_model_path, examples, "cpu", tmp_path / "cpu")
    assert all(x == x for x in gpu) and len(gpu) == 3
    # same seed, same data, fp32 on both: the first loss agrees to float tolerance
    assert abs(gpu[0] - cpu[0]) < 1e-3 * max(1.0, abs(cpu[0]))
