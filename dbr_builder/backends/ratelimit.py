"""Client-side rate limits for API teachers: requests and tokens per minute, server pushback.

``RateLimiter.acquire(tokens)`` blocks the calling worker thread until sending one request
of about ``tokens`` tokens keeps the client within ``rpm`` requests and ``tpm`` tokens per
minute. Requests are spaced evenly (a leaky bucket, burst 1: request k may start at
``k * 60 / rpm`` s), so no 60 s window - and no shorter one either - sees more than
``rpm`` requests (+1 at its edge). The token budget is spent the same way: a request of T
tokens pushes the next start back by ``T * 60 / tpm`` s.

The server's word wins over the client's plan: a ``Retry-After`` (429/503) pauses every
worker, and ``x-ratelimit-remaining-requests: 0`` / ``x-ratelimit-remaining-tokens: 0``
pause them until the matching ``x-ratelimit-reset-*`` duration (``"1s"``, ``"6m0s"``,
``"250ms"``) has passed.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | None) -> float | None:
    """Seconds in an ``x-ratelimit-reset-*`` value (``"1s"``, ``"6m0s"``, ``"20ms"``, ``"0.5"``)."""
    if not text:
        return None
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits shared by a backend's worker threads."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        for name, v in (("rpm", rpm), ("tpm", tpm)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v <= 0):
                raise ValueError(f"rate limit {name}={v!r} must be a positive number (or unset)")
        self.rpm, self.tpm = rpm, tpm
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._next_req = 0.0
        self._next_tok = 0.0
        self._paused_until = 0.0
        self.stats = {"waits": 0, "waited_s": 0.0, "server_pauses": 0}

    @property
    def active(self) -> bool:
        """Whether any client-side limit is set (server pushback is honoured regardless)."""
        return bool(self.rpm or self.tpm)

    def acquire(self, tokens: int = 0) -> float:
        """Block until one request of ``tokens`` tokens may start; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next_req, self._next_tok, self._paused_until)
            if self.rpm:
                self._next_req = start + 60.0 / self.rpm
            if self.tpm:
                self._next_tok = start + max(0, tokens) * 60.0 / self.tpm
            wait = start - now
            if wait > 0:
                self.stats["waits"] += 1
                self.stats["waited_s"] += wait
        if wait > 0:
            self._sleep(wait)
        return max(0.0, wait)

    def pause(self, seconds: float) -> None:
        """Hold every worker for ``seconds`` from now (the server asked us to back off)."""
        if seconds is None or seconds <= 0:
            return
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + float(seconds))
            self.stats["server_pauses"] += 1

    def observe(self, headers: Mapping[str, str] | None) -> None:
        """Read ``x-ratelimit-*`` headers of a response; an exhausted budget pauses until its reset."""
        if not headers:
            return
        h = {k.lower(): v for k, v in headers.items()}
        for kind in ("requests", "tokens"):
            remaining = h.get(f"x-ratelimit-remaining-{kind}")
            try:
                exhausted = remaining is not None and float(remaining) <= 0
            except ValueError:
                exhausted = False
            if exhausted:
                reset = parse_duration(h.get(f"x-ratelimit-reset-{kind}"))
                self.pause(reset if reset is not None else 1.0)
