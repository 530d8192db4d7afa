"""Model selection on the training domains' ``out`` splits (DomainBed training-domain validation).

The validation accuracy is DomainBed's: the **mean over training domains** of each domain's
``out`` accuracy (not the pooled accuracy over all validation images). Images are classified in
the mode that is reported (``select.mode``):

- ``scored`` (default): the log-likelihood of every class name as the assistant answer to q_cls
  (with the options), end-of-turn token included, so ``cat`` cannot win by being a prefix of
  ``cathedral``; the argmax is the prediction. Exact, no parsing, no sampling. ``dbr eval``'s
  ``scored`` mode reports the same quantity on the held-out domain.
- ``direct`` / ``reasoning``: greedy generation with q_cls / q_reason, parsed exactly as
  ``dbr eval`` parses those modes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dbr_builder.log import show_progress
from dbr_builder.stages.evaluate.parsing import parse_answer
from trainers.data import KIND_CLS, Example, SampleEncoder, collate, load_image, pad_token_id
from trainers.loss import answer_nll
from trainers.sarr import SarrConfig, generate_with_model

SELECT_MODES = ("scored", "direct", "reasoning")


def class_scores(
    model: Any, encoder: SampleEncoder, examples: Sequence[Example], seq_batch: int = 32, fast: bool = True
) -> Any:
    """(num_examples, num_classes) tensor of log p(class answer | image, q_cls)."""
    import torch
    from tqdm import tqdm


    device = next(model.parameters()).device
    pad = pad_token_id(encoder.processor)
    k = len(encoder.classes)
    per_image = max(1, seq_batch // k)  # whole images per forward, K sequences each
    scores = torch.empty(len(examples), k)
    was_training = model.training
    model.eval()
    try:
        for lo in tqdm(range(0, len(examples), per_image), desc="select", unit="batch", leave=False,
                       disable=not show_progress()):
            chunk = examples[lo : lo + per_image]
            groups = []
            for ex in chunk:
                enc = encoder.encode_prompt(load_image(ex.image), encoder.q_cls)
                groups.append([encoder.encode(None, encoder.q_cls, c, KIND_CLS, enc=enc) for c in encoder.classes])
            rows = [[s] for g in groups for s in g]  # one "image" per sequence: each carries its pixels
            batch = collate(rows, pad)
            batch = {kk: (v.to(device) if hasattr(v, "to") else v) for kk, v in batch.items()}
            with torch.no_grad():
                sums, _ = answer_nll(model, batch, fast=fast)
            scores[lo : lo + len(chunk)] = -sums.float().cpu().view(len(chunk), k)
    finally:
        model.train(was_training)
    return scores


def predict_classes(
    model: Any, encoder: SampleEncoder, examples: Sequence[Example], mode: str = "scored", seq_batch: int = 32,
    max_new_tokens: int = 32, batch_size: int = 16, synonyms: dict[str, list[str]] | None = None,
) -> list[str | None]:
    """The predicted class of each example in ``mode`` (None: unparseable generated answer)."""
    if not examples:
        return []
    if mode == "scored":
        scores = class_scores(model, encoder, examples, seq_batch=seq_batch)
        return [encoder.classes[i] for i in scores.argmax(dim=1).tolist()]
    if mode not in SELECT_MODES:
        raise ValueError(f"selection mode {mode!r}; expected one of {', '.join(SELECT_MODES)}")
    prompt = encoder.q_cls if mode == "direct" else encoder.q_reason
    sc = SarrConfig(n=1, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    texts = generate_with_model(model, encoder, examples, sc, seed=0, prompt=prompt)
    return [parse_answer(mode, t[0] if t else None, encoder.classes, synonyms).pred for t in texts]


def summarize_validation(examples: Sequence[Example], preds: Sequence[str | None]) -> dict[str, Any]:
    """DomainBed training-domain validation: mean of the per-domain accuracies (+ pooled, per domain)."""
    if not examples:
        return {"accuracy": None, "images": 0}
    per_domain: dict[str, list[bool]] = {}
    for ex, p in zip(examples, preds, strict=True):
        per_domain.setdefault(ex.domain, []).append(p == ex.class_name)
    accs = {d: sum(v) / len(v) for d, v in sorted(per_domain.items())}
    correct = [c for v in per_domain.values() for c in v]
    return {
        "accuracy": sum(accs.values()) / len(accs),
        "pooled_accuracy": sum(correct) / len(correct),
        "images": len(correct),
        "per_domain": accs,
    }


def validation_accuracy(
    model: Any, encoder: SampleEncoder, examples: Sequence[Example], seq_batch: int = 32, mode: str = "scored"
) -> dict[str, Any]:
    """Training-domain validation accuracy of ``examples`` (see :func:`summarize_validation`)."""
    if not examples:
        return {"accuracy": None, "images": 0}
    return summarize_validation(examples, predict_classes(model, encoder, examples, mode, seq_batch=seq_batch))
