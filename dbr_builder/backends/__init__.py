"""Teacher / student backends behind one protocol: batched requests in, ``n`` candidates out.

``make_backend(spec, **options)`` picks one from a spec string:

- ``vllm:<model>``                      vLLM offline engine (GPU)
- ``openai:<model>@<base_url>``          OpenAI-compatible chat completions (GPT-4o, ``vllm serve``)
- ``openai:<model>``                     same, base URL ``https://api.openai.com/v1``
- ``hf:<model or path>``                 transformers ``AutoModelForImageTextToText`` (CPU or GPU)
- ``oracle``                             SynthShapes only: true chains from scene attributes

Options may also be given inline after a comma: ``hf:/models/x,adapter=/runs/a,max_pixels=200704``.
Options holding JSON (``engine_kwargs={"enforce_eager": true}``) may contain commas: a spec is
split only on commas outside brackets. Backends never raise for a single bad request: they return
a ``Result`` with ``error`` set; an engine that cannot start raises ``EngineStartError`` (fatal).
Every backend has ``close()``; callers close a backend before the next one loads.
"""

from __future__ import annotations

import inspect
from typing import Any

from dbr_builder.backends.base import (
    KINDS,
    Backend,
    BackendError,
    EngineError,
    EngineStartError,
    Request,
    Result,
    TooManyErrors,
    check_sampling,
    parse_spec,
    redact_spec,
)
from dbr_builder.backends.hf_backend import HFBackend
from dbr_builder.backends.openai_backend import OpenAIBackend
from dbr_builder.backends.oracle import OracleBackend
from dbr_builder.backends.vllm_backend import VLLMBackend

# Spec kind -> backend class (each imports its heavy engine lazily, on first use).
BACKENDS: dict[str, type] = {"vllm": VLLMBackend, "openai": OpenAIBackend, "hf": HFBackend, "oracle": OracleBackend}


def make_backend(spec: str, **options: Any) -> Backend:
    """Build the backend named by ``spec``; keyword options override inline ones."""
    kind, target, inline = parse_spec(spec)
    opts = {**inline, **{k: v for k, v in options.items() if v is not None}}
    cls = BACKENDS[kind]
    if kind == "openai":
        target, _, base_url = target.partition("@")
        if base_url:
            opts.setdefault("base_url", base_url)
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


__all__ = ["BACKENDS", "KINDS", "Backend", "BackendError", "EngineError", "EngineStartError", "Request", "Result",
           "TooManyErrors", "check_options", "check_sampling", "make_backend", "parse_spec", "redact_spec"]
