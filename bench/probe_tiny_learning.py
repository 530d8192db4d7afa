"""Probe: can the tiny student learn SynthShapes from scratch on CPU, and how fast?

Trains the tiny student (full fine-tune, the real trainer loop) on the `in` split of the training
domains and reports accuracy on training images and on the training domains' `out` split
(DomainBed's training-domain validation; class-name log-likelihood scoring, as in model
selection). Held-out-domain accuracy is printed only with ``--report-heldout``: settings are
chosen on training-domain validation alone (docs/RESULTS.md).

    .venv/bin/python bench/probe_tiny_learning.py --per-class 20 --epochs 40 --lr 2e-3
    .venv/bin/python bench/probe_tiny_learning.py --variant shortcut --tower '{"patch_size": 7}' --epochs 8
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
    p.add_argument("--variant", default="classic", choices=["classic", "shortcut"])
    p.add_argument("--agreement", type=float, default=None,
                   help="shortcut: spurious agreement in the training domains (held-out: chance)")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=float, default=40)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")
    p.add_argument("--warmup", type=float, default=0.05, help="warmup share of the steps")
    p.add_argument("--tasks", default="cls", help="comma-separated: cls, reason")
    p.add_argument("--heldout", default="sketch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tower", default="default", help="a tower name of trainers.tiny_model.TOWERS or JSON overrides")
    p.add_argument("--report-heldout", action="store_true", help="also score the held-out domain")
    a = p.parse_args()

    import torch

    from dbr_builder.stages.synth import DOMAINS, write_synthshapes
    from trainers.data import SampleEncoder, examples_from_rows, group_by_domain, lodo_split, rows_from_synth
    from trainers.loop import train_stage
    from trainers.select import validation_accuracy
    from trainers.tiny_model import build_tiny_model
    from trainers.train import _cfg, _loop_config, load_student

    tower = json.loads(a.tower) if a.tower.startswith("{") else a.tower
    tmp = Path(tempfile.mkdtemp(prefix="probe-"))
    extra = {}
    if a.variant == "shortcut":
        agree = {d: a.agreement for d in DOMAINS if d != a.heldout} if a.agreement is not None else {}
        extra = {"variant": "shortcut", "spurious": {"attribute": "background", "agreement": agree}}
    root = write_synthshapes(tmp / "raw", seed=0, per_class=a.per_class, image_size=a.image_size, **extra)
    by = group_by_domain(examples_from_rows(rows_from_synth(root)))
    train, val, _ = lodo_split(by, a.heldout)
    classes = sorted({e.class_name for e in train})
    c = _cfg({"finetune": "full", "batch_size": a.batch_size, "micro_batch_size": a.batch_size, "epochs": a.epochs,
              "tasks": a.tasks.split(","), "optim": {"lr": a.lr, "warmup_ratio": a.warmup, "betas": [0.9, a.beta2]}})
    torch.manual_seed(a.seed)
    processor, model = load_student(str(build_tiny_model(tmp / "tiny", tower=tower)), c, torch.device("cpu"))
    enc = SampleEncoder(processor, classes, max_length=512)
    t0 = time.perf_counter()
    r = train_stage(model, enc, train, _loop_config(c, a.seed), tmp / "work", resume=False, log=lambda *_: None)
    secs = time.perf_counter() - t0
    sample = random.Random(0).sample(train, min(96, len(train)))
    out = {"args": vars(a), "steps": r.steps, "train_seconds": round(secs, 1),
           "loss_curve": [round(sum(r.losses[i:i + 10]) / len(r.losses[i:i + 10]), 3) for i in range(0, len(r.losses), 10)], "train_accuracy": validation_accuracy(model, enc, sample)["accuracy"],
           "val_accuracy": validation_accuracy(model, enc, val)["accuracy"]}
    if a.report_heldout:
        out["heldout_accuracy"] = validation_accuracy(model, enc, by[a.heldout])["accuracy"]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
