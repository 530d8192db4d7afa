"""A real HTTP server on loopback for the download tests.

Threaded; serves in-memory files with ``Range`` support (206 + Content-Range, ETag for
If-Range); can drop the connection after N bytes of a file for its first K requests; can put a
Google-Drive-like "can't scan this file for viruses" confirmation page in front of a file; can
answer a fixed status (404, 503, ...). Every request is logged with the bytes actually sent.
"""

from __future__ import annotations

import hashlib
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DRIVE_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>
<body><p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="{action}" method="get">
<input type="submit" value="Download anyway"/>
<input type="hidden" name="id" value="{id}">
<input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t">
<input type="hidden" name="uuid" value="{uuid}">
</form></body></html>"""

QUOTA_PAGE = """<html><head><title>Google Drive - Quota exceeded</title></head><body>
Too many users have viewed or downloaded this file recently. Please try accessing the file again later.
</body></html>"""


@dataclass
class Served:
    """One logged request."""

    path: str
    range: str | None
    status: int
    sent: int


@dataclass
class FileServer:
    """Files by path (``/PACS.zip``) plus behaviour switches; start() returns the base URL."""

    files: dict[str, bytes] = field(default_factory=dict)
    drop_after: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (bytes, times)
    status: dict[str, int] = field(default_factory=dict)  # path -> fixed status
    drive: dict[str, str] = field(default_factory=dict)  # drive id -> served path
    quota: set[str] = field(default_factory=set)  # drive ids answering the quota page
    log: list[Served] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle --
    def start(self) -> str:
        handler = _make_handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url("")

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def url(self, path: str) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/{path.lstrip('/')}"

    def drive_url(self, file_id: str) -> str:
        return self.url(f"uc?export=download&id={file_id}")

    # -- accounting --
    def record(self, s: Served) -> None:
        with self._lock:
            self.log.append(s)

    def bytes_sent(self, path: str | None = None) -> int:
        return sum(s.sent for s in self.log if path is None or s.path == path)

    def take_drop(self, path: str) -> int | None:
        with self._lock:
            if path in self.drop_after:
                n, times = self.drop_after[path]
                if times > 0:
                    self.drop_after[path] = (n, times - 1)
                    return n
        return None


def _make_handler(srv: FileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            q = dict(urllib.parse.parse_qsl(parts.query))
            path = parts.path
            if path == "/uc":
                return self._drive_page(q)
            if path == "/download" and "id" in q:
                if q.get("confirm") != "t" or q["id"] not in srv.drive:
                    return self._simple(403, b"<html><title>Sign in</title>You need access</html>", "text/html")
                path = srv.drive[q["id"]]
            if path in srv.status:
                return self._simple(srv.status[path], b"nope", "text/plain", log_path=path)
            if path not in srv.files:
                return self._simple(404, b"not found", "text/plain", log_path=path)
            self._serve_file(path, srv.files[path])

        def _drive_page(self, q: dict[str, str]) -> None:
            fid = q.get("id", "")
            if fid in srv.quota:
                return self._simple(200, QUOTA_PAGE.encode(), "text/html", log_path="/uc")
            if fid not in srv.drive:
                return self._simple(404, b"<html><title>Not Found</title></html>", "text/html", log_path="/uc")
            page = DRIVE_PAGE.format(action=srv.url("download"), id=fid, uuid="0f0e-uuid")
            self._simple(200, page.encode(), "text/html; charset=utf-8", log_path="/uc")

        def _simple(self, code: int, body: bytes, ctype: str, log_path: str | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            srv.record(Served(log_path or self.path, self.headers.get("Range"), code, 0))

        def _serve_file(self, path: str, data: bytes) -> None:
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            rng = self.headers.get("Range")
            start, code = 0, 200
            if rng and self.headers.get("If-Range", etag) == etag:
                m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
                if m:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        srv.record(Served(path, rng, 416, 0))
                        return
                    code = 206
            body = data[start:]
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            if code == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            drop = srv.take_drop(path)
            if drop is not None:
                # Send part of the body, then cut the connection mid-file.
                chunk = body[:drop]
                self.wfile.write(chunk)
                self.wfile.flush()
                srv.record(Served(path, rng, code, len(chunk)))
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:
                    pass
                return
            self.wfile.write(body)
            srv.record(Served(path, rng, code, len(body)))

    return Handler
