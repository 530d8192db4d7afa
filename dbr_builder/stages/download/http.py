"""Resumable HTTP downloads on the standard library: Range resume, bounded retries, timeouts.

Also handles Google Drive's "can't scan this file for viruses" confirmation page (the
download form or ``confirm=`` link is followed) and turns Drive's quota / permission pages
into a clear error instead of saving HTML as an archive.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from dbr_builder.log import get_logger

USER_AGENT = "dbr-builder-download/0.1 (+https://github.com/dbr-builder)"
CHUNK = 1 << 20

log = get_logger(__name__)


class DownloadError(Exception):
    """A download failed; ``url`` and a short ``reason`` (HTTP status, DNS error, ...)."""

    def __init__(self, url: str, reason: str, retryable: bool = False):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason
        self.retryable = retryable


@dataclass
class FetchOptions:
    """How hard to try: socket timeout (connect and each read), retries, backoff, progress bar."""

    timeout: float = 10.0
    retries: int = 3
    backoff: float = 0.5  # seconds before the first retry; doubles each time
    max_backoff: float = 8.0
    progress: bool = True


@dataclass
class FetchResult:
    path: Path
    bytes_fetched: int  # bytes received over the network in this call
    resumed_from: int  # size of the partial file when this call started


class _FormParser(HTMLParser):
    """Collect forms (action + hidden inputs), links, and the page title."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), {}))
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1][1][a["name"]] = a.get("value", "")
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def confirmation_url(page_url: str, html: str) -> str | None:
    """The real download URL behind a Google-Drive-style confirmation page, or None.

    Handles the current page (a GET form ``download-form`` with hidden ``id``/``confirm``/``uuid``
    inputs, posted to drive.usercontent.google.com) and the older one (a link with ``confirm=TOKEN``).
    """
    p = _FormParser()
    p.feed(html)
    for action, fields in p.forms:
        if "confirm" in fields or "id" in fields:
            target = urllib.parse.urljoin(page_url, action or page_url)
            sep = "&" if urllib.parse.urlsplit(target).query else "?"
            return target + sep + urllib.parse.urlencode(fields)
    for href in p.links:
        if "confirm=" in href:
            return urllib.parse.urljoin(page_url, href.replace("&amp;", "&"))
    m = re.search(r"confirm=([0-9A-Za-z_-]+)", html)
    if m:
        parts = urllib.parse.urlsplit(page_url)
        q = dict(urllib.parse.parse_qsl(parts.query))
        q["confirm"] = m.group(1)
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))
    return None


def _html_error(url: str, html: str) -> DownloadError:
    """Explain an HTML page received where a file was expected."""
    p = _FormParser()
    p.feed(html)
    text = re.sub(r"\s+", " ", html)
    if re.search(r"too many users have viewed or downloaded", text, re.I) or "quota" in text.lower():
        why = "Google Drive download quota exceeded for this file (try again in 24 h)"
    elif re.search(r"(you need access|request access|sign in)", text, re.I):
        why = "the file is not public (Drive asks for access / sign-in)"
    else:
        why = f"the server sent an HTML page instead of the file (title: {p.title.strip()[:80]!r})"
    return DownloadError(url, why)


def describe_error(e: BaseException) -> tuple[str, bool]:
    """A one-line reason for a network error and whether retrying can help."""
    if isinstance(e, urllib.error.HTTPError):
        retry = e.code in (408, 425, 429) or e.code >= 500
        return f"HTTP {e.code} {e.reason}", retry
    if isinstance(e, urllib.error.URLError):
        r = e.reason
        if isinstance(r, socket.gaierror):
            # DNS failure: no network or a wrong host; retrying only delays the error.
            return f"DNS lookup failed ({r.strerror or r})", False
        if isinstance(r, ConnectionRefusedError):
            return "connection refused", False
        if isinstance(r, (TimeoutError, socket.timeout)):
            return "timed out connecting", True
        return f"network error ({r})", True
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timed out reading", True
    if isinstance(e, http.client.IncompleteRead):
        return f"connection closed early ({len(e.partial)} bytes of the last chunk)", True
    if isinstance(e, (ConnectionError, http.client.HTTPException, OSError)):
        return f"connection error ({type(e).__name__}: {e})", True
    return f"{type(e).__name__}: {e}", False


def _open(url: str, offset: int, validator: str | None, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _is_html(resp) -> bool:
    return resp.headers.get_content_type() in ("text/html", "application/xhtml+xml")


def _read_meta(meta_path: Path) -> dict:
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return {}


def fetch(url: str, dest: str | os.PathLike[str], opts: FetchOptions | None = None,
          desc: str | None = None) -> FetchResult:
    """Download ``url`` to ``dest`` with resume: bytes already in ``dest.part`` are not fetched again.

    ``dest`` appears (atomic rename) only when complete. Retries transient errors with
    exponential backoff; raises DownloadError naming the URL and the HTTP/DNS error otherwise.
    """
    from tqdm import tqdm

    opts = opts or FetchOptions()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meta_path = dest.with_name(dest.name + ".part.json")
    meta = _read_meta(meta_path)
    if part.exists() and meta.get("url") != url:
        part.unlink()  # a partial file of another URL must not be continued
        meta = {}
    start_size = part.stat().st_size if part.exists() else 0
    stats = {"bytes": 0}  # bytes received, failed attempts included
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        try:
            _fetch_once(url, part, meta_path, meta, have, opts, desc or dest.name, tqdm, stats)
            os.replace(part, dest)
            meta_path.unlink(missing_ok=True)
            return FetchResult(dest, stats["bytes"], start_size)
        except DownloadError as e:
            if not e.retryable or attempt >= opts.retries:
                raise
            err = e
        except Exception as e:  # network errors of every kind: classify, maybe retry
            reason, retryable = describe_error(e)
            if not retryable or attempt >= opts.retries:
                raise DownloadError(url, reason) from None
            err = DownloadError(url, reason, True)
        attempt += 1
        delay = min(opts.max_backoff, opts.backoff * 2 ** (attempt - 1))
        log.warning(f"retry {attempt}/{opts.retries} in {delay:.1f}s: {err.reason}")
        time.sleep(delay)


def _fetch_once(url, part: Path, meta_path: Path, meta: dict, have: int, opts: FetchOptions,
                desc: str, tqdm, stats: dict[str, int]) -> int:
    """One HTTP exchange (plus a confirmation hop); appends to ``part``; returns bytes received."""
    target = url  # always start at the public URL: confirmation tokens expire
    resp = None
    try:
        resp = _open(target, have, meta.get("validator"), opts.timeout)
        if _is_html(resp):
            page = resp.read(2 << 20).decode("utf-8", "replace")
            resp.close()
            nxt = confirmation_url(resp.geturl(), page)
            if not nxt:
                raise _html_error(url, page)
            resp = _open(nxt, have, meta.get("validator"), opts.timeout)
            if _is_html(resp):
                raise _html_error(url, resp.read(2 << 20).decode("utf-8", "replace"))
            target = nxt
        status = resp.status
        total: int | None = None
        mode = "ab"
        if status == 206:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise DownloadError(url, f"server resumed at the wrong offset ({resp.headers.get('Content-Range')})",
                                    True)
            total = int(m.group(3)) if m.group(3) != "*" else None
        else:
            # 200: the server ignored Range (or the file changed): start again from zero.
            mode, have = "wb", 0
            cl = resp.headers.get("Content-Length")
            total = int(cl) if cl and cl.isdigit() else None
        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        new_meta = {"url": url, "resolved": target if target != url else None, "validator": validator,
                    "total": total}
        if new_meta != meta:
            meta.clear()
            meta.update(new_meta)
            meta_path.write_text(json.dumps(meta))
        got = 0
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=desc, disable=not opts.progress or None,
                                         leave=False) as bar:
            while True:
                try:
                    block = resp.read(CHUNK)
                except (http.client.HTTPException, OSError) as e:
                    block, lost = b"", describe_error(e)[0]
                else:
                    lost = None
                if block:
                    f.write(block)
                    got += len(block)
                    stats["bytes"] += len(block)
                    bar.update(len(block))
                if not block or lost:
                    break
        if lost or (total is not None and have + got < total):
            raise DownloadError(url, f"connection lost after {have + got} of {total or '?'} bytes"
                                + (f" ({lost})" if lost else ""), True)
        return got
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # Range past the end: the partial file may already be complete.
            m = re.match(r"bytes \*/(\d+)", e.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == have:
                return 0
            part.unlink(missing_ok=True)
            raise DownloadError(url, "partial file does not match the remote file; restarting", True) from None
        raise
    finally:
        if resp is not None:
            resp.close()
