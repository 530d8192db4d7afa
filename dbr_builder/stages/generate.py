"""Generate teacher reasoning chains for every image of a dataset (resumable, shardable).

For each manifest image (optionally one shard of them, by a hash of ``image_id``) the stage
asks the teacher for ``n`` candidate chains with the ``teacher`` prompt (class list, label
withheld) and appends them to the generation store (``dbr_builder.core.store``). Already stored
candidates are skipped, so a rerun after a crash or ``kill -9`` finishes the job without
redoing paid-for work; failed requests are recorded with their cause and retried on the next
pass and the next run. Images are decoded and resized in worker threads a couple of batches
ahead of the engine.

``generate_for_images`` is the entry point for the filter's STaR-style rationalization round
(hinted prompt with the true label, results stored with ``prompt_name="rationalize"``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbr_builder.backends import Backend, BackendError, Request, Result, make_backend
from dbr_builder.backends.base import TooManyErrors, _coerce, check_sampling
from dbr_builder.config import (
    add_option,
    flags_of,
    options_from_args,
    resolve,
    schema_defaults,
    validate_options,
)
from dbr_builder.core.fsutil import write_json_atomic
from dbr_builder.core.imageprep import parallel_map, prefetch, prepare_content
from dbr_builder.core.locks import stage_lock
from dbr_builder.core.manifest import image_path, load_manifest
from dbr_builder.core.prompts import fields, prompt_id, teacher_prompt
from dbr_builder.core.store import (
    Row,
    Store,
    done_keys_of,
    merge_dataset,
    params_json,
    request_key,
    shard_file,
    store_dir,
    store_files,
)
from dbr_builder.errors import ConfigError, UserError
from dbr_builder.log import show_progress

PER_DATASET = True

DEFAULTS: dict[str, Any] = schema_defaults("generate")  # defined once, in schemas/stages/generate.schema.json


@dataclass
class Job:
    """One image with one prompt: the unit the store keys its ``n`` candidates by."""

    image_id: str
    content: list[dict]
    prompt_name: str
    prompt_id: str


def shard_of(image_id: str, num_shards: int) -> int:
    """Deterministic shard of an image (uniform even when ids are not hex)."""
    return int(hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:16], 16) % num_shards


def _sample_seed(seed: int | None, job: Job, sample_index: int) -> int | None:
    if seed is None:
        return None
    h = hashlib.sha256(f"{seed}\x1f{job.image_id}\x1f{job.prompt_id}\x1f{sample_index}".encode()).hexdigest()
    return int(h[:8], 16) % (2**31)


def _cause(error: str) -> str:
    return error.split(":", 1)[0].strip() or "unknown"


def _split_tokens(total: int, texts: list[str]) -> list[int]:
    """Per-candidate output tokens: exact for one candidate, else shared by text length."""
    if len(texts) == 1:
        return [total]
    size = sum(len(t) for t in texts) or 1
    return [round(total * len(t) / size) for t in texts]


def run_jobs(store: Store, backend: Backend, jobs: Sequence[Job], n: int, sampling: dict[str, Any],
             batch_size: int = 64, passes: int = 2, max_pixels: int | None = None,
             prep_workers: int | None = None, progress: bool = True, desc: str = "generate",
             on_batch: Callable[[int], None] | None = None, max_error_share: float | None = 0.25,
             error_check_after: int = 64, done_extra: set[str] | None = None) -> dict[str, Any]:
    """Generate the missing candidates of ``jobs`` into ``store``; return a summary.

    ``sampling`` holds ``max_new_tokens``, ``temperature``, ``top_p`` and ``seed``; with
    the backend's model name and the prompt id they make the request keys. A backend
    exception fails only its batch (recorded per request); ``passes`` bounds the retries
    within this run, a rerun retries whatever is still missing. A ``BackendError`` from the
    backend (engine failed to start, engine died) is fatal and propagates. Once
    ``error_check_after`` requests were sent, a share of failed requests above
    ``max_error_share`` stops the run with :class:`TooManyErrors` (the batches already done,
    errors included, are stored) instead of recording thousands of identical errors.
    ``done_extra``: keys stored elsewhere (the merged store, for a shard rerun after a merge)
    that count as done.
    """
    from tqdm import tqdm


    if n < 1:
        raise ValueError("n (candidates per image) must be >= 1")
    check_sampling(n, float(sampling["temperature"]), float(sampling["top_p"]), desc)
    t0 = time.perf_counter()
    params = params_json(sampling)
    model = backend.model
    done = store.done_keys() | (done_extra or set())
    pending: list[tuple[Job, list[tuple[int, str]]]] = []
    already = 0
    for job in jobs:
        miss = []
        for j in range(n):
            k = request_key(job.image_id, job.prompt_id, model, params, j)
            if k in done:
                already += 1
            else:
                miss.append((j, k))
        if miss:
            pending.append((job, miss))
    del done
    wants_images = getattr(backend, "wants_images", True)

    def prepare(batch: list[tuple[Job, list[tuple[int, str]]]]) -> list[tuple[Any, Request | None, str | None]]:
        def one(item: tuple[Job, list[tuple[int, str]]]) -> tuple[Any, Request | None, str | None]:
            job, miss = item
            try:
                content = prepare_content(job.content, max_pixels) if wants_images else job.content
            except OSError as e:
                return item, None, f"image: {e}"
            req = Request(key=miss[0][1], content=content, n=len(miss),
                          max_new_tokens=int(sampling["max_new_tokens"]), temperature=float(sampling["temperature"]),
                          top_p=float(sampling["top_p"]), seed=_sample_seed(sampling.get("seed"), job, miss[0][0]))
            return item, req, None

        if not wants_images or len(batch) < 8:
            return [one(x) for x in batch]
        return parallel_map(one, batch, prep_workers)

    stats = Counter()
    fail_causes: Counter = Counter()
    last_errors: dict[str, str] = {}
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc=desc, unit="img",
               disable=not show_progress(progress), dynamic_ncols=True)
    try:
        for p in range(max(1, passes)):
            failed: list[tuple[Job, list[tuple[int, str]]]] = []
            batches = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
            for prepared in prefetch(batches, prepare, depth=2):
                reqs = [r for _, r, _ in prepared if r is not None]
                try:
                    results = backend.generate(reqs) if reqs else []
                except BackendError:
                    raise  # the engine did not start or died: no later batch can succeed
                except Exception as e:  # noqa: BLE001 - a backend crash fails this batch, not the run
                    results = [Result(r.key, [], 0, [], error=f"backend: {type(e).__name__}: {e}"[:500]) for r in reqs]
                by_key = {r.key: r for r in results}
                rows: list[Row] = []
                for (job, miss), req, prep_err in prepared:
                    res = by_key.get(req.key) if req is not None else None
                    err = prep_err or (res.error if res is not None else "backend: no result returned")
                    texts = res.texts if res is not None and res.error is None else []
                    toks = _split_tokens(res.out_tokens, texts) if texts else []
                    finishes = (res.finish_reasons if res is not None else []) or []
                    ok_here = 0
                    for i, (j, k) in enumerate(miss):
                        if i < len(texts):
                            rows.append(Row(k, job.image_id, job.prompt_name, job.prompt_id, model, params, j,
                                            texts[i], finishes[i] if i < len(finishes) else "stop", toks[i]))
                            ok_here += 1
                        else:
                            e = err if not texts else f"short: backend returned {len(texts)} of {len(miss)} candidates"
                            rows.append(Row(k, job.image_id, job.prompt_name, job.prompt_id, model, params, j,
                                            None, None, None, e))
                    stats["generated"] += ok_here
                    stats["out_tokens"] += sum(toks)
                    if ok_here == 0:
                        stats["failed_requests"] += 1
                        fail_causes[_cause(rows[-1].error or "unknown")] += 1
                    if ok_here < len(miss):
                        bad = miss[ok_here:]
                        failed.append((job, bad))
                        last_errors[job.image_id] = rows[-1].error or "unknown"
                    else:
                        last_errors.pop(job.image_id, None)
                        bar.update(1)
                store.add(rows)
                stats["requests"] += len(prepared)
                if on_batch is not None:
                    on_batch(len(rows))
                el = time.perf_counter() - t0
                bar.set_postfix(tok_s=f"{stats['out_tokens'] / el:.0f}", failed=len(failed), refresh=False)
                sent, bad = stats["requests"], stats["failed_requests"]
                if max_error_share is not None and sent >= max(1, error_check_after) and bad > max_error_share * sent:
                    (cause, count), = fail_causes.most_common(1)
                    example = next((e for e in last_errors.values() if _cause(e) == cause), cause)
                    raise TooManyErrors(
                        f"{desc}: {bad} of {sent} requests to {model} failed ({bad / sent:.0%} > max_error_share "
                        f"{max_error_share:.0%}); most common cause {cause!r} ({count}x), e.g. {example[:200]!r}; "
                        "stopped; fix the cause and rerun (finished candidates are kept)")
            stats["passes"] = p + 1
            pending = failed
            if not pending:
                break
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    causes = Counter(_cause(e) for e in last_errors.values())
    return {
        "teacher": model,
        "images": len(jobs),
        "candidates_wanted": len(jobs) * n,
        "already_done": already,
        "generated": stats["generated"],
        "requests_sent": stats["requests"],
        "passes": stats["passes"],
        "out_tokens": stats["out_tokens"],
        "failed_images": len(pending),
        "failures_by_cause": dict(sorted(causes.items())),
        "failed_requests": stats["failed_requests"],
        "wall_s": round(wall, 3),
        "candidates_per_s": round(stats["generated"] / wall, 1) if wall > 0 else None,
        "out_tokens_per_s": round(stats["out_tokens"] / wall, 1) if wall > 0 else None,
    }


# --- building jobs from the manifest ---------------------------------------------------------

def build_jobs(df: Any, meta: dict[str, Any], prompt_name: str) -> list[Job]:
    """One job per manifest row: the prompt text (shared prefix), then the image."""
    pid = prompt_id(prompt_name)
    classes = list(meta["classes"])
    hinted = "label" in fields(prompt_name)
    shared = None if hinted else teacher_prompt(prompt_name, classes)
    jobs = []
    for image_id, rel, cls in zip(df["image_id"], df["path"], df["class_name"], strict=True):
        text = teacher_prompt(prompt_name, classes, label=cls) if hinted else shared
        # Prompt text first: it is identical for every image, so the engine's prefix cache reuses it.
        content = [{"type": "text", "text": text}, {"type": "image", "path": str(image_path(meta, rel))}]
        jobs.append(Job(image_id, content, prompt_name, pid))
    return jobs


def select_rows(df: Any, cfg: dict[str, Any]) -> Any:
    """Apply ``domains`` / ``splits`` / shard / ``limit`` to the manifest (order kept)."""
    import polars as pl


    if cfg.get("domains"):
        unknown = sorted(set(cfg["domains"]) - set(df["domain"].unique().to_list()))
        if unknown:
            raise ConfigError(f"generate: domains {unknown} not in the manifest of {cfg['dataset']}")
        df = df.filter(pl.col("domain").is_in(cfg["domains"]))
    if cfg.get("splits"):
        df = df.filter(pl.col("split").is_in(cfg["splits"]))
    shard, num = int(cfg.get("shard") or 0), int(cfg.get("num_shards") or 1)
    if num < 1 or not 0 <= shard < num:
        raise ConfigError(f"generate: shard {shard} of num_shards {num} is out of range (0 <= shard < num_shards)")
    if num > 1:
        df = df.filter(pl.col("image_id").map_elements(lambda i: shard_of(i, num) == shard, return_dtype=pl.Boolean))
    df = df.unique(subset="image_id", keep="first", maintain_order=True)  # duplicate files share a request
    if cfg.get("limit"):
        df = df.head(int(cfg["limit"]))
    return df


def _sampling(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: cfg[k] for k in ("max_new_tokens", "temperature", "top_p", "seed")}


def _error_limits(cfg: dict[str, Any]) -> dict[str, Any]:
    share = cfg.get("max_error_share")
    return {"max_error_share": None if share is None else float(share),
            "error_check_after": int(cfg.get("error_check_after") or 64)}


def close_backend(backend: Any) -> None:
    """Give back what ``backend`` holds (engine, GPU memory, threads) before the next model loads."""
    close = getattr(backend, "close", None)
    if callable(close):
        close()


def _full_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    out = resolve("generate", cfg)
    if not out.get("teacher") and not out.get("merge"):
        raise ConfigError("generate: set `teacher:` (e.g. vllm:Qwen/Qwen2.5-VL-7B-Instruct, openai:gpt-4o, "
                          "hf:<path>, oracle)")
    if "dataset" not in out:
        raise ConfigError("generate: `dataset` is not set")
    check_sampling(int(out["n"]), float(out["temperature"]), float(out["top_p"]), "generate")
    return out


def summary_file(workdir: Path, dataset: str, shard: int, num_shards: int) -> Path:
    """Where a run's summary is written (beside its store file)."""
    f = shard_file(workdir, dataset, shard, num_shards)
    return f.with_name(f.stem.replace("results", "summary") + ".json")


def lock_name(dataset: str, shard: int = 0, num_shards: int = 1) -> str:
    """The stage lock of the store file one generate run writes (see :mod:`dbr_builder.core.locks`)."""
    return f"generate-{dataset}" if num_shards <= 1 else f"generate-{dataset}-{shard:05d}-of-{num_shards:05d}"


def _shard_lock_of(path: Path, dataset: str) -> str | None:
    m = re.fullmatch(r"results-(\d+)-of-(\d+)\.sqlite", path.name)
    return lock_name(dataset, int(m.group(1)), int(m.group(2))) if m else None


def merge_shards(workdir: Path, dataset: str, extra: Sequence[str | Path] = ()) -> dict[str, int]:
    """``merge_dataset`` under the locks of the merged store and of every local shard.

    A shard still being written here (its lock held) or whose run did not finish (no
    completion marker) is refused with an error naming it; nothing is merged then.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(stage_lock(workdir, lock_name(dataset), f"generate {dataset} (merge)"))
        for f in store_files(workdir, dataset):
            name = _shard_lock_of(f, dataset)
            if name:
                stack.enter_context(stage_lock(workdir, name, f"generate {dataset} shard {f.name}"))
        return merge_dataset(workdir, dataset, extra)


def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The stage: generate (this shard of) a dataset's candidates; optionally merge shards."""
    c = _full_cfg(cfg)
    workdir = Path(workdir)
    ds = c["dataset"]
    shard, num = int(c["shard"]), int(c["num_shards"])
    df, meta = load_manifest(workdir, ds)
    df = select_rows(df, c)
    jobs = build_jobs(df, meta, c["prompt"])
    path = shard_file(workdir, ds, shard, num)
    with stage_lock(workdir, lock_name(ds, shard, num), f"generate {ds}" + (f" shard {shard}/{num}" if num > 1 else "")):
        # A shard rerun after a merge: what the merged store holds is done, not to redo.
        merged = shard_file(workdir, ds)
        extra_done = done_keys_of(merged) if num > 1 and merged.exists() else None
        backend = make_backend(c["teacher"], **(c.get("teacher_options") or {}))
        try:
            with Store(path) as st:
                st.incomplete_on_write()  # a run in progress: merge refuses this file until it ends
                summary = run_jobs(st, backend, jobs, int(c["n"]), _sampling(c), batch_size=int(c["batch_size"]),
                                   passes=int(c["passes"]), max_pixels=c.get("max_pixels"),
                                   prep_workers=c.get("prep_workers"), progress=bool(c["progress"]),
                                   desc=f"generate {ds}" + (f" [{shard}/{num}]" if num > 1 else ""),
                                   done_extra=extra_done, **_error_limits(c))
                st.set_state("complete", json.dumps({"images": summary["images"],
                                                     "failed_images": summary["failed_images"]}))
        finally:
            close_backend(backend)
        summary = {"dataset": ds, "prompt": c["prompt"], "shard": c["shard"], "num_shards": c["num_shards"],
                   "store": str(path), **summary}
        write_json_atomic(summary_file(workdir, ds, shard, num), summary)
    if c.get("merge") and num == 1:
        summary["merge"] = merge_shards(workdir, ds)
        write_json_atomic(summary_file(workdir, ds, shard, num), summary)
    return summary


def generate_for_images(workdir: str | Path, dataset: str, image_ids: Sequence[str], teacher_spec: str | Backend,
                        n: int, prompt_name: str = "rationalize", **opts: Any) -> dict[str, Any]:
    """Generate ``n`` candidates with ``prompt_name`` for some images (the filter's rationalization round).

    ``teacher_spec`` is a spec string or an already built backend (to reuse a loaded model).
    ``opts``: ``teacher_options``, ``max_new_tokens``, ``temperature``, ``top_p``, ``seed``,
    ``batch_size``, ``passes``, ``max_pixels``, ``prep_workers``, ``progress``, ``max_error_share``,
    ``error_check_after``. A backend built from a spec is closed before returning. Results go to the
    dataset's unsharded store with ``prompt_name`` recorded (``"rationalize"`` = hinted).
    """
    import polars as pl


    bad = sorted(set(opts) - set(DEFAULTS) - {"progress"})
    if bad:
        raise TypeError(f"generate_for_images: unknown option(s) {', '.join(bad)}")
    c = {**DEFAULTS, **opts}
    df, meta = load_manifest(workdir, dataset)
    wanted = list(dict.fromkeys(image_ids))
    df = df.filter(pl.col("image_id").is_in(wanted)).unique(subset="image_id", keep="first", maintain_order=True)
    if df.height != len(wanted):
        missing = sorted(set(wanted) - set(df["image_id"].to_list()))
        raise KeyError(f"{len(missing)} image id(s) not in the {dataset} manifest, e.g. {missing[:3]}")
    jobs = build_jobs(df, meta, prompt_name)
    check_sampling(int(n), float(c["temperature"]), float(c["top_p"]), f"{prompt_name} {dataset}")
    own = isinstance(teacher_spec, str)
    backend = make_backend(teacher_spec, **(c.get("teacher_options") or {})) if own else teacher_spec
    try:
        with Store(shard_file(workdir, dataset)) as st:
            summary = run_jobs(st, backend, jobs, int(n), _sampling(c), batch_size=int(c["batch_size"]),
                               passes=int(c["passes"]), max_pixels=c.get("max_pixels"),
                               prep_workers=c.get("prep_workers"), progress=bool(c["progress"]),
                               desc=f"{prompt_name} {dataset}", **_error_limits(c))
    finally:
        if own:  # a backend built here is closed here; one passed in belongs to the caller
            close_backend(backend)
    return {"dataset": dataset, "prompt": prompt_name, **summary}


def outputs(cfg: dict[str, Any], workdir: Path) -> list[Path]:
    """The dataset's store folder (all shard files, the merged file and run summaries)."""
    return [store_dir(workdir, cfg["dataset"])]


# --- CLI -------------------------------------------------------------------------------------

def _kv(text: str) -> tuple[str, Any]:
    k, eq, v = text.partition("=")
    if not eq or not k:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return k, _coerce(v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="dataset name (its manifest W/manifest/<dataset>.parquet must exist)")
    p.add_argument("--workdir", "-w", required=True, help="work directory; writes W/generations/<dataset>/")
    add_option(p, "generate", "teacher", metavar="SPEC")
    add_option(p, "generate", "teacher_options", "--teacher-option", "-O", action="append", type=_kv,
               metavar="KEY=VALUE", help="backend option, repeatable (e.g. -O tensor_parallel_size=2 -O max_pixels=401408)")
    for key in ("prompt", "n", "max_new_tokens", "temperature", "top_p", "seed", "batch_size", "passes", "shard",
                "num_shards"):
        add_option(p, "generate", key)
    add_option(p, "generate", "domains")
    add_option(p, "generate", "splits")
    for key in ("limit", "max_pixels", "prep_workers", "max_error_share", "error_check_after"):
        add_option(p, "generate", key)
    add_option(p, "generate", "merge", action="store_true")
    p.add_argument("--merge-from", nargs="+", default=[], metavar="PATH",
                   help="with --merge: also merge store files / folders copied from other nodes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    try:
        if args.merge and not args.teacher:
            res = merge_shards(workdir, args.dataset, args.merge_from)
            print(f"merged {res['files']} store file(s) into {workdir / 'generations' / args.dataset}/results.sqlite "
                  f"({res['new_rows']} new rows)")
            return 0
        cfg = {"dataset": args.dataset, **options_from_args(args), "progress": not args.no_progress}
        cfg["teacher_options"] = dict(cfg.get("teacher_options") or [])  # -O pairs -> the schema's mapping
        # Range-check numbers before any work (the pipeline path is checked when its YAML loads);
        # the teacher spec gets its own, clearer check from the backend factory.
        validate_options({k: v for k, v in cfg.items() if k != "teacher"}, "generate", "command line", flags_of(args))
        s = run(cfg, workdir)
        if args.merge and (args.num_shards or 1) == 1 and args.merge_from:
            merge_shards(workdir, args.dataset, args.merge_from)
    except (BackendError, ValueError) as e:
        raise UserError(str(e)) from None
    print(format_summary(s))
    return 0 if not s["failed_images"] else 3


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable end-of-run summary."""
    lines = [
        f"{s['dataset']} [{s['prompt']}] teacher {s['teacher']}: {s['images']} images, "
        f"{s['already_done']} candidates already stored, {s['generated']} generated",
        f"  requests sent {s['requests_sent']}, output tokens {s['out_tokens']}, wall {s['wall_s']:.1f}s "
        f"({s['candidates_per_s'] or 0:.1f} cand/s, {s['out_tokens_per_s'] or 0:.0f} tok/s)",
        f"  store: {s['store']}",
    ]
    if s["failed_images"]:
        causes = ", ".join(f"{k}: {v}" for k, v in s["failures_by_cause"].items())
        lines.append(f"  FAILED {s['failed_images']} image(s) ({causes}); rerun the same command to retry them")
    return "\n".join(lines)

