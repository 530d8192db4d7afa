"""The backend protocol: requests, results, errors and spec strings (see ``dbr_builder.backends``)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from dbr_builder.core.sanitize import redact
from dbr_builder.errors import ConfigError, UserError


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


@runtime_checkable
class Backend(Protocol):
    """Anything with a ``model`` name, a batched ``generate`` and a ``close``.

    ``close()`` gives back what the backend holds (GPU memory of an engine, worker threads,
    connections); callers invoke it between units (datasets, rationalization rounds, eval
    jobs, SARR rounds) so that the next model never loads beside the previous one. It must be
    safe to call twice, and on a backend that never started its engine.
    """

    model: str

    def generate(self, requests: list[Request]) -> list[Result]: ...

    def close(self) -> None: ...


class BackendError(ValueError):
    """A backend spec or option is invalid (bad spec string, missing package, bad path)."""


class EngineError(BackendError, UserError):
    """The model engine failed as a whole (did not start, or died): fatal for the run.

    A ``UserError`` too, so the CLI prints it as one line, whichever stage raised it.
    """


class EngineStartError(EngineError):
    """The model engine could not start: fatal for the run, never retried per request.

    The message is one line naming the model, the cause (out of memory, unknown model, bad
    option, ...) and what to change.
    """


class TooManyErrors(UserError):
    """A run's share of failed requests passed its threshold: stop instead of storing errors."""


def check_sampling(n: int, temperature: float, top_p: float = 1.0, where: str = "sampling") -> None:
    """Refuse sampling settings that a backend would reject for every request (ConfigError).

    The rules are vLLM's ``SamplingParams`` checks (verified against the real package by
    ``tests/contract/test_vllm_contract.py``): greedy decoding (temperature exactly 0) gives
    one candidate only, temperature >= 0, 0 < top_p <= 1, n >= 1.
    """
    if n < 1:
        raise ConfigError(f"{where}: n={n}; candidates per request must be >= 1")
    if temperature < 0:
        raise ConfigError(f"{where}: temperature={temperature}; must be >= 0")
    if not 0 < top_p <= 1:
        raise ConfigError(f"{where}: top_p={top_p}; must be in (0, 1]")
    # vLLM raises temperatures in (0, 0.01) to 0.01 and treats only 0 as greedy (sampling_params.py)
    if n > 1 and temperature <= 0:
        raise ConfigError(f"{where}: n={n} with temperature={temperature} (greedy) would give {n} identical "
                          "candidates and vLLM rejects it; set temperature > 0 (e.g. 0.7) or n: 1")


KINDS = ("vllm", "openai", "hf", "oracle")


def _coerce(value: str) -> Any:
    """Inline option values: ints, floats, booleans, JSON objects/arrays, else the string.

    A value starting with ``{`` must be a JSON object (``engine_kwargs={"enforce_eager": true}``);
    one starting with ``[`` is read as JSON when it is JSON, else kept as a string (a regex
    character class such as ``[a-z]+``).
    """
    if value.startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise BackendError(f"inline option value {value[:60]!r} is not valid JSON ({e.msg} at column "
                               f"{e.colno}); quote it as one JSON object") from None
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def split_spec(spec: str) -> list[str]:
    """Split a spec on the commas that are not inside ``{}``/``[]`` or a quoted string in them.

    ``vllm:m,max_model_len=8192,engine_kwargs={"a": 1, "b": [2, 3]}`` gives three parts. Specs
    without brackets split exactly as ``spec.split(",")`` did, so every existing spec keeps its
    meaning (quotes count only inside brackets; a stray closing bracket is a plain character);
    an unclosed bracket or quote is a BackendError, never a silent cut.
    """
    parts, cur, depth, quote, esc = [], [], 0, "", False
    closing = {"}": "{", "]": "["}
    stack: list[str] = []
    for ch in spec:
        if quote:
            cur.append(ch)
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                quote = ""
            continue
        if ch in "\"'" and depth:
            quote = ch
        elif ch in "{[":
            stack.append(ch)
            depth += 1
        elif ch in closing and stack:
            if stack[-1] != closing[ch]:
                raise BackendError(f"spec {redact_spec_simple(spec)!r}: unbalanced {ch!r}")
            stack.pop()
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if stack or quote:
        raise BackendError(f"spec {redact_spec_simple(spec)!r}: unclosed {(stack[-1] if stack else quote)!r}")
    parts.append("".join(cur))
    return parts


def _mask_head(head: str) -> str:
    """A spec's ``kind:target`` for messages: URL credentials and key-shaped text masked; a head
    whose kind is not even word-like (a key pasted into ``--teacher``) is masked whole."""
    kind = head.partition(":")[0].strip().lower()
    if kind not in KINDS and not re.fullmatch(r"[a-z][a-z0-9_-]{0,11}", kind):
        return "***"
    return redact(re.sub(r"//[^/@\s]+@", "//***@", head)) or head


def redact_spec_simple(spec: str) -> str:
    """The spec's head only (used while the spec cannot even be split)."""
    return _mask_head(spec.split(",", 1)[0]) + (",..." if "," in spec else "")


_SECRET_KEY = re.compile(r"(key|token|secret|password)", re.I)


def redact_spec(spec: Any) -> str:
    """``spec`` for messages: values of secret-looking inline options and URL credentials masked.

    Keys belong in the environment (OPENAI_API_KEY, HF_TOKEN); if one is typed into a spec
    anyway, an error message must not echo it to the terminal or a log.
    """
    if not isinstance(spec, str):
        return str(spec)  # not a spec at all (None, a number): nothing to hide
    try:
        head, *opts = split_spec(spec)
    except BackendError:
        return redact_spec_simple(spec)
    head = _mask_head(head)
    if head == "***":
        return head
    # A bare value (no key=) may be a pasted key: never echo it either.
    masked = [o if "=" in o and not _SECRET_KEY.search(o.partition("=")[0]) else
              (f"{o.partition('=')[0]}=***" if "=" in o else "***") for o in opts]
    return ",".join([head, *masked])


def parse_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """Split ``kind:target,k=v,...`` into ``(kind, target, inline options)``."""
    if not spec or not isinstance(spec, str):
        raise BackendError(f"teacher spec must be a non-empty string, got {spec!r}")
    head, *opts = split_spec(spec)
    kind, _, target = head.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        shown = redact_spec(spec)
        raise BackendError(
            f"teacher spec {shown!r}: unknown backend{'' if shown == '***' else f' {kind!r}'}; use one of "
            "vllm:<model>, openai:<model>@<base_url>, hf:<model_or_path>, oracle"
        )
    options: dict[str, Any] = {}
    for i, o in enumerate(opts, 1):
        k, eq, v = o.partition("=")
        if not eq or not k.strip():
            raise BackendError(f"teacher spec {redact_spec(spec)!r}: inline option {i} is not key=value "
                               "(e.g. hf:/models/x,adapter=/runs/a)")
        try:
            options[k.strip()] = _coerce(v.strip())
        except BackendError as e:
            raise BackendError(f"teacher spec {redact_spec(spec)!r}: option {k.strip()!r}: {e}") from None
    if kind != "oracle" and not target.strip():
        raise BackendError(f"teacher spec {redact_spec(spec)!r}: give a model after '{kind}:'")
    return kind, target.strip(), options
