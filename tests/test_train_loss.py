"""MTCT data + loss: masks and the loss against a hand computation on a tiny batch."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def student(tiny_model_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_path)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path).eval()
    return processor, model


@pytest.fixture(scope="module")
def examples(synth_root):
    from trainers.data import examples_from_rows, rows_from_synth

    return examples_from_rows(rows_from_synth(synth_root / "SynthShapes"))


@pytest.fixture(scope="module")
def encoder(student, examples):
    from trainers.data import SampleEncoder

    return SampleEncoder(student[0], sorted({e.class_name for e in examples}))


def test_labels_cover_exactly_the_answer(student, examples, encoder):
    processor, model = student
    from trainers.data import IGNORE_INDEX, KIND_CLS, KIND_REASON

    ex = examples[5]
    cls, reason = encoder.encode_example(ex)
    assert (cls.kind, reason.kind) == (KIND_CLS, KIND_REASON)
    image_token = model.config.image_token_id
    for s, answer in ((cls, ex.class_name), (reason, ex.chain)):
        prompt_len = len(s.input_ids) - s.answer_tokens
        # The prompt (with the image placeholders the processor expanded) is entirely masked ...
        assert image_token in s.input_ids[:prompt_len]
        assert all(lab == IGNORE_INDEX for lab in s.labels[:prompt_len])
        # ... and the trained tokens are exactly the assistant answer plus the end-of-turn token.
        trained = [t for t in s.labels if t != IGNORE_INDEX]
        assert trained == s.input_ids[prompt_len:]
        text = processor.tokenizer.decode(trained)
        assert text.startswith(answer) and "<|im_end|>" in text
        assert image_token not in trained


def _hand_loss(model, batch):
    """Per-image loss computed token by token from full logits, as written in DESIGN.md."""
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "image_index", "kind", "num_images")}
        logp = torch.log_softmax(model(**inputs).logits.double(), dim=-1)
    per_image = [0.0] * batch["num_images"]
    for r in range(batch["input_ids"].shape[0]):
        labels = batch["labels"][r].tolist()
        terms = [logp[r, t - 1, labels[t]].item() for t in range(1, len(labels)) if labels[t] != -100]
        nll = -sum(terms)
        if int(batch["kind"][r]) == 1:
            nll /= len(terms)  # reasoning: length-normalised by T_i
        per_image[int(batch["image_index"][r])] += nll
    return sum(per_image) / len(per_image)


@pytest.mark.parametrize("fast", [True, False])
def test_mtct_loss_matches_hand_computation(student, examples, encoder, fast):
    from dataclasses import replace

    from trainers.data import collate, pad_token_id
    from trainers.loss import mtct_loss

    processor, model = student
    # Two full images and one without a chain (classification only): different lengths -> padding.
    exs = [examples[0], examples[9], replace(examples[17], chain=None)]
    batch = collate([encoder.encode_example(e) for e in exs], pad_token_id(processor))
    assert batch["input_ids"].shape[0] == 5 and batch["num_images"] == 3
    expected = _hand_loss(model, batch)
    with torch.no_grad():
        got, stats = mtct_loss(model, batch, fast=fast)
    assert math.isclose(float(got), expected, rel_tol=1e-4)
    assert stats["answer_tokens"] == float((batch["labels"] != -100).sum())


def test_reasoning_term_is_length_normalised(student, examples, encoder):
    """Doubling a chain's text roughly keeps its per-token term, it does not double the loss."""
    from dataclasses import replace

    from trainers.data import collate, pad_token_id
    from trainers.loss import answer_nll, per_image_loss

    processor, model = student
    ex = examples[3]
    long = replace(ex, chain=ex.chain + ex.chain)
    for e in (ex, long):
        batch = collate([encoder.encode_example(e, tasks=("reason",))], pad_token_id(processor))
        with torch.no_grad():
            sums, toks = answer_nll(model, batch)
            loss = per_image_loss(sums, toks, batch["kind"], batch["image_index"], 1)
        assert math.isclose(float(loss[0]), float(sums[0]) / int(toks[0]), rel_tol=1e-6)
        assert int(toks[0]) == next(s.answer_tokens for s in encoder.encode_example(e, ("reason",)))


def test_bad_rows_name_the_field():
    from dbr_builder.errors import UserError
    from trainers.data import examples_from_rows

    with pytest.raises(UserError, match="dg_split"):
        examples_from_rows([{"image": "x.png", "class_name": "a", "domain": "d"}], source="hub/x")
    with pytest.raises(UserError, match="'val'"):
        examples_from_rows([{"image": "x.png", "class_name": "a", "domain": "d", "dg_split": "val"}])
