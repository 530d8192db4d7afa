"""Fine-tune a student MLLM with MTCT then SARR, leave-one-domain-out (``dbr train``).

For each dataset, held-out domain and trial seed, writes
``W/runs/<run>/<Dataset>/<heldout_safe>/seed<k>/`` with one folder per stage (``mtct/``, ``sarr1/``,
...; each a PEFT adapter + ``stage.json``) and ``final/`` (the stage with the best accuracy on the
training domains' ``out`` splits) holding ``student.json``. Finished stages are reused on rerun; an
interrupted stage resumes from its last checkpoint (``_work/<stage>/checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from dbr_builder.backends import check_sampling
from dbr_builder.config import (
    Options,
    add_option,
    flags_of,
    load_stage_config,
    options_from_args,
    resolve,
    validate_options,
)
from dbr_builder.core import workdir as wdl
from dbr_builder.core.fsutil import atomic_dir, stable_hash, write_json_atomic
from dbr_builder.core.locks import stage_lock
from dbr_builder.core.manifest import load_manifest, manifest_paths, manifest_splits
from dbr_builder.core.workdir import check_name
from dbr_builder.errors import ConfigError, UserError
from dbr_builder.log import get_logger
from dbr_builder.stages.publish.push import check_push
from trainers import sarr as sarr_mod
from trainers.card import push_run, write_unit_card
from trainers.data import SampleEncoder, load_published, lodo_split
from trainers.sarr import SarrConfig
from trainers.tiny_model import build_tiny_model
from trainers.tracking import check_report_to, make_tracker

PER_DATASET = False
STAGE = "train"

VISION_MODULES = r".*(visual|vision_tower|vision_model|vision_encoder|multi_modal_projector|connector|mlp1).*"

logger = get_logger(__name__)


def _cfg(cfg: dict[str, Any]) -> Options:
    """The train options with the schema's defaults (schemas/stages/train.schema.json) filled in."""
    return resolve(STAGE, cfg)


def _datasets(cfg: dict[str, Any]) -> list[str]:
    ds = [cfg["dataset"]] if cfg.get("dataset") else list(cfg.get("datasets") or [])
    if not ds:
        raise ConfigError("train: no dataset; set `datasets:` in the pipeline or pass --dataset")
    return [check_name(d) for d in ds]


def _data_source(cfg: dict[str, Any], workdir: Path) -> str:
    return str(cfg.get("data") or (Path(workdir) / "hub"))


def seed_dir(workdir: Path, run: str, dataset: str, heldout: str, seed: int) -> Path:
    """``W/runs/<run>/<Dataset>/<heldout_safe>/seed<k>``."""
    return wdl.seed_dir(workdir, run, dataset, heldout, seed)


def outputs(cfg: dict[str, Any], workdir: Path) -> list[Path]:
    c = _cfg(cfg)
    return [Path(workdir) / "runs" / c["run"] / ds for ds in _datasets(c)]


def inputs(cfg: dict[str, Any], workdir: Path) -> list[Path]:
    src = Path(_data_source(_cfg(cfg), workdir))
    return [src] if src.exists() and not src.is_relative_to(Path(workdir)) else []


# ---------------------------------------------------------------------------------------------
# model


def resolve_student(spec: str, workdir: Path) -> str:
    """``tiny`` / ``tiny:<tower>`` -> the tiny student (with that vision tower of
    ``trainers.tiny_model.TOWERS``) built under ``W/models/``; anything else unchanged."""
    if spec == "tiny" or spec.startswith("tiny:"):
        tower = spec.partition(":")[2] or "default"
        name = "tiny" if tower == "default" else f"tiny-{tower}"
        return str(build_tiny_model(Path(workdir) / "models" / name, tower=tower))
    return spec


def check_student(spec: str) -> None:
    """Fail before any run folder is made when ``student`` is a path that does not exist."""
    if spec.startswith(("/", "./", "../", "~")) and not Path(spec).expanduser().is_dir():
        raise UserError(f"student {spec!r}: no such model folder; set `student:` / --student to a local folder, "
                        "a Hub id, `tiny` or `tiny:<tower>`")


def family_processor_defaults(processor: Any) -> dict[str, Any]:
    """Image settings a family gets unless the config says otherwise.

    InternVL's processor tiles every image into up to 12 crops plus a thumbnail (a 640x480 image
    becomes 13 tiles, 3,328 tokens at 448 px), which would spend most of ``max_length`` on image
    tokens and cut chains; the RD-MLDG student sees one 448 px tile per image. Other families'
    processors already cap resolution (Qwen: max_pixels; Idefics3/SmolVLM, LLaVA-OV: their own
    tiling), so they keep their processor's defaults.
    """
    name = type(processor).__name__
    if name.startswith("InternVL"):
        return {"crop_to_patches": False}
    return {}


def effective_processor_kwargs(processor: Any, configured: dict[str, Any] | None) -> dict[str, Any]:
    """The family defaults overridden by the config's ``processor_kwargs``."""
    return {**family_processor_defaults(processor), **(configured or {})}


def resplit(by_domain: dict[str, list], c: dict[str, Any], workdir: Path, dataset: str, seed: int) -> dict[str, list]:
    """The examples with DomainBed's in/out split of ``seed`` (``seed_hash(trial_seed, env)``).

    The published data carries the split of the trial seed it was indexed with; other trial seeds
    re-split from ``W/manifest/<Dataset>.parquet``, which lists every image of every domain.
    """
    from dataclasses import replace

    if not c.get("resplit", True):
        return by_domain
    if not manifest_paths(workdir, dataset)[0].exists():
        if seed == 0:
            return by_domain  # the published split is DomainBed's trial seed 0 (`dbr index` default)
        raise UserError(f"trial seed {seed}: re-splitting {dataset} per trial seed needs its manifest "
                        f"{manifest_paths(workdir, dataset)[0]} (run `dbr index`), or set `resplit: false` "
                        "to keep the published split")
    _, meta = load_manifest(workdir, dataset)
    if int(meta.get("trial_seed", 0)) == seed:
        return by_domain
    splits = manifest_splits(workdir, dataset, seed)
    taken: dict[tuple[str, str], int] = {}
    out: dict[str, list] = {}
    for dom, exs in by_domain.items():
        new = []
        for ex in exs:
            key = (ex.domain, ex.image_id)
            got = splits.get(key)
            if got is None:
                raise UserError(f"{dataset}: image {ex.image_id} ({ex.domain}) of the published data is not in "
                                f"the manifest; publish and manifest differ (rebuild with `dbr publish`)")
            k = taken.get(key, 0)
            taken[key] = k + 1
            new.append(replace(ex, dg_split=got[min(k, len(got) - 1)]))
        out[dom] = new
    return out


def load_student(path: str, c: dict[str, Any], device: Any) -> tuple[Any, Any]:
    """Processor + model (LoRA-wrapped unless ``finetune: full``) on ``device``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.bfloat16 if device.type == "cuda" and c["precision"] in ("auto", "bf16") else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise UserError(f"student {path!r}: cannot load ({e}); set `student:` to a local folder or Hub id") from None
    if getattr(processor, "chat_template", None) is None:
        raise UserError(f"student {path!r}: the processor has no chat template; MTCT needs one")
    model.config.use_cache = False
    if c["finetune"] == "full":
        model.requires_grad_(True)
        return processor, model.to(device)
    from peft import LoraConfig, get_peft_model

    lc = c["lora"]
    conf = LoraConfig(
        r=int(lc["r"]), lora_alpha=int(lc["alpha"]), lora_dropout=float(lc["dropout"]),
        target_modules=lc["target_modules"], exclude_modules=None if lc["vision"] else VISION_MODULES,
        modules_to_save=lc["modules_to_save"] or None, bias="none",
    )
    model = get_peft_model(model, conf)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master weights for the trainable part under bf16 autocast
    return processor, model.to(device)


def save_stage(dest: Path, model: Any, processor: Any, info: dict[str, Any], full: bool,
               extra_files: dict[str, Path] | None = None) -> None:
    """Write a stage folder atomically: adapter (or full model) + stage.json."""
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        if full:
            processor.save_pretrained(tmp)
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, tmp / name)
        write_json_atomic(tmp / "stage.json", info)


def load_stage_weights(stage_dir: Path, model: Any, full: bool) -> None:
    """Put a finished stage's trained weights into the live model."""
    if full:
        from transformers import AutoModelForImageTextToText

        done = AutoModelForImageTextToText.from_pretrained(stage_dir, dtype=next(model.parameters()).dtype)
        model.load_state_dict(done.state_dict())
        return
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(stage_dir / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------
# one (dataset, held-out domain, seed)


def _loop_config(c: dict[str, Any], seed: int):
    from trainers.loop import LoopConfig  # pulls torch: keep `dbr --help` fast
    o = c["optim"]
    return LoopConfig(
        lr=float(o["lr"]), weight_decay=float(o["weight_decay"]),
        betas=tuple(o["betas"]), scheduler=o["scheduler"],
        warmup_ratio=float(o["warmup_ratio"]), max_grad_norm=o["max_grad_norm"],
        batch_size=int(c["batch_size"]), micro_batch_size=int(c["micro_batch_size"]), epochs=float(c["epochs"]),
        max_steps=c["max_steps"], seed=seed, precision=c["precision"],
        gradient_checkpointing=c["gradient_checkpointing"], checkpoint_every=int(c["checkpoint_every"]),
        num_workers=int(c["num_workers"]), tasks=tuple(c["tasks"]), fast_head=bool(o["fast_head"]),
        max_truncated_fraction=(None if c.get("max_truncated_fraction") is None
                                else float(c["max_truncated_fraction"])),
    )


def _sarr_config(c: dict[str, Any]):
    sc = SarrConfig(**c["sarr"])
    if sc.rounds:
        check_sampling(sc.n, sc.temperature, sc.top_p, "train.sarr")
    return sc


def _subsample(examples: list, n: int | None, seed: int) -> list:
    if n is None or len(examples) <= n:
        return examples
    import numpy as np

    keep = sorted(np.random.RandomState(seed).choice(len(examples), n, replace=False).tolist())
    return [examples[i] for i in keep]


def _sharded(state: Any, items: list, fn: Any, tag: Path) -> list:
    """Run ``fn`` over this rank's share of ``items``; exchange results (JSON) through files."""
    world, rank = state.num_processes, state.process_index
    if world == 1:
        return fn(items)
    mine = fn(items[rank::world])

    write_json_atomic(tag.with_name(f"{tag.name}.rank{rank}.json"), mine)
    state.wait_for_everyone()
    parts = [json.loads(tag.with_name(f"{tag.name}.rank{r}.json").read_text()) for r in range(world)]
    out: list = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


# Keys that do not change what a run trains (where it runs, how it checkpoints, which units it covers).
_NOT_SETTINGS = {"resume", "num_workers", "checkpoint_every", "datasets", "dataset", "heldout", "trial_seeds",
                 "workdir", "root", "stage", "name", "description", "report_to", "tracking_project"}


def check_run_settings(out: Path, c: dict[str, Any]) -> None:
    """Refuse to reuse or resume a run folder that was trained with other settings.

    Finished and interrupted stages are reused on rerun; without this check a changed student or
    hyperparameter would silently return the old model.
    """
    settings = {k: v for k, v in c.items() if k not in _NOT_SETTINGS}
    fp = stable_hash(settings)
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != fp:
            changed = sorted(k for k in set(old.get("settings", {})) | set(settings)
                             if old.get("settings", {}).get(k) != settings.get(k))
            raise UserError(
                f"{out} was trained with other settings (changed: {', '.join(changed) or '?'}); "
                "use a new run name (--run / `run:`) or delete that folder to retrain"
            )
    elif not (out / "final").exists():
        write_json_atomic(path, {"fingerprint": fp, "settings": settings})


def train_one(
    c: dict[str, Any], workdir: Path, dataset: str, heldout: str, seed: int,
    by_domain: dict[str, list], log: Any = None,
) -> dict[str, Any]:
    """MTCT, SARR rounds and model selection for one held-out domain and seed."""
    log = log or logger.info
    import torch
    from accelerate import PartialState

    from trainers.loop import (  # pulls torch
        find_checkpoint,
        load_trainable_state,
        train_stage,
        trainable_state,
    )
    from trainers.select import SELECT_MODES, predict_classes, summarize_validation  # pulls torch


    out = seed_dir(workdir, c["run"], dataset, heldout, seed)
    final = out / "final"
    check_run_settings(out, c)
    if (final / "student.json").exists():
        log(f"[train] {dataset}/{heldout}/seed{seed}: done ({final})")
        return json.loads((final / "student.json").read_text())
    state = PartialState()
    work = out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    if not c["resume"] and any(find_checkpoint(work / d.name) for d in work.iterdir() if d.is_dir()):
        raise UserError(f"{work}: a partial run exists; rerun with --resume, or delete {out} to start over")

    by_domain = resplit(by_domain, c, workdir, dataset, seed)
    train, val, train_domains = lodo_split(by_domain, heldout)
    train = _subsample(train, c["max_train_images"], seed)
    sel = c["select"]
    val = _subsample(val, sel["max_images"], seed)
    classes = sorted({ex.class_name for exs in by_domain.values() for ex in exs})
    if "reason" in c["tasks"] and not any(ex.chain for ex in train):
        raise UserError(f"{dataset}: no training row has a `chain`; the reasoning task needs published chains")

    torch.manual_seed(seed)
    student = resolve_student(c["student"], workdir)
    processor, model = load_student(student, c, state.device)
    full = c["finetune"] == "full"
    proc_kwargs = effective_processor_kwargs(processor, c["processor_kwargs"])
    encoder = SampleEncoder(processor, classes, max_length=c["max_length"], processor_kwargs=proc_kwargs)
    lc = _loop_config(c, seed)
    sc = _sarr_config(c)
    init_state = trainable_state(model) if sc.init == "restart" and sc.rounds > 0 else None
    seq_batch = int(sel["seq_batch"])
    sel_mode = sel.get("mode", "scored")
    if sel_mode not in SELECT_MODES:
        raise ConfigError(f"train.select.mode={sel_mode!r}; expected one of {', '.join(SELECT_MODES)}")

    def validate() -> dict[str, Any]:
        # Each rank predicts its share; accuracy is recomputed from the merged per-image predictions.
        def predict(idx: list[int]) -> list[str | None]:
            return predict_classes(model, encoder, [val[i] for i in idx], sel_mode, seq_batch=seq_batch,
                                   max_new_tokens=int(sel.get("max_new_tokens") or (sc.max_new_tokens if sel_mode ==
                                                                                     "reasoning" else 32)),
                                   batch_size=sc.batch_size, synonyms=sc.synonyms)
        preds = _sharded(state, list(range(len(val))), predict, work / "val")
        return {**summarize_validation(val, preds), "mode": sel_mode}

    stages = ["mtct"] + [f"sarr{r}" for r in range(1, sc.rounds + 1)]
    infos: dict[str, dict[str, Any]] = {}
    base_info = {"dataset": dataset, "heldout_domain": heldout, "train_domains": train_domains,
                 "trial_seed": seed, "base_model": student, "classes": classes,
                 # the image encoding the student was trained with; `dbr eval` and the backends reuse it
                 "processor_kwargs": proc_kwargs, "selection_mode": sel_mode}
    for i, name in enumerate(stages):
        sdir = out / name
        if (sdir / "stage.json").exists():
            load_stage_weights(sdir, model, full)
            infos[name] = json.loads((sdir / "stage.json").read_text())
            log(f"[train] {dataset}/{heldout}/seed{seed}/{name}: reusing finished stage")
            continue
        swork = work / name
        swork.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {"stage": name, **base_info}
        data = train
        extra: dict[str, Path] = {}
        if i > 0:
            rec_path = swork / "self_chains.jsonl"
            if rec_path.exists():
                records = sarr_mod.load_records(rec_path)
                data = sarr_mod.examples_from_records(train, records, sc.no_correct)
                rejected = sum(not r["kept"] for r in records)
                stats = {"images": len(records), "rejected": rejected,
                         "rejection_rate": rejected / len(records) if records else 0.0,
                         "train_images": len(data), "self_chains": len(records) - rejected,
                         "teacher_chains": sum(ex.chain_source == "teacher" for ex in data),
                         "no_correct": sc.no_correct, "reloaded": True}
            else:
                gen = _generator(c, sc, model, encoder, student, out, seed * 1000 + i, state, work, swork)
                data, stats, records = sarr_mod.self_label(train, classes, gen, sc)
                if state.is_main_process:
                    sarr_mod.save_records(rec_path, records)
                state.wait_for_everyone()
            log(f"[train] {name}: rejection rate {stats['rejection_rate']:.3f} "
                f"({stats['rejected']}/{stats['images']} images without a correct self chain; "
                f"training on {stats['self_chains']} self and {stats['teacher_chains']} teacher chains)")
            info["sarr"] = stats
            extra["self_chains.jsonl"] = rec_path
            if sc.init == "restart" and init_state is not None and find_checkpoint(swork) is None:
                load_trainable_state(model, init_state)
            if not data:
                logger.warning(f"[train] {name}: no correct self chain and sarr.no_correct=drop: the round "
                               "trains on nothing and keeps the previous weights")
        with make_tracker(c["report_to"] if state.is_main_process else ["none"], out / "tensorboard" / name,
                          c["tracking_project"], f"{c['run']}/{dataset}/{heldout}/seed{seed}/{name}",
                          {k: v for k, v in c.items() if k not in _NOT_SETTINGS}) as tracker:
            if data:
                res = train_stage(model, encoder, data, lc, swork, resume=True,
                                  desc=f"{dataset}/{heldout}/seed{seed}/{name}", log=log, tracker=tracker)
                info["train"] = res.summary()
                steps = res.steps
            else:
                info["train"] = {"steps": 0, "samples": 0, "truncated_samples": 0, "truncated_tokens": 0,
                                 "skipped": "no training images (no correct self chain)"}
                steps = 0
            info["val"] = validate()
            tracker.log({"val/accuracy": info["val"]["accuracy"]}, steps)
        log(f"[train] {name}: val accuracy (training domains' out) = {info['val']['accuracy']}")
        if state.is_main_process:
            save_stage(sdir, model, processor, info, full, extra)
            shutil.rmtree(swork / "checkpoint", ignore_errors=True)
        state.wait_for_everyone()
        infos[name] = info

    # Model selection: best training-domain validation accuracy (mean of the training domains'
    # `out` accuracies, DomainBed), in the configured mode; ties go to the later stage.
    best = max(stages, key=lambda s: (infos[s]["val"]["accuracy"] or 0.0, stages.index(s)))
    student_json = {
        **base_info,
        "adapter": None if full else str(final.resolve()),
        "base_model": str(final.resolve()) if full else student,
        "selected_stage": best,
        "val_accuracy": {s: infos[s]["val"]["accuracy"] for s in stages},
        "rejection_rate": {s: infos[s]["sarr"]["rejection_rate"] for s in stages if "sarr" in infos[s]},
        "teacher_chains": {s: infos[s]["sarr"].get("teacher_chains") for s in stages if "sarr" in infos[s]},
        "truncated_samples": {s: infos[s]["train"].get("truncated_samples") for s in stages},
        "run": c["run"],
        "finetune": c["finetune"],
    }
    if state.is_main_process:
        with atomic_dir(final) as tmp:
            shutil.copytree(out / best, tmp, dirs_exist_ok=True)
            if full:
                processor.save_pretrained(tmp)
            write_json_atomic(tmp / "student.json", student_json)
            write_unit_card(tmp, out, student_json, _data_source(c, workdir), workdir)  # README.md + training.png
    state.wait_for_everyone()
    log(f"[train] {dataset}/{heldout}/seed{seed}: selected {best} -> {final}")
    return student_json


def _generator(c, sc, model, encoder, student, out, gen_seed, state, work, swork):
    """The SARR chain generator: in-process generate, or a dbr backend with the current adapter."""
    if sc.generator == "model":
        def gen(exs):
            return _sharded(state, list(exs), lambda part: sarr_mod.generate_with_model(
                model, encoder, part, sc, gen_seed), swork / "gen")
        return gen
    # A backend spec: "vllm" / "hf" alone mean "this student with the current adapter".
    full = c["finetune"] == "full"
    snapshot = swork / ("model_for_generation" if full else "adapter_for_generation")
    if state.is_main_process:
        model.save_pretrained(snapshot)
        if full:  # a fully fine-tuned student is served as a model folder of its own
            encoder.processor.save_pretrained(snapshot)
    state.wait_for_everyone()
    kind, target = (sc.generator.split(":", 1) + [""])[:2] if ":" in sc.generator else (sc.generator, "")
    spec = f"{kind}:{snapshot if full else (target or student)}"
    extra = {} if full else {"adapter": str(snapshot)}

    def gen(exs):
        # Its own step: the student leaves the GPU, a child process per rank serves it on that
        # rank's GPU and exits (engine closed), then the student comes back for training.
        import torch

        device = next(model.parameters()).device
        on_gpu = device.type == "cuda"
        if on_gpu:
            model.to("cpu")
            torch.cuda.empty_cache()
        try:
            return _sharded(state, list(exs), lambda part: sarr_mod.generate_in_subprocess(
                spec, part, encoder, sc, gen_seed, work / "images", swork / f"gen_rank{state.process_index}",
                gpu=(device.index if device.index is not None else state.local_process_index) if on_gpu else None,
                **extra), swork / "gen")
        finally:
            if on_gpu:
                model.to(device)
    return gen


# ---------------------------------------------------------------------------------------------
# stage protocol


def _checked(cfg: dict[str, Any]) -> dict[str, Any]:
    c = _cfg(cfg)
    if c["finetune"] not in ("lora", "full"):
        raise ConfigError(f"train.finetune={c['finetune']!r}; expected lora or full")
    check_student(c["student"])
    check_report_to(c["report_to"])
    _sarr_config(c)  # sampling a backend would reject fails here, before any model loads
    return c


def _heldouts(c: dict[str, Any], ds: str, by_domain: dict[str, list]) -> list[str]:
    held = c["heldout"]
    held = list(by_domain) if held is None else ([held] if isinstance(held, str) else list(held))
    unknown = [h for h in held if h not in by_domain]
    if unknown:  # before any run folder is made
        raise ConfigError(f"train.heldout: {', '.join(map(repr, unknown))} not a domain of {ds} "
                          f"(domains: {', '.join(by_domain)})")
    return held


def _unit_summary(sj: dict[str, Any]) -> dict[str, Any]:
    return {"selected": sj["selected_stage"], "val": sj["val_accuracy"]}


def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Train every (dataset, held-out domain, trial seed) of the config; return their selections."""
    c = _checked(cfg)
    workdir = Path(workdir)
    check_name(c["run"], "run name")
    if int(os.environ.get("RANK", "0") or 0) != 0:  # DDP: rank 0 holds the lock for the whole job
        return _run(c, workdir)
    with stage_lock(workdir, f"train-{c['run']}", f"train (run {c['run']})"):
        return _run(c, workdir)


def _run(c: dict[str, Any], workdir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for ds in _datasets(c):
        by_domain = load_published(_data_source(c, workdir), ds)
        for h in _heldouts(c, ds, by_domain):
            for seed in c["trial_seeds"]:
                sj = train_one(c, workdir, ds, h, int(seed), by_domain)
                summary[f"{ds}/{h}/seed{seed}"] = _unit_summary(sj)
    return summary


# ---------------------------------------------------------------------------------------------
# units for `dbr run --executor local|slurm` (dbr_builder.launch): one job per (dataset, held-out, seed)


def job_units(cfg: dict[str, Any], workdir: Path, opts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The LODO units of the config, each ``{"id", "dataset", "heldout", "seed"}`` (checked before any job)."""
    c = _checked(cfg)
    if c["student"] == "tiny" or c["student"].startswith("tiny:"):
        resolve_student(c["student"], Path(workdir))  # build it once here, not in every unit job at once
    units = []
    for ds in _datasets(c):
        by_domain = load_published(_data_source(c, Path(workdir)), ds)
        for h in _heldouts(c, ds, by_domain):
            for seed in c["trial_seeds"]:
                units.append({"id": f"{ds}-{wdl.safe_split_name(h)}-seed{int(seed)}", "dataset": ds,
                              "heldout": h, "seed": int(seed)})
    return units


def run_unit(cfg: dict[str, Any], workdir: Path, unit: dict[str, Any]) -> dict[str, Any]:
    """Train one unit (MTCT, SARR rounds, selection); under several processes each runs this as one rank."""
    c = _checked(cfg)
    check_name(c["run"], "run name")
    by_domain = load_published(_data_source(c, Path(workdir)), unit["dataset"])

    def one() -> dict[str, Any]:
        return _unit_summary(train_one(c, Path(workdir), unit["dataset"], unit["heldout"], int(unit["seed"]),
                                       by_domain))

    if int(os.environ.get("RANK", "0") or 0) != 0:  # DDP: rank 0 holds the lock for the whole unit
        return one()
    # one lock per unit (not per run): the units of a run train side by side in their own jobs
    with stage_lock(workdir, f"train-{c['run']}-{unit['id']}", f"train (run {c['run']}, unit {unit['id']})"):
        return one()


def unit_outputs(cfg: dict[str, Any], workdir: Path, unit: dict[str, Any]) -> list[Path]:
    """The unit's run folder ``W/runs/<run>/<Dataset>/<heldout>/seed<k>``."""
    return [seed_dir(Path(workdir), _cfg(cfg)["run"], unit["dataset"], unit["heldout"], int(unit["seed"]))]


def collect(cfg: dict[str, Any], workdir: Path, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The stage summary once every unit has ended (the same shape as :func:`run` returns)."""
    summary: dict[str, Any] = {}
    for unit in job_units(cfg, workdir):
        out = unit_outputs(cfg, workdir, unit)[0] / "final" / "student.json"
        summary[f"{unit['dataset']}/{unit['heldout']}/seed{unit['seed']}"] = _unit_summary(
            json.loads(out.read_text()))
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="train config (pipelines/train_mtct_sarr.yaml, or a pipeline with a train stage)")
    p.add_argument("--workdir", "-w", default=None,
                   help="work directory W (default: the config's `workdir`, else work)")
    add_option(p, STAGE, "dataset", help="dataset (config) to train on; default: the config's datasets")
    add_option(p, STAGE, "heldout", help="held-out domain; default: every domain in turn (LODO)")
    add_option(p, STAGE, "trial_seeds", "--trial-seed", metavar="K")
    for key in ("student", "data", "run", "max_steps", "resume"):
        add_option(p, STAGE, key)
    add_option(p, STAGE, "report_to", metavar="TRACKER")
    p.add_argument("--push", metavar="REPO_ID", help="after training, upload the run's students with their model "
                   "cards to this Hub model repo, in one commit (token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push: create the repo as private")
    p.add_argument("--dry-run", action="store_true", help="with --push: train nothing, upload nothing; list the "
                   "exact commit operations for the students already trained")


def main(args: argparse.Namespace) -> int:
    cfg = load_stage_config(args.config, STAGE) if args.config else {"stage": STAGE}
    given = options_from_args(args)
    cfg.update(given)
    # The config file was checked when loaded; check the command-line overrides the same way.
    validate_options(given, STAGE, "command line", flags_of(args))
    if args.push:
        check_push(args.push, dry_run=args.dry_run, repo_type="model")
    elif args.dry_run or args.private:
        raise UserError("--dry-run and --private only apply with --push REPO_ID")
    wd = Path(args.workdir or cfg.get("workdir") or "work")
    if not args.dry_run:
        summary = run(cfg, wd)
        print(json.dumps(summary, indent=2))
    if args.push:
        c = _cfg(cfg)
        held = c.get("heldout")
        push_run(wd, c["run"], args.push, _data_source(c, wd),
                 datasets=_datasets(c) if c.get("dataset") or c.get("datasets") else None,
                 heldout=None if held is None else ([held] if isinstance(held, str) else list(held)),
                 seeds=[int(s) for s in c["trial_seeds"]] if "trial_seeds" in given else None,
                 private=args.private, dry_run=args.dry_run)
    return 0
