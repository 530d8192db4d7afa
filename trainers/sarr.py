"""SARR self-labeling: the current student writes chains for its training images (q_reason); a chain
is kept when it is a complete five-stage chain whose ``<CONCLUSION>`` names the image's label.

Generation runs in-process with ``model.generate`` on the live (LoRA) weights by default, or through
any ``dbr_builder.backends`` spec (e.g. ``vllm:<base model>`` with the round's adapter) when the
config names one. Images with no correct self chain follow the ``no_correct`` policy: ``drop``
(the default and the paper's rule: leave the image out of the round) or ``keep_teacher`` (train on
its teacher chain). Each round records how many teacher chains it still trains on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dbr_builder.backends import Request, make_backend
from dbr_builder.core import chat
from dbr_builder.core.answers import match_class
from dbr_builder.core.chains import parse_chain
from dbr_builder.core.fsutil import write_text_atomic
from trainers.data import Example, SampleEncoder, load_image

NO_CORRECT = ("keep_teacher", "drop")


@dataclass
class SarrConfig:
    """One SARR round's self-labeling settings (`sarr:` in the config)."""

    rounds: int = 3
    no_correct: str = "drop"  # drop (the paper: only correct self chains) | keep_teacher
    init: str = "continue"  # continue (from the current adapter) | restart (fresh adapter on the base model)
    n: int = 1  # candidates per image; the first correct one is kept
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 16  # images per generate call
    generator: str = "model"  # "model" (in-process generate) or a dbr backend spec
    synonyms: dict[str, list[str]] | None = None


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
        for lo in tqdm(range(0, len(examples), sc.batch_size), desc="sarr generate", unit="batch"):
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


def generate_with_backend(
    spec: str, examples: Sequence[Example], encoder: SampleEncoder, sc: SarrConfig, seed: int,
    image_dir: Path, **options: Any,
) -> list[list[str]]:
    """n chains per example through a dbr backend (images written once to ``image_dir``)."""
    backend = make_backend(spec, **options)
    image_dir.mkdir(parents=True, exist_ok=True)
    reqs = []
    for i, ex in enumerate(examples):
        if isinstance(ex.image, str | Path):
            path = Path(ex.image)
        else:
            path = image_dir / f"{i:07d}.png"
            if not path.exists():
                load_image(ex.image).save(path)
        reqs.append(Request(
            key=f"sarr:{ex.image_id}", content=[{"type": "image", "path": str(path)},
                                                {"type": "text", "text": encoder.q_reason}],
            n=sc.n, max_new_tokens=sc.max_new_tokens, temperature=sc.temperature, top_p=sc.top_p, seed=seed,
        ))
    results = {r.key: r for r in backend.generate(reqs)}
    return [list(results[r.key].texts) if r.key in results else [] for r in reqs]


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
