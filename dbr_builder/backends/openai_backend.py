"""OpenAI-compatible chat-completions backend (GPT-4o, ``vllm serve``, any compatible server).

Images travel as base64 ``data:`` URLs. Requests run on a bounded thread pool (one
keep-alive HTTP connection per thread). 429, 5xx, timeouts, dropped connections and
malformed bodies are retried with exponential backoff and jitter (``Retry-After`` honoured),
a bounded number of times; other 4xx fail at once. A request that still fails becomes a
``Result`` with ``error`` set - it never raises. The API key is read from the environment
(``OPENAI_API_KEY`` unless ``api_key_env`` names another variable) and is never logged:
error bodies are stored and printed with it (and anything key-shaped) masked.

Time bounds. ``timeout`` is a total deadline per attempt (connect, send, headers and body
together): a server that trickles its answer is cut off when it passes, however slowly each
byte arrives. Connecting is bounded by ``connect_timeout``. A dead endpoint fails fast: once
one request has used all its attempts on connection errors or timeouts while no response of
any kind came back, the endpoint is marked unreachable and every other request fails at once
(rerun the command when it is back). With the defaults (6 attempts, backoff 1+2+4+8+16 s at
most, 10 s to connect) that is about 30 s after the first request when connections are
refused and about 90 s when they time out; a server that accepts connections but never
answers costs ``(max_retries + 1) * timeout`` (12 min), as it cannot be told from a slow one.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from dbr_builder.backends.base import BackendError, Request, Result
from dbr_builder.core.imageprep import load_image, to_data_url
from dbr_builder.core.sanitize import clean_text, redact

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class _Retryable(Exception):
    """A failure worth another attempt; ``cause`` is the short error class."""

    def __init__(self, cause: str, detail: str, retry_after: float | None = None):
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failure that another attempt would not fix (bad request, auth)."""


class OpenAIBackend:
    """Chat completions over HTTP (see module doc)."""

    wants_images = True

    def __init__(self, model: str, base_url: str = DEFAULT_BASE_URL, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 16, timeout: float = 120.0, connect_timeout: float = 10.0, max_retries: int = 5,
                 backoff_base: float = 1.0, backoff_max: float = 60.0, max_pixels: int | None = None,
                 image_format: str = "JPEG", max_tokens_field: str = "max_tokens",
                 extra_body: dict[str, Any] | str | None = None, detail: str | None = None):
        if not model:
            raise BackendError("openai backend: give a model name, e.g. openai:gpt-4o")
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise BackendError(f"openai backend: base_url {base_url!r} is not an http(s) URL")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self._scheme, self._host, self._port = url.scheme, url.hostname, url.port
        self._path = url.path.rstrip("/") + "/chat/completions"
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None and url.hostname == "api.openai.com":
            raise BackendError(f"openai backend: set the {api_key_env} environment variable (the key is never "
                               "read from configs or the command line)")
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.connect_timeout = min(float(connect_timeout), self.timeout)
        for name, v in (("timeout", self.timeout), ("connect_timeout", self.connect_timeout)):
            if not math.isfinite(v) or v <= 0:
                raise BackendError(f"openai backend: {name} must be a positive number of seconds, got {v}")
        self.max_retries = max(0, int(max_retries))
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.max_pixels = max_pixels
        self.image_format = image_format
        self.max_tokens_field = max_tokens_field
        if isinstance(extra_body, str):
            try:
                extra_body = json.loads(extra_body)
            except json.JSONDecodeError as e:
                raise BackendError(f"openai backend: extra_body is not valid JSON ({e})") from None
        self.extra_body = dict(extra_body or {})
        self.detail = detail
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # kept across batches so connections stay alive
        self.stats = {"attempts": 0, "retries": 0}
        self._last_response = 0.0  # monotonic time of the last HTTP response of any kind
        self._dead: str | None = None  # set once the endpoint is judged unreachable

    # -- HTTP ---------------------------------------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.connect_timeout)
            self._local.conn = conn
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _redact(self, text: str) -> str:
        return redact(text, [self._api_key]) or ""

    def _post(self, body: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        expired = threading.Event()
        conn = self._conn()

        def cut() -> None:  # the deadline passed: unblock whatever read or write is waiting
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout, cut)
        timer.daemon = True
        timer.start()
        try:
            if conn.sock is None:
                conn.connect()  # bounded by connect_timeout
            conn.sock.settimeout(self.timeout)
            conn.request("POST", self._path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if expired.is_set():
                raise TimeoutError
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
            self._drop_conn()
            if expired.is_set() or isinstance(e, TimeoutError):
                raise _Retryable("timeout", f"no complete answer within {self.timeout:g}s") from e
            raise _Retryable("connection", self._redact(f"{type(e).__name__}: {e}")) from e
        finally:
            timer.cancel()
        self._last_response = time.monotonic()
        if resp.status != 200:
            msg = data[:300].decode("utf-8", "replace")
            try:
                msg = json.loads(data)["error"]["message"][:300]
            except Exception:  # noqa: BLE001 - error bodies come in many shapes
                pass
            msg = self._redact(str(msg))  # a server may echo the key back
            if resp.status in RETRY_STATUS:
                ra = resp.getheader("Retry-After")
                try:
                    retry_after = float(ra) if ra else None
                except ValueError:
                    retry_after = None
                raise _Retryable(f"http {resp.status}", msg, retry_after)
            raise _Fatal(f"http {resp.status}: {msg}")
        try:
            obj = json.loads(data)
            choices = obj["choices"]
            if not isinstance(choices, list) or not choices:
                raise KeyError("choices")
            for c in choices:
                if not isinstance(c["message"]["content"], str):
                    raise KeyError("content")
            return obj
        except (ValueError, KeyError, TypeError) as e:
            raise _Retryable("malformed", f"unusable response body ({type(e).__name__}: {str(e)[:80]})") from e

    # -- requests -----------------------------------------------------------------------------
    def payload(self, req: Request) -> dict[str, Any]:
        """The JSON body for one request (images as data URLs, in content order)."""
        parts: list[dict[str, Any]] = []
        for p in req.content:
            if p.get("type") == "image":
                img = p.get("image") or load_image(p["path"], self.max_pixels)
                url: dict[str, Any] = {"url": to_data_url(img, self.image_format)}
                if self.detail:
                    url["detail"] = self.detail
                parts.append({"type": "image_url", "image_url": url})
            else:
                parts.append({"type": "text", "text": p["text"]})
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": parts}],
            "n": req.n,
            self.max_tokens_field: req.max_new_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        body.update(self.extra_body)
        return body

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_max, self.backoff_base * (2 ** attempt))
        delay *= 0.5 + random.random() / 2  # jitter so many workers do not retry in lockstep
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    def _one(self, req: Request) -> Result:
        try:
            body = json.dumps(self.payload(req)).encode("utf-8")
        except OSError as e:
            return Result(req.key, [], 0, [], error=f"image: {e}")
        last = ""
        started = time.monotonic()
        unreachable = True  # every attempt failed before any HTTP response
        for attempt in range(self.max_retries + 1):
            if self._dead is not None:
                return Result(req.key, [], 0, [], error=self._dead)
            with self._lock:
                self.stats["attempts"] += 1
            try:
                obj = self._post(body)
            except _Fatal as e:
                return Result(req.key, [], 0, [], error=str(e))
            except _Retryable as e:
                last = str(e)
                unreachable = unreachable and e.cause in ("timeout", "connection")
                if attempt < self.max_retries:
                    with self._lock:
                        self.stats["retries"] += 1
                    time.sleep(self._backoff(attempt, e.retry_after))
                continue
            choices = sorted(obj["choices"], key=lambda c: c.get("index", 0))
            texts = [clean_text(c["message"]["content"]) for c in choices]
            finishes = [c.get("finish_reason") or "stop" for c in choices]
            usage = obj.get("usage") or {}
            tokens = int(usage.get("completion_tokens") or sum(len(t.split()) for t in texts))
            return Result(req.key, texts, tokens, finishes)
        error = f"{last} (gave up after {self.max_retries + 1} attempts)"
        if unreachable and self._last_response < started:
            # Nothing answered this request, nor anything else, the whole time: the endpoint is down.
            # Fail every other request now instead of spending the same retries on each of them.
            self._dead = (f"connection: endpoint {self.base_url} unreachable ({last}); "
                          "rerun the command when it is back")
        return Result(req.key, [], 0, [], error=error)

    def generate(self, requests: list[Request]) -> list[Result]:
        """Send the requests concurrently (at most ``concurrency`` in flight); results in order."""
        if not requests:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai")
        return list(self._pool.map(self._one, requests))

    def close(self) -> None:
        """Stop the worker threads (their connections close with them)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
