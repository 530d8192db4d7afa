"""FSDP / DeepSpeed training is refused (checkpoints save unsharded named_parameters() on rank 0).

FSDP needs several GPUs, which this suite cannot have: accelerate's Accelerator is replaced at that
boundary by a subclass that reports the FSDP distributed type; everything after it is the real loop.
"""

from __future__ import annotations

from pathlib import Path

import accelerate
import pytest
from accelerate.utils import DistributedType

from dbr_builder.errors import UserError
from trainers.loop import LoopConfig, train_stage


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_sharded_training_is_refused_before_any_step(kind, tmp_path: Path, monkeypatch) -> None:
    class Sharded(accelerate.Accelerator):
        @property
        def distributed_type(self):  # what accelerate reports under `accelerate launch --use_fsdp`
            return kind

        @distributed_type.setter
        def distributed_type(self, value) -> None:
            pass

    monkeypatch.setattr(accelerate, "Accelerator", Sharded)
    with pytest.raises(UserError, match=f"training under {kind.name} is not supported"):
        train_stage(None, None, [], LoopConfig(), tmp_path / "work")
    assert not (tmp_path / "work").exists()  # refused before writing anything
