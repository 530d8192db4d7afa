"""Run a stage's units as separate jobs through submitit: local processes or a Slurm cluster.

``dbr run --executor inline`` (the default) runs every stage in the ``dbr`` process, as before.
With ``local`` or ``slurm`` the stages that split into independent units run each unit as its own
job (its own process, so GPU memory is released between units):

=========  ===============================================  ==========================================
stage      one unit                                         when all units have ended
=========  ===============================================  ==========================================
generate   one shard of a dataset (``--shard I --num-shards N``)  the shard stores are merged
train      one (dataset, held-out domain, trial seed)        the selections are summarised
eval       one (dataset, held-out domain, trial seed)        the result tables are written
=========  ===============================================  ==========================================

Every other stage runs inline. The executor is `submitit <https://github.com/facebookincubator/submitit>`_:
``local`` starts one process per unit on this machine (``max_parallel`` at a time), ``slurm``
submits one job array per stage (one array task per unit, ``array_parallelism`` = ``max_parallel``).
A unit job is checkpointable: when Slurm preempts it or its time runs out, submitit requeues the
same call, and the stage resumes from what it already stored (the generation store, the training
checkpoint, the prediction files).

Each unit has a folder ``W/logs/<stage>/<unit>/``: ``job.json`` (job id, where submitit keeps its
logs), ``stdout``/``stderr`` (links to those logs), ``running.json`` (pid, host) while it runs and
``done.json`` once it succeeded. ``done.json`` records the unit's config key and a fingerprint of its
outputs; a later ``dbr run`` resubmits only the units without a matching one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from dbr_builder.core import workdir as wdl
from dbr_builder.core.fsutil import stable_hash, tree_fingerprint, write_json_atomic
from dbr_builder.errors import ConfigError, UserError
from dbr_builder.log import ROOT_LOGGER, get_logger, setup_logging
from dbr_builder.stages import evaluate as evaluate_stage
from dbr_builder.stages import generate
from trainers import train

KINDS = ("inline", "local", "slurm")

# Stages that split into units. A unit stage module exposes
#   job_units(cfg, workdir, opts) -> [{"id": str, ...}]   (checked before any job is submitted)
#   run_unit(cfg, workdir, unit) -> dict                   (in the job's process; resumes)
#   unit_outputs(cfg, workdir, unit) -> [Path]             (what done.json fingerprints)
#   collect(cfg, workdir, {unit id: run_unit's dict}) -> dict   (in `dbr run`, after every unit)
UNIT_STAGES: dict[str, ModuleType] = {"generate": generate, "train": train, "eval": evaluate_stage}

# submitit's resource parameters shared by the local and Slurm executors (AutoExecutor's generic keys)
RESOURCE_KEYS = {"timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node"}
RESOURCE_DEFAULTS: dict[str, Any] = {"timeout_min": 24 * 60}
POLL_S = {"local": 2.0, "slurm": 30.0}
TAIL_LINES = 25

logger = get_logger(__name__)


@dataclass
class ExecutorConfig:
    """The ``executor:`` section of a pipeline, with command-line overrides applied."""

    kind: str = "inline"
    poll_s: float | None = None
    max_parallel: int | None = None
    resources: dict[str, Any] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    shards: int | None = None
    cli: dict[str, Any] = field(default_factory=dict)  # command-line values: they win over every YAML level

    @property
    def poll(self) -> float:
        return float(self.poll_s if self.poll_s is not None else POLL_S.get(self.kind, 2.0))

    def for_stage(self, name: str, stage: str) -> dict[str, Any]:
        """Resources, Slurm options and ``shards`` for one stage entry (``stages.<stage>`` then ``stages.<name>``)."""
        out = {"resources": {**RESOURCE_DEFAULTS, **self.resources}, "slurm": dict(self.slurm),
               "shards": self.shards, "max_parallel": self.max_parallel}
        for key in dict.fromkeys((stage, name)):
            over = self.stages.get(key) or {}
            out["resources"].update(over.get("resources") or {})
            out["slurm"].update(over.get("slurm") or {})
            for k in ("shards", "max_parallel"):
                if over.get(k) is not None:
                    out[k] = over[k]
        out["resources"].update(self.cli.get("resources") or {})
        out["slurm"].update(self.cli.get("slurm") or {})
        for k in ("shards", "max_parallel"):
            if self.cli.get(k) is not None:
                out[k] = self.cli[k]
        return out


def executor_config(section: dict[str, Any] | None, kind: str | None = None,
                    slurm: dict[str, Any] | None = None, resources: dict[str, Any] | None = None,
                    shards: int | None = None, max_parallel: int | None = None) -> ExecutorConfig:
    """Build the executor settings: the pipeline's ``executor:`` section, then command-line overrides."""
    s = dict(section or {})
    ex = ExecutorConfig(
        kind=kind or s.get("kind") or "inline", poll_s=s.get("poll_s"), max_parallel=s.get("max_parallel"),
        resources=dict(s.get("resources") or {}), slurm=dict(s.get("slurm") or {}),
        stages={k: dict(v or {}) for k, v in (s.get("stages") or {}).items()}, shards=s.get("shards"),
    )
    if ex.kind not in KINDS:
        raise ConfigError(f"executor: {ex.kind!r} is not one of {', '.join(KINDS)}")
    ex.cli = {"resources": dict(resources or {}), "slurm": dict(slurm or {}), "shards": shards,
              "max_parallel": max_parallel}
    for k in ("shards", "max_parallel"):
        if ex.cli[k] is not None:
            setattr(ex, k, ex.cli[k])
    for where, res in [("executor.resources", ex.resources), ("--resource", ex.cli["resources"])] + [
            (f"executor.stages.{k}.resources", v.get("resources") or {}) for k, v in ex.stages.items()]:
        bad = sorted(set(res) - RESOURCE_KEYS)
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(bad)}; use {', '.join(sorted(RESOURCE_KEYS))} "
                              "(Slurm-only options go under executor.slurm)")
    for k, v in (("shards", ex.shards), ("max_parallel", ex.max_parallel)):
        if v is not None and int(v) < 1:
            raise ConfigError(f"executor.{k}: {v} must be >= 1")
    return ex


def make_executor(kind: str, folder: Path, opts: dict[str, Any], name: str) -> Any:
    """A submitit executor for ``local`` or ``slurm`` with the stage's parameters.

    Slurm: an ``AutoExecutor`` with submitit's generic resource keys (``timeout_min``,
    ``gpus_per_node``, ...) and the ``slurm`` options as its ``slurm_*`` parameters (``partition``,
    ``account``, ``qos``, ``constraint``, ``additional_parameters`` for any other sbatch line,
    ``setup`` for shell lines before the job, ...). Local: a ``LocalExecutor`` (the ``dbr run``
    driver gives each job its own GPUs through ``visible_gpus``).
    """
    import submitit

    res = opts["resources"]
    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(**{k: v for k, v in res.items()
                                if k in ("timeout_min", "gpus_per_node", "tasks_per_node", "nodes")})
        return ex
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster=kind)
    except RuntimeError as e:  # submitit's Slurm executor needs `srun` on this machine
        raise UserError(f"executor slurm: no `srun` here ({e}); run `dbr run --executor slurm` on a Slurm "
                        "login node, or use --executor local") from None
    params: dict[str, Any] = {"name": f"dbr-{name}", **res}
    params.update({f"slurm_{k}": v for k, v in opts["slurm"].items()})
    if opts.get("max_parallel"):
        params.setdefault("slurm_array_parallelism", int(opts["max_parallel"]))
    try:
        ex.update_parameters(**params)
    except (NameError, ValueError, AssertionError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"executor ({kind}, stage {name}): {first}") from None
    return ex


def local_gpu_slots(gpus_per_unit: int) -> list[tuple[int, ...]] | None:
    """GPU id groups for local unit jobs (``None``: units use no GPU, run as many as ``max_parallel``).

    The visible GPUs (``CUDA_VISIBLE_DEVICES``, else all that torch sees) split into groups of
    ``gpus_per_unit``: 8 GPUs and 1 per unit give 8 concurrent units, each on its own GPU.
    """
    if gpus_per_unit <= 0:
        return None
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [int(x) for x in env.split(",") if x.strip().isdigit()]
    else:
        import torch

        ids = list(range(torch.cuda.device_count()))
    if len(ids) < gpus_per_unit:
        raise UserError(f"executor local: a unit asks for {gpus_per_unit} GPU(s) (resources.gpus_per_node), "
                        f"this machine shows {len(ids)}; lower gpus_per_node or use --executor slurm")
    return [tuple(ids[i:i + gpus_per_unit]) for i in range(0, len(ids) - gpus_per_unit + 1, gpus_per_unit)]


# ---------------------------------------------------------------------------------------------
# the job (runs in the unit's own process)


def unit_dir(workdir: Path, name: str, unit_id: str) -> Path:
    """``W/logs/<stage>/<unit>/``."""
    return wdl.logs_dir(workdir) / name / unit_id


class UnitJob:
    """The callable a unit's job runs: one stage unit, then its ``done.json``.

    Checkpointable in submitit's sense (``submitit.helpers.Checkpointable``'s protocol: a
    ``checkpoint`` method that returns the call to requeue): when Slurm preempts the job or its
    time runs out, submitit requeues the same call and the stage resumes from its stored state.
    (Duck-typed rather than subclassed so that ``dbr --help`` does not import submitit.)
    """

    def __init__(self, level: int = logging.INFO) -> None:
        self.level = level  # the dbr log level of the `dbr run` that submitted the job

    def __call__(self, stage: str, cfg: dict[str, Any], workdir: str, unit: dict[str, Any], key: str,
                 name: str) -> dict[str, Any]:
        import submitit

        wd = Path(workdir)
        env = submitit.JobEnvironment()
        export_distributed()
        setup_logging(self.level)  # the stage's messages go to this job's stdout/stderr (rank 0 for INFO)
        d = unit_dir(wd, name, unit["id"])
        if env.global_rank == 0:
            write_json_atomic(d / "running.json", {"pid": os.getpid(), "host": socket.gethostname(),
                                                   "job_id": env.job_id, "started": time.time()})
        t0 = time.perf_counter()
        mod = UNIT_STAGES[stage]
        summary = mod.run_unit(cfg, wd, unit)
        if env.global_rank == 0:
            write_json_atomic(d / "done.json", {
                "key": key, "outputs": tree_fingerprint([Path(p) for p in mod.unit_outputs(cfg, wd, unit)]),
                "summary": summary, "pid": os.getpid(), "host": socket.gethostname(), "job_id": env.job_id,
                "seconds": round(time.perf_counter() - t0, 3)})
            (d / "running.json").unlink(missing_ok=True)
        return summary

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue the same call (the stage resumes from what it stored)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def export_distributed() -> int:
    """In a job with several tasks (GPUs) per unit: export torch.distributed's ``env://`` variables.

    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` from submitit's job
    environment (what ``torchrun`` would set), which accelerate reads. Each task sees all of the
    node's GPUs and takes ``cuda:LOCAL_RANK``. Returns the number of tasks.
    """
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return env.num_tasks


def unit_key(stage_key: dict[str, Any], unit: dict[str, Any]) -> str:
    """What a unit's ``done.json`` must match: the stage's config/upstream key and the unit itself."""
    return stable_hash({"stage": stage_key, "unit": unit})


def done_record(d: Path, key: str, outputs: list[Path]) -> dict[str, Any] | None:
    """The unit's ``done.json`` when it matches ``key`` and its outputs are as that run left them."""
    f = d / "done.json"
    if not f.exists():
        return None
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: the unit is simply run again
    if rec.get("key") != key or rec.get("outputs") != tree_fingerprint(outputs):
        return None
    return rec


# ---------------------------------------------------------------------------------------------
# the driver (in `dbr run`)


def _link(d: Path, job: Any) -> None:
    """``job.json`` and ``stdout``/``stderr`` links to submitit's logs of this unit's job."""
    d.mkdir(parents=True, exist_ok=True)
    paths = job.paths
    write_json_atomic(d / "job.json", {"job_id": job.job_id, "submitted": time.time(),
                                       "stdout": str(paths.stdout), "stderr": str(paths.stderr),
                                       "submitit_folder": str(paths.folder)})
    for nm, target in (("stdout", paths.stdout), ("stderr", paths.stderr)):
        link = d / nm
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(target, d))


def log_tail(job: Any, lines: int = TAIL_LINES) -> str:
    """The last lines of a job's stdout and stderr (progress-bar redraws split into lines), and how it ended."""
    parts = []
    for label, reader, n in (("stdout", job.stdout, lines // 3), ("stderr", job.stderr, lines)):
        try:
            text = reader() or ""
        except (OSError, ValueError):
            text = ""
        rows = [r for r in text.replace("\r", "\n").splitlines() if r.strip()]
        if rows:
            parts.append(f"[{label}]\n" + "\n".join(rows[-n:]))
    try:
        exc = job.exception()
    except Exception as e:  # noqa: BLE001 - a torn result pickle is also a way to end
        exc = e
    if exc is not None:
        first = str(exc).strip().splitlines()
        parts.append(f"[job] {type(exc).__name__}: {first[0] if first else ''}")
    return "\n".join(parts) or "(no log output)"


def _state(job: Any) -> str:
    """``running``, ``queued``, ``ok`` or ``failed`` (a finished job without a result failed)."""
    if not job.done():
        st = str(job.state).upper()
        return "running" if st in ("RUNNING", "COMPLETING") else "queued"
    try:
        return "failed" if job.exception() is not None else "ok"
    except Exception:  # noqa: BLE001 - submitit raises when the result pickle is missing or torn
        return "failed"


def run_units(name: str, stage: str, cfg: dict[str, Any], workdir: Path, stage_key: dict[str, Any],
              ex: ExecutorConfig, resume_cmd: str, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a unit stage's pending units as jobs, wait, then collect; return the stage summary.

    Raises ``UserError`` naming the failed units (with each one's log tail printed first and the
    command that resumes) when some unit failed; units that succeeded keep their ``done.json``.
    """
    log = log or logger.info
    mod = UNIT_STAGES[stage]
    wd = Path(workdir)
    opts = ex.for_stage(name, stage)
    units = mod.job_units(cfg, wd, opts)
    results: dict[str, dict[str, Any]] = {}
    todo: list[tuple[dict[str, Any], str]] = []
    for u in units:
        key = unit_key(stage_key, u)
        rec = done_record(unit_dir(wd, name, u["id"]), key, [Path(p) for p in mod.unit_outputs(cfg, wd, u)])
        if rec is not None:
            results[u["id"]] = rec.get("summary") or {}
        else:
            todo.append((u, key))
    log(f"[{name}] {len(units)} unit(s) on the {ex.kind} executor: {len(results)} already done, "
        f"{len(todo)} to run (logs: {wdl.logs_dir(wd) / name}/<unit>/)")
    if todo:
        failed = _submit_and_wait(name, stage, cfg, wd, todo, ex, opts, log)
        for u, _ in todo:
            rec = (json.loads((unit_dir(wd, name, u["id"]) / "done.json").read_text())
                   if u["id"] not in failed and (unit_dir(wd, name, u["id"]) / "done.json").exists() else None)
            if rec is None and u["id"] not in failed:
                failed[u["id"]] = None  # the job ended "well" but never wrote done.json
            if rec is not None:
                results[u["id"]] = rec.get("summary") or {}
        if failed:
            for uid, job in failed.items():
                log(f"--- {name} unit {uid} failed; the end of its logs ({unit_dir(wd, name, uid)}/):")
                log(log_tail(job) if job is not None else "(the job ended without writing done.json)")
            raise UserError(f"{len(failed)} of {len(units)} unit(s) of stage `{name}` failed "
                            f"({', '.join(sorted(failed))}); logs under {wdl.logs_dir(wd) / name}/; "
                            f"fix the cause and resume (finished units are kept) with: {resume_cmd}")
    return mod.collect(cfg, wd, results)


def _submit_and_wait(name: str, stage: str, cfg: dict[str, Any], wd: Path, todo: list[tuple[dict[str, Any], str]],
                     ex: ExecutorConfig, opts: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Submit ``todo`` and poll until every job ended; return ``{unit id: job}`` of the failed ones."""
    folder = wdl.logs_dir(wd) / name / "_submitit"  # submitit names its files by job id
    executor = make_executor(ex.kind, folder, opts, name)
    fn = UnitJob(logging.getLogger(ROOT_LOGGER).getEffectiveLevel())
    wd_abs = str(wd.resolve())
    jobs: dict[str, Any] = {}
    queue = list(todo)
    # local: at most max_parallel processes at once (submitit's local executor starts each job at
    # once), each on its own GPUs when the units use GPUs
    slots = local_gpu_slots(int(opts["resources"].get("gpus_per_node") or 0)) if ex.kind == "local" else None
    held: dict[str, tuple[int, ...]] = {}
    if ex.kind == "slurm":
        limit = len(queue)
    else:
        limit = int(opts.get("max_parallel") or (len(slots) if slots else os.cpu_count() or 1))
        if slots:
            limit = min(limit, len(slots))

    def submit(batch: list[tuple[dict[str, Any], str]]) -> None:
        for u, _ in batch:  # before the job starts: a fast job may write its new done.json at once
            (unit_dir(wd, name, u["id"]) / "done.json").unlink(missing_ok=True)
        if ex.kind == "slurm" and len(batch) > 1:
            with executor.batch():  # one job array; array_parallelism bounds the tasks running at once
                pending = [(u, executor.submit(fn, stage, cfg, wd_abs, u, k, name)) for u, k in batch]
        else:
            pending = []
            for u, k in batch:
                if slots is not None:
                    held[u["id"]] = slots.pop(0)
                    executor.update_parameters(visible_gpus=held[u["id"]])
                pending.append((u, executor.submit(fn, stage, cfg, wd_abs, u, k, name)))
        for u, job in pending:
            jobs[u["id"]] = job
            _link(unit_dir(wd, name, u["id"]), job)

    submit(queue[:limit])
    queue = queue[limit:]
    states: dict[str, str] = {}
    last = ""
    try:
        while True:
            states = {uid: states.get(uid) if states.get(uid) in ("ok", "failed") else _state(j)
                      for uid, j in jobs.items()}
            active = sum(s in ("running", "queued") for s in states.values())
            for uid in [u for u in held if states.get(u) in ("ok", "failed")]:
                slots.append(held.pop(uid))  # type: ignore[union-attr]  # that unit's GPUs are free again
            if queue and active < limit:
                submit(queue[: limit - active])
                queue = queue[limit - active:]
                continue
            counts = {s: sum(v == s for v in states.values()) for s in ("ok", "running", "queued", "failed")}
            line = (f"[{name}] {counts['ok']}/{len(todo)} done, {counts['running']} running, "
                    f"{counts['queued'] + len(queue)} queued, {counts['failed']} failed")
            if line != last:
                log(line)
                last = line
            if not queue and not active:
                break
            time.sleep(ex.poll)
    except KeyboardInterrupt:
        if ex.kind == "local":
            for uid, j in jobs.items():
                if states.get(uid) in ("running", "queued"):
                    j.cancel(check=False)
        else:
            logger.warning(f"Slurm jobs keep running ({', '.join(sorted({str(j.job_id) for j in jobs.values()}))}); "
                           "rerun the same command to wait for them and resubmit what is not done")
        raise
    return {uid: jobs[uid] for uid, s in states.items() if s == "failed"}
