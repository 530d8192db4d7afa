"""Text hygiene at the storage and printing boundaries: lone surrogates and secrets.

- :func:`clean_text`: text from a backend may hold lone UTF-16 surrogates (a model emitting
  half an emoji, a server's ``\\ud83d`` escape); SQLite, parquet and UTF-8 files refuse them.
  They are replaced with U+FFFD before anything is stored; valid pairs are joined.
- :func:`redact`: API keys and tokens never reach a terminal, a log or a stored error. It
  masks the values of secret-looking environment variables (``*KEY*``, ``*TOKEN*``,
  ``*SECRET*``, ``*PASSWORD*``), well-known key shapes (``sk-...``, ``hf_...``, ``ghp_...``,
  ``Bearer ...``, ``AKIA...``) and ``key=value`` pairs with a secret-looking key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

_SURROGATE = re.compile("[\ud800-\udfff]")
_SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.I)
_PATTERNS = [
    re.compile(r"\bsk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_\-]{16,}"),  # OpenAI-style keys (sk-..., sk-proj-...)
    re.compile(r"\b(?:hf|ghp|gho|ghs|ghu|glpat|xox[abprs])[_-][A-Za-z0-9]{16,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{16,}"),
    re.compile(r"\bAKIA[0-9A-Z]{12,}"),
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/\-]{8,}=*"),
    re.compile(r"(?i)(\b[\w-]*(?:api[_-]?key|token|secret|password)[\"']?\s*[=:]\s*[\"']?)[^\s\"',;&}]{4,}"),
]
MASK = "***"


def clean_text(text: str | None) -> str | None:
    """``text`` with lone surrogates replaced by U+FFFD (None stays None)."""
    if text is None or not _SURROGATE.search(text):
        return text
    # Round-trip through UTF-16: a valid pair becomes its character, a lone half becomes U+FFFD.
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def secret_values(extra: Iterable[str | None] = ()) -> list[str]:
    """Secret strings to mask: secret-looking environment variables (8+ chars) and ``extra``."""
    vals = [v for k, v in os.environ.items() if _SECRET_ENV.search(k) and v and len(v) >= 8]
    vals += [v for v in extra if v and len(v) >= 4]
    return sorted(set(vals), key=len, reverse=True)


def redact(text: str | None, extra: Iterable[str | None] = ()) -> str | None:
    """``text`` with secrets masked (see module doc); ``extra``: more exact values to mask."""
    if not text:
        return text
    for v in secret_values(extra):
        if v in text:
            text = text.replace(v, MASK)
    for pat in _PATTERNS:
        text = pat.sub(lambda m: (m.group(1) if m.re.groups else "") + MASK, text)
    return text


def looks_secret(value: str) -> bool:
    """True when ``value`` would be masked by :func:`redact` (a pasted key, a token)."""
    return redact(value) != value
