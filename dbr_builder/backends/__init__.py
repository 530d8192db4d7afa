"""Teacher / student backends behind one protocol: batched requests in, ``n`` candidates out.

``make_backend(spec, **options)`` picks one from a spec string:

- ``vllm:<model>``                      vLLM offline engine (GPU)
- ``openai:<model>@<base_url>``          OpenAI-compatible chat completions (GPT-4o, ``vllm serve``)
- ``openai:<model>``                     same, base URL ``https://api.openai.com/v1``
- ``hf:<model or path>``                 transformers ``AutoModelForImageTextToText`` (CPU or GPU)
- ``oracle``                             SynthShapes only: true chains from scene attributes

Options may also be given inline after a comma: ``hf:/models/x,adapter=/runs/a,max_pixels=200704``.
Backends never raise for a single bad request: they return a ``Result`` with ``error`` set.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class Request:
    """One user turn (images and text interleaved) for which ``n`` candidates are wanted.

    An image part is ``{"type": "image", "path": str}``; it may also carry an already
    prepared ``"image"`` (an RGB ``PIL.Image`` from :mod:`dbr_builder.imageprep`), which
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


@runtime_checkable
class Backend(Protocol):
    """Anything with a ``model`` name and a batched ``generate``."""

    model: str

    def generate(self, requests: list[Request]) -> list[Result]: ...


class BackendError(ValueError):
    """A backend spec or option is invalid (bad spec string, missing package, bad path)."""


KINDS = ("vllm", "openai", "hf", "oracle")


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
            "vllm:<model>, openai:<model>@<base_url>, hf:<model_or_path>, oracle"
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


def make_backend(spec: str, **options: Any) -> Backend:
    """Build the backend named by ``spec``; keyword options override inline ones."""
    kind, target, inline = parse_spec(spec)
    opts = {**inline, **{k: v for k, v in options.items() if v is not None}}
    if kind == "oracle":
        from dbr_builder.backends.oracle import OracleBackend as cls
    elif kind == "openai":
        from dbr_builder.backends.openai_backend import OpenAIBackend as cls

        target, _, base_url = target.partition("@")
        if base_url:
            opts.setdefault("base_url", base_url)
    elif kind == "hf":
        from dbr_builder.backends.hf_backend import HFBackend as cls
    else:
        from dbr_builder.backends.vllm_backend import VLLMBackend as cls
    if kind != "oracle":
        opts["model"] = target
    check_options(spec, cls, opts)
    return cls(**opts)


def check_options(spec: str, cls: type, options: dict[str, Any]) -> None:
    """Raise BackendError naming unknown options (a typo must not be silently ignored)."""
    params = inspect.signature(cls.__init__).parameters
    allowed = {k for k in params if k != "self"}
    bad = sorted(set(options) - allowed)
    if bad:
        raise BackendError(
            f"teacher {redact_spec(spec)!r}: unknown option(s) {', '.join(bad)}; this backend takes: "
            f"{', '.join(sorted(allowed - {'model'}))}"
        )


__all__ = ["Backend", "BackendError", "Request", "Result", "check_options", "make_backend", "parse_spec"]
