"""Probe: can the tiny student learn SynthShapes classification from scratch on CPU?

Trains the tiny student (full fine-tune, classification task only, the real trainer loop) on the
`in` split of three SynthShapes domains and reports training-image and held-out-domain accuracy
(class-name log-likelihood scoring, as in model selection). Used for docs/RESULTS.md.

    .venv/bin/python bench/probe_tiny_learning.py --per-class 20 --epochs 40 --lr 2e-3
    .venv/bin/python bench/probe_tiny_learning.py --per-class 20 --epochs 40 --lr 2e-3 --vision-depth 4 --vision-hidden 128
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=float, default=40)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tasks", default="cls", help="comma-separated: cls, reason")
    p.add_argument("--heldout", default="sketch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vision-depth", type=int, default=None, help="override the tiny vision tower's depth")
    p.add_argument("--vision-hidden", type=int, default=None, help="override the tiny vision tower's width")
    a = p.parse_args()

    import torch

    import trainers.tiny_model as tm
    from dbr_builder.stages.synth import write_synthshapes
    from trainers.data import SampleEncoder, examples_from_rows, group_by_domain, lodo_split, rows_from_synth
    from trainers.loop import train_stage
    from trainers.select import validation_accuracy
    from trainers.train import _cfg, _loop_config, load_student

    if a.vision_depth or a.vision_hidden:
        h = a.vision_hidden or tm.VISION_CONFIG["hidden_size"]
        d = a.vision_depth or tm.VISION_CONFIG["depth"]
        tm.VISION_CONFIG.update(depth=d, hidden_size=h, intermediate_size=2 * h, num_heads=max(2, h // 32),
                                fullatt_block_indexes=list(range(1, d, 2)))
    tmp = Path(tempfile.mkdtemp(prefix="probe-"))
    root = write_synthshapes(tmp / "raw", seed=0, per_class=a.per_class, image_size=a.image_size)
    by = group_by_domain(examples_from_rows(rows_from_synth(root)))
    train, _, _ = lodo_split(by, a.heldout)
    classes = sorted({e.class_name for e in train})
    c = _cfg({"finetune": "full", "batch_size": 16, "micro_batch_size": 16, "epochs": a.epochs,
              "tasks": a.tasks.split(","), "optim": {"lr": a.lr, "warmup_ratio": 0.05}})
    torch.manual_seed(a.seed)
    processor, model = load_student(str(tm.build_tiny_model(tmp / "tiny")), c, torch.device("cpu"))
    enc = SampleEncoder(processor, classes, max_length=512)
    t0 = time.perf_counter()
    r = train_stage(model, enc, train, _loop_config(c, a.seed), tmp / "work", resume=False, log=lambda *_: None)
    sample = random.Random(0).sample(train, min(96, len(train)))
    out = {"args": vars(a), "steps": r.steps, "train_seconds": round(time.perf_counter() - t0, 1),
           "final_loss": r.losses[-1], "train_accuracy": validation_accuracy(model, enc, sample)["accuracy"],
           "heldout_accuracy": validation_accuracy(model, enc, by[a.heldout])["accuracy"]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
