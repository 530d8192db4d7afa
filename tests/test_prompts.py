"""Prompt templates: fields, ids, the paper's q_cls wording, label withheld from the teacher."""

from __future__ import annotations

import pytest

from dbr_builder.core import prompts

CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]


def test_q_cls_is_the_papers_wording() -> None:
    text = prompts.render("q_cls", **prompts.class_fields(CLASSES))
    assert text.startswith("What type of object is in this photo? Choose from the following options:")
    assert text.endswith("dog, elephant, giraffe, guitar, horse, house, person")


def test_teacher_prompt_lists_classes_and_asks_for_five_stages() -> None:
    text = prompts.teacher_prompt("teacher", CLASSES, label="giraffe")
    for c in CLASSES:
        assert f"- {c}" in text
    positions = [text.index(f"<{tag}>") for tag in ("SUMMARY", "CAPTION", "REASONING", "REFLECTION", "CONCLUSION")]
    assert positions == sorted(positions)
    assert "style is not evidence" in text
    # The label is withheld: the teacher template has no label field at all.
    assert "label" not in prompts.fields("teacher")
    assert "Hint" not in text


def test_rationalize_prompt_gets_the_label() -> None:
    text = prompts.teacher_prompt("rationalize", CLASSES, label="horse")
    assert 'the correct class is "horse"' in text
    with pytest.raises(prompts.PromptError, match="needs the true label"):
        prompts.teacher_prompt("rationalize", CLASSES)


def test_prompt_id_is_a_hash_of_the_text() -> None:
    ids = {n: prompts.prompt_id(n) for n in ("teacher", "rationalize", "q_cls", "q_reason")}
    assert len(set(ids.values())) == 4
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids.values())
    assert prompts.prompt_id("teacher") == prompts.prompt_id("teacher")


def test_missing_field_and_unknown_prompt_are_clear_errors() -> None:
    with pytest.raises(prompts.PromptError, match="needs field"):
        prompts.render("q_cls")
    with pytest.raises(prompts.PromptError, match="not found"):
        prompts.render("no_such_prompt")
    assert "options" in prompts.fields("q_reason")
