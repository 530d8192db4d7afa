"""Evaluate held-out-domain accuracy of trained students and baselines; write DomainBed-style tables.

``dbr eval --config FILE --workdir W`` evaluates

- the *students* trained by ``dbr train``: every ``W/runs/<run>/<Dataset>/<heldout>/seed<k>/final/``
  (a PEFT adapter plus ``student.json``) on its own held-out domain, and/or
- *models* given by backend SPEC (``hf:``, ``vllm:``, ``openai:``; e.g. GPT-4o or a ``vllm serve``
  endpoint as baselines, optionally with a LoRA ``adapter``) on every held-out domain,

in one or more modes: ``scored`` (class log-likelihood argmax after q_cls: what model selection
measures; hf backend), ``direct`` (q_cls, answer parsed to a class), ``reasoning`` (q_reason, class
read from ``<CONCLUSION>``), ``choice`` (the OOD-generalization paper's zero-shot ``Answer Choice:``
protocol) and ``icl`` (k labelled examples from the training domains before the query). The
held-out domain is evaluated on its ``in`` split of the job's trial seed (DomainBed reports the test
environment's ``in`` split; ``test_split: out | all`` for the others). Every record carries the id
of the prompt templates it was made with.

Requests go through :func:`dbr_builder.backends.make_backend` in batches. Every answer is appended
to ``W/runs/<run>/eval/predictions/<job>.jsonl`` as soon as its batch returns, so an interrupted
run resumes where it stopped (a job's file name hashes everything that changes its answers:
model, adapter, mode, shots, prompts, generation settings). Answers are parsed when the tables are
made, so a better parser rescores without regenerating. Outputs: ``W/runs/<run>/eval/results.{json,md,tex}``
and ``<Dataset>.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dbr_builder.backends import KINDS, BackendError, Request, Result, make_backend, parse_spec, redact_spec
from dbr_builder.config import (
    add_option,
    load_stage_config,
    options_from_args,
    resolve,
    schema_defaults,
    stage_schema,
    validate,
)
from dbr_builder.core import prompts
from dbr_builder.core import workdir as wdl
from dbr_builder.core.fsutil import naming, stable_hash, tree_fingerprint, write_json_atomic
from dbr_builder.core.locks import stage_lock
from dbr_builder.core.manifest import image_path, load_manifest, load_quarantine, splits_for_seed
from dbr_builder.core.sanitize import clean_text, redact
from dbr_builder.core.workdir import check_name
from dbr_builder.errors import ConfigError
from dbr_builder.log import get_logger, show_progress
from dbr_builder.resources import resource_path
from dbr_builder.stages.evaluate import icl
from dbr_builder.stages.evaluate.icl import group_pool, icl_pool, select_examples
from dbr_builder.stages.evaluate.parsing import load_synonyms, parse_answer
from dbr_builder.stages.evaluate.results import load_paper_table, write_reports

PER_DATASET = False

MODES = ("scored", "direct", "reasoning", "choice", "icl")
_D = schema_defaults("eval")  # every option default, defined once in schemas/stages/eval.schema.json
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"scored": 0, **_D["max_new_tokens"]}
TEST_SPLITS = ("in", "out", "all")
PROMPTS_OF = {"scored": ["q_cls"], "direct": ["q_cls"], "reasoning": ["q_reason"], "choice": ["zeroshot_choice"],
              "icl": ["zeroshot_choice", "icl_example", "icl_query"]}
STUDENT_FIELDS = ("base_model", "dataset", "heldout_domain", "trial_seed", "classes")


# ---------------------------------------------------------------- jobs

logger = get_logger(__name__)


@dataclass(frozen=True)
class Job:
    """One (model, mode, shots) evaluated on one held-out domain of one dataset for one trial seed."""

    name: str  # the model's display name (table row prefix)
    spec: str  # backend spec
    adapter: str | None
    mode: str
    shots: int
    dataset: str
    heldout: str
    trial_seed: int
    options: str = "{}"  # backend options as canonical JSON (hashable, may nest)

    @property
    def method(self) -> str:
        """Table row name, e.g. ``mtct_sarr [reasoning]`` or ``gpt-4o [icl k=4]``."""
        tag = f"icl k={self.shots}" if self.mode == "icl" else self.mode
        return f"{self.name} [{tag}]"

    @property
    def backend_key(self) -> tuple:
        return (self.spec, self.adapter, self.options)


def safe_name(s: str) -> str:
    """A file-name-safe form of ``s`` (``Real World`` -> ``Real_World``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


def _mode_list(value: Any, where: str) -> list[str]:
    modes = [value] if isinstance(value, str) else list(value or [])
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"{where}: unknown mode(s) {', '.join(map(str, bad))}; use {', '.join(MODES)}")
    return modes


def find_students(workdir: Path, run: str, datasets: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The trained students of ``W/runs/<run>/``: one dict per ``final/student.json`` (plus ``dir``)."""
    base = Path(workdir) / "runs" / run
    out = []
    for p in sorted(base.glob("*/*/seed*/final/student.json")):
        try:
            info = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{p}: unreadable student.json ({e}); rerun `dbr train` for this student") from None
        missing = [k for k in STUDENT_FIELDS if k not in info]
        if missing:
            raise ConfigError(f"{p}: student.json lacks {', '.join(missing)}; rerun `dbr train` for this student")
        if datasets and info["dataset"] not in datasets:
            continue
        info["adapter_dir"] = student_adapter(p.parent, info)
        info["dir"] = str(p.parent)
        out.append(info)
    return out


def student_adapter(final_dir: Path, info: dict[str, Any]) -> str | None:
    """The LoRA adapter folder of a student, or None for a fully fine-tuned one (``adapter: null``).

    ``student.json`` stores an absolute path; if the work directory was moved since, the
    adapter in ``final/`` itself is used.
    """
    if not info.get("adapter"):
        return None
    a = final_dir / info["adapter"]
    if not a.exists() and (final_dir / "adapter_config.json").exists():
        a = final_dir
    return str(a.resolve())


def _options_json(options: dict[str, Any] | None) -> str:
    return json.dumps(options or {}, sort_keys=True, default=str)


def _student_spec(base_model: str, kind: str) -> str:
    """Backend spec of a student's base model (``student.json`` stores a model id or path)."""
    head = base_model.split(":", 1)[0].lower()
    return base_model if head in KINDS and ":" in base_model else f"{kind}:{base_model}"


def student_options(cfg: dict[str, Any], student: dict[str, Any], kind: str = "hf") -> dict[str, Any]:
    """Backend options of a student: the config's ``student_options`` plus the processor settings it
    was trained with (``student.json`` ``processor_kwargs``), so it is evaluated on the same image
    encoding without the user repeating them (hf: ``processor_kwargs``, vllm: ``mm_processor_kwargs``);
    settings given in ``student_options`` win key by key."""
    opts = dict(cfg.get("student_options") or {})
    trained = student.get("processor_kwargs") or {}
    if trained:
        key = "mm_processor_kwargs" if kind == "vllm" else "processor_kwargs"
        opts[key] = {**trained, **(opts.get(key) or {})}
    return opts


def plan_jobs(cfg: dict[str, Any], workdir: Path, domains: dict[str, list[str]]) -> list[Job]:
    """Expand the eval config into jobs; ``domains`` maps each dataset to its sorted domains."""
    cfg = resolve("eval", cfg)
    jobs: list[Job] = []
    datasets = list(domains)
    heldouts = cfg["heldout_domains"]
    known = {d for ds in datasets for d in domains[ds]}
    unknown = [d for d in heldouts or [] if d not in known]
    if unknown:
        raise ConfigError(f"heldout_domains: {', '.join(map(repr, unknown))} not a domain of "
                          f"{', '.join(datasets)} (domains: {', '.join(sorted(known))})")
    seeds = [int(s) for s in cfg["trial_seeds"]]
    default_shots = [int(k) for k in cfg["shots"]]
    if cfg["students"]:
        students_run = students_run_of(cfg)
        found = find_students(workdir, students_run, datasets)
        smodes = _mode_list(cfg["student_modes"], "student_modes")
        if cfg["student_backend"] != "hf" and "scored" in smodes:
            # `scored` (what model selection measures) needs a backend that scores answers
            logger.warning("eval: mode `scored` needs student_backend hf; skipped for %s students",
                        cfg["student_backend"])
            smodes = [m for m in smodes if m != "scored"]
        for st in found:
            if heldouts and st["heldout_domain"] not in heldouts:
                continue
            for mode in smodes:
                for k in (default_shots if mode == "icl" else [0]):
                    jobs.append(Job(cfg["student_name"] or students_run,
                                    _student_spec(st["base_model"], cfg["student_backend"]),
                                    st["adapter_dir"], mode, k, st["dataset"], st["heldout_domain"],
                                    int(st["trial_seed"]), _options_json(student_options(cfg, st, cfg["student_backend"]))))
        if not found and not cfg["models"]:
            raise ConfigError(
                f"no trained students under {workdir / 'runs' / students_run}/<Dataset>/<heldout>/seed<k>/final/"
                "student.json; run `dbr train` first, or list baseline `models:` in the eval config"
            )
    for i, m in enumerate(cfg["models"]):
        where = f"models[{i}]"
        if "spec" not in m:
            raise ConfigError(f"{where}: give the model's backend `spec` (e.g. hf:PATH, vllm:MODEL, openai:gpt-4o)")
        modes = _mode_list(m.get("modes") or cfg["modes"], f"{where}.modes")
        shots = [int(k) for k in m.get("shots") or default_shots]
        mseeds = [int(s) for s in m.get("trial_seeds") or seeds]
        adapter = str(Path(m["adapter"]).resolve()) if m.get("adapter") else None
        for ds in datasets:
            for dom in domains[ds]:
                if heldouts and dom not in heldouts:
                    continue
                for mode in modes:
                    for k in (shots if mode == "icl" else [0]):
                        for s in mseeds:
                            jobs.append(Job(m.get("name") or redact_spec(m["spec"]), m["spec"], adapter, mode, k, ds, dom, s,
                                            _options_json(m.get("options"))))
    return jobs


# ---------------------------------------------------------------- prompts and requests


def _max_new_tokens(cfg: dict[str, Any], mode: str) -> int:
    v = resolve("eval", cfg)["max_new_tokens"]
    return v if isinstance(v, int) else int(v[mode])


def build_content(job: Job, row: dict[str, Any], meta: dict[str, Any], classes: list[str],
                  examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The user turn of one request (image parts carry absolute paths)."""
    img = str(image_path(meta, row["path"]))
    if job.mode in ("scored", "direct", "reasoning"):
        name = "q_reason" if job.mode == "reasoning" else "q_cls"
        return [{"type": "image", "path": img},
                {"type": "text", "text": prompts.render(name, **prompts.class_fields(classes))}]
    if job.mode == "choice":
        return icl.choice_content(img, classes)
    exs = [(str(image_path(meta, e["path"])), e["class_name"]) for e in examples]
    return icl.icl_content(exs, img, classes)


def job_fingerprint(job: Job, cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes a job's answers (its prediction file is named by this hash)."""
    names = PROMPTS_OF[job.mode]
    return {
        "spec": job.spec, "options": json.loads(job.options), "mode": job.mode, "shots": job.shots,
        "adapter": job.adapter,
        # a retrained adapter in the same folder must not reuse old answers
        "adapter_files": tree_fingerprint([Path(job.adapter)]) if job.adapter else None,
        "prompts": {n: prompts.prompt_id(n) for n in names},
        "max_new_tokens": _max_new_tokens(cfg, job.mode), "temperature": float(cfg["temperature"]),
        "top_p": float(cfg["top_p"]), "seed": int(cfg["seed"]),
        "icl_split": cfg["icl_split"] if job.mode == "icl" else None,
        "trial_seed": job.trial_seed, "dataset": job.dataset, "heldout": job.heldout,
        "test_split": test_split(cfg),
    }


def test_split(cfg: dict[str, Any]) -> str:
    """Which images of the held-out domain are evaluated: DomainBed's ``in`` split by default."""
    split = cfg.get("test_split", "in")
    if split not in TEST_SPLITS:
        raise ConfigError(f"eval.test_split={split!r}; expected one of {', '.join(TEST_SPLITS)}")
    return split


def prompt_id(mode: str) -> str:
    """One id for the prompt templates a mode uses (stored with every eval record)."""
    ids = [prompts.prompt_id(n) for n in PROMPTS_OF[mode]]
    return ids[0] if len(ids) == 1 else stable_hash(ids)[:16]


def job_file(eval_dir: Path, job: Job, cfg: dict[str, Any]) -> Path:
    """``predictions/<name>__<Dataset>__<heldout>__seed<k>__<mode>__<hash>.jsonl``."""
    tag = f"icl{job.shots}" if job.mode == "icl" else job.mode
    h = stable_hash(job_fingerprint(job, cfg))[:12]
    return eval_dir / "predictions" / (
        f"{safe_name(job.name)[:60]}__{safe_name(job.dataset)}__{safe_name(job.heldout)}__seed{job.trial_seed}"
        f"__{tag}__{h}.jsonl")


# ---------------------------------------------------------------- prediction store


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """image_id -> latest record of a job file; a torn last line (crash mid-write) is ignored."""
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # only the last line can be torn; its request is simply redone
            prev = out.get(rec["image_id"])
            if prev is None or prev.get("error") is not None or rec.get("error") is None:
                out[rec["image_id"]] = rec  # a good answer is final; an error is replaced by a retry
    return out


def append_predictions(path: Path, records: list[dict[str, Any]]) -> None:
    """Append records as JSON lines and fsync (one batch = one durable write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming(path), open(path, "a", encoding="utf-8") as f:
        # a torn previous line gets its own line so the new records stay parseable
        if f.tell() > 0:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write("\n")
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- run


@dataclass
class DatasetData:
    """A dataset's manifest rows and meta, loaded once."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    classes: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    _by_seed: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def rows_for(self, trial_seed: int) -> list[dict[str, Any]]:
        """The rows with DomainBed's in/out split of ``trial_seed`` (``seed_hash(trial_seed, env)``)."""
        if trial_seed == int(self.meta.get("trial_seed", 0)):
            return self.rows
        if trial_seed not in self._by_seed:
            splits = splits_for_seed(self.rows, self.quarantined, trial_seed,
                                     float(self.meta.get("holdout_fraction", 0.2)))
            self._by_seed[trial_seed] = [{**r, "split": sp} for r, sp in zip(self.rows, splits, strict=True)]
        return self._by_seed[trial_seed]


def _load_datasets(workdir: Path, names: Sequence[str]) -> dict[str, DatasetData]:
    out = {}
    for ds in names:
        df, meta = load_manifest(workdir, ds)
        out[ds] = DatasetData(df.to_dicts(), meta, list(meta["classes"]), list(meta["domains"]),
                              load_quarantine(workdir, ds))
    return out


def _datasets_of(cfg: dict[str, Any], workdir: Path) -> list[str]:
    if cfg.get("datasets"):
        return list(cfg["datasets"])
    if cfg.get("dataset"):
        return [cfg["dataset"]]
    # no list given: the datasets that trained students exist for
    cfg = resolve("eval", cfg)
    found = sorted({s["dataset"] for s in find_students(workdir, students_run_of(cfg))}) if cfg["students"] else []
    if not found:
        raise ConfigError("eval: give `datasets:` (or --dataset); no trained students found to infer them from")
    return found


def _eval_items(job: Job, data: DatasetData, limit: int | None, split: str = "in") -> list[dict[str, Any]]:
    """The held-out domain's images that are evaluated: its ``split`` rows for the job's trial seed."""
    rows = [r for r in data.rows_for(job.trial_seed) if r["domain"] == job.heldout]
    if not rows:
        raise ConfigError(f"{job.dataset}: held-out domain {job.heldout!r} has no images in the manifest "
                          f"(domains: {', '.join(data.domains)})")
    if split != "all":
        rows = [r for r in rows if r["split"] == split]
    if limit:
        # image_id is a content hash: sorting by it is a fixed, class-mixed sample
        rows = sorted(rows, key=lambda r: r["image_id"])[:limit]
    return rows


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _free(backend: Any) -> None:
    """Drop a backend and give its GPU memory back before the next model loads."""
    close = getattr(backend, "close", None)
    if callable(close):
        close()
    del backend
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _score(backend: Any, reqs: list[Request], classes: list[str], job: Job) -> dict[str, Result]:
    """``scored`` mode: the class with the highest answer log-likelihood (hf backend only)."""
    score = getattr(backend, "score", None)
    if not callable(score):
        raise ConfigError(f"eval: mode `scored` needs a backend that scores answers (hf); "
                          f"{redact_spec(job.spec)!r} does not")
    out = {}
    for req, sc in zip(reqs, score(reqs, list(classes)), strict=True):
        best = max(range(len(classes)), key=lambda i: sc[i])
        out[req.key] = Result(req.key, [classes[best]], 0, ["scored"])
    return out


def run_job(job: Job, backend_factory, cfg: dict[str, Any], data: DatasetData, path: Path,
            progress: bool = True) -> dict[str, int]:
    """Generate the missing answers of one job, appending each batch to ``path``."""
    from tqdm import tqdm


    items = _eval_items(job, data, cfg["limit"], test_split(cfg))
    done = {k for k, r in read_predictions(path).items() if r.get("error") is None}
    todo = [r for r in items if r["image_id"] not in done]
    if not todo:
        return {"items": len(items), "generated": 0, "errors": 0}
    pool = (group_pool(icl_pool(data.rows_for(job.trial_seed), job.heldout, cfg["icl_split"]))
            if job.mode == "icl" else None)
    seed = int(cfg["seed"])
    backend = backend_factory()
    errors = 0
    bar = tqdm(total=len(todo), desc=f"eval {job.method} {job.dataset}/{job.heldout} seed{job.trial_seed}",
               unit="img", disable=not show_progress(progress), file=sys.stderr)
    for batch in _batches(todo, int(cfg["batch_size"])):
        reqs, extras = [], {}
        for row in batch:
            exs = (select_examples(pool, job.shots, job.trial_seed, row["image_id"], job.heldout)
                   if job.mode == "icl" else [])
            extras[row["image_id"]] = [e["image_id"] for e in exs]
            reqs.append(Request(key=row["image_id"], content=build_content(job, row, data.meta, data.classes, exs),
                                n=1, max_new_tokens=_max_new_tokens(cfg, job.mode),
                                temperature=float(cfg["temperature"]),
                                top_p=float(cfg["top_p"]), seed=seed))
        if job.mode == "scored":
            results = _score(backend, reqs, data.classes, job)
        else:
            results = {r.key: r for r in backend.generate(reqs)}
        recs = []
        for row in batch:
            res = results.get(row["image_id"])
            err = "backend returned no result" if res is None else clean_text(redact(res.error))
            if err is None and not res.texts:
                err = "backend returned no text"
            errors += err is not None
            recs.append({
                "image_id": row["image_id"], "domain": row["domain"], "class_name": row["class_name"],
                "text": None if err else clean_text(res.texts[0]),
                "finish_reason": (res.finish_reasons[0] if res and res.finish_reasons else None),
                "out_tokens": res.out_tokens if res else 0, "error": err, "prompt_id": prompt_id(job.mode),
                **({"examples": extras[row["image_id"]]} if job.mode == "icl" else {}),
            })
        append_predictions(path, recs)
        bar.update(len(batch))
    bar.close()
    return {"items": len(items), "generated": len(todo), "errors": errors}


def collect_records(jobs: list[Job], cfg: dict[str, Any], data: dict[str, DatasetData],
                    eval_dir: Path) -> list[dict[str, Any]]:
    """Parsed prediction records of every job (what :mod:`dbr_builder.stages.evaluate.results` aggregates).

    An item without a stored answer (generation failed and was not retried yet) is scored
    as unparseable with status ``error``, so accuracies are always over the whole domain.
    """
    syn = {ds: load_synonyms(ds, d.classes, cfg["synonyms"]) for ds, d in data.items()}
    out = []
    for job in jobs:
        d = data[job.dataset]
        preds = read_predictions(job_file(eval_dir, job, cfg))
        for row in _eval_items(job, d, cfg["limit"], test_split(cfg)):
            rec = preds.get(row["image_id"])
            if rec is None or rec.get("error") is not None:
                pred, status = None, "error"
            elif job.mode == "scored":  # the stored text is the argmax class itself
                pred = rec.get("text") if rec.get("text") in d.classes else None
                status = "ok" if pred is not None else "no_match"
            else:
                parsed = parse_answer(job.mode, rec.get("text"), d.classes, syn[job.dataset])
                pred, status = parsed.pred, parsed.status
            out.append({"method": job.method, "dataset": job.dataset, "heldout_domain": job.heldout,
                        "trial_seed": job.trial_seed, "image_id": row["image_id"], "label": row["class_name"],
                        "pred": pred, "status": status, "prompt_id": prompt_id(job.mode)})
    return out


def eval_dir_of(cfg: dict[str, Any], workdir: Path) -> Path:
    """``W/runs/<run>/eval``."""
    return wdl.eval_dir(workdir, resolve("eval", cfg)["run"])


def students_run_of(cfg: dict[str, Any]) -> str:
    """The run whose students are evaluated: ``students_run``, else ``run``."""
    cfg = resolve("eval", cfg)
    return cfg["students_run"] or cfg["run"]


@dataclass
class Plan:
    """What an eval config evaluates: the resolved options, the loaded datasets and the expanded jobs."""

    cfg: dict[str, Any]
    data: dict[str, DatasetData]
    jobs: list[Job]
    eval_dir: Path


def _quiet(*_: Any) -> None:
    pass


def plan(cfg: dict[str, Any], workdir: str | Path, log: Any = None) -> Plan:
    """Load the datasets the config evaluates and expand its jobs (errors before any answer is generated)."""
    log = log or logger.info
    workdir = Path(workdir)
    names = [check_name(n) for n in _datasets_of(cfg, workdir)]
    cfg = resolve("eval", cfg)
    check_name(cfg["run"], "run name")
    check_name(students_run_of(cfg), "run name")
    if cfg["students"] and not cfg["models"]:
        # only students to evaluate: skip datasets nobody has trained on (and their manifests)
        trained = {s["dataset"] for s in find_students(workdir, students_run_of(cfg))}
        skipped = [n for n in names if n not in trained]
        names = [n for n in names if n in trained]
        if skipped and names:
            log(f"eval: no trained students for {', '.join(skipped)}; skipping")
        if not names:
            run_dir = wdl.runs_dir(workdir, students_run_of(cfg))
            raise ConfigError(
                f"no trained students under {run_dir}/<Dataset>/<heldout>/seed<k>/final/student.json for "
                f"{', '.join(skipped)}; run `dbr train` first, or list baseline `models:` in the eval config")
    data = _load_datasets(workdir, names)
    jobs = plan_jobs(cfg, workdir, {ds: d.domains for ds, d in data.items()})
    if not jobs:
        raise ConfigError("eval: nothing to evaluate (no students matched and no `models:` given)")
    for spec in sorted({j.backend_key[0] for j in jobs}):
        try:  # a bad spec fails here, before any folder or file is made
            parse_spec(spec)
        except BackendError as e:
            raise ConfigError(f"eval: model {redact_spec(spec)!r}: {e}") from None
    return Plan(cfg, data, jobs, eval_dir_of(cfg, workdir))


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed run made, deepest first, when nothing was written into them."""
    for d in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if d.is_dir():
            for f in d.glob("*.job.json"):  # job descriptions whose job never produced an answer
                if not f.with_name(f.name[: -len(".job.json")] + ".jsonl").exists():
                    f.unlink()
            try:
                d.rmdir()
            except OSError:
                pass  # not empty: something was written, keep it


def generate_answers(p: Plan, jobs: Sequence[Job], progress: bool = True) -> dict[str, int]:
    """Generate the missing answers of ``jobs``, one backend per model at a time (closed before the next)."""
    cfg = p.cfg
    stats = {"jobs": len(jobs), "generated": 0, "errors": 0}
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        groups.setdefault(j.backend_key, []).append(j)
    for (spec, adapter, options), group in groups.items():
        holder: dict[str, Any] = {}

        def factory(spec=spec, adapter=adapter, options=options, holder=holder, group=group):
            # loaded only when some job of this model still has missing answers
            if "b" not in holder:
                opts = json.loads(options)
                if adapter:
                    opts["adapter"] = adapter
                shots = max((j.shots for j in group if j.mode == "icl"), default=0)
                if spec.lower().startswith("vllm:") and shots and "limit_images" not in opts:
                    opts["limit_images"] = shots + 1  # vLLM caps images per prompt (default 1)
                try:
                    holder["b"] = make_backend(spec, **opts)
                except BackendError as e:
                    raise ConfigError(f"eval: model {redact_spec(spec)!r}: {e}") from None
            return holder["b"]

        try:
            for job in group:
                path = job_file(p.eval_dir, job, cfg)
                if not path.with_suffix(".job.json").exists():
                    write_json_atomic(path.with_suffix(".job.json"),
                                      {"job": asdict(job), "fingerprint": job_fingerprint(job, cfg)})
                st = run_job(job, factory, cfg, p.data[job.dataset], path, progress)
                stats["generated"] += st["generated"]
                stats["errors"] += st["errors"]
        finally:
            if "b" in holder:
                _free(holder.pop("b"))
    return stats


def run(cfg: dict[str, Any], workdir: str | Path, progress: bool = True, log: Any = None) -> dict[str, Any]:
    """Evaluate every job of ``cfg`` (resuming stored answers) and write the result tables."""
    p = plan(cfg, workdir, log)
    eval_dir = p.eval_dir
    with stage_lock(workdir, f"eval-{p.cfg['run']}", f"eval (run {p.cfg['run']})"):
        made = [d for d in (eval_dir.parent.parent, eval_dir.parent, eval_dir, eval_dir / "predictions")
                if not d.exists()]
        try:
            return _report(p, generate_answers(p, p.jobs, progress), log)
        except BaseException:
            _remove_empty(made)
            raise


def _report(p: Plan, stats: dict[str, int], log: Any = None) -> dict[str, Any]:
    """Score every job's stored answers and write the result tables."""
    log = log or logger.info
    cfg, jobs = p.cfg, p.jobs
    domains = {ds: d.domains for ds, d in p.data.items()}
    records = collect_records(jobs, cfg, p.data, p.eval_dir)
    paper = load_paper_table(cfg["paper_table"]) if cfg["compare_paper"] else None
    # table columns: the domains some job held out (all of them unless heldout_domains narrows it)
    evaluated = {ds: [d for d in doms if any(j.dataset == ds and j.heldout == d for j in jobs)]
                 for ds, doms in domains.items()}
    evaluated = {ds: doms for ds, doms in evaluated.items() if doms}
    paths = write_reports(records, p.eval_dir, evaluated, paper, cfg["error"],
                          title=f"Held-out-domain accuracy: run `{cfg['run']}`",
                          all_domains=domains, num_classes={ds: len(d.classes) for ds, d in p.data.items()})
    log(paths["md"].read_text(encoding="utf-8"))  # `dbr run` (make demo) ends with this table
    if stats["errors"]:
        logger.warning(f"{stats['errors']} request(s) failed (scored as wrong); rerun `dbr eval` to retry them")
    return {**stats, "records": len(records), "outputs": {k: str(v) for k, v in paths.items()}}


# ---------------------------------------------------------------- units for `dbr run --executor local|slurm`
# (dbr_builder.launch): one job per (dataset, held-out domain, trial seed); tables once all have ended.


def _unit_id(job: Job) -> str:
    return f"{safe_name(job.dataset)}-{safe_name(job.heldout)}-seed{job.trial_seed}"


def job_units(cfg: dict[str, Any], workdir: str | Path, opts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One unit per (dataset, held-out domain, trial seed) that some job evaluates."""
    units: dict[str, dict[str, Any]] = {}
    for job in plan(cfg, workdir, _quiet).jobs:
        units.setdefault(_unit_id(job), {"id": _unit_id(job), "dataset": job.dataset, "heldout": job.heldout,
                                         "trial_seed": job.trial_seed})
    return list(units.values())


def _unit_jobs(p: Plan, unit: dict[str, Any]) -> list[Job]:
    return [j for j in p.jobs if _unit_id(j) == unit["id"]]


def run_unit(cfg: dict[str, Any], workdir: str | Path, unit: dict[str, Any]) -> dict[str, Any]:
    """Generate the answers of one unit's jobs (every model and mode on that held-out domain and seed)."""
    p = plan(cfg, workdir, _quiet)
    # one lock per unit (not per run): the units of a run answer side by side in their own jobs
    with stage_lock(workdir, f"eval-{p.cfg['run']}-{unit['id']}", f"eval (run {p.cfg['run']}, unit {unit['id']})"):
        return generate_answers(p, _unit_jobs(p, unit), progress=False)


def unit_outputs(cfg: dict[str, Any], workdir: str | Path, unit: dict[str, Any]) -> list[Path]:
    """The unit's prediction files."""
    p = plan(cfg, workdir, _quiet)
    return [job_file(p.eval_dir, j, p.cfg) for j in _unit_jobs(p, unit)]


def collect(cfg: dict[str, Any], workdir: str | Path, results: dict[str, dict[str, Any]],
            log: Any = None) -> dict[str, Any]:
    """Once every unit has ended: score all stored answers and write the tables (generates nothing)."""
    p = plan(cfg, workdir, log)
    stats = {"jobs": len(p.jobs), "generated": sum(int(r.get("generated") or 0) for r in results.values()),
             "errors": sum(int(r.get("errors") or 0) for r in results.values())}
    with stage_lock(workdir, f"eval-{p.cfg['run']}", f"eval (run {p.cfg['run']})"):
        return _report(p, stats, log)


def outputs(cfg: dict[str, Any], workdir: str | Path) -> list[Path]:
    """The result files (one chart per dataset of the config)."""
    d = eval_dir_of(cfg, Path(workdir))
    names = list(cfg.get("datasets") or ([cfg["dataset"]] if cfg.get("dataset") else []))
    return [d / "results.json", d / "results.md", d / "results.tex", *[d / f"{ds}.png" for ds in names]]


def inputs(cfg: dict[str, Any], workdir: str | Path) -> list[Path]:
    """Files it reads that the pipeline does not produce upstream: students, synonyms, paper table."""
    cfg = resolve("eval", cfg)
    out = [Path(cfg["synonyms"]) if cfg["synonyms"] else resource_path("pipelines", "class_synonyms.yaml"),
           Path(cfg["paper_table"]) if cfg["paper_table"] else resource_path("pipelines", "paper_table1.yaml")]
    if cfg["students"]:
        out += [Path(s["dir"]) for s in find_students(Path(workdir), students_run_of(cfg))]
    out += [Path(m["adapter"]) for m in cfg["models"] if m.get("adapter")]
    return out


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dbr eval``."""
    p.add_argument("--config", "-c", help="eval config (YAML): a pipeline with an `eval` stage or a mapping of "
                                          "eval options, e.g. pipelines/eval.yaml")
    p.add_argument("--workdir", "-w", help="work directory (default: the config's `workdir`, else ./work)")
    p.add_argument("--model", metavar="SPEC",
                   help="evaluate this backend instead of the config's students/models: hf:PATH, vllm:MODEL, "
                        "openai:MODEL[@BASE_URL] (with --adapter: the base model of the adapter)")
    p.add_argument("--adapter", metavar="DIR",
                   help="a LoRA adapter: a student's final/ folder (with student.json; its base model, dataset, "
                        "held-out domain and trial seed are used) or a PEFT adapter folder with --model")
    p.add_argument("--name", help="row name of --model/--adapter in the tables (default: the spec)")
    add_option(p, "eval", "modes", "--mode", action="append", choices=MODES,
               help="direct | reasoning | choice | icl (repeatable; default: the config's, else "
                    "direct+reasoning for students and choice for models)")
    add_option(p, "eval", "shots", action="append", type=int, metavar="K")
    add_option(p, "eval", "datasets", "--dataset", action="append", metavar="NAME")
    add_option(p, "eval", "heldout_domains", "--heldout", action="append", metavar="DOMAIN")
    add_option(p, "eval", "trial_seeds", "--trial-seed", action="append", type=int, metavar="K")
    add_option(p, "eval", "run")
    add_option(p, "eval", "limit", metavar="N")
    add_option(p, "eval", "batch_size", metavar="N")
    add_option(p, "eval", "max_new_tokens", type=int, metavar="N", help="token budget of every mode's answer")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The eval cfg: the config file's eval options with command-line overrides applied."""
    if args.config:
        cfg = load_stage_config(args.config, "eval")
    elif args.model or args.adapter:
        cfg = {"stage": "eval"}
    else:
        raise ConfigError("dbr eval: give --config FILE (e.g. pipelines/eval.yaml), or --model SPEC / --adapter DIR")
    if args.adapter:
        adir = Path(args.adapter)
        if not adir.is_dir():
            raise FileNotFoundError(f"--adapter {adir}: no such folder")
        sj = adir / "student.json"
        if sj.exists():
            info = json.loads(sj.read_text(encoding="utf-8"))
            spec = args.model or _student_spec(info["base_model"], "hf")
            cfg["datasets"] = args.datasets or [info["dataset"]]
            cfg["heldout_domains"] = args.heldout_domains or [info["heldout_domain"]]
            cfg["trial_seeds"] = args.trial_seeds or [int(info["trial_seed"])]
            adapter = student_adapter(adir, info)
            options = student_options(cfg, info, spec.split(":", 1)[0].lower())
            # W/runs/<run>/<Dataset>/<heldout>/seed<k>/final: name the row after the run
            parents = adir.resolve().parents
            label = parents[3].name if len(parents) > 3 and adir.name == "final" else adir.name
        elif not args.model:
            raise ConfigError(f"--adapter {adir}: no student.json there; give its base model with --model SPEC")
        else:
            spec, adapter, label, options = args.model, str(adir.resolve()), args.model, {}
        default_modes = ["direct", "reasoning"]
    else:
        spec, adapter, label, default_modes, options = args.model, None, args.model, ["choice"], {}
    if args.model or args.adapter:
        cfg["students"] = False
        cfg["models"] = [{"name": args.name or label,
                          "spec": spec, **({"adapter": adapter} if adapter else {}),
                          **({"options": options} if options else {}),
                          "modes": args.modes or default_modes}]
    elif args.modes:
        cfg["student_modes"] = args.modes
        cfg["modes"] = args.modes
        for m in cfg.get("models") or []:
            m["modes"] = args.modes
    cfg.update({k: v for k, v in options_from_args(args).items() if k != "modes"})  # --mode: handled above
    schema = stage_schema("eval")
    if schema is not None:
        validate(cfg, schema, args.config or "command line")
    return cfg


def main(args: argparse.Namespace) -> int:
    """``dbr eval``: evaluate, write the tables, print the Markdown report."""
    cfg = config_from_args(args)
    workdir = Path(args.workdir or cfg.get("workdir") or "work")
    summary = run(cfg, workdir, progress=not args.no_progress)
    print(f"results: {eval_dir_of(cfg, workdir)} ({summary['generated']} answers generated, "
          f"{summary['records']} scored)")
    return 0
