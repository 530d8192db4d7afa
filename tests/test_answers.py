"""Class matching: normalisation, plurals, multi-word and CamelCase names, synonyms, ambiguity."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbr_builder.core.answers import NON_ALNUM_PATTERN, find_classes, match_class, matcher, synonyms_for

PACS = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
OFFICE = ["Alarm_Clock", "Batteries", "Desk_Lamp", "Knives", "Lamp_Shade", "Pen", "Pencil", "TV",
          "ToothBrush", "Postit_Notes", "Mouse", "Computer", "Glasses", "Real World"]


@pytest.mark.parametrize(
    "text,want",
    [
        ("dog", "dog"), ("Dog.", "dog"), ("DOGS!", "dog"), ("The object is a **giraffe**.", "giraffe"),
        ("people", "person"), ("persons", "person"), ("houses", "house"), ("horse", "horse"),
        ("a dog and a cat", "dog"),  # cat is not a PACS class
        ("dog or horse", None), ("nothing here", None), ("", None), (None, None),
        ("hotdog", None),  # whole words only
    ],
)
def test_pacs(text, want):
    assert match_class(text, PACS) == want


@pytest.mark.parametrize(
    "text,want",
    [
        ("alarm clock", "Alarm_Clock"), ("Alarm-Clocks", "Alarm_Clock"), ("alarm_clock", "Alarm_Clock"),
        ("battery", "Batteries"), ("Batteries", "Batteries"), ("a knife", "Knives"), ("knives", "Knives"),
        ("desk lamp", "Desk_Lamp"), ("lamp shades", "Lamp_Shade"), ("pen", "Pen"), ("pencils", "Pencil"),
        ("tv", "TV"), ("TVs", "TV"), ("toothbrush", "ToothBrush"), ("tooth brush", "ToothBrush"),
        ("Postit notes", "Postit_Notes"), ("mice", "Mouse"), ("eyeglasses", None),
        ("real world", "Real World"), ("Real_World", "Real World"), ("pen and pencil", None),
    ],
)
def test_office_names(text, want):
    assert match_class(text, OFFICE) == want


def test_synonyms_and_defaults():
    assert match_class("a television set", OFFICE) is None
    syn = synonyms_for("OfficeHome", {"Mouse": ["computer mouse"]}, classes=OFFICE)
    assert "Trash_Can" not in syn  # not a class of this list
    assert match_class("a television set", OFFICE, syn) == "TV"
    assert match_class("eyeglasses", OFFICE, syn) == "Glasses"
    # the longest mention wins: "computer mouse" is Mouse, not also Computer
    assert match_class("a computer mouse", OFFICE, syn) == "Mouse"
    assert find_classes("a computer and a mouse", OFFICE, syn) == ["Computer", "Mouse"]
    assert match_class("a boy", PACS, synonyms_for("PACS")) == "person"
    with pytest.raises(ValueError, match="unknown class"):
        match_class("x", PACS, {"cat": ["kitty"]})


def test_shared_synonym_names_neither_class():
    assert match_class("pet", ["dog", "cat"], {"dog": ["pet"], "cat": ["pet"]}) is None


_words = st.sampled_from(["dog", "Dogs", "horse", "house", "houses", "person", "people", "the", "a", "not", "hot",
                          "_", "-", ".", " ", "DOG", "guitars", "Giraffe!", "é", "ſ", "\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_words, max_size=8).map(" ".join), min_size=1, max_size=10))
def test_polars_path_matches_python(texts):
    """The filter runs the matcher's regex in polars; it must agree with match_class."""
    m = matcher(PACS)
    got = (
        pl.Series(texts).str.to_lowercase().str.replace_all(NON_ALNUM_PATTERN, " ")
        .str.extract_all(m.pattern).to_list()
    )
    for text, surfaces in zip(texts, got, strict=True):
        classes = list(dict.fromkeys(m.surface_to_class[s] for s in surfaces))
        assert classes == find_classes(text, PACS), repr(text)
