"""The OpenAI Batch API: a files + batches client and the ``batch:<model>`` teacher.

``BatchClient`` speaks the four endpoints a batch needs over plain HTTP(S) (``http.client``,
like the live backend, so no SDK dependency): ``POST /files`` (multipart upload with
``purpose=batch``), ``POST /batches``, ``GET /batches/{id}`` and ``GET /files/{id}/content``.
429, 5xx and dropped connections are retried with backoff; other errors raise ``BatchAPIError``.

``OpenAIBatchBackend`` (spec ``batch:gpt-4o`` or ``batch:<model>@<base_url>``) builds request
bodies exactly like the live ``openai:`` backend (same model name, so both share request keys
in the store), and its ``generate`` submits one batch, waits for it and returns the results.
The generate stage drives it resumably instead (``run_batch_api`` there): batch ids are kept in
the store, so a killed run picks the same batch up.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dbr_builder.backends.base import BackendError, Request, Result
from dbr_builder.backends.batchfile import ENDPOINT, input_line, parse_output_line
from dbr_builder.backends.openai_backend import DEFAULT_BASE_URL, RETRY_STATUS, OpenAIBackend

FINAL = {"completed", "failed", "expired", "cancelled"}


class BatchAPIError(RuntimeError):
    """The Batch API refused or failed a call (after retries); the message is safe to show."""


class BatchClient:
    """Minimal client for the OpenAI files and batches endpoints (see module doc)."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 300.0, max_retries: int = 5, backoff_base: float = 1.0):
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise BackendError(f"batch backend: base_url {base_url!r} is not an http(s) URL")
        self._scheme, self._host, self._port = url.scheme, url.hostname, url.port
        self._prefix = url.path.rstrip("/")
        self._api_key = os.environ.get(api_key_env) or None
        self.api_key_env = api_key_env
        self.is_openai = url.hostname == "api.openai.com"
        self.timeout, self.max_retries, self.backoff_base = float(timeout), int(max_retries), float(backoff_base)
        self.requests_sent = 0

    def require_key(self) -> None:
        """Raise BackendError when talking to api.openai.com without a key in the environment."""
        if self._api_key is None and self.is_openai:
            raise BackendError(f"batch backend: set the {self.api_key_env} environment variable (the key is never "
                               "read from configs or the command line)")

    def _call(self, method: str, path: str, body: bytes | None = None,
              content_type: str = "application/json") -> bytes:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            try:
                self.requests_sent += 1
                conn.request(method, self._prefix + path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                last = f"connection: {type(e).__name__}: {e}"
                resp = None
            finally:
                conn.close()
            if resp is not None:
                if resp.status == 200:
                    return data
                msg = data[:300].decode("utf-8", "replace")
                try:
                    msg = json.loads(data)["error"]["message"][:300]
                except Exception:  # noqa: BLE001 - error bodies come in many shapes
                    pass
                last = f"http {resp.status}: {msg}"
                if resp.status not in RETRY_STATUS:
                    raise BatchAPIError(f"{method} {path}: {last}")
                ra = resp.getheader("Retry-After")
            else:
                ra = None
            if attempt < self.max_retries:
                try:
                    delay = float(ra) if ra else self.backoff_base * 2 ** attempt * (0.5 + random.random() / 2)
                except ValueError:
                    delay = self.backoff_base * 2 ** attempt
                time.sleep(min(delay, 60.0))
        raise BatchAPIError(f"{method} {path}: {last} (gave up after {self.max_retries + 1} attempts)")

    def _json(self, method: str, path: str, obj: dict[str, Any] | None = None) -> dict[str, Any]:
        data = self._call(method, path, json.dumps(obj).encode() if obj is not None else None)
        try:
            out = json.loads(data)
        except ValueError:
            raise BatchAPIError(f"{method} {path}: answer is not JSON") from None
        if not isinstance(out, dict):
            raise BatchAPIError(f"{method} {path}: answer is not a JSON object")
        return out

    def upload(self, path: str | os.PathLike[str]) -> str:
        """Upload a batch input file (``purpose=batch``); returns the file id."""
        p = Path(path)
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{p.name}\"\r\n"
                "Content-Type: application/jsonl\r\n\r\n").encode()
        body = head + p.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        obj = json.loads(self._call("POST", "/files", body, f"multipart/form-data; boundary={boundary}"))
        if not isinstance(obj, dict) or not obj.get("id"):
            raise BatchAPIError("POST /files: no file id in the answer")
        return str(obj["id"])

    def create(self, input_file_id: str, metadata: dict[str, str] | None = None,
               completion_window: str = "24h") -> dict[str, Any]:
        """Create a batch over an uploaded file; returns the batch object."""
        obj = self._json("POST", "/batches", {"input_file_id": input_file_id, "endpoint": ENDPOINT,
                                              "completion_window": completion_window,
                                              "metadata": metadata or {}})
        if not obj.get("id"):
            raise BatchAPIError("POST /batches: no batch id in the answer")
        return obj

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        """The batch object (``status``, ``request_counts``, ``output_file_id``, ``error_file_id``)."""
        return self._json("GET", f"/batches/{batch_id}")

    def content(self, file_id: str) -> bytes:
        """The bytes of a file (a batch's output or error file)."""
        return self._call("GET", f"/files/{file_id}/content")


class OpenAIBatchBackend:
    """``batch:<model>[@base_url]``: requests go through the Batch API (see module doc)."""

    wants_images = True

    def __init__(self, model: str, base_url: str = DEFAULT_BASE_URL, api_key_env: str = "OPENAI_API_KEY",
                 poll_s: float = 30.0, completion_window: str = "24h", max_requests: int = 50_000,
                 max_file_mb: float = 190.0, timeout: float = 300.0, max_retries: int = 5,
                 backoff_base: float = 1.0, max_pixels: int | None = None, image_format: str = "JPEG",
                 max_tokens_field: str = "max_tokens", extra_body: dict[str, Any] | str | None = None,
                 detail: str | None = None, constrain: list[str] | None = None, require_key: bool = True):
        # The live backend builds the bodies: same fields, same model name, same request keys.
        self.chat = OpenAIBackend(model, base_url=base_url, api_key_env=api_key_env, max_pixels=max_pixels,
                                  image_format=image_format, max_tokens_field=max_tokens_field,
                                  extra_body=extra_body, detail=detail, constrain=constrain, require_key=False)
        self.client = BatchClient(base_url, api_key_env, timeout=timeout, max_retries=max_retries,
                                  backoff_base=backoff_base)
        if require_key:
            self.client.require_key()
        self.model = self.chat.model
        if float(poll_s) < 0 or int(max_requests) < 1 or float(max_file_mb) <= 0:
            raise BackendError("batch backend: poll_s >= 0, max_requests >= 1 and max_file_mb > 0 are required")
        self.poll_s = float(poll_s)
        self.completion_window = completion_window
        self.max_requests = int(max_requests)
        self.max_bytes = int(float(max_file_mb) * 1024 * 1024)

    def close(self) -> None:
        """Nothing held between calls (each API call opens its own connection); for the protocol."""
        self.chat.close()

    def line(self, req: Request) -> str:
        """The batch input line of one request (custom_id = the request key)."""
        return input_line(req.key, self.chat.payload(req))

    def submit(self, path: str | os.PathLike[str], requests: int, tag: str = "") -> dict[str, Any]:
        """Upload a batch input file and create the batch; returns the batch object."""
        file_id = self.client.upload(path)
        batch = self.client.create(file_id, {"dbr": tag[:500], "requests": str(requests)}, self.completion_window)
        batch.setdefault("input_file_id", file_id)
        return batch

    def wait(self, batch_id: str, on_poll: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll a batch until it is completed, failed, expired or cancelled; returns the final object."""
        while True:
            b = self.client.retrieve(batch_id)
            if on_poll is not None:
                on_poll(b)
            if b.get("status") in FINAL:
                return b
            time.sleep(self.poll_s)

    def results(self, batch: dict[str, Any]) -> list[Result]:
        """Results of a finished batch: its output file, then its error file (errors stay errors)."""
        out: list[Result] = []
        for fid in (batch.get("output_file_id"), batch.get("error_file_id")):
            if not fid:
                continue
            for line in self.client.content(fid).decode("utf-8").splitlines():
                if line.strip():
                    try:
                        out.append(self.chat.finish(parse_output_line(json.loads(line))))
                    except ValueError:
                        continue  # a line without custom_id cannot be matched to any request
        return out

    def generate(self, requests: list[Request]) -> list[Result]:
        """One batch for ``requests``, waited for (not resumable: the generate stage resumes)."""
        if not requests:
            return []
        with tempfile.TemporaryDirectory(prefix="dbr-batch-") as tmp:
            path = Path(tmp) / "input.jsonl"
            path.write_text("".join(self.line(r) + "\n" for r in requests), encoding="utf-8")
            try:
                final = self.wait(self.submit(path, len(requests))["id"])
                by_key = {r.key: r for r in self.results(final)}
            except BatchAPIError as e:
                return [Result(r.key, [], 0, [], error=f"batch: {e}"[:500]) for r in requests]
        status = final.get("status")
        return [by_key.get(r.key) or Result(r.key, [], 0, [], error=f"batch {status}: no result for this request")
                for r in requests]
