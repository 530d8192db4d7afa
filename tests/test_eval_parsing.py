"""Answer parsing of `dbr eval`: direct, reasoning (<CONCLUSION>) and the 'Answer Choice:' protocol."""

from __future__ import annotations

import pytest

from dbr_builder.stages.evaluate.parsing import (
    AMBIGUOUS,
    EMPTY,
    NO_ANSWER,
    NO_MATCH,
    OK,
    load_synonyms,
    mentioned_classes,
    parse_answer,
    parse_choice,
    parse_direct,
    parse_reasoning,
)

PACS = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
OFFICE = ["Alarm_Clock", "Computer", "Desk_Lamp", "Knives", "Lamp_Shade", "Mouse", "Pen", "Pencil", "TV"]
TERRA = ["bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel"]


def chain(conclusion: str, reasoning: str = "It has four legs and fur.") -> str:
    return (f"<SUMMARY>I will look at the object.</SUMMARY><CAPTION>An animal.</CAPTION>"
            f"<REASONING>{reasoning}</REASONING><REFLECTION>Consistent.</REFLECTION>"
            f"<CONCLUSION>{conclusion}</CONCLUSION>")


@pytest.mark.parametrize("text,want", [
    ("dog", "dog"),
    ("Dog.", "dog"),
    ("  DOGS!  ", "dog"),
    ("**Giraffe**", "giraffe"),
    ("The answer is: horse", "horse"),
    ("Answer: a house", "house"),
    ("I think this is a picture of an elephant.", "elephant"),
    ("people", "person"),
    ("It looks like a cat, but the answer is: dog", "dog"),  # explicit lead-in wins
    ("This is not a horse; it is a dog.", "dog"),  # negated mention dropped
])
def test_direct_parses(text: str, want: str) -> None:
    got = parse_direct(text, PACS)
    assert got.status == OK and got.pred == want, got


@pytest.mark.parametrize("text,status", [
    ("", EMPTY),
    ("   \n", EMPTY),
    (None, EMPTY),
    ("a bicycle", NO_MATCH),
    ("a dog and a horse", AMBIGUOUS),
    ("dogdog", NO_MATCH),  # whole words only
])
def test_direct_unparseable(text: str | None, status: str) -> None:
    got = parse_direct(text, PACS)
    assert got.pred is None and got.status == status, got


def test_direct_office_names_underscores_camelcase_and_longest_phrase() -> None:
    assert parse_direct("alarm clock", OFFICE).pred == "Alarm_Clock"
    assert parse_direct("Alarm-Clock", OFFICE).pred == "Alarm_Clock"
    assert parse_direct("a knife", OFFICE).pred == "Knives"
    assert parse_direct("desk lamp", OFFICE).pred == "Desk_Lamp"  # not also a bare "lamp"
    assert parse_direct("pencils", OFFICE).pred == "Pencil"  # not Pen
    assert parse_direct("television", OFFICE, load_synonyms("OfficeHome", OFFICE)).pred == "TV"


def test_dataset_synonyms_from_yaml() -> None:
    syn = load_synonyms("OfficeHome", OFFICE)
    assert "computer mouse" in syn["Mouse"]
    # with the synonym "computer mouse" is the Mouse, without it the text names two classes
    assert parse_direct("a computer mouse", OFFICE, syn).pred == "Mouse"
    assert parse_direct("a computer mouse", OFFICE).status == AMBIGUOUS
    terra = load_synonyms("TerraIncognita", TERRA)
    assert parse_direct("There is no animal in this image.", TERRA, terra).pred == "empty"
    assert parse_direct("possum", TERRA, terra).pred == "opossum"
    # synonyms of classes a dataset folder lacks are dropped instead of failing
    assert load_synonyms("OfficeHome", ["Mouse"]) == {"Mouse": syn["Mouse"]}
    assert load_synonyms("NoSuchDataset", PACS) == {}


@pytest.mark.parametrize("text,want", [
    (chain("dog"), "dog"),
    (chain("Dogs."), "dog"),
    (chain("The object is a giraffe."), "giraffe"),
    # the reasoning mentions other classes: only the conclusion counts
    (chain("guitar", reasoning="Not a horse, not a dog, not a house."), "guitar"),
    ("<summary>x</summary><caption>y</caption><reasoning>z</reasoning><reflection>w</reflection>"
     "<conclusion> Horse </conclusion>", "horse"),  # lower-case tags
    (chain("It is an elephant rather than a horse"), "elephant"),
    # truncated chain that still opened its conclusion
    ("<SUMMARY>a</SUMMARY><CAPTION>b</CAPTION><REASONING>c</REASONING><REFLECTION>d</REFLECTION>"
     "<CONCLUSION>person", "person"),
])
def test_reasoning_parses_conclusion(text: str, want: str) -> None:
    got = parse_reasoning(text, PACS)
    assert got.status == OK and got.pred == want, got


@pytest.mark.parametrize("text,status", [
    ("The answer is dog.", NO_ANSWER),  # no CONCLUSION: the answer outside the chain does not count
    (chain("dog").replace("<CONCLUSION>dog</CONCLUSION>", ""), NO_ANSWER),
    (chain("a dog or a horse"), AMBIGUOUS),
    (chain("unclear"), NO_MATCH),
    ("", EMPTY),
])
def test_reasoning_unparseable(text: str, status: str) -> None:
    got = parse_reasoning(text, PACS)
    assert got.pred is None and got.status == status, got


@pytest.mark.parametrize("text,want", [
    ("Answer Choice: dog", "dog"),
    ("answer choice: [Dog]", "dog"),
    ("ANSWER CHOICE:  giraffe.", "giraffe"),
    ("**Answer Choice:** guitar", "guitar"),
    ("Answer Choice： horse", "horse"),  # full-width colon
    ("Sure!\nAnswer Choice: house\nConfidence Score: 0.9\nReasoning: it has a roof and a dog.", "house"),
    # the model echoed the format template, then answered
    ("Answer Choice: [Your Answer Choice Here]\nAnswer Choice: person", "person"),
    ("Answer Choice: Alarm Clock", None),  # not a PACS class (checked below with OFFICE)
])
def test_choice_protocol_parses(text: str, want: str | None) -> None:
    got = parse_choice(text, PACS)
    if want is None:
        assert got.pred is None and parse_choice(text, OFFICE).pred == "Alarm_Clock"
    else:
        assert got.status == OK and got.pred == want, got


@pytest.mark.parametrize("text,status", [
    ("dog", NO_ANSWER),  # right class, wrong format: unparseable = wrong (the paper's protocol)
    ("The answer is dog.", NO_ANSWER),
    ("Answer: dog", NO_ANSWER),
    ("Answer Choice: [Your Answer Choice Here]", NO_MATCH),
    ("Answer Choice: dog\nAnswer Choice: horse", AMBIGUOUS),
    ("Answer Choice: dog or horse", AMBIGUOUS),
    ("", EMPTY),
])
def test_choice_protocol_unparseable(text: str, status: str) -> None:
    got = parse_choice(text, PACS)
    assert got.pred is None and got.status == status, got


def test_parse_answer_dispatch() -> None:
    assert parse_answer("direct", "dog", PACS).pred == "dog"
    assert parse_answer("reasoning", chain("dog"), PACS).pred == "dog"
    assert parse_answer("choice", "Answer Choice: dog", PACS).pred == "dog"
    assert parse_answer("icl", "dog", PACS).status == NO_ANSWER  # ICL answers use the choice protocol
    with pytest.raises(ValueError, match="unknown eval mode"):
        parse_answer("vibes", "dog", PACS)


def test_mentioned_classes_order_and_negation() -> None:
    assert mentioned_classes("a horse next to a dog", PACS) == ["horse", "dog"]
    assert mentioned_classes("not a horse but a dog", PACS) == ["dog"]
    # every mention negated: all are kept, so the caller sees an ambiguity, never a guess
    assert mentioned_classes("neither a horse nor a dog", PACS) == ["horse", "dog"]
    assert mentioned_classes("a bobcat", TERRA) == ["bobcat"]  # not also "cat"
