"""The five-stage output constraint for teachers that can decode under one.

- :func:`chain_regex`: a regular expression admitting exactly
  ``<SUMMARY>..</SUMMARY><CAPTION>..</CAPTION><REASONING>..</REASONING><REFLECTION>..</REFLECTION>
  <CONCLUSION>class</CONCLUSION>`` (stages separated by at most one newline, stage texts free of
  ``<``, the conclusion one of the dataset's class names) - for vLLM structured outputs;
- :func:`chain_json_schema`: the same as a strict JSON schema with the five fields (the
  conclusion an enum of the class names) - for OpenAI ``response_format: json_schema``;
- :func:`json_to_chain`: a JSON answer re-serialized into the tagged text the store keeps.
"""

from __future__ import annotations

import json
from typing import Any

from dbr_builder.core.chains import FIELDS, STAGES

# Characters with a meaning in regular expressions. Only these are escaped: structured-output
# engines (xgrammar, outlines, guidance) reject some of Python's extra escapes such as "\ ".
_META = set(".^$*+?{}[]\\|()")


def _escape(text: str) -> str:
    return "".join("\\" + ch if ch in _META else ch for ch in text)


def chain_regex(classes: list[str] | tuple[str, ...]) -> str:
    """The regex of a well-formed five-stage chain concluding one of ``classes``."""
    if not classes:
        raise ValueError("a five-stage constraint needs the dataset's class names")
    conclusion = "(" + "|".join(_escape(c) for c in classes) + ")"
    parts = [f"<{s}>[^<]+</{s}>" for s in STAGES[:-1]] + [f"<{STAGES[-1]}>{conclusion}</{STAGES[-1]}>"]
    return "\n?".join(parts)


def chain_json_schema(classes: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A strict JSON schema: the five stages as string fields, the conclusion an enum of ``classes``."""
    if not classes:
        raise ValueError("a five-stage constraint needs the dataset's class names")
    props: dict[str, Any] = {f: {"type": "string"} for f in FIELDS}
    props["conclusion"] = {"type": "string", "enum": list(classes)}
    return {"type": "object", "properties": props, "required": list(FIELDS), "additionalProperties": False}


def response_format(classes: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """OpenAI's ``response_format`` for the five-stage schema (strict structured outputs)."""
    return {"type": "json_schema",
            "json_schema": {"name": "five_stage_chain", "strict": True, "schema": chain_json_schema(classes)}}


def json_to_chain(text: str) -> str | None:
    """The tagged chain for a JSON answer with the five fields, or None when it is not one.

    None (not an exception) lets the caller keep the raw text, which the filter then rejects
    with its format reason - a truncated JSON answer is a rejected candidate, not a crash.
    """
    try:
        obj = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(obj, dict) or not all(isinstance(obj.get(f), str) for f in FIELDS):
        return None
    return "\n".join(f"<{s}>{obj[f].strip()}</{s}>" for s, f in zip(STAGES, FIELDS, strict=True))
