"""Parse five-stage reasoning chains (LLaVA-CoT style with a reflection stage).

A well-formed chain has each of ``<SUMMARY>``, ``<CAPTION>``, ``<REASONING>``,
``<REFLECTION>``, ``<CONCLUSION>`` exactly once, each closed before the next opens, in that
order, each with non-empty content. The parser is tolerant of whitespace and text around
the tags and inside them (``< /summary >`` is a closing SUMMARY tag; tags are
case-insensitive), and strict about everything else.

Reason codes (``ParsedChain.reason``), checked in this order:

``empty``            the text is empty or whitespace
``truncated``        the text ends inside an open stage or in a partial tag (``... <CONCL``)
``duplicate_stage``  a tag occurs more than once
``malformed_tag``    a stage is opened before the previous one is closed, or closed without being opened
``missing_stage``    a stage is absent
``out_of_order``     all stages present, not in the canonical order
``empty_stage``      a stage has only whitespace inside

The structure is decided from the sequence of tags alone, so :func:`parse_chains_frame`
(polars, vectorised: literal searches and byte slices for chains with exactly the canonical
tags, otherwise one regex pass per text and one Python call per *distinct* tag sequence)
gives exactly the same answer as :func:`parse_chain` (tested).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

STAGES: tuple[str, ...] = ("SUMMARY", "CAPTION", "REASONING", "REFLECTION", "CONCLUSION")
FIELDS: tuple[str, ...] = tuple(s.lower() for s in STAGES)
REASONS: tuple[str, ...] = (
    "empty", "truncated", "duplicate_stage", "malformed_tag", "missing_stage", "out_of_order", "empty_stage",
)

_TAGS = "|".join(STAGES)
# Explicit ASCII whitespace: Python's and Rust's ideas of \s differ on exotic characters.
WS = r"[ \t\n\r\f\v]"
WS_CHARS = " \t\n\r\f\v"
# One tag token, opening or closing; same text for Python re and Rust regex (polars).
TAG_PATTERN = rf"(?i)<{WS}*/?{WS}*(?:{_TAGS}){WS}*>"
# A tag cut off at the end of the text (applied to the right-stripped text).
PARTIAL_PATTERN = rf"<{WS}*/?{WS}*[A-Za-z]*$"
# Contents of the five stages of a structurally valid chain (no other tags can sit between).
CONTENT_PATTERN = "(?is)" + ".*?".join(rf"<{WS}*{s}{WS}*>(.*?)<{WS}*/{WS}*{s}{WS}*>" for s in STAGES)
_SENTINEL = "\x00"
FULL_SEQUENCE = "".join(f"<{s}></{s}>" for s in STAGES)
_CANONICAL_TAGS = [t for s in STAGES for t in (f"<{s}>", f"</{s}>")]

_TAG_RE = re.compile(TAG_PATTERN)
_PARTIAL_RE = re.compile(PARTIAL_PATTERN)
_WS_RE = re.compile(WS + "+")
_SEQ_TOKEN_RE = re.compile(r"<(/?)([A-Z]+)>")


@dataclass(frozen=True)
class ParsedChain:
    """A parsed chain: the five stage texts (stripped) when ``ok``, else ``reason`` says why not."""

    summary: str | None = None
    caption: str | None = None
    reasoning: str | None = None
    reflection: str | None = None
    conclusion: str | None = None
    ok: bool = False
    reason: str | None = None  # one of REASONS, None when ok
    truncated: bool = False
    stage: str | None = None  # the stage the reason is about (e.g. "CAPTION"), when there is one

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


def normalize_sequence(tokens: list[str] | tuple[str, ...]) -> str:
    """Canonical tag sequence: tokens joined, uppercased, whitespace removed."""
    return _WS_RE.sub("", "".join(tokens)).upper()


@lru_cache(maxsize=4096)
def classify_sequence(seq: str) -> tuple[str | None, str | None, bool]:
    """Classify a canonical tag sequence: ``(reason or None, stage or None, ends_open)``."""
    tokens = [(name, close == "/") for close, name in _SEQ_TOKEN_RE.findall(seq)]
    if not tokens:
        return "missing_stage", STAGES[0], False
    if not tokens[-1][1]:
        return "truncated", tokens[-1][0], True
    opens = [n for n, c in tokens if not c]
    closes = [n for n, c in tokens if c]
    for s in STAGES:
        if opens.count(s) > 1 or closes.count(s) > 1:
            return "duplicate_stage", s, False
    current: str | None = None
    for name, close in tokens:
        if not close:
            if current is not None:
                return "malformed_tag", current, False
            current = name
        else:
            if current != name:
                return "malformed_tag", name, False
            current = None
    for s in STAGES:
        if s not in opens:
            return "missing_stage", s, False
    for want, got in zip(STAGES, opens, strict=True):
        if want != got:
            return "out_of_order", got, False
    return None, None, False


def parse_chain(text: str | None) -> ParsedChain:
    """Parse one chain text into its five stages, or say why it is not a valid chain."""
    if text is None or not text.strip(WS_CHARS):
        return ParsedChain(reason="empty")
    seq = normalize_sequence(_TAG_RE.findall(text))
    reason, stage, ends_open = classify_sequence(seq)
    partial = seq != FULL_SEQUENCE and _PARTIAL_RE.search(text.rstrip(WS_CHARS)) is not None
    if ends_open or partial:
        return ParsedChain(reason="truncated", truncated=True, stage=stage if ends_open else None)
    if reason is not None:
        return ParsedChain(reason=reason, stage=stage)
    # A valid sequence has exactly ten tags: the contents are the pieces between open and close.
    parts = [g.strip(WS_CHARS) for g in _TAG_RE.split(text)[1:10:2]]
    for s, p in zip(STAGES, parts, strict=True):
        if not p:
            return ParsedChain(reason="empty_stage", stage=s)
    return ParsedChain(*parts, ok=True)


def format_chain(summary: str, caption: str, reasoning: str, reflection: str, conclusion: str) -> str:
    """Render five stage texts as a canonical chain (the inverse of :func:`parse_chain`)."""
    parts = (summary, caption, reasoning, reflection, conclusion)
    return "".join(f"<{s}>{p}</{s}>" for s, p in zip(STAGES, parts, strict=True))


PARSED_COLUMNS: tuple[str, ...] = (*FIELDS, "ok", "reason", "truncated", "stage")


def parse_chains_frame(texts: pl.Series | list[str | None]) -> pl.DataFrame:
    """Vectorised :func:`parse_chain` over many texts (same results, one row per text, same order).

    Columns: ``summary, caption, reasoning, reflection, conclusion, ok, reason, truncated, stage``.

    Texts whose tags are exactly the ten canonical ones (``<SUMMARY>...</CONCLUSION>``, upper
    case, no spaces, in order: what teachers write nearly always) take a fast path: literal
    searches for the ten tags and byte slices between them, no regex over the contents. The
    rest take :func:`_parse_general`.
    """
    import polars as pl

    s = texts if isinstance(texts, pl.Series) else pl.Series("text", texts, dtype=pl.String)
    s = s.cast(pl.String).rename("text")
    # Fast path when the text holds exactly ten "<" and the ten canonical tags are found (first
    # occurrence, literal) at strictly increasing positions: every tag match starts with "<", so
    # those ten are all the tag matches, in canonical order. (Counting "<" is a sufficient test
    # and much cheaper than counting regex tag matches; a text with another "<" anywhere, say
    # "a < b", simply takes the general path.)
    # The streaming engine splits the rows into morsels and uses every thread; the eager engine
    # runs each string kernel on one thread.
    pos = pl.DataFrame({"text": s}).lazy().with_columns(
        pl.col("text").str.count_matches("<", literal=True).alias("_n"),
        *(pl.col("text").str.find(t, literal=True).alias(f"_p{i}") for i, t in enumerate(_CANONICAL_TAGS)),
    ).collect(engine="streaming")
    canon = pos.select(
        ((pl.col("_n") == len(_CANONICAL_TAGS))
         & pl.all_horizontal(pl.col(f"_p{i}") < pl.col(f"_p{i + 1}") for i in range(len(_CANONICAL_TAGS) - 1)))
        .fill_null(False)
    ).to_series()
    n_canon = int(canon.sum())
    if n_canon == s.len():
        return _parse_canonical(pos)
    if n_canon == 0:
        return _parse_general(s)
    idx = pl.Series("_i", range(s.len()), dtype=pl.UInt32)
    fast = _parse_canonical(pos.filter(canon)).with_columns(idx.filter(canon))
    slow = _parse_general(s.filter(~canon)).with_columns(idx.filter(~canon))
    return pl.concat([fast, slow], how="vertical").sort("_i").drop("_i")


def _parse_canonical(pos: pl.DataFrame) -> pl.DataFrame:
    """:func:`parse_chains_frame` for texts whose tags are exactly the canonical ten, in order.

    ``pos`` has ``text`` and ``_p0`` ... ``_p9``, the byte offsets of the ten tags. Such a
    text is structurally valid, so the only possible reason is ``empty_stage``.
    """
    import polars as pl

    raw = pl.col("text").cast(pl.Binary)  # byte slices: the offsets are byte offsets

    def content(i: int) -> pl.Expr:
        start = pl.col(f"_p{2 * i}") + len(_CANONICAL_TAGS[2 * i])
        # Cut at ASCII tags, so every slice is valid UTF-8 again.
        return raw.bin.slice(start, pl.col(f"_p{2 * i + 1}") - start).cast(pl.String).str.strip_chars(WS_CHARS)

    df = pos.lazy().select(content(i).alias(f) for i, f in enumerate(FIELDS)).collect(engine="streaming")
    empty_stage = pl.lit(None, pl.String)
    for f, st in reversed(list(zip(FIELDS, STAGES, strict=True))):  # first empty stage wins
        empty_stage = pl.when(pl.col(f) == "").then(pl.lit(st)).otherwise(empty_stage)
    df = df.with_columns(stage=empty_stage)
    df = df.with_columns(
        ok=pl.col("stage").is_null(),
        reason=pl.when(pl.col("stage").is_not_null()).then(pl.lit("empty_stage")).otherwise(None),
        truncated=pl.lit(False),
    )
    if not df.get_column("ok").all():  # contents only for valid chains (as parse_chain)
        df = df.with_columns(pl.when(pl.col("ok")).then(pl.col(f)).otherwise(None).alias(f) for f in FIELDS)
    return df.select(PARSED_COLUMNS)


def _parse_general(s: pl.Series) -> pl.DataFrame:
    """:func:`parse_chains_frame` for any texts (tag variants, broken structure, NUL characters)."""
    import polars as pl

    df = pl.DataFrame({"text": s})
    df = df.with_columns(
        _seq=pl.col("text").str.extract_all(TAG_PATTERN).list.join("").str.replace_all(WS + "+", "")
        .str.to_uppercase().fill_null(""),
        _empty=pl.col("text").is_null() | (pl.col("text").str.strip_chars(WS_CHARS) == ""),
        _partial=pl.col("text").str.strip_chars_end(WS_CHARS).str.contains(PARTIAL_PATTERN).fill_null(False),
    )
    seqs = df.get_column("_seq").unique().to_list()
    cls = [classify_sequence(q) for q in seqs]
    table = pl.DataFrame(
        {"_seq": seqs, "_reason": [c[0] for c in cls], "_stage": [c[1] for c in cls],
         "_ends_open": [c[2] for c in cls]},
        schema={"_seq": pl.String, "_reason": pl.String, "_stage": pl.String, "_ends_open": pl.Boolean},
    )
    df = df.join(table, on="_seq", how="left", maintain_order="left")
    trunc = pl.col("_ends_open") | (pl.col("_partial") & (pl.col("_seq") != FULL_SEQUENCE))
    df = df.with_columns(
        truncated=~pl.col("_empty") & trunc,
        _pre=pl.when(pl.col("_empty")).then(pl.lit("empty"))
        .when(trunc).then(pl.lit("truncated"))
        .otherwise(pl.col("_reason")),
    )
    valid = pl.col("_pre").is_null()
    # Split on the tags (much faster than a capture-group regex). A text holding the sentinel
    # itself would split wrongly: such (rare) rows take the capture-group regex instead.
    has_nul = pl.col("text").str.contains(_SENTINEL, literal=True).fill_null(False)
    pieces = pl.col("text").str.replace_all(TAG_PATTERN, _SENTINEL).str.split(_SENTINEL)
    df = df.with_columns(_pieces=pl.when(valid & ~has_nul).then(pieces), _nul=valid & has_nul)
    df = df.with_columns(
        pl.col("_pieces").list.get(2 * i + 1, null_on_oob=True).str.strip_chars(WS_CHARS).alias(f)
        for i, f in enumerate(FIELDS)
    )
    if df.get_column("_nul").any():
        idx = df.with_row_index("_i").filter(pl.col("_nul")).get_column("_i")
        groups = df[idx].select(pl.col("text").str.extract_groups(CONTENT_PATTERN)).to_series().struct.unnest()
        for i, f in enumerate(FIELDS):
            col = df.get_column(f).scatter(idx, groups.get_column(str(i + 1)).str.strip_chars(WS_CHARS))
            df = df.with_columns(col.alias(f))
    empty_stage = pl.lit(None, pl.String)
    for f, st in reversed(list(zip(FIELDS, STAGES, strict=True))):  # first empty stage wins
        empty_stage = pl.when(valid & (pl.col(f) == "")).then(pl.lit(st)).otherwise(empty_stage)
    df = df.with_columns(_empty_stage=empty_stage)
    reason = pl.when(pl.col("_pre").is_not_null()).then(pl.col("_pre")) \
        .when(pl.col("_empty_stage").is_not_null()).then(pl.lit("empty_stage")).otherwise(None)
    stage = pl.when(pl.col("_pre") == "truncated").then(pl.when(pl.col("_ends_open")).then(pl.col("_stage")))\
        .when(pl.col("_pre") == "empty").then(None) \
        .when(pl.col("_pre").is_not_null()).then(pl.col("_stage")).otherwise(pl.col("_empty_stage"))
    df = df.with_columns(reason=reason, stage=stage)
    df = df.with_columns(ok=pl.col("reason").is_null())
    df = df.with_columns(
        pl.when(pl.col("ok")).then(pl.col(f)).otherwise(None).alias(f) for f in FIELDS
    )
    return df.select(PARSED_COLUMNS)
