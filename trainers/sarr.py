"""SARR self-labeling: the current student writes chains for its training images (q_reason); a chain
is kept when it is a complete five-stage chain whose ``<CONCLUSION>`` names the image's label.

Generation runs in-process with ``model.generate`` on the live (LoRA) weights by default, or through
any ``dbr_builder.backends`` spec (e.g. ``vllm:<base model>`` with the round's adapter) when the
config names one. A backend generator runs as its own step, in a child process
(``python -m trainers.sarr JOB OUT``, :func:`generate_in_subprocess`): the trainer moves the
student off the GPU first, the child serves base + round adapter with the training processor
settings on its rank's GPU, closes the engine and exits (so the GPU is really free again), and a
round whose requests fail above ``sarr.max_error_share`` stops with the cause instead of silently
retraining on teacher chains. Images with no correct self chain follow the ``no_correct`` policy:
``drop`` (the default and the paper's rule: leave the image out of the round) or ``keep_teacher``
(train on its teacher chain). Each round records how many teacher chains it still trains on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dbr_builder.backends import Request, make_backend, parse_spec
from dbr_builder.config import schema_defaults
from dbr_builder.core import chat
from dbr_builder.core.answers import match_class
from dbr_builder.core.chains import parse_chain
from dbr_builder.core.fsutil import stable_hash, write_json_atomic, write_text_atomic
from dbr_builder.errors import UserError
from dbr_builder.log import show_progress
from trainers.data import Example, SampleEncoder, load_image

NO_CORRECT = ("keep_teacher", "drop")


_D = schema_defaults("train")["sarr"]


@dataclass
class SarrConfig:
    """One SARR round's self-labeling settings (`sarr:` in the config)."""

    # Defaults are the train schema's `sarr` defaults (schemas/stages/train.schema.json), defined once.
    rounds: int = _D["rounds"]
    no_correct: str = _D["no_correct"]  # drop (the paper: only correct self chains) | keep_teacher
    init: str = _D["init"]  # continue (from the current adapter) | restart (fresh adapter on the base model)
    n: int = _D["n"]  # candidates per image; the first correct one is kept
    max_new_tokens: int = _D["max_new_tokens"]
    temperature: float = _D["temperature"]
    top_p: float = _D["top_p"]
    batch_size: int = _D["batch_size"]  # images per generate call
    generator: str = _D["generator"]  # "model" (in-process generate) or a dbr backend spec
    # backend options of a backend generator (e.g. gpu_memory_utilization)
    generator_options: dict[str, Any] = field(default_factory=lambda: dict(_D["generator_options"]))
    max_error_share: float = _D["max_error_share"]  # a backend round with more failed requests stops
    synonyms: dict[str, list[str]] | None = _D["synonyms"]


def judge(text: str | None, label: str, classes: Sequence[str], synonyms: dict[str, list[str]] | None = None) -> str:
    """Why a self chain is kept or rejected: ``ok`` | ``wrong_class`` | ``no_class`` | a parse reason."""
    parsed = parse_chain(text)
    if not parsed.ok:
        return str(parsed.reason or "invalid")
    got = match_class(parsed.conclusion, classes, synonyms)
    if got is None:
        return "no_class"
    return "ok" if got == label else "wrong_class"


def generate_with_model(
    model: Any, encoder: SampleEncoder, examples: Sequence[Example], sc: SarrConfig, seed: int,
    prompt: str | None = None,
) -> list[list[str]]:
    """n answers per example from the live model (left-padded batched ``generate``); q_reason by default."""
    import torch
    from tqdm import tqdm

    tok = encoder.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"  # decoder-only batched generation
    device = next(model.parameters()).device
    out: list[list[str]] = []
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for lo in tqdm(range(0, len(examples), sc.batch_size), desc="sarr generate", unit="batch",
                       disable=not show_progress()):
            chunk = examples[lo : lo + sc.batch_size]
            text = [encoder.prompt_text(prompt or encoder.q_reason)] * len(chunk)
            # one image list per text (Gemma3 / Idefics3 need it), no second BOS
            enc = chat.encode(encoder.processor, text, [[load_image(e.image)] for e in chunk], padding=True,
                              **encoder.processor_kwargs)
            enc = {k: v.to(device) if hasattr(v, "to") else v for k, v in enc.items()}
            sample = sc.temperature > 0
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=sc.max_new_tokens,
                    do_sample=sample,
                    temperature=sc.temperature if sample else None,
                    top_p=sc.top_p if sample else None,
                    num_return_sequences=sc.n,
                    pad_token_id=tok.pad_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            texts = tok.batch_decode(new, skip_special_tokens=True)
            out.extend(texts[i * sc.n : (i + 1) * sc.n] for i in range(len(chunk)))
    finally:
        tok.padding_side = old_side
        model.train(was_training)
    return out


def backend_requests(examples: Sequence[Example], encoder: SampleEncoder, sc: SarrConfig, seed: int,
                     image_dir: Path) -> list[Request]:
    """One request per example (image written once to ``image_dir`` when it is in memory)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    reqs = []
    for i, ex in enumerate(examples):
        if isinstance(ex.image, str | Path):
            path = Path(ex.image)
        else:
            # named by the image id (ranks shard differently, so a position would clash)
            path = image_dir / f"{stable_hash(ex.image_id or str(i))[:24]}.png"
            if not path.exists():
                load_image(ex.image).save(path)
        reqs.append(Request(
            key=f"sarr:{ex.image_id}", content=[{"type": "image", "path": str(path)},
                                                {"type": "text", "text": encoder.q_reason}],
            n=sc.n, max_new_tokens=sc.max_new_tokens, temperature=sc.temperature, top_p=sc.top_p, seed=seed,
        ))
    return reqs


def processor_options(spec: str, processor_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Backend options that give the backend the student's training processor settings.

    vLLM takes them all as ``mm_processor_kwargs``, the hf backend as ``processor_kwargs`` (passed
to every processor call, as in training); other backends serve no student.
    """
    if not processor_kwargs:
        return {}
    kind = parse_spec(spec)[0]
    if kind == "vllm":
        return {"mm_processor_kwargs": dict(processor_kwargs)}
    if kind == "hf":
        return {"processor_kwargs": dict(processor_kwargs)}
    return {}


def generate_requests(spec: str, reqs: list[Request], max_error_share: float, **options: Any) -> list[list[str]]:
    """Texts per request from a backend built here and closed here.

    Raises UserError when the share of failed requests passes ``max_error_share`` (a round
    must not silently fall back to teacher chains); an engine start failure propagates.
    """
    backend = make_backend(spec, **options)
    try:
        results = {r.key: r for r in backend.generate(reqs)}
    finally:
        close = getattr(backend, "close", None)
        if callable(close):
            close()
    errors = Counter()
    for r in reqs:
        res = results.get(r.key)
        if res is None or res.error is not None or not res.texts:
            errors["no result" if res is None else (res.error or "no text").split(":", 1)[0]] += 1
    failed = sum(errors.values())
    if reqs and failed > max_error_share * len(reqs):
        (cause, count), = errors.most_common(1)
        example = next((results[r.key].error for r in reqs if r.key in results and results[r.key].error), cause)
        raise UserError(f"sarr generation with {spec}: {failed} of {len(reqs)} requests failed "
                        f"({failed / len(reqs):.0%} > sarr.max_error_share {max_error_share:.0%}); most common "
                        f"cause {cause!r} ({count}x), e.g. {str(example)[:200]!r}; the round stops instead of "
                        "retraining on teacher chains")
    if failed:
        print(f"sarr generation: {failed} of {len(reqs)} requests failed ({dict(errors)}); those images count as "
              "rejected", file=sys.stderr)
    return [list(results[r.key].texts) if r.key in results and results[r.key].error is None else [] for r in reqs]


def generate_with_backend(
    spec: str, examples: Sequence[Example], encoder: SampleEncoder, sc: SarrConfig, seed: int,
    image_dir: Path, **options: Any,
) -> list[list[str]]:
    """n chains per example through a dbr backend in this process (built, used, closed here)."""
    reqs = backend_requests(examples, encoder, sc, seed, image_dir)
    opts = {**processor_options(spec, encoder.processor_kwargs), **(sc.generator_options or {}), **options}
    return generate_requests(spec, reqs, sc.max_error_share, **opts)


def generate_in_subprocess(
    spec: str, examples: Sequence[Example], encoder: SampleEncoder, sc: SarrConfig, seed: int,
    image_dir: Path, work: Path, gpu: int | None = None, **options: Any,
) -> list[list[str]]:
    """Like :func:`generate_with_backend`, in a child process (``python -m trainers.sarr``).

    The child sees only GPU ``gpu`` (``CUDA_VISIBLE_DEVICES``; one per rank, so ranks shard the
    round across GPUs) and exits when done, which frees everything the engine held. Its
    one-line error (engine start, error share) becomes this process's UserError.
    """
    reqs = backend_requests(examples, encoder, sc, seed, image_dir)
    opts = {**processor_options(spec, encoder.processor_kwargs), **(sc.generator_options or {}), **options}
    work.mkdir(parents=True, exist_ok=True)
    job, out = work / "generate_job.json", work / "generate_out.json"
    out.unlink(missing_ok=True)
    write_json_atomic(job, {"spec": spec, "options": opts, "max_error_share": sc.max_error_share,
                            "requests": [vars(r) for r in reqs]})
    env = dict(os.environ)
    if gpu is not None:  # the parent's device index, through its own CUDA_VISIBLE_DEVICES if set
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[gpu] if gpu < len(visible) else str(gpu)
    # The child must import this project as the parent does (source checkout or installed).
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "trainers.sarr", str(job), str(out)], env=env,
                          stdout=None, stderr=subprocess.PIPE, text=True)
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0 or not out.exists():
        lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith("sarr-generate error: ")), None)
        msg = last.removeprefix("sarr-generate error: ") if last else (lines[-1] if lines else "no output")
        raise UserError(f"sarr generation with {spec} failed (exit {proc.returncode}): {msg}")
    texts = json.loads(out.read_text(encoding="utf-8"))["texts"]
    return [list(t) for t in texts]


def _child_main(argv: list[str]) -> int:
    """``python -m trainers.sarr JOB OUT``: run one generation job and write its texts."""
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    reqs = [Request(**r) for r in job["requests"]]
    try:
        texts = generate_requests(job["spec"], reqs, float(job["max_error_share"]), **job["options"])
    except (UserError, ValueError) as e:  # BackendError/EngineStartError are ValueErrors
        print(f"sarr-generate error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    write_json_atomic(Path(argv[1]), {"texts": texts})
    return 0


def self_label(
    examples: Sequence[Example],
    classes: Sequence[str],
    generate: Callable[[Sequence[Example]], list[list[str]]],
    sc: SarrConfig,
) -> tuple[list[Example], dict[str, Any], list[dict[str, Any]]]:
    """One round of self-labeling.

    Returns the round's training examples (self chains in place of teacher chains; the
    ``no_correct`` policy for the rest), stats (``rejection_rate`` = share of images without a
    correct self chain, reasons) and one record per image for the log.
    """
    if sc.no_correct not in NO_CORRECT:
        raise ValueError(f"sarr.no_correct={sc.no_correct!r}; expected one of {', '.join(NO_CORRECT)}")
    texts = generate(examples)
    kept: list[Example] = []
    records: list[dict[str, Any]] = []
    reasons: dict[str, int] = {}
    rejected = 0
    for ex, cands in zip(examples, texts, strict=True):
        verdicts = [judge(t, ex.class_name, classes, sc.synonyms) for t in cands]
        for v in verdicts:
            reasons[v] = reasons.get(v, 0) + 1
        good = next((t for t, v in zip(cands, verdicts, strict=True) if v == "ok"), None)
        if good is not None:
            kept.append(replace(ex, chain=good, chain_source="self"))
        else:
            rejected += 1
            if sc.no_correct == "keep_teacher":
                kept.append(replace(ex, chain_source="teacher"))
        records.append({"image_id": ex.image_id, "label": ex.class_name, "verdicts": verdicts,
                        "kept": good is not None, "chain": good})
    n = len(examples)
    stats = {
        "images": n,
        "correct": n - rejected,
        "rejected": rejected,
        "rejection_rate": rejected / n if n else 0.0,
        "candidate_verdicts": dict(sorted(reasons.items())),
        "train_images": len(kept),
        "self_chains": n - rejected,
        "teacher_chains": sum(ex.chain_source == "teacher" for ex in kept),
        "no_correct": sc.no_correct,
    }
    return kept, stats, records


def save_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Write the round's per-image self-labeling log (jsonl) atomically."""
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def load_records(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def examples_from_records(
    examples: Sequence[Example], records: list[dict[str, Any]], no_correct: str
) -> list[Example]:
    """Rebuild a round's training set from its saved records (resume without regenerating)."""
    by_id = {r["image_id"]: r for r in records}
    out = []
    for ex in examples:
        r = by_id.get(ex.image_id)
        if r is not None and r["kept"]:
            out.append(replace(ex, chain=r["chain"], chain_source="self"))
        elif no_correct == "keep_teacher":
            out.append(ex)
    return out


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
