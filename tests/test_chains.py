"""Chain parser: every reason code, tolerance around tags, and vectorised == scalar parsing."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbr_builder.core.chains import FIELDS, STAGES, format_chain, parse_chain, parse_chains_frame

GOOD = format_chain("Look at the shape.", "A red star.", "Five points, so a star.", "Holds.", "star")


def test_good_chain_parses_and_round_trips():
    p = parse_chain(GOOD)
    assert p.ok and p.reason is None and not p.truncated
    assert (p.summary, p.caption, p.conclusion) == ("Look at the shape.", "A red star.", "star")
    assert format_chain(*(getattr(p, f) for f in FIELDS)) == GOOD


def test_tolerates_whitespace_case_and_text_around():
    text = "Sure! Here it is:\n< summary >\n  Look.  </SUMMARY >\n\n<Caption>A star</caption>  \n" \
           "<REASONING>Five\npoints</REASONING>blah<REFLECTION>ok</REFLECTION>\n<CONCLUSION> star </ CONCLUSION>\nBye."
    p = parse_chain(text)
    assert p.ok, p
    assert p.summary == "Look." and p.reasoning == "Five\npoints" and p.conclusion == "star"


def _drop(stage: str) -> str:
    """GOOD without one whole stage."""
    return GOOD[: GOOD.index(f"<{stage}>")] + GOOD[GOOD.index(f"</{stage}>") + len(f"</{stage}>"):]


@pytest.mark.parametrize(
    "text,reason,stage",
    [
        ("", "empty", None),
        ("   \n\t", "empty", None),
        (None, "empty", None),
        ("no tags at all", "missing_stage", "SUMMARY"),
        (_drop("REFLECTION"), "missing_stage", "REFLECTION"),
        (GOOD + "<SUMMARY>again</SUMMARY>", "duplicate_stage", "SUMMARY"),
        (GOOD.replace("</CAPTION>", "</CAPTION></CAPTION>"), "duplicate_stage", "CAPTION"),
        (GOOD.replace("</SUMMARY>", ""), "malformed_tag", "SUMMARY"),
        (GOOD.replace("<REASONING>", ""), "malformed_tag", "REASONING"),
        (
            format_chain("a", "b", "c", "d", "e").replace("<CAPTION>b</CAPTION>", "")
            .replace("<SUMMARY>", "<CAPTION>b</CAPTION><SUMMARY>"),
            "out_of_order", "CAPTION",
        ),
        (format_chain("a", "  \n", "c", "d", "e"), "empty_stage", "CAPTION"),
        (format_chain("a", "b", "c", "d", ""), "empty_stage", "CONCLUSION"),
        (GOOD[: GOOD.index("</CONCLUSION>")], "truncated", "CONCLUSION"),
        (GOOD[: GOOD.index("<CONCLUSION>") + 5], "truncated", None),
        ("<SUMMARY>Look at", "truncated", "SUMMARY"),
    ],
)
def test_reason_codes(text, reason, stage):
    p = parse_chain(text)
    assert not p.ok
    assert (p.reason, p.stage) == (reason, stage)
    assert p.truncated == (reason == "truncated")
    assert p.conclusion is None
    # the vectorised parser agrees
    row = parse_chains_frame([text]).row(0, named=True)
    assert (row["reason"], row["stage"], row["ok"], row["truncated"]) == (reason, stage, False, p.truncated)


def test_complete_chain_followed_by_a_lone_angle_bracket_is_not_truncated():
    assert parse_chain(GOOD + " <").ok


_fragments = st.sampled_from(
    [f"<{s}>" for s in STAGES] + [f"</{s}>" for s in STAGES]
    + ["< summary >", "</ Caption>", "<REFL", "</CONCL", "<", " ", "\n", "x", "dog", "Real World", "<b>", "é"]
)
_text = st.lists(st.one_of(_fragments, st.text(max_size=5)), max_size=14).map("".join)
_mutated = st.tuples(
    st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=6), min_size=5, max_size=5),
    st.integers(0, len(GOOD)), st.integers(0, 30), st.text(max_size=4),
).map(lambda t: (format_chain(*t[0]), t[1], t[2], t[3])).map(lambda t: t[0][: t[1]] + t[3] + t[0][t[1] + t[2]:])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_text, _mutated), min_size=1, max_size=20))
def test_vectorised_equals_scalar(texts):
    frame = parse_chains_frame(texts)
    assert frame.height == len(texts)
    for text, row in zip(texts, frame.iter_rows(named=True), strict=True):
        assert row == parse_chain(text).to_dict(), repr(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=20), min_size=5, max_size=5))
def test_any_nonblank_stages_round_trip(parts):
    text = format_chain(*parts)
    p = parse_chain(text)
    ws = " \t\n\r\f\v"
    if all(x.strip(ws) for x in parts):
        assert p.ok and [getattr(p, f) for f in FIELDS] == [x.strip(ws) for x in parts]
    else:
        assert p.reason == "empty_stage"


def test_frame_accepts_series_and_keeps_order():
    texts = [GOOD, "", GOOD.replace("star", "dog")]
    out = parse_chains_frame(pl.Series("t", texts))
    assert out["ok"].to_list() == [True, False, True]
    assert out["conclusion"].to_list() == ["star", None, "dog"]


def test_text_with_nul_characters_parses_the_same():
    texts = [GOOD.replace("red", "r\x00ed"), GOOD, "\x00"]
    rows = parse_chains_frame(texts).to_dicts()
    assert rows == [parse_chain(t).to_dict() for t in texts]
    assert rows[0]["caption"] == "A r\x00ed star."
