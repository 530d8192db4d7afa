"""Batch files in the OpenAI Batch API format (also read and written by ``vllm run-batch``).

Input: one JSON object per line, ``{"custom_id", "method": "POST", "url": "/v1/chat/completions",
"body": <chat-completion request>}``. Output (OpenAI and vLLM alike): one object per line,
``{"id", "custom_id", "response": {"status_code", "request_id", "body": <chat completion>} | null,
"error": {"code", "message"} | "<message>" | null}``; lines come in any order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dbr_builder.backends.base import Result
from dbr_builder.backends.openai_backend import result_from_completion
from dbr_builder.errors import UserError

ENDPOINT = "/v1/chat/completions"


def input_line(custom_id: str, body: dict[str, Any], url: str = ENDPOINT) -> str:
    """One line of a batch input file (no trailing newline)."""
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body},
                      ensure_ascii=False, separators=(",", ":"))


def _error_text(err: Any) -> str:
    if isinstance(err, dict):
        code, msg = err.get("code"), err.get("message")
        return f"{code}: {msg}" if code else str(msg)
    return str(err)


def parse_output_line(obj: Any) -> Result:
    """A ``Result`` keyed by ``custom_id`` from one output-file object; failures become errors.

    Raises ValueError when the object is not an output line at all (no ``custom_id``).
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str) or not obj["custom_id"]:
        raise ValueError("not a batch output line (no custom_id)")
    cid = obj["custom_id"]
    resp = obj.get("response")
    err = obj.get("error")
    status = resp.get("status_code") if isinstance(resp, dict) else None
    body = resp.get("body") if isinstance(resp, dict) else None
    if err or status != 200 or not isinstance(body, dict):
        if err:
            msg = _error_text(err)
        elif isinstance(body, dict) and body.get("error"):
            msg = _error_text(body["error"])
        else:
            msg = "no response body"
        return Result(cid, [], 0, [], error=f"batch {status if status is not None else 'error'}: {msg}"[:500])
    try:
        res = result_from_completion(cid, body)
        if not all(isinstance(t, str) for t in res.texts) or not res.texts:
            raise ValueError("no texts")
        return res
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return Result(cid, [], 0, [], error=f"malformed: unusable response body ({type(e).__name__}: {str(e)[:80]})")


def read_output_file(path: str | os.PathLike[str]) -> Iterator[tuple[int, Result]]:
    """``(line number, Result)`` for every line of an output (or error) file.

    A line that is not JSON or not an output line stops the import with a one-line error naming
    the file and line: a wrong file (e.g. the *input* file) must not be half-imported.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: batch results file not found")
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if isinstance(obj, dict) and "body" in obj and "response" not in obj:
                    raise ValueError("this is a batch *input* line (method/url/body); give the output file")
                yield i, parse_output_line(obj)
            except ValueError as e:
                raise UserError(f"{p}:{i}: not a batch output line ({str(e)[:120]}); give the output file of "
                                "the OpenAI Batch API or of `vllm run-batch`") from None
