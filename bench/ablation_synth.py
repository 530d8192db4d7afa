"""The paper's ablation in miniature (docs/RESULTS.md): classification-only vs reasoning-only vs MTCT vs
MTCT + SARR, the tiny student trained from scratch on CPU on the SynthShapes *shortcut* variant.

    .venv/bin/python bench/ablation_synth.py --out docs/ablation_synth.json --chart docs/ablation_synth.png

The benchmark (``dbr synth --variant shortcut``): four shapes drawn large on a background whose
colour agrees with the class with probability ``--agreement`` in the training domains and with
chance (1/4) in the held-out domain; the chains (``trainers.data.rows_from_synth``, the oracle
teacher's shape-only chains without injected errors) describe the outline, never the colours.
Every variant gets the same data, seeds and number of optimizer steps (MTCT + SARR splits them:
half for MTCT, the other half shared by the SARR rounds).

Per run it measures, on the held-out domain:
- direct: argmax over classes of log p(class name | image, q_cls) (``trainers.select`` scoring);
- reasoning: greedy chain with q_reason, ``<CONCLUSION>`` parsed and matched (unparseable = wrong);
  not measured for classification-only (it never learns to write a chain);
- shortcut reliance: direct (and reasoning) accuracy on the held-out images whose background
  points to a wrong class, and the share of those predicted as the class the background points to;
and on the training domains' ``out`` split (DomainBed's training-domain validation) direct accuracy.
SARR's rejection rate is recorded per round. Runs go to ``--jobs`` worker processes of one thread
each (on 2 shared cores two single-threaded workers beat one two-threaded process).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

VARIANTS = ("cls_only", "reason_only", "mtct", "mtct_sarr")
LABELS = {"cls_only": "classification only", "reason_only": "reasoning only", "mtct": "MTCT",
          "mtct_sarr": "MTCT + SARR"}
METRICS = ("heldout_direct", "heldout_reasoning", "val_direct", "conflict_direct", "conflict_reasoning",
           "conflict_follows_shortcut")


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _reasoning_ok(model, enc, examples, max_new_tokens: int) -> list[bool]:
    from trainers.sarr import SarrConfig, generate_with_model, judge

    sc = SarrConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=32)
    texts = generate_with_model(model, enc, examples, sc, seed=0)
    return [judge(t[0], ex.class_name, enc.classes) == "ok" for t, ex in zip(texts, examples, strict=True)]


def _mean(xs: list[bool]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def run_variant(task: dict) -> dict:
    """Train one (variant, seed) and measure it; ``task`` carries the data and settings."""
    import torch

    from trainers.data import SampleEncoder, examples_from_rows, group_by_domain, lodo_split, rows_from_synth
    from trainers.loop import train_stage
    from trainers.sarr import SarrConfig, generate_with_model, self_label
    from trainers.select import class_scores, validation_accuracy
    from trainers.train import _cfg, _loop_config, load_student

    a, variant, seed = task["args"], task["variant"], task["seed"]
    root = Path(task["root"])
    scenes = {json.loads(line)["path"]: json.loads(line) for line in open(root / "scenes.jsonl", encoding="utf-8")}
    by_domain = group_by_domain(examples_from_rows(rows_from_synth(root)))
    train, val, _ = lodo_split(by_domain, a["heldout"])
    test = by_domain[a["heldout"]]
    classes = sorted({e.class_name for e in train})
    tasks = {"cls_only": ["cls"], "reason_only": ["reason"]}.get(variant, ["cls", "reason"])
    # Exact step budgets: epochs set high enough, max_steps caps them (same steps for every variant).
    c = _cfg({"finetune": "full", "batch_size": a["batch_size"], "micro_batch_size": a["batch_size"],
              "epochs": 1000, "max_steps": a["steps"], "tasks": tasks, "checkpoint_every": 10**6,
              "optim": {"lr": a["lr"], "warmup_ratio": 0.05, "betas": [0.9, a["beta2"]]}})
    torch.manual_seed(seed)
    processor, model = load_student(task["student"], c, torch.device("cpu"))
    enc = SampleEncoder(processor, classes, max_length=a["max_length"])
    lc = _loop_config(c, seed)
    work = Path(task["work"]) / f"{variant}-{seed}"
    quiet = lambda *_: None  # noqa: E731
    t0 = time.perf_counter()
    rounds = a["sarr_rounds"] if variant == "mtct_sarr" else 0
    if rounds:
        lc.max_steps = a["steps"] // 2  # same total steps: half MTCT, half shared by the rounds
    train_stage(model, enc, train, lc, work / "mtct", resume=False, desc=variant, log=quiet)
    rejection = []
    if rounds:
        sc = SarrConfig(n=1, temperature=0.0, max_new_tokens=a["max_new_tokens"], batch_size=32)
        lc.max_steps = (a["steps"] - a["steps"] // 2) // rounds
        for r in range(1, rounds + 1):
            data, stats, _ = self_label(train, classes, lambda exs: generate_with_model(model, enc, exs, sc, seed), sc)
            rejection.append(stats["rejection_rate"])
            if data:  # as the train stage: a round with no correct self chain keeps the previous weights
                train_stage(model, enc, data, lc, work / f"sarr{r}", resume=False, desc=f"sarr{r}", log=quiet)
    train_secs = time.perf_counter() - t0

    pred = class_scores(model, enc, test).argmax(1).tolist()
    direct = [classes[p] == ex.class_name for p, ex in zip(pred, test, strict=True)]
    conflict = [i for i, ex in enumerate(test) if scenes[ex.image_id]["spurious_class"] != ex.class_name]
    reason = _reasoning_ok(model, enc, test, a["max_new_tokens"]) if variant != "cls_only" else None
    out = {
        "variant": variant, "seed": seed,
        "heldout_direct": _mean(direct),
        "heldout_reasoning": _mean(reason) if reason is not None else None,
        "val_direct": validation_accuracy(model, enc, val)["accuracy"],
        "conflict_direct": _mean([direct[i] for i in conflict]),
        "conflict_reasoning": _mean([reason[i] for i in conflict]) if reason is not None else None,
        "conflict_follows_shortcut": _mean([classes[pred[i]] == scenes[test[i].image_id]["spurious_class"]
                                            for i in conflict]),
        "conflict_images": len(conflict),
        "sarr_rejection_rate": rejection or None,
        "train_seconds": round(train_secs, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    return out


def _stat(xs: list[float | None]) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return {"mean": statistics.mean(xs), "se": sd / math.sqrt(len(xs)), "sd": sd, "n": len(xs)}


def summarize(results: list[dict], variants: list[str]) -> dict:
    """Mean, standard error and sd over seeds of every metric; SARR rejection rate per round."""
    out = {}
    for v in variants:
        rs = [r for r in results if r["variant"] == v]
        s = {m: _stat([r[m] for r in rs]) for m in METRICS}
        rounds = [r["sarr_rejection_rate"] for r in rs if r["sarr_rejection_rate"]]
        if rounds:
            s["sarr_rejection_rate"] = [_stat([rr[k] for rr in rounds]) for k in range(len(rounds[0]))]
        out[v] = s
    return out


def chart(summary: dict, chance: float, path: Path, title: str) -> None:
    """Grouped bars (mean +- SE over seeds) per variant, and SARR rejection per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [("heldout_direct", "held-out, direct"), ("heldout_reasoning", "held-out, reasoning"),
             ("conflict_direct", "held-out, background misleads (direct)"), ("val_direct", "training-domain val")]
    variants = list(summary)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    w = 0.8 / len(shown)
    for k, (m, label) in enumerate(shown):
        xs = [i + (k - (len(shown) - 1) / 2) * w for i in range(len(variants))]
        st = [summary[v][m] for v in variants]
        ax.bar(xs, [100 * s["mean"] if s else 0 for s in st], w, yerr=[100 * s["se"] if s else 0 for s in st],
               label=label, capsize=3)
    ax.axhline(100 * chance, color="k", ls="--", lw=1, label=f"chance ({100 * chance:.0f} %)")
    ax.set_xticks(range(len(variants)), [LABELS.get(v, v) for v in variants])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    rej = summary.get("mtct_sarr", {}).get("sarr_rejection_rate") or []
    ax2.bar(range(1, len(rej) + 1), [100 * r["mean"] for r in rej], yerr=[100 * r["se"] for r in rej], capsize=3)
    ax2.set_xticks(range(1, len(rej) + 1))
    ax2.set_xlabel("SARR round")
    ax2.set_ylabel("rejection rate (%)")
    ax2.set_ylim(0, 100)
    ax2.set_title("SARR rejection (no correct self chain)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--heldout", default="cartoon")
    p.add_argument("--agreement", type=float, default=0.9, help="background-class agreement in the training domains")
    p.add_argument("--per-class", type=int, default=16, help="images per class and domain (the in split trains)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per variant (MTCT + SARR splits them)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (chosen on training-domain validation)")
    p.add_argument("--sarr-rounds", type=int, default=1)
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--max-new-tokens", type=int, default=144, help="a whole shape chain (100-125 tokens) + <|im_end|>")
    p.add_argument("--tower", default="shapes", help="tiny student's vision tower (trainers.tiny_model.TOWERS)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    p.add_argument("--out", type=Path, default=Path("docs/ablation_synth.json"))
    p.add_argument("--chart", type=Path, default=None, help="PNG chart (default: --out with .png)")
    args = p.parse_args()

    from dbr_builder.stages.synth import DOMAINS, write_synthshapes
    from trainers.tiny_model import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="ablation-"))
    t0 = time.perf_counter()
    agreement = {d: args.agreement for d in DOMAINS if d != args.heldout}  # held-out: chance
    root = write_synthshapes(tmp / "raw", seed=0, per_class=args.per_class, image_size=args.image_size,
                             variant="shortcut", spurious={"attribute": "background", "agreement": agreement})
    student = str(build_tiny_model(tower=args.tower))  # the user cache: the tower is pretrained once
    tasks = [{"args": vars(args) | {"out": None, "chart": None}, "variant": v, "seed": s, "root": str(root),
              "student": student, "work": str(tmp / "runs")} for s in args.seeds for v in args.variants]
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker) as pool:
        for r in pool.map(run_variant, tasks):
            print(json.dumps(r), flush=True)
            results.append(r)
    summary = summarize(results, args.variants)
    classes = sorted({json.loads(line)["class_name"] for line in open(root / "scenes.jsonl", encoding="utf-8")})
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "classes": classes, "chance": 1 / len(classes), "spurious_agreement": agreement,
           "results": results, "summary": summary, "total_seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    chart(summary, 1 / len(classes), args.chart or args.out.with_suffix(".png"),
          f"SynthShapes shortcut variant, held-out {args.heldout}, {len(args.seeds)} seeds (mean ± SE)")
    print(json.dumps({v: {m: s and round(s["mean"], 3) for m, s in summary[v].items() if m in METRICS}
                      for v in summary}, indent=2))
    print(f"total {out['total_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
