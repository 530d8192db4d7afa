"""Model selection on the training domains' ``out`` splits (DomainBed training-domain validation).

Each validation image is classified by scoring: the log-likelihood of every class name as the
assistant answer to q_cls (with the options), end-of-turn token included, so ``cat`` cannot win by
being a prefix of ``cathedral``; the argmax is the prediction. Exact, no parsing, no sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dbr_builder.log import show_progress
from trainers.data import KIND_CLS, Example, SampleEncoder, collate, load_image, pad_token_id
from trainers.loss import answer_nll


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


def validation_accuracy(
    model: Any, encoder: SampleEncoder, examples: Sequence[Example], seq_batch: int = 32
) -> dict[str, Any]:
    """Accuracy (and per-domain accuracy) of scoring predictions on ``examples``."""
    if not examples:
        return {"accuracy": None, "images": 0}
    scores = class_scores(model, encoder, examples, seq_batch=seq_batch)
    pred = scores.argmax(dim=1).tolist()
    correct = [encoder.classes[p] == ex.class_name for p, ex in zip(pred, examples, strict=True)]
    per_domain: dict[str, list[bool]] = {}
    for ex, c in zip(examples, correct, strict=True):
        per_domain.setdefault(ex.domain, []).append(c)
    return {
        "accuracy": sum(correct) / len(correct),
        "images": len(correct),
        "per_domain": {d: sum(v) / len(v) for d, v in sorted(per_domain.items())},
    }
