"""The paper's ablation in miniature (docs/RESULTS.md): classification-only vs reasoning-only vs MTCT vs
MTCT+SARR, the tiny student trained from scratch on CPU on SynthShapes, one held-out domain, same
data, seeds and step budget; held-out-domain accuracy, mean over seeds.

    .venv/bin/python bench/ablation_synth.py --seeds 0 1 2 --out docs/ablation_synth.json

Held-out accuracy is measured two ways on the held-out domain:
- direct: argmax over classes of log p(class name | image, q_cls)  (trainers.select scoring);
- reasoning: greedy generation with q_reason, the `<CONCLUSION>` parsed and matched to a class
  (an unparseable chain counts as wrong).
Chains are true chains written from the scene attributes (trainers.data.rows_from_synth).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def reasoning_accuracy(model, encoder, examples, max_new_tokens: int) -> float:
    from trainers.sarr import SarrConfig, generate_with_model, judge

    sc = SarrConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=32)
    texts = generate_with_model(model, encoder, examples, sc, seed=0)
    ok = [judge(t[0], ex.class_name, encoder.classes) == "ok" for t, ex in zip(texts, examples, strict=True)]
    return sum(ok) / len(ok)


def run_variant(variant: str, seed: int, by_domain, heldout: str, student: str, args, work: Path) -> dict:
    import torch

    from trainers.data import SampleEncoder, lodo_split
    from trainers.loop import train_stage
    from trainers.sarr import SarrConfig, generate_with_model, self_label
    from trainers.select import validation_accuracy
    from trainers.train import _cfg, _loop_config, load_student

    train, val, _ = lodo_split(by_domain, heldout)
    test = by_domain[heldout]
    classes = sorted({e.class_name for e in train})
    tasks = {"cls_only": ["cls"], "reason_only": ["reason"]}.get(variant, ["cls", "reason"])
    c = _cfg({"finetune": args.finetune, "batch_size": args.batch_size, "micro_batch_size": args.batch_size,
              "epochs": args.epochs, "tasks": tasks, "optim": {"lr": args.lr, "warmup_ratio": 0.05},
              "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "modules_to_save": args.modules_to_save}})
    torch.manual_seed(seed)
    processor, model = load_student(student, c, torch.device("cpu"))
    enc = SampleEncoder(processor, classes, max_length=512)
    lc = _loop_config(c, seed)
    t0 = time.perf_counter()
    quiet = lambda *_: None  # noqa: E731
    if variant == "mtct_sarr":
        # Same total budget as the others: the MTCT epochs are split between MTCT and one SARR round.
        lc.epochs = args.epochs / 2
    train_stage(model, enc, train, lc, work / f"{variant}-{seed}-a", resume=False, desc=variant, log=quiet)
    sarr_stats = None
    if variant == "mtct_sarr":
        sc = SarrConfig(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens, batch_size=32)
        data, sarr_stats, _ = self_label(train, classes, lambda exs: generate_with_model(model, enc, exs, sc, seed), sc)
        train_stage(model, enc, data, lc, work / f"{variant}-{seed}-b", resume=False, desc="sarr1", log=quiet)
    secs = time.perf_counter() - t0
    direct = validation_accuracy(model, enc, test)["accuracy"]
    # Training-domain `out` rows (unseen images of the seen domains): did the student learn at all?
    val_direct = validation_accuracy(model, enc, val)["accuracy"]
    reason = reasoning_accuracy(model, enc, test, args.max_new_tokens)
    return {"variant": variant, "seed": seed, "direct": direct, "reasoning": reason, "val_direct": val_direct, "train_seconds": round(secs, 1),
            "sarr_rejection_rate": sarr_stats["rejection_rate"] if sarr_stats else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["cls_only", "reason_only", "mtct", "mtct_sarr"])
    p.add_argument("--heldout", default="sketch")
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=float, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--finetune", choices=["lora", "full"], default="full")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--modules-to-save", nargs="*", default=None)
    # Scene chains are at most 96 tokens with the tiny tokenizer, +1 for <|im_end|>: 128 fits them.
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("docs/ablation_synth.json"))
    args = p.parse_args()

    from dbr_builder.stages.synth import write_synthshapes
    from trainers.data import examples_from_rows, group_by_domain, rows_from_synth
    from trainers.tiny_model import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="ablation-"))
    root = write_synthshapes(tmp / "raw", seed=0, per_class=args.per_class, image_size=args.image_size)
    by_domain = group_by_domain(examples_from_rows(rows_from_synth(root)))
    student = str(build_tiny_model(tmp / "tiny"))
    results = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        for v in args.variants:
            r = run_variant(v, seed, by_domain, args.heldout, student, args, tmp / "runs")
            print(json.dumps(r), flush=True)
            results.append(r)
    summary = {}
    for v in args.variants:
        rs = [r for r in results if r["variant"] == v]
        summary[v] = {k: {"mean": statistics.mean(r[k] for r in rs),
                          "std": statistics.pstdev(r[k] for r in rs)} for k in ("direct", "reasoning", "val_direct")}
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "results": results, "summary": summary, "total_seconds": round(time.perf_counter() - t0, 1),
           "train_images": sum(len([e for e in exs if e.dg_split == "in"]) for d, exs in by_domain.items() if d != args.heldout),
           "test_images": len(by_domain[args.heldout])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
