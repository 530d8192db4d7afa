"""The MTCT loss (DESIGN.md), exactly:

    L = 1/B * sum_i [ -log p(y_i | x_i, q_cls)  -  1/T_i * sum_t log p(r_i,t | r_i,<t, x_i, q_reason) ]

per image i of the batch: the summed NLL of the class-name answer (all its tokens, end-of-turn
included) plus the reasoning NLL divided by the chain's token count T_i (the number of trained answer
tokens of the reasoning sample). Classification-only / reasoning-only training (the ablation) just
leaves one kind of sample out; SARR's ``drop`` policy leaves images out.

``AnswerNLL`` wraps the model so that only the answer positions go through the LM head: prompts are
dominated by image tokens and, for 150k-token vocabularies, full logits would be most of the
activation memory. It is the module handed to accelerate/DDP, so gradient sync hooks fire.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trainers.data import KIND_CLS, KIND_REASON

# This module is only imported by training code, never by `dbr --help`, so torch is imported at top.
NON_MODEL_KEYS = ("labels", "image_index", "kind", "num_images", "truncated")


def _body_and_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder body returning last_hidden_state, LM head) when the model has that shape."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    cfg = getattr(base, "config", None)
    text_cfg = getattr(cfg, "text_config", cfg)
    if body is None or head is None or getattr(text_cfg, "final_logit_softcapping", None):
        return None
    return body, head


def answer_nll(model: Any, batch: dict[str, Any], fast: bool = True) -> tuple[Any, Any]:
    """Per-sequence (summed NLL over answer tokens, number of answer tokens).

    ``fast`` applies the LM head only at answer positions; otherwise full logits are computed
    (the reference path, also used for models without a separable head).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    split = _body_and_head(model) if fast else None
    if split is not None:
        body, head = split
        hidden = body(**inputs, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][mask]).float()
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1][mask].float()
    nll = F.cross_entropy(logits, shift_labels[mask], reduction="none")
    seq = mask.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, seq, nll)
    return sums, mask.sum(dim=1)


def per_image_loss(seq_nll: Any, seq_tokens: Any, kind: Any, image_index: Any, num_images: int) -> Any:
    """Per-image MTCT loss from per-sequence NLL sums: cls NLL + reasoning NLL / T_i."""
    denom = torch.where(kind == KIND_REASON, seq_tokens.clamp(min=1).to(seq_nll.dtype), torch.ones_like(seq_nll))
    per_seq = seq_nll / denom
    return torch.zeros(num_images, dtype=seq_nll.dtype, device=seq_nll.device).index_add(0, image_index, per_seq)


def mtct_loss(model: Any, batch: dict[str, Any], fast: bool = True) -> tuple[Any, dict[str, float]]:
    """Mean over the batch's images of the MTCT loss, plus logging stats."""
    sums, toks = answer_nll(model, batch, fast=fast)
    kind = batch["kind"].to(sums.device)
    per_img = per_image_loss(sums, toks, kind, batch["image_index"].to(sums.device), batch["num_images"])
    return per_img.mean(), _stats(sums, toks, kind)


def _stats(sums: Any, toks: Any, kind: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, k in (("cls_nll", KIND_CLS), ("reason_nll_per_token", KIND_REASON)):
        sel = kind == k
        if bool(sel.any()):
            s = sums[sel].detach()
            out[name] = float(s.sum() / (toks[sel].sum().clamp(min=1) if k == KIND_REASON else sel.sum()))
    out["answer_tokens"] = float(toks.sum())
    return out


class AnswerNLL(torch.nn.Module):
    """Wraps a model for accelerate/DDP: ``forward(batch) -> (per-sequence NLL sums, answer tokens)``."""

    def __init__(self, model: Any, fast: bool = True) -> None:
        super().__init__()
        self.model = model
        self.fast = fast

    def forward(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        return answer_nll(self.model, batch, fast=self.fast)
