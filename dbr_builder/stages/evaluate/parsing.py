"""Turn a model's answer text into one class (or "unparseable") for each evaluation protocol.

Three protocols (``dbr eval --mode``):

- ``direct``: the answer to ``q_cls`` is free text that should name one class
  (``"Dog."``, ``"The answer is: dogs"``, ``"**giraffe**"``);
- ``reasoning``: the answer to ``q_reason`` is a five-stage chain; the class is read from its
  ``<CONCLUSION>`` only (``dbr_builder.core.chains.parse_chain``), never from the reasoning text;
- ``choice`` (also used for in-context learning): the zero-shot protocol of the
  OOD-generalization paper: the answer must contain ``Answer Choice: [choice]``, found with a
  case-insensitive regex; an answer without it is unparseable, and unparseable counts as wrong.

Every protocol maps the extracted span to a class with ``dbr_builder.core.answers.match_class``
(case, punctuation, underscores vs spaces, simple plurals, per-dataset synonyms) and, when
the span is a sentence rather than a bare class name, with :func:`mentioned_classes`: the
classes named in it (longest form first, so ``computer mouse`` is not also ``Computer``;
negated mentions such as ``not a cat`` are dropped). Exactly one class must remain;
two different classes is ``ambiguous`` and counts as wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dbr_builder.core.answers import match_class, matcher, normalize, synonyms_for
from dbr_builder.core.chains import parse_chain
from dbr_builder.errors import ConfigError
from dbr_builder.resources import resource_path

MODES = ("direct", "reasoning", "choice", "icl")

# Status codes of a parse; everything but "ok" is counted as unparseable (and wrong).
OK = "ok"
EMPTY = "empty"  # no text at all (or the backend returned an error)
NO_ANSWER = "no_answer"  # the protocol's answer slot is missing (no CONCLUSION / no "Answer Choice:")
NO_MATCH = "no_match"  # an answer slot, but it names no class
AMBIGUOUS = "ambiguous"  # it names two or more different classes

Synonyms = Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class ParsedAnswer:
    """The class a model answered (``pred``), or None with the reason in ``status``."""

    pred: str | None
    status: str
    span: str = ""  # the part of the text the class was read from

    @property
    def ok(self) -> bool:
        return self.pred is not None


# The answer slot of the OOD paper's protocol: "Answer Choice: [choice]", case-insensitive,
# tolerant of markdown bold around the key and of a full-width colon.
_CHOICE_RE = re.compile(r"answer[\s_*]*choice[\s*]*[:：][\s*]*(?P<choice>[^\n]*)", re.IGNORECASE)
# Lead-ins of a direct answer ("The answer is: X", "Answer: X", "Final answer - X").
_ANSWER_IS_RE = re.compile(
    r"\b(?:final\s+answer|answer\s+choice|answer|prediction|class|category|label)\b"
    r"(?:\s+is)?[\s*]*[:：=-]?[\s*]*(?P<ans>[^\n]+)",
    re.IGNORECASE,
)
_CONCLUSION_OPEN_RE = re.compile(r"<\s*CONCLUSION\s*>(?P<body>.*?)(?:<\s*/\s*CONCLUSION\s*>|$)",
                                 re.IGNORECASE | re.DOTALL)
# normalised (apostrophes become spaces: "isn't" -> "isn t")
_NEGATIONS = ("not", "no", "isn t", "nor", "never", "neither", "instead of", "rather than",
              "unlike", "except", "than")


def mentioned_classes(text: str, classes: Sequence[str], synonyms: Synonyms | None = None) -> list[str]:
    """Distinct classes named in ``text`` (in order of first mention), negated mentions dropped.

    Mentions are found with ``dbr_builder.core.answers``' matcher (whole words, longest phrase
    first, so ``desk lamp`` is not also ``Desk``). A mention right after a negation
    (``not a cat``, ``rather than dogs``) is dropped, unless every mention is negated (then
    all are kept, and the caller sees an ambiguity rather than a silent guess).
    """
    m = matcher(list(classes), synonyms)
    norm = normalize(text)
    hits: list[tuple[str, bool]] = []
    for hit in re.finditer(m.pattern, norm):
        before = " ".join(norm[: hit.start()].split()[-3:])
        negated = any(re.search(rf"(^| ){re.escape(n)}( |$)", before) for n in _NEGATIONS)
        hits.append((m.surface_to_class[hit.group(0)], negated))
    positive = [c for c, neg in hits if not neg]
    chosen = positive if positive else [c for c, _ in hits]
    return list(dict.fromkeys(chosen))


def classify_span(span: str, classes: Sequence[str], synonyms: Synonyms | None = None) -> ParsedAnswer:
    """Map an answer span (a class name or a short sentence) to exactly one class."""
    span = span.strip()
    if not span:
        return ParsedAnswer(None, NO_MATCH, span)
    # a bare class name in any spelling: markdown, brackets, quotes, trailing period
    bare = span.strip(" \t*_`'\"[](){}.:;,!")
    hit = match_class(bare, list(classes), synonyms=synonyms) if bare else None
    if hit is not None:
        return ParsedAnswer(hit, OK, span)
    found = mentioned_classes(span, classes, synonyms)
    if len(found) == 1:
        return ParsedAnswer(found[0], OK, span)
    return ParsedAnswer(None, AMBIGUOUS if found else NO_MATCH, span)


def parse_direct(text: str | None, classes: Sequence[str], synonyms: Synonyms | None = None) -> ParsedAnswer:
    """Direct protocol: the answer to ``q_cls`` names one class.

    Tries, in order: an explicit lead-in (``Answer: X``, ``The answer is X``; the last one
    wins, as models restate their final answer last), the whole text as a bare class name,
    then the single class the whole text mentions.
    """
    if not text or not text.strip():
        return ParsedAnswer(None, EMPTY)
    leads = list(_ANSWER_IS_RE.finditer(text))
    for m in reversed(leads):
        got = classify_span(m.group("ans"), classes, synonyms)
        if got.ok:
            return got
    return classify_span(text, classes, synonyms)


def conclusion_text(text: str) -> str | None:
    """The ``<CONCLUSION>`` body of a chain, or None if the chain has none.

    Uses ``dbr_builder.core.chains.parse_chain``; a chain cut off inside an opened
    ``<CONCLUSION>`` (no closing tag) still yields its body.
    """
    parsed = parse_chain(text)
    if parsed.conclusion is not None and parsed.conclusion.strip():
        return parsed.conclusion
    # the last opened CONCLUSION tag, closed or not (truncated or malformed chains)
    bodies = [m.group("body") for m in _CONCLUSION_OPEN_RE.finditer(text)]
    bodies = [b for b in bodies if b.strip()]
    return bodies[-1] if bodies else None


def parse_reasoning(text: str | None, classes: Sequence[str], synonyms: Synonyms | None = None) -> ParsedAnswer:
    """Reasoning protocol: the class is read from the chain's ``<CONCLUSION>`` only."""
    if not text or not text.strip():
        return ParsedAnswer(None, EMPTY)
    body = conclusion_text(text)
    if body is None:
        return ParsedAnswer(None, NO_ANSWER)
    return classify_span(body, classes, synonyms)


def parse_choice(text: str | None, classes: Sequence[str], synonyms: Synonyms | None = None) -> ParsedAnswer:
    """The OOD paper's protocol: ``Answer Choice: [choice]``, case-insensitive; else unparseable.

    Every ``Answer Choice:`` line is read (a model may echo the format template, e.g.
    ``Answer Choice: [Your Answer Choice Here]``, before answering); the lines that name a
    class must all name the same one, otherwise the answer is ambiguous (wrong).
    """
    if not text or not text.strip():
        return ParsedAnswer(None, EMPTY)
    matches = list(_CHOICE_RE.finditer(text))
    if not matches:
        return ParsedAnswer(None, NO_ANSWER)
    got = [classify_span(m.group("choice"), classes, synonyms) for m in matches]
    preds = list(dict.fromkeys(g.pred for g in got if g.ok))
    if len(preds) == 1:
        return next(g for g in got if g.ok)
    if len(preds) > 1:
        return ParsedAnswer(None, AMBIGUOUS, " | ".join(m.group("choice") for m in matches))
    return ParsedAnswer(None, AMBIGUOUS if any(g.status == AMBIGUOUS for g in got) else NO_MATCH,
                        matches[-1].group("choice"))


def parse_answer(mode: str, text: str | None, classes: Sequence[str],
                 synonyms: Synonyms | None = None) -> ParsedAnswer:
    """Parse ``text`` with the protocol of ``mode`` (``icl`` answers use the choice protocol)."""
    if mode == "direct":
        return parse_direct(text, classes, synonyms)
    if mode == "reasoning":
        return parse_reasoning(text, classes, synonyms)
    if mode in ("choice", "icl"):
        return parse_choice(text, classes, synonyms)
    raise ValueError(f"unknown eval mode {mode!r}; expected one of {', '.join(MODES)}")


def load_synonyms(dataset: str, classes: Sequence[str], path: str | None = None) -> dict[str, list[str]]:
    """Class synonyms of ``dataset``: ``dbr_builder.core.answers``' defaults plus ``pipelines/class_synonyms.yaml``.

    ``path`` replaces the packaged YAML file. Only synonyms of classes in ``classes`` are
    kept (a dataset folder may hold a subset of the classes).
    """
    from pathlib import Path

    import yaml


    p = Path(path) if path else resource_path("pipelines", "class_synonyms.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: cannot read class synonyms: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of dataset name -> {{class: [synonyms]}}")
    entry = data.get(dataset) or {}
    if not isinstance(entry, dict) or not all(isinstance(v, list) for v in entry.values()):
        raise ConfigError(f"{p}: `{dataset}` must map each class name to a list of synonyms")
    extra = {str(k): [str(s) for s in v] for k, v in entry.items()}
    return synonyms_for(dataset, extra=extra, classes=list(classes))
