"""Prompt templates: text files in ``prompts/`` with ``{named}`` fields.

``render(name, **fields)`` fills a template; ``prompt_id(name)`` is the first 16 hex
characters of the sha256 of the template text, so editing a prompt changes the id and
therefore the generation store's request keys (old results are kept, new ones are made).
"""

from __future__ import annotations

import functools
import hashlib
import string
from collections.abc import Sequence

from dbr_builder.resources import data_dir


class PromptError(KeyError):
    """A template is missing or a field it needs was not given."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


@functools.lru_cache(maxsize=64)
def template(name: str) -> str:
    """The text of ``prompts/<name>.txt`` (trailing newline stripped)."""
    path = data_dir("prompts") / f"{name}.txt"
    if not path.exists():
        have = sorted(p.stem for p in data_dir("prompts").glob("*.txt"))
        raise PromptError(f"prompt {name!r} not found ({path}); available: {', '.join(have)}")
    return path.read_text(encoding="utf-8").rstrip("\n")


def fields(name: str) -> list[str]:
    """The named fields a template uses, in order of first appearance."""
    seen: dict[str, None] = {}
    for _, field, _, _ in string.Formatter().parse(template(name)):
        if field:
            seen.setdefault(field, None)
    return list(seen)


def prompt_id(name: str) -> str:
    """sha256 of the template text, 16 hex chars."""
    return hashlib.sha256(template(name).encode("utf-8")).hexdigest()[:16]


def render(name: str, **values: object) -> str:
    """Fill template ``name`` with ``values``; extra values are ignored, missing ones are an error."""
    missing = [f for f in fields(name) if f not in values]
    if missing:
        raise PromptError(f"prompt {name!r} needs field(s) {', '.join(missing)}")
    return template(name).format_map(values)


def class_fields(classes: Sequence[str]) -> dict[str, object]:
    """The class-list fields every classification prompt understands.

    ``options`` (comma-separated, for q_cls / q_reason), ``class_list`` (one ``- name`` per
    line, for the teacher) and ``num_classes``.
    """
    if not classes:
        raise ValueError("class list is empty")
    return {
        "options": ", ".join(classes),
        "class_list": "\n".join(f"- {c}" for c in classes),
        "num_classes": len(classes),
    }


def teacher_prompt(name: str, classes: Sequence[str], label: str | None = None) -> str:
    """Render a teacher-side prompt (``teacher`` or ``rationalize``) for a dataset's classes.

    ``label`` is only used by hinted prompts; the plain teacher prompt never sees it.
    """
    vals = class_fields(classes)
    if "label" in fields(name):
        if label is None:
            raise PromptError(f"prompt {name!r} is a hinted prompt and needs the true label")
        vals["label"] = label
    return render(name, **vals)
