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

from dbr_builder.backends import (
    Backend,
    BackendError,
    Request,
    Result,
    make_backend,
    parse_spec,
    record_name,
)
from dbr_builder.backends.base import TooManyErrors, _coerce, check_sampling
from dbr_builder.backends.batchfile import input_line, read_output_file
from dbr_builder.backends.openai_backend import OpenAIBackend
from dbr_builder.backends.openai_batch import BatchAPIError, OpenAIBatchBackend
from dbr_builder.config import (
    add_option,
    flags_of,
    options_from_args,
    resolve,
    schema_defaults,
    validate_options,
)
from dbr_builder.core.constrain import json_to_chain, response_format
from dbr_builder.core.fsutil import atomic_path, write_json_atomic, write_text_atomic
from dbr_builder.core.imageprep import fit_size, parallel_map, prefetch, prepare_content
from dbr_builder.core.locks import stage_lock
from dbr_builder.core.manifest import image_path, load_manifest
from dbr_builder.core.prompts import fields, prompt_id, teacher_prompt
from dbr_builder.core.store import (
    Row,
    Store,
    done_keys,
    done_keys_of,
    merge_dataset,
    params_json,
    request_key,
    shard_file,
    store_dir,
    store_files,
    usage_groups,
)
from dbr_builder.core.usage import (
    CHAT_OVERHEAD_TOKENS,
    cost_usd,
    image_tokens,
    load_prices,
    price_for,
    store_usage,
    text_counter,
    usage_line,
)
from dbr_builder.core.workdir import reports_dir
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
    """Per-candidate output tokens: exact for one candidate, else shared by text length.

    Largest-remainder rounding, so the parts always sum to ``total`` (usage reports add rows up
    and must equal what the backend billed).
    """
    if len(texts) == 1:
        return [total]
    size = sum(len(t) for t in texts)
    if size == 0:
        shares = [total / len(texts)] * len(texts)
    else:
        shares = [total * len(t) / size for t in texts]
    parts = [int(x) for x in shares]
    order = sorted(range(len(texts)), key=lambda i: shares[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def result_rows(job: Job, miss: Sequence[tuple[int, str]], res: Result | None, err: str | None,
                model: str, params: str, route: str) -> tuple[list[Row], int]:
    """Store rows for one request's candidates ``miss`` from its result; ``(rows, good count)``.

    The request's prompt tokens go on its first candidate's row (billed once per request);
    candidates the backend did not return are error rows, retried later.
    """
    texts = res.texts if res is not None and res.error is None else []
    toks = _split_tokens(res.out_tokens, texts) if texts else []
    finishes = (res.finish_reasons if res is not None else []) or []
    in_tokens = res.in_tokens if res is not None and texts else None
    rid = miss[0][1] if miss else None
    rows: list[Row] = []
    ok = 0
    for i, (j, k) in enumerate(miss):
        if i < len(texts):
            rows.append(Row(k, job.image_id, job.prompt_name, job.prompt_id, model, params, j,
                            texts[i], finishes[i] if i < len(finishes) else "stop", toks[i],
                            in_tokens=in_tokens if i == 0 else None, request_id=rid, route=route))
            ok += 1
        else:
            e = err if not texts else f"short: backend returned {len(texts)} of {len(miss)} candidates"
            rows.append(Row(k, job.image_id, job.prompt_name, job.prompt_id, model, params, j,
                            None, None, None, e, request_id=rid, route=route))
    return rows, ok


def pending_of(done: set[str], jobs: Sequence[Job], n: int, model: str,
               params: str) -> tuple[list[tuple[Job, list[tuple[int, str]]]], int]:
    """``([(job, [(sample index, key), ...missing]), ...], candidates already stored)``."""
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
    return pending, already


def make_request(job: Job, miss: Sequence[tuple[int, str]], content: list[dict], sampling: dict[str, Any]) -> Request:
    """The request for a job's missing candidates; its key (= batch custom_id) is the first one's key."""
    return Request(key=miss[0][1], content=content, n=len(miss),
                   max_new_tokens=int(sampling["max_new_tokens"]), temperature=float(sampling["temperature"]),
                   top_p=float(sampling["top_p"]), seed=_sample_seed(sampling.get("seed"), job, miss[0][0]))


def run_jobs(store: Store, backend: Backend, jobs: Sequence[Job], n: int, sampling: dict[str, Any],
             batch_size: int = 64, passes: int = 2, max_pixels: int | None = None,
             prep_workers: int | None = None, progress: bool = True, desc: str = "generate",
             on_batch: Callable[[int], None] | None = None, max_error_share: float | None = 0.5,
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
    pending, already = pending_of(store.done_keys() | (done_extra or set()), jobs, n, model, params)
    wants_images = getattr(backend, "wants_images", True)

    def prepare(batch: list[tuple[Job, list[tuple[int, str]]]]) -> list[tuple[Any, Request | None, str | None]]:
        def one(item: tuple[Job, list[tuple[int, str]]]) -> tuple[Any, Request | None, str | None]:
            job, miss = item
            try:
                content = prepare_content(job.content, max_pixels) if wants_images else job.content
            except OSError as e:
                return item, None, f"image: {e}"
            return item, make_request(job, miss, content, sampling), None

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
                    got, ok_here = result_rows(job, miss, res, err, model, params, "live")
                    rows.extend(got)
                    stats["generated"] += ok_here
                    stats["out_tokens"] += sum(r.out_tokens or 0 for r in got)
                    stats["in_tokens"] += sum(r.in_tokens or 0 for r in got)
                    stats["usage_requests"] += int(any(r.in_tokens is not None for r in got))
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
        "in_tokens": stats["in_tokens"],
        "requests_with_usage": stats["usage_requests"],
        "failed_images": len(pending),
        "failures_by_cause": dict(sorted(causes.items())),
        "failed_requests": stats["failed_requests"],
        "wall_s": round(wall, 3),
        "candidates_per_s": round(stats["generated"] / wall, 1) if wall > 0 else None,
        "out_tokens_per_s": round(stats["out_tokens"] / wall, 1) if wall > 0 else None,
    }


# --- batch files, the Batch API, estimates, usage --------------------------------------------

# Teacher options that shape a request body (the rest configure an engine or a connection).
_BODY_OPTIONS = ("max_pixels", "image_format", "max_tokens_field", "extra_body", "detail", "constrain")
# OpenAI's per-batch limits (requests per input file, input file size).
OPENAI_BATCH_MAX_REQUESTS = 50_000
OPENAI_BATCH_MAX_MB = 200


def _entries(pending: Sequence[tuple[Job, list[tuple[int, str]]]], model: str, params: str) -> list[dict[str, Any]]:
    """What each request of ``pending`` stands for, keyed by its custom_id (store.batch_requests)."""
    return [{"custom_id": miss[0][1], "image_id": job.image_id, "prompt_name": job.prompt_name,
             "prompt_id": job.prompt_id, "model": model, "params": params, "samples": [list(m) for m in miss]}
            for job, miss in pending]


def _request_lines(pending: Sequence[tuple[Job, list[tuple[int, str]]]], body: Callable[[Request], dict[str, Any]],
                   sampling: dict[str, Any], max_pixels: int | None, prep_workers: int | None,
                   images: str = "data") -> list[tuple[int, str | None, str | None]]:
    """``(index in pending, input line or None, image error or None)`` for every pending request."""

    def one(i: int) -> tuple[int, str | None, str | None]:
        job, miss = pending[i]
        try:
            content = prepare_content(job.content, max_pixels) if images == "data" else job.content
            req = make_request(job, miss, content, sampling)
            return i, input_line(req.key, body(req)), None
        except OSError as e:
            return i, None, f"image: {e}"

    return parallel_map(one, range(len(pending)), prep_workers)


def fallback_map(jobs: Sequence[Job], n: int, model: str, params: str) -> dict[str, Any]:
    """custom_id -> (job, candidates, model, params) for requests this configuration could make.

    A request starting at sample j covers samples j, j+1, ... (how an export groups the missing
    candidates of an image when none of them is stored). Used for results files written from
    another store (generate on another cluster, import here).
    """
    out: dict[str, Any] = {}
    for job in jobs:
        keys = [(j, request_key(job.image_id, job.prompt_id, model, params, j)) for j in range(n)]
        for j in range(n):
            out[keys[j][1]] = (job, keys[j:], model, params)
    return out


def import_results(store: Store, results: Sequence[Result], fallback: dict[str, Any],
                   route: str = "batch") -> Counter:
    """Store batch results by custom_id (idempotent: good candidates are never replaced).

    A custom_id is looked up among the requests this store exported or submitted, else in
    ``fallback`` (:func:`fallback_map`). Counts: ``requests``, ``generated``, ``errors``,
    ``already_done``, ``unknown``, ``in_tokens``, ``out_tokens`` and ``cause:<cause>``.
    """
    known = store.batch_requests([r.key for r in results])
    done = store.done_keys()
    stats: Counter = Counter()
    rows: list[Row] = []
    for res in results:
        e = known.get(res.key)
        if e is not None:
            job = Job(e["image_id"], [], e["prompt_name"], e["prompt_id"])
            miss, model, params = [tuple(x) for x in e["samples"]], e["model"], e["params"]
        elif res.key in fallback:
            job, miss, model, params = fallback[res.key]
        else:
            stats["unknown"] += 1
            continue
        if all(k in done for _, k in miss):
            stats["already_done"] += len(miss)
            continue
        got, _ = result_rows(job, miss, res, res.error, model, params, route)
        got = [r for r in got if r.request_key not in done]  # a good row is final: not counted twice
        rows.extend(got)
        stats["requests"] += 1
        stats["generated"] += sum(r.error is None for r in got)
        stats["errors"] += sum(r.error is not None for r in got)
        stats["in_tokens"] += sum(r.in_tokens or 0 for r in got)
        stats["out_tokens"] += sum(r.out_tokens or 0 for r in got)
        if res.error:
            stats[f"cause:{_cause(res.error)}"] += 1
    for i in range(0, len(rows), 5000):
        store.add(rows[i:i + 5000])
    return stats


def _usage_report(workdir: Path, ds: str, c: dict[str, Any], this_run: dict[str, Any]) -> dict[str, Any]:
    """Write ``W/reports/<Dataset>/generate_usage.json``: this run and the whole store, with costs."""
    prices = load_prices(c.get("prices"))
    model = this_run.get("model")
    run_cost = (cost_usd(prices, model, this_run["in_tokens"], this_run["out_tokens"],
                         this_run.get("route") == "batch") if model else None)
    rep = {"dataset": ds, "prices_as_of": prices.get("as_of"), "currency": prices.get("currency", "USD"),
           "batch_discount": prices.get("batch_discount"),
           "this_run": {**this_run, "cost_usd": run_cost},
           "store": store_usage(usage_groups(workdir, ds), prices)}
    write_json_atomic(reports_dir(workdir, ds) / "generate_usage.json", rep)
    return rep


def _teacher_options(c: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """The teacher's options, with ``constrain=<class names>`` when the constrained format is on."""
    opts = dict(c.get("teacher_options") or {})
    if c.get("constrained"):
        kind = parse_spec(c["teacher"])[0]
        if kind == "hf":
            raise ConfigError("generate: constrained: true is not supported by the hf backend; use vllm:, openai:, "
                              "batch: or oracle, or turn it off")
        opts["constrain"] = list(classes)
    return opts


def estimate(c: dict[str, Any], workdir: Path, df: Any, meta: dict[str, Any], jobs: Sequence[Job]) -> dict[str, Any]:
    """Expected requests, tokens and cost of the pending work; builds no engine and sends nothing.

    Prompt tokens: the prompt text (tiktoken o200k_base when installed, else characters / 4) +
    chat overhead + each image by the model's tile rule at the size it will be sent
    (``max_pixels``); output tokens: ``expected_output_tokens`` per candidate.
    """
    opts = _teacher_options(c, meta["classes"])
    kind = parse_spec(c["teacher"])[0]
    model = record_name(c["teacher"], **opts)
    params = params_json(_sampling(c))
    pending, already = pending_of(done_keys(workdir, c["dataset"]), jobs, int(c["n"]), model, params)
    prices = load_prices(c.get("prices"))
    hit = price_for(prices, model)
    rule = hit[1].get("images") if hit else None
    count, method = text_counter()
    max_pixels = c.get("max_pixels") or opts.get("max_pixels")
    sizes = dict(zip(df["image_id"].to_list(), zip(df["width"].to_list(), df["height"].to_list(), strict=True),
                     strict=True))
    text_cache: dict[str, int] = {}
    in_text = in_img = 0
    for job, _ in pending:
        for part in job.content:
            if part.get("type") == "text":
                t = part["text"]
                if t not in text_cache:
                    text_cache[t] = count(t)
                in_text += text_cache[t]
            elif rule is not None:
                w, h = fit_size(*sizes[job.image_id], max_pixels)
                in_img += image_tokens(w, h, rule, opts.get("detail")) or 0
        in_text += CHAT_OVERHEAD_TOKENS
    if c.get("constrained") and kind in ("openai", "batch"):
        # the JSON schema is part of the prompt OpenAI bills for structured outputs
        in_text += len(pending) * count(json.dumps(response_format(meta["classes"])))
    cands = sum(len(m) for _, m in pending)
    out = cands * int(c["expected_output_tokens"])
    tin = in_text + in_img
    live = cost_usd(prices, model, tin, out)
    batch = cost_usd(prices, model, tin, out, batch=True)
    return {"mode": "estimate", "dataset": c["dataset"], "teacher": model, "price_key": hit[0] if hit else None,
            "prices_as_of": prices.get("as_of"), "images": len(jobs), "already_done": already,
            "requests": len(pending), "candidates": cands, "in_tokens": tin, "in_text_tokens": in_text,
            "in_image_tokens": in_img if rule is not None else None, "text_token_method": method,
            "image_token_rule": (f"{hit[0]} tiles: {rule['base']} + {rule['tile']} per 512 px tile" if rule else
                                 "none for this model (image tokens not counted)"),
            "out_tokens": out, "expected_output_tokens": int(c["expected_output_tokens"]),
            "cost_usd": round(live, 4) if live is not None else None,
            "batch_cost_usd": round(batch, 4) if batch is not None else None}


def _body_backend(c: dict[str, Any], opts: dict[str, Any]) -> OpenAIBackend:
    """A request-body builder for batch files: the live backend's bodies, no key needed, nothing sent."""
    model = record_name(c["teacher"], **opts)
    body_opts = {k: v for k, v in opts.items() if k in _BODY_OPTIONS}
    return OpenAIBackend(model, require_key=False, **body_opts)


def export_batch(c: dict[str, Any], store: Store, jobs: Sequence[Job], opts: dict[str, Any]) -> dict[str, Any]:
    """Write the pending requests as an OpenAI batch input file; remember their custom_ids in the store."""
    body = _body_backend(c, opts)
    params = params_json(_sampling(c))
    pending, already = pending_of(store.done_keys(), jobs, int(c["n"]), body.model, params)
    images = c["batch_images"]
    lines = _request_lines(pending, lambda r: body.payload(r, images), _sampling(c), c.get("max_pixels"),
                           c.get("prep_workers"), images=images)
    dest = Path(c["export_batch"])
    bad = [(i, e) for i, line, e in lines if line is None]
    ok = [i for i, line, _ in lines if line is not None]
    with atomic_path(dest) as tmp, tmp.open("w", encoding="utf-8") as f:
        for _, line, _ in lines:
            if line is not None:
                f.write(line + "\n")
    store.add_batch_requests(_entries([pending[i] for i in ok], body.model, params))
    size_mb = dest.stat().st_size / 2**20
    return {"mode": "export", "dataset": c["dataset"], "teacher": body.model, "file": str(dest),
            "requests": len(ok), "candidates": sum(len(pending[i][1]) for i in ok), "already_done": already,
            "image_errors": len(bad), "first_image_error": bad[0][1] if bad else None, "size_mb": round(size_mb, 2),
            "over_openai_limits": len(ok) > OPENAI_BATCH_MAX_REQUESTS or size_mb > OPENAI_BATCH_MAX_MB}


def import_batch(c: dict[str, Any], store: Store, jobs: Sequence[Job], opts: dict[str, Any]) -> dict[str, Any]:
    """Read OpenAI Batch API / ``vllm run-batch`` output files into the store."""
    fallback: dict[str, Any] = {}
    if c.get("teacher"):
        fallback = fallback_map(jobs, int(c["n"]), record_name(c["teacher"], **opts), params_json(_sampling(c)))
    constrained = bool(opts.get("constrain"))
    totals: Counter = Counter()
    lines = 0
    for f in c["import_batch"]:
        results = []
        for _, res in read_output_file(f):
            lines += 1
            if constrained and res.error is None:
                res.texts = [json_to_chain(t) or t for t in res.texts]
            results.append(res)
        totals.update(import_results(store, results, fallback))
    if lines and totals["unknown"] == lines:
        raise UserError(f"{c['import_batch'][0]}: none of its {lines} custom_id(s) is a request of this store or of "
                        "this configuration; import into the work dir that exported them, or give the same "
                        "--teacher, --n and sampling flags as the export")
    return {"mode": "import", "dataset": c["dataset"], "files": [str(f) for f in c["import_batch"]], "lines": lines,
            **{k: totals[k] for k in ("requests", "generated", "errors", "already_done", "unknown", "in_tokens",
                                      "out_tokens")},
            "errors_by_cause": {k[6:]: v for k, v in sorted(totals.items()) if k.startswith("cause:")}}


def _batch_error(batch: dict[str, Any]) -> str:
    errs = (batch.get("errors") or {}).get("data") or []
    if errs and isinstance(errs[0], dict):
        return str(errs[0].get("message") or errs[0].get("code") or "no result")[:200]
    return "no result for this request"


def run_batch_api(c: dict[str, Any], store: Store, backend: OpenAIBatchBackend, jobs: Sequence[Job]) -> dict[str, Any]:
    """The ``batch:`` teacher end to end: resume open batches, submit the pending requests, poll, import.

    Every batch id is committed to the store as soon as the batch exists, so a killed run (even
    ``kill -9`` mid-poll) resumes polling the same batch instead of paying for it twice.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    sampling = _sampling(c)
    model, params = backend.model, params_json(sampling)
    fallback = fallback_map(jobs, int(c["n"]), model, params)
    totals: Counter = Counter()
    batch_ids: list[str] = []
    progress = show_progress(bool(c.get("progress", True)))
    folder = store.path.parent / "batches"
    _, already0 = pending_of(store.done_keys(), jobs, int(c["n"]), model, params)

    def finish(batch_id: str, requests: int) -> None:
        bar = tqdm(total=requests, desc=f"batch {batch_id}", unit="req", disable=not progress, dynamic_ncols=True)

        def on_poll(b: dict[str, Any]) -> None:
            rc = b.get("request_counts") or {}
            bar.n = int(rc.get("completed", 0)) + int(rc.get("failed", 0))
            bar.set_postfix(status=b.get("status"), failed=rc.get("failed", 0), refresh=True)
            store.save_batch(batch_id, str(b.get("status")), requests)

        try:
            final = backend.wait(batch_id, on_poll)
        finally:
            bar.close()
        results = backend.results(final)
        got = {r.key for r in results}
        status = final.get("status")
        # requests the batch never answered (failed validation, expired, cancelled) become errors
        missing = [Result(cid, [], 0, [], error=f"batch {status}: {_batch_error(final)}")
                   for cid, e in store.batch_requests().items() if e["batch_id"] == batch_id and cid not in got]
        totals.update(import_results(store, results + missing, fallback))
        store.save_batch(batch_id, str(status), requests, imported=True)
        batch_ids.append(batch_id)

    for b in store.open_batches():
        totals["resumed_batches"] += 1
        finish(b["batch_id"], int(b["requests"]))
    for _ in range(max(1, int(c["passes"]))):
        pending, _ = pending_of(store.done_keys(), jobs, int(c["n"]), model, params)
        if not pending:
            break
        lines = _request_lines(pending, backend.chat.payload, sampling, c.get("max_pixels"), c.get("prep_workers"))
        bad = [i for i, line, _ in lines if line is None]
        if bad:  # undecodable images: stored as errors here, never sent
            store.add_batch_requests(_entries([pending[i] for i in bad], model, params))
            errs = [Result(pending[i][1][0][1], [], 0, [], error=e) for i, line, e in lines if line is None]
            totals.update(import_results(store, errs, fallback))
        chunks: list[list[tuple[int, str]]] = [[]]
        size = 0
        for i, line, _ in lines:
            if line is None:
                continue
            n_bytes = len(line.encode("utf-8")) + 1
            if chunks[-1] and (len(chunks[-1]) >= backend.max_requests or size + n_bytes > backend.max_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append((i, line))
            size += n_bytes
        submitted: list[tuple[str, int]] = []
        for ch in (ch for ch in chunks if ch):
            path = folder / f"input-{time.strftime('%Y%m%dT%H%M%S')}-{pending[ch[0][0]][1][0][1][:12]}.jsonl"
            write_text_atomic(path, "".join(line + "\n" for _, line in ch))
            entries = _entries([pending[i] for i, _ in ch], model, params)
            store.add_batch_requests(entries)
            try:
                b = backend.submit(path, len(ch), tag=f"{c['dataset']}:{c['prompt']}")
            except BatchAPIError as e:
                raise UserError(f"batch teacher: could not submit {path.name}: {e}") from None
            store.save_batch(b["id"], str(b.get("status", "validating")), len(ch), b.get("input_file_id"))
            store.add_batch_requests(entries, b["id"])
            totals["submitted_batches"] += 1
            submitted.append((b["id"], len(ch)))
        for bid, nreq in submitted:
            finish(bid, nreq)
    pending, _ = pending_of(store.done_keys(), jobs, int(c["n"]), model, params)
    wall = time.perf_counter() - t0
    failed = store.failed()
    causes = Counter(_cause(failed[miss[0][1]][0]) for _, miss in pending if miss[0][1] in failed)
    return {"teacher": model, "images": len(jobs), "candidates_wanted": len(jobs) * int(c["n"]),
            "already_done": already0, "generated": totals["generated"],
            "requests_sent": totals["requests"], "passes": int(c["passes"]), "out_tokens": totals["out_tokens"],
            "in_tokens": totals["in_tokens"], "requests_with_usage": totals["requests"],
            "failed_images": len(pending), "failures_by_cause": dict(sorted(causes.items())),
            "wall_s": round(wall, 3), "candidates_per_s": round(totals["generated"] / wall, 1) if wall > 0 else None,
            "out_tokens_per_s": round(totals["out_tokens"] / wall, 1) if wall > 0 else None,
            "batches": batch_ids, "resumed_batches": totals["resumed_batches"],
            "submitted_batches": totals["submitted_batches"]}


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
    out = {k: cfg[k] for k in ("max_new_tokens", "temperature", "top_p", "seed")}
    if cfg.get("constrained"):
        out["constrained"] = True  # constrained answers are other answers: other request keys
    return out


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
    if not out.get("teacher") and not out.get("merge") and not out.get("import_batch"):
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
    opts = _teacher_options(c, meta["classes"]) if c.get("teacher") else {}
    if c.get("estimate"):
        return estimate(c, workdir, df, meta, jobs)  # reads the store, builds no engine, sends nothing
    path = shard_file(workdir, ds, shard, num)
    if c.get("export_batch") or c.get("import_batch"):
        with stage_lock(workdir, lock_name(ds, shard, num), f"generate {ds}"), Store(path) as st:
            s = export_batch(c, st, jobs, opts) if c.get("export_batch") else import_batch(c, st, jobs, opts)
        s["store"] = str(path)
        if s["mode"] == "import":
            model = record_name(c["teacher"], **opts) if c.get("teacher") else None
            s["usage"] = _usage_report(workdir, ds, c, {"model": model, "route": "batch",
                                                        "requests": s["requests"], "in_tokens": s["in_tokens"],
                                                        "out_tokens": s["out_tokens"]})
        return s
    with stage_lock(workdir, lock_name(ds, shard, num), f"generate {ds}" + (f" shard {shard}/{num}" if num > 1 else "")):
        # A shard rerun after a merge: what the merged store holds is done, not to redo.
        merged = shard_file(workdir, ds)
        extra_done = done_keys_of(merged) if num > 1 and merged.exists() else None
        backend = make_backend(c["teacher"], **opts)
        try:
            with Store(path) as st:
                st.incomplete_on_write()  # a run in progress: merge refuses this file until it ends
                if isinstance(backend, OpenAIBatchBackend):
                    summary = run_batch_api(c, st, backend, jobs)
                else:
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
        route = "batch" if isinstance(backend, OpenAIBatchBackend) else "live"
        summary["usage"] = _usage_report(workdir, ds, c, {
            "model": summary["teacher"], "route": route, "requests": summary["requests_sent"],
            "in_tokens": summary["in_tokens"], "out_tokens": summary["out_tokens"]})
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


# --- units for `dbr run --executor local|slurm` (dbr_builder.launch): one job per shard ----------

def job_units(cfg: dict[str, Any], workdir: Path, opts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The shards to run as separate jobs: the config's ``num_shards``, else the executor's ``shards``."""
    c = _full_cfg(cfg)
    n = int(c["num_shards"]) if int(c["num_shards"]) > 1 else int((opts or {}).get("shards") or 1)
    if n < 1:
        raise ConfigError(f"generate: shards={n}; expected >= 1")
    return [{"id": f"{c['dataset']}-shard{i:05d}-of-{n:05d}", "shard": i, "num_shards": n} for i in range(n)]


def run_unit(cfg: dict[str, Any], workdir: Path, unit: dict[str, Any]) -> dict[str, Any]:
    """Generate one shard into its own store file (resumes from what that file already holds)."""
    return run({**cfg, "shard": unit["shard"], "num_shards": unit["num_shards"], "merge": False,
                "progress": False}, workdir)


def unit_outputs(cfg: dict[str, Any], workdir: Path, unit: dict[str, Any]) -> list[Path]:
    """The shard's summary file (its store file is folded into ``results.sqlite`` and removed by the merge)."""
    return [summary_file(Path(workdir), cfg["dataset"], int(unit["shard"]), int(unit["num_shards"]))]


def collect(cfg: dict[str, Any], workdir: Path, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Once every shard has ended: merge the shard stores into ``results.sqlite``; sum the shard summaries."""
    workdir = Path(workdir)
    merged = merge_shards(workdir, cfg["dataset"])
    keys = ("images", "candidates_wanted", "already_done", "generated", "requests_sent", "out_tokens",
            "failed_images")
    total = {k: sum(int(r.get(k) or 0) for r in results.values()) for k in keys}
    return {"dataset": cfg["dataset"], "shards": len(results), **total, "merge": merged}


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
    add_option(p, "generate", "estimate", action="store_true")
    add_option(p, "generate", "expected_output_tokens")
    add_option(p, "generate", "prices", metavar="FILE")
    add_option(p, "generate", "export_batch", metavar="FILE.jsonl")
    add_option(p, "generate", "import_batch", metavar="RESULTS.jsonl")
    add_option(p, "generate", "batch_images")
    add_option(p, "generate", "constrained", action="store_true")


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
        if sum(bool(cfg.get(k)) for k in ("estimate", "export_batch", "import_batch")) > 1:
            raise UserError("generate: give only one of --estimate, --export-batch, --import-batch")
        if (cfg.get("estimate") or cfg.get("export_batch")) and not cfg.get("teacher"):
            raise UserError("generate: --estimate and --export-batch need --teacher (the model decides the "
                            "request keys, the body and the price)")
        s = run(cfg, workdir)
        if args.merge and (args.num_shards or 1) == 1 and args.merge_from:
            merge_shards(workdir, args.dataset, args.merge_from)
    except (BackendError, BatchAPIError, ValueError) as e:
        raise UserError(str(e)) from None
    print(format_summary(s))
    if s.get("mode") == "import":
        return 0 if not s["errors"] else 3
    return 0 if not s.get("failed_images") else 3


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable end-of-run summary (or estimate / export / import report)."""
    mode = s.get("mode")
    if mode == "estimate":
        def money(v: float | None) -> str:
            return f"${v:,.2f}" if v is not None else "unknown (no price for this model; add one with --prices)"
        return "\n".join([
            f"estimate {s['dataset']} teacher {s['teacher']}: {s['images']} images, {s['already_done']} candidates "
            f"already stored; {s['requests']} requests for {s['candidates']} candidates pending (nothing sent)",
            f"  input tokens {s['in_tokens']:,} (text {s['in_text_tokens']:,}: {s['text_token_method']}; images "
            + (f"{s['in_image_tokens']:,}: {s['image_token_rule']})" if s["in_image_tokens"] is not None
               else s["image_token_rule"] + ")"),
            f"  output tokens {s['out_tokens']:,} ({s['expected_output_tokens']} expected per candidate)",
            f"  cost: {money(s['cost_usd'])} live, {money(s['batch_cost_usd'])} with the Batch API"
            + (f" (prices of {s['prices_as_of']}, {s['price_key']})" if s["price_key"] else ""),
        ])
    if mode == "export":
        lines = [f"exported {s['requests']} requests ({s['candidates']} candidates) for {s['teacher']} to "
                 f"{s['file']} ({s['size_mb']} MB); {s['already_done']} candidates already stored"]
        if s["image_errors"]:
            lines.append(f"  SKIPPED {s['image_errors']} request(s) with unreadable images, e.g. {s['first_image_error']}")
        if s["over_openai_limits"]:
            lines.append("  over OpenAI's per-batch limits (50,000 requests, 200 MB): split it with --limit/--domains "
                         "or use the batch: teacher, which splits by itself")
        return "\n".join(lines)
    if mode == "import":
        lines = [f"imported {s['lines']} result line(s) from {len(s['files'])} file(s): {s['generated']} candidates "
                 f"stored, {s['errors']} errors, {s['already_done']} already stored, {s['unknown']} unknown custom_id",
                 f"  store: {s['store']}", "  " + usage_line(s["usage"]["this_run"] | {
                     "prices_as_of": s["usage"]["prices_as_of"]})]
        if s["errors_by_cause"]:
            lines.append("  errors by cause: " + ", ".join(f"{k}: {v}" for k, v in s["errors_by_cause"].items()))
        return "\n".join(lines)
    lines = [
        f"{s['dataset']} [{s['prompt']}] teacher {s['teacher']}: {s['images']} images, "
        f"{s['already_done']} candidates already stored, {s['generated']} generated",
        f"  requests sent {s['requests_sent']}, output tokens {s['out_tokens']}, wall {s['wall_s']:.1f}s "
        f"({s['candidates_per_s'] or 0:.1f} cand/s, {s['out_tokens_per_s'] or 0:.0f} tok/s)",
        f"  store: {s['store']}",
    ]
    if s.get("usage"):
        lines.append("  " + usage_line(s["usage"]["this_run"] | {"prices_as_of": s["usage"]["prices_as_of"]}))
    if s.get("batches"):
        lines.append(f"  batches: {', '.join(s['batches'])} ({s['resumed_batches']} resumed)")
    if s["failed_images"]:
        causes = ", ".join(f"{k}: {v}" for k, v in s["failures_by_cause"].items())
        lines.append(f"  FAILED {s['failed_images']} image(s) ({causes}); rerun the same command to retry them")
    return "\n".join(lines)

