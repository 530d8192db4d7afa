"""The backend protocol: requests, results, errors and spec strings (see ``dbr_builder.backends``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class Request:
    """One user turn (images and text interleaved) for which ``n`` candidates are wanted.

    An image part is ``{"type": "image", "path": str}``; it may also carry an already
    prepared ``"image"`` (an RGB ``PIL.Image`` from :mod:`dbr_builder.core.imageprep`), which
    backends then use instead of reading the file again.
    """

    key: str
    content: list[dict]
    n: int = 1
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Result:
    """The ``n`` candidates of one request (``texts`` empty and ``error`` set on failure)."""

    key: str
    texts: list[str]
    out_tokens: int
    finish_reasons: list[str] = field(default_factory=list)
    error: str | None = None
    in_tokens: int | None = None  # prompt tokens billed for the request, when the backend reports them


@runtime_checkable
class Backend(Protocol):
    """Anything with a ``model`` name and a batched ``generate``."""

    model: str

    def generate(self, requests: list[Request]) -> list[Result]: ...


class BackendError(ValueError):
    """A backend spec or option is invalid (bad spec string, missing package, bad path)."""


KINDS = ("vllm", "openai", "batch", "hf", "oracle")


def _coerce(value: str) -> Any:
    """Inline option values: ints, floats, booleans, else the string."""
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


_SECRET_KEY = re.compile(r"(key|token|secret|password)", re.I)


def redact_spec(spec: Any) -> str:
    """``spec`` for messages: values of secret-looking inline options and URL credentials masked.

    Keys belong in the environment (OPENAI_API_KEY, HF_TOKEN); if one is typed into a spec
    anyway, an error message must not echo it to the terminal or a log.
    """
    if not isinstance(spec, str):
        return str(spec)  # not a spec at all (None, a number): nothing to hide
    head, *opts = spec.split(",")
    head = re.sub(r"//[^/@\s]+@", "//***@", head)
    # A bare value (no key=) may be a pasted key: never echo it either.
    masked = [o if "=" in o and not _SECRET_KEY.search(o.partition("=")[0]) else
              (f"{o.partition('=')[0]}=***" if "=" in o else "***") for o in opts]
    return ",".join([head, *masked])


def parse_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """Split ``kind:target,k=v,...`` into ``(kind, target, inline options)``."""
    if not spec or not isinstance(spec, str):
        raise BackendError(f"teacher spec must be a non-empty string, got {spec!r}")
    head, *opts = spec.split(",")
    kind, _, target = head.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise BackendError(
            f"teacher spec {redact_spec(spec)!r}: unknown backend {kind!r}; use one of "
            "vllm:<model>, openai:<model>@<base_url>, batch:<model>[@<base_url>], hf:<model_or_path>, oracle"
        )
    options: dict[str, Any] = {}
    for i, o in enumerate(opts, 1):
        k, eq, v = o.partition("=")
        if not eq or not k.strip():
            raise BackendError(f"teacher spec {redact_spec(spec)!r}: inline option {i} is not key=value "
                               "(e.g. hf:/models/x,adapter=/runs/a)")
        options[k.strip()] = _coerce(v.strip())
    if kind != "oracle" and not target.strip():
        raise BackendError(f"teacher spec {redact_spec(spec)!r}: give a model after '{kind}:'")
    return kind, target.strip(), options
