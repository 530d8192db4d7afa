"""Match free text (a chain's conclusion, a model's answer) to one class of a dataset.

Normalisation: lowercase, every run of characters other than ``a-z0-9`` becomes one space
(so case, punctuation, underscores, hyphens and extra spaces do not matter). A class is
known by its folder name (``Alarm_Clock`` -> ``alarm clock``; CamelCase ``ToothBrush`` ->
``tooth brush`` and ``toothbrush``), by the singular and simple plural forms of its last
word (``knife``/``knives``, ``battery``/``batteries``, ``person``/``people``) and by any
synonyms given (per dataset defaults in :data:`DEFAULT_SYNONYMS`).

A text names a class when exactly one distinct class is mentioned as whole words; the
longest mention wins where mentions overlap (``desk lamp`` is not also ``lamp``). Texts
that mention no class or several classes match nothing (``None``): a conclusion such as
"a dog, not a cat" is ambiguous by this rule, on purpose.

The same compiled pattern runs in Python (``re``) and in polars (Rust ``regex``), which
share leftmost-first alternation semantics, so :func:`match_class` and the vectorised
filter agree (tested).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

# Irregular plural -> singular (both directions are used).
_IRREGULAR = {
    "people": "person",
    "mice": "mouse",
    "knives": "knife",
    "shelves": "shelf",
    "leaves": "leaf",
    "wolves": "wolf",
    "children": "child",
    "men": "man",
    "women": "woman",
    "teeth": "tooth",
    "feet": "foot",
    "geese": "goose",
}
_IRREGULAR_PLURAL = {v: k for k, v in _IRREGULAR.items()}

# Synonyms a teacher commonly uses for DomainBed class names (class folder name -> phrases).
DEFAULT_SYNONYMS: dict[str, dict[str, list[str]]] = {
    "PACS": {"person": ["human", "man", "woman", "boy", "girl", "child"]},
    "VLCS": {"person": ["human", "man", "woman", "boy", "girl", "child"], "car": ["automobile"]},
    "OfficeHome": {
        "TV": ["television"],
        "Postit_Notes": ["post it notes", "sticky notes", "post its"],
        "Flipflops": ["flip flops", "flip flop"],
        "Trash_Can": ["trash bin", "garbage can", "waste bin", "wastebasket"],
        "Refrigerator": ["fridge"],
        "Couch": ["sofa"],
        "Bike": ["bicycle"],
        "Mug": ["coffee mug"],
        "Sneakers": ["sneaker", "trainers"],
        "Glasses": ["eyeglasses", "spectacles"],
        "Push_Pin": ["pushpin", "thumbtack"],
        "Paper_Clip": ["paperclip"],
        "Alarm_Clock": ["alarmclock"],
    },
    "TerraIncognita": {"empty": ["no animal", "no animals", "empty scene"], "opossum": ["possum"]},
}

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
# Same pattern text as _NON_ALNUM, for polars (Rust regex) after lowercasing.
NON_ALNUM_PATTERN = r"[^0-9a-z]+"


def normalize(text: str) -> str:
    """Lowercase and turn every run of non ``[a-z0-9]`` characters into one space."""
    return _NON_ALNUM.sub(" ", text.lower()).strip()


def singular(word: str) -> str:
    """Simple English singular of one lowercase word (``batteries`` -> ``battery``)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def plural_forms(word: str) -> set[str]:
    """Surface forms of one lowercase word: its singular and simple plurals."""
    s = singular(word)
    forms = {word, s, s + "s"}
    if s in _IRREGULAR_PLURAL:
        forms.add(_IRREGULAR_PLURAL[s])
    if s.endswith("y") and len(s) > 2 and s[-2] not in "aeiou":
        forms.add(s[:-1] + "ies")
    if s.endswith(("s", "x", "z", "ch", "sh")):
        forms.add(s + "es")
    if s.endswith("fe"):
        forms.add(s[:-2] + "ves")
    elif s.endswith("f"):
        forms.add(s[:-1] + "ves")
    return {f for f in forms if f}


def _name_variants(name: str) -> set[str]:
    """Normalised phrases for one class folder name or synonym."""
    out = {normalize(name)}
    camel = normalize(_CAMEL.sub(" ", name))
    out.add(camel)
    out.add(camel.replace(" ", ""))
    return {v for v in out if v}


@dataclass(frozen=True)
class ClassMatcher:
    """A compiled class matcher: one regex over normalised text, surface phrase -> class."""

    classes: tuple[str, ...]
    pattern: str  # apply to normalize(text); matches are surface phrases
    surface_to_class: Mapping[str, str]

    def find(self, text: str | None) -> list[str]:
        """Distinct classes mentioned in ``text``, in order of first mention."""
        if not text:
            return []
        found: dict[str, None] = {}
        for m in re.finditer(self.pattern, normalize(text)):
            found.setdefault(self.surface_to_class[m.group(0)], None)
        return list(found)

    def match(self, text: str | None) -> str | None:
        """The one class named by ``text``, or None when none or several are named."""
        found = self.find(text)
        return found[0] if len(found) == 1 else None


def _freeze(synonyms: Mapping[str, Iterable[str]] | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not synonyms:
        return ()
    return tuple(sorted((k, tuple(sorted(v))) for k, v in synonyms.items()))


@lru_cache(maxsize=64)
def _build(classes: tuple[str, ...], synonyms: tuple[tuple[str, tuple[str, ...]], ...]) -> ClassMatcher:
    phrases: dict[str, set[str]] = {c: _name_variants(c) for c in classes}
    for cls, syns in synonyms:
        if cls not in phrases:
            raise ValueError(f"synonyms given for unknown class {cls!r}; classes are {list(classes)}")
        for s in syns:
            phrases[cls] |= _name_variants(s)
    surface: dict[str, str] = {}
    clash: set[str] = set()
    for cls in classes:
        for ph in phrases[cls]:
            words = ph.split(" ")
            for last in plural_forms(words[-1]):
                form = " ".join([*words[:-1], last])
                if surface.get(form, cls) != cls:
                    clash.add(form)
                surface[form] = cls
    for form in clash:  # a phrase shared by two classes names neither
        del surface[form]
    # Longest first so that, at one position, the longest phrase wins (leftmost-first regex).
    alts = sorted(surface, key=lambda s: (-len(s), s))
    pattern = r"\b(?:" + "|".join(re.escape(a) for a in alts) + r")\b" if alts else r"(?!x)x"
    return ClassMatcher(classes, pattern, surface)


def matcher(classes: Sequence[str], synonyms: Mapping[str, Iterable[str]] | None = None) -> ClassMatcher:
    """A (cached) :class:`ClassMatcher` for ``classes`` plus optional ``{class: [synonym, ...]}``."""
    return _build(tuple(classes), _freeze(synonyms))


def synonyms_for(dataset: str | None, extra: Mapping[str, Iterable[str]] | None = None,
                 classes: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Default synonyms of ``dataset`` merged with ``extra``; keeps only keys in ``classes`` if given."""
    out: dict[str, list[str]] = {k: list(v) for k, v in DEFAULT_SYNONYMS.get(dataset or "", {}).items()}
    for k, v in (extra or {}).items():
        out.setdefault(k, [])
        out[k] += [s for s in v if s not in out[k]]
    if classes is not None:
        out = {k: v for k, v in out.items() if k in set(classes)}
    return out


def match_class(text: str | None, classes: Sequence[str],
                synonyms: Mapping[str, Iterable[str]] | None = None) -> str | None:
    """Return the one class of ``classes`` that ``text`` names, else None.

    ``synonyms`` maps a class name to extra phrases for it (``{"person": ["people", "man"]}``).
    Case, punctuation, underscores vs spaces and simple plurals are ignored.
    """
    return matcher(classes, synonyms).match(text)


def find_classes(text: str | None, classes: Sequence[str],
                 synonyms: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """All distinct classes that ``text`` mentions, in order of first mention."""
    return matcher(classes, synonyms).find(text)
