"""Training loop: only LoRA weights move; a killed stage resumes from its checkpoint exactly."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def examples(synth_root):
    from trainers.data import examples_from_rows, rows_from_synth

    exs = examples_from_rows(rows_from_synth(synth_root / "SynthShapes"))
    return [e for e in exs if e.dg_split == "in"][::8][:8]


def _student(path, seed=0):
    from trainers.train import _cfg, load_student

    torch.manual_seed(seed)  # LoRA A matrices are random: same seed, same start
    processor, model = load_student(str(path), _cfg({"lora": {"dropout": 0.1}}), torch.device("cpu"))
    return processor, model


def _lc(**kw):
    from trainers.loop import LoopConfig

    base = dict(lr=1e-2, batch_size=4, micro_batch_size=2, epochs=1, warmup_ratio=0.0, checkpoint_every=2)
    return LoopConfig(**{**base, **kw})


def _encoder(processor, examples):
    from trainers.data import SampleEncoder

    return SampleEncoder(processor, sorted({e.class_name for e in examples} | {"hexagon", "star"}))


@pytest.mark.slow
def test_only_lora_parameters_change(tiny_model_path, examples, tmp_path):
    from trainers.loop import train_stage

    processor, model = _student(tiny_model_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train_stage(model, _encoder(processor, examples), examples, _lc(max_steps=2), tmp_path / "w")
    assert res.steps == 2 and len(res.losses) == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed, "nothing was trained"
    assert changed <= trainable and all("lora_" in n for n in trainable)
    # After two AdamW steps every LoRA matrix (A needs B != 0 first) has moved.
    assert changed == trainable
    assert (tmp_path / "w" / "checkpoint" / "state.json").exists()
    assert len((tmp_path / "w" / "log.jsonl").read_text().splitlines()) == 2


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_killed_stage_resumes_from_checkpoint(tiny_model_path, examples, tmp_path):
    """Kill after step 3 (last checkpoint at step 2): the rerun continues at step 2 and ends exactly
    where an uninterrupted run ends (data order, optimizer, scheduler and RNG all restored)."""
    from trainers.loop import train_stage, trainable_state

    lc = _lc(epochs=2, batch_size=2, micro_batch_size=1)  # 4 images, 2 per step -> 4 steps over two epochs
    examples = examples[:4]
    processor, model = _student(tiny_model_path)
    enc = _encoder(processor, examples)
    train_stage(model, enc, examples, lc, tmp_path / "full")
    reference = trainable_state(model)

    processor, model = _student(tiny_model_path)

    def kill(step):
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train_stage(model, enc, examples, lc, tmp_path / "killed", on_step=kill)
    import json

    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["step"] == 2

    processor, model = _student(tiny_model_path, seed=123)  # fresh process: different LoRA init
    messages = []
    res = train_stage(model, enc, examples, lc, tmp_path / "killed", log=messages.append)
    assert res.resumed_from == 2 and len(res.losses) == 2
    assert any("resuming from checkpoint at step 2" in m for m in messages)
    got = trainable_state(model)
    assert got.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(got[k], reference[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_checkpoint_swap_survives_a_crash_between_renames(tiny_model_path, examples, tmp_path):
    """If only the previous checkpoint (moved aside) exists, it is the one that is loaded."""
    import os

    from trainers.loop import find_checkpoint, train_stage

    processor, model = _student(tiny_model_path)
    w = tmp_path / "w"
    train_stage(model, _encoder(processor, examples[:2]), examples[:2], _lc(max_steps=1, batch_size=2), w)
    os.replace(w / "checkpoint", w / ".checkpoint.old")
    assert find_checkpoint(w) == w / ".checkpoint.old"


def test_step_plan_is_deterministic_and_covers_every_image():
    from trainers.loop import LoopConfig, micro_batches, plan_steps, step_images

    lc = LoopConfig(batch_size=5, micro_batch_size=2, epochs=2, seed=3)
    bs, per_epoch, total = plan_steps(12, lc)
    assert (bs, per_epoch, total) == (5, 3, 6)
    epoch0 = [i for s in range(per_epoch) for i in step_images(12, lc, s)]
    assert sorted(epoch0) == list(range(12))
    assert step_images(12, lc, 4) == step_images(12, lc, 4)
    # Two ranks: equal shares and equally many micro-batches.
    idx = step_images(12, LoopConfig(batch_size=6, micro_batch_size=2), 0, world=2)
    r0, r1 = micro_batches(idx, LoopConfig(micro_batch_size=2), 0, 2), micro_batches(idx, LoopConfig(micro_batch_size=2), 1, 2)
    assert len(r0) == len(r1) == 2 and sorted(sum(r0 + r1, [])) == sorted(idx)
