"""The training loop of one stage (MTCT or one SARR round): our own loop on accelerate.

Why not ``transformers.Trainer``: the MTCT objective is a mean over *images* of a per-image sum of
two differently normalised sequence losses, and the effective batch (128 images) is split into
micro-batches and devices. Getting that exactly right in Trainer means overriding ``compute_loss``,
the ``num_items_in_batch`` scaling, the sampler (two samples of an image must stay together), and
checkpointing (Trainer saves the whole model, 16 GB for an 8B student, when only LoRA weights
change); SARR also interleaves generation between stages. A ~200-line loop on accelerate keeps the
loss exact (each micro-batch is scaled by its share of the step's images), runs unchanged under
``accelerate launch`` / ``torchrun`` (DDP), and checkpoints only what changes: trainable weights,
optimizer, scheduler, RNG and step, written atomically.

Data order is a pure function of (seed, epoch), so a resumed run sees exactly the batches the
killed run would have seen.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dbr_builder.core.fsutil import atomic_dir, naming, remove_temps, write_text_atomic
from dbr_builder.errors import UserError
from trainers.data import KIND_CLS, KIND_REASON, Example, SampleEncoder, collate, pad_token_id
from trainers.loss import AnswerNLL, per_image_loss
from trainers.tracking import step_metrics

CKPT = "checkpoint"


@dataclass
class LoopConfig:
    """Optimisation settings of one stage (pipelines/train_mtct_sarr.yaml, `optim:` and friends)."""

    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: str = "cosine"  # any transformers.get_scheduler name
    warmup_ratio: float = 0.03
    batch_size: int = 128  # images per optimizer step, all devices and micro-batches together
    micro_batch_size: int = 4  # images per forward pass on one device (2 sequences each)
    epochs: float = 3.0
    max_steps: int | None = None
    seed: int = 0
    max_grad_norm: float | None = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    gradient_checkpointing: bool | str = "auto"  # auto = on with a GPU
    checkpoint_every: int = 50  # optimizer steps between checkpoints (and at each epoch end)
    num_workers: int = 0  # DataLoader workers that run the processor
    tasks: tuple[str, ...] = ("cls", "reason")
    fast_head: bool = True  # LM head on answer positions only
    log_every: int = 10
    # Refuse a stage once more than this share of its samples had their answer cut by max_length
    # (checked from the 64th sample on, and at the end); None = never refuse (still counted).
    max_truncated_fraction: float | None = 0.05

    def mixed_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if torch.cuda.is_available() else "no"
        return {"fp32": "no"}.get(self.precision, self.precision)


@dataclass
class StageResult:
    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    tokens: int = 0
    samples: int = 0
    truncated_samples: int = 0
    truncated_tokens: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "samples": self.samples,
            "truncated_samples": self.truncated_samples,
            "truncated_tokens": self.truncated_tokens,
            "resumed_from_step": self.resumed_from,
            "final_loss": self.losses[-1] if self.losses else None,
            "first_loss": self.losses[0] if self.losses else None,
            "seconds": round(self.seconds, 2),
            "images_per_s": round(self.images / self.seconds, 3) if self.seconds else None,
            "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else None,
        }


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of example indices used in ``epoch`` (deterministic)."""
    return np.random.RandomState((seed * 100003 + epoch) % 2**31).permutation(n)


def plan_steps(n: int, lc: LoopConfig, world: int = 1) -> tuple[int, int, int]:
    """(images per step, steps per epoch, total steps)."""
    if n == 0:
        raise ValueError("no training examples")
    bs = min(lc.batch_size, n)
    bs = max(world, bs - bs % world)  # every rank gets the same number of images
    per_epoch = math.ceil(n / bs)
    total = max(1, math.ceil(lc.epochs * per_epoch))
    if lc.max_steps is not None:
        total = min(total, lc.max_steps)
    return bs, per_epoch, total


def step_images(n: int, lc: LoopConfig, step: int, world: int = 1) -> list[int]:
    """Example indices of optimizer step ``step`` (all ranks)."""
    bs, per_epoch, _ = plan_steps(n, lc, world)
    epoch, k = divmod(step, per_epoch)
    idx = epoch_order(n, lc.seed, epoch)[k * bs : (k + 1) * bs].tolist()
    return idx[: len(idx) - len(idx) % world] if len(idx) >= world else idx


def micro_batches(idx: Sequence[int], lc: LoopConfig, rank: int, world: int) -> list[list[int]]:
    """This rank's share of a step, split in equally many micro-batches on every rank."""
    share = list(idx[rank::world])
    n_micro = max(1, math.ceil(len(idx) / world / lc.micro_batch_size))
    return [part.tolist() for part in np.array_split(np.array(share, dtype=np.int64), n_micro) if len(part)]


# ---------------------------------------------------------------------------------------------
# checkpoints


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (LoRA weights, or everything when fully fine-tuning)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"checkpoint has parameters the model lacks (e.g. {missing[0]}); wrong base model?")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(work: Path, model: Any, optimizer: Any, scheduler: Any, step: int, meta: dict[str, Any]) -> Path:
    """Write ``work/checkpoint`` atomically: built beside it, then swapped in by renames."""
    work.mkdir(parents=True, exist_ok=True)
    dest = work / CKPT
    with naming(dest), atomic_dir(dest) as tmp:  # a full disk: one line naming the checkpoint
        torch.save(trainable_state(model), tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2, sort_keys=True))
    return dest


def find_checkpoint(work: Path) -> Path | None:
    """The last complete checkpoint (the previous one if a crash hit between the two renames)."""
    for cand in (work / CKPT, work / f".{CKPT}.old"):
        if (cand / "state.json").exists():
            return cand
    return None


def load_checkpoint(ckpt: Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    """Restore a checkpoint into live objects; return the step it was taken after."""
    load_trainable_state(model, torch.load(ckpt / "trainable.pt", map_location="cpu"))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
    return int(json.loads((ckpt / "state.json").read_text())["step"])


# ---------------------------------------------------------------------------------------------


def trim_log(log_path: Path, last_step: int) -> None:
    """Keep only the records of steps ``<= last_step`` in ``log.jsonl`` (atomically).

    A run killed after logging steps past its last checkpoint replays them on resume; without
    this, those steps would be logged twice. A torn last line (killed mid-write) is dropped.
    """
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= last_step:
            keep.append(line + "\n")
    if keep:
        write_text_atomic(log_path, "".join(keep))
    else:
        log_path.unlink()


def use_gradient_checkpointing(lc: LoopConfig) -> bool:
    if lc.gradient_checkpointing == "auto":
        return torch.cuda.is_available()
    return bool(lc.gradient_checkpointing)


def train_stage(
    model: Any,
    encoder: SampleEncoder,
    examples: Sequence[Example],
    lc: LoopConfig,
    work: Path,
    resume: bool = True,
    desc: str = "train",
    on_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
    tracker: Any = None,
) -> StageResult:
    """Train ``model``'s trainable parameters on ``examples`` with the MTCT loss.

    ``work`` holds the stage's checkpoint and ``log.jsonl``; with ``resume`` an existing
    checkpoint there is loaded and training continues after its step. ``on_step(step)`` is
    called after every optimizer step (after any checkpoint of that step). ``tracker``
    (``trainers.tracking.Tracker``) gets every step's record on the main process.
    """
    from accelerate import Accelerator
    from tqdm import tqdm
    from transformers import get_scheduler

    accelerator = Accelerator(mixed_precision=lc.mixed_precision())
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        # Checkpoints and stage folders save named_parameters() of the unwrapped model on rank 0;
        # under FSDP/ZeRO those are shards, so what was saved would not be the trained model.
        raise UserError(f"training under {accelerator.distributed_type.name} is not supported (checkpoints would "
                        "hold parameter shards); launch data-parallel instead: `accelerate launch --num_processes "
                        "N` or `torchrun` without FSDP/DeepSpeed options")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(examples)
    bs, per_epoch, total = plan_steps(n, lc, world)

    if use_gradient_checkpointing(lc) and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lc.lr, betas=tuple(lc.betas), weight_decay=lc.weight_decay)
    scheduler = get_scheduler(
        lc.scheduler, optimizer, num_warmup_steps=int(round(lc.warmup_ratio * total)), num_training_steps=total
    )
    start = 0
    ckpt = find_checkpoint(work) if resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, model, optimizer, scheduler)
        log(f"[{desc}] resuming from checkpoint at step {start}/{total} ({ckpt})")
    elif (work / CKPT).exists():
        shutil.rmtree(work / CKPT)
    if accelerator.is_main_process:
        remove_temps(work, CKPT)  # half-written checkpoints of a killed run

    wrapped = AnswerNLL(model, fast=lc.fast_head)
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    wrapped.train()
    pad = pad_token_id(encoder.processor)

    def encode(micro: list[int]) -> dict[str, Any]:
        return collate([encoder.encode_example(examples[i], lc.tasks) for i in micro], pad)

    result = StageResult(steps=total, resumed_from=start)
    log_path = work / "log.jsonl"
    if accelerator.is_main_process:
        trim_log(log_path, start)  # steps after the checkpoint are replayed: log them once
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", disable=not accelerator.is_main_process)
    t0 = time.perf_counter()
    step = start
    while step < total:
        # One DataLoader per epoch remainder: workers prefetch and run the processor.
        epoch_end = min(total, (step // per_epoch + 1) * per_epoch)
        plan = [(s, m) for s in range(step, epoch_end) for m in micro_batches(step_images(n, lc, s, world), lc, rank, world)]
        loader = torch.utils.data.DataLoader(
            [m for _, m in plan], batch_size=None, collate_fn=encode, num_workers=lc.num_workers,
            generator=torch.Generator(),  # never draw from the global RNG: resume must replay it exactly
        )
        step_loss = 0.0
        stats: dict[str, float] = {}
        for j, ((s, _), batch) in enumerate(zip(plan, loader, strict=True)):
            last_micro = j + 1 == len(plan) or plan[j + 1][0] != s
            step_n = len(step_images(n, lc, s, world))
            batch = {k: (v.to(accelerator.device) if hasattr(v, "to") else v) for k, v in batch.items()}
            sync = accelerator.no_sync(wrapped) if not last_micro else contextlib.nullcontext()
            with sync, accelerator.autocast():
                sums, toks = wrapped(batch)
                per_img = per_image_loss(sums, toks, batch["kind"], batch["image_index"], batch["num_images"])
                # Scale so that the summed gradients equal d(mean over the step's images): DDP averages ranks.
                loss = per_img.sum() * (world / step_n)
            accelerator.backward(loss)
            step_loss += float(per_img.detach().sum()) / step_n * world
            result.images += batch["num_images"]
            result.tokens += int(batch["attention_mask"].sum())
            cut = batch["truncated"]
            result.samples += int(cut.numel())
            result.truncated_samples += int((cut > 0).sum())
            result.truncated_tokens += int(cut.sum())
            for k, v in _kind_stats(sums, toks, batch["kind"]).items():
                stats[k] = stats.get(k, 0.0) + v
            if not last_micro:
                continue
            check_truncation(result, lc, desc, log, final=False)
            if lc.max_grad_norm:
                accelerator.clip_grad_norm_(params, lc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step = s + 1
            step_loss = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "mean"))
            result.losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if accelerator.is_main_process:
                rec = {"step": step, "epoch": (step - 1) // per_epoch, "loss": step_loss, "lr": scheduler.get_last_lr()[0], **stats}
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                if tracker is not None:
                    tracker.log(step_metrics(rec), step)
            stats = {}
            step_loss = 0.0
            if step % max(1, lc.checkpoint_every) == 0 or step % per_epoch == 0 or step == total:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(work, model, optimizer, scheduler, step, {"total": total, "desc": desc})
                accelerator.wait_for_everyone()
            if on_step is not None:
                on_step(step)
    bar.close()
    result.seconds = time.perf_counter() - t0
    wrapped.eval()
    check_truncation(result, lc, desc, log, final=True)
    return result


class TruncationError(UserError):
    """Too many training answers were cut by ``max_length`` (see ``max_truncated_fraction``)."""


def check_truncation(result: StageResult, lc: LoopConfig, desc: str, log: Callable[[str], None],
                     final: bool) -> None:
    """Warn about (final) and refuse (above ``max_truncated_fraction``) answers cut by ``max_length``."""
    n, cut = result.samples, result.truncated_samples
    if not n or not cut:
        return
    frac = cut / n
    limit = lc.max_truncated_fraction
    if limit is not None and frac > limit and (final or n >= 64):
        raise TruncationError(
            f"[{desc}] {cut} of {n} samples ({frac:.1%}) had their answer cut by max_length "
            f"(over max_truncated_fraction={limit}); raise `max_length`, shrink images with "
            "`processor_kwargs`, or set `max_truncated_fraction` higher (null = never refuse)")
    if final:
        log(f"warning: [{desc}] {cut} of {n} samples ({frac:.1%}) had their answer cut by max_length "
            f"({result.truncated_tokens} tokens); their chains lose the tail (often <CONCLUSION>)")


def _kind_stats(sums: Any, toks: Any, kind: Any) -> dict[str, float]:
    out = {}
    for name, k in (("cls_nll_sum", KIND_CLS), ("reason_nll_sum", KIND_REASON)):
        sel = kind == k
        if bool(sel.any()):
            out[name] = float(sums[sel].detach().sum())
            out[name.replace("nll_sum", "tokens")] = float(toks[sel].sum())
    return out
