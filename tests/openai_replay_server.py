"""A real HTTP server on loopback that replays recorded chat-completion responses.

Used by the OpenAI-backend tests instead of the network. It serves
``POST /v1/chat/completions``: the response is the recording in
``tests/data/openai_recorded/`` whose model and choice count match the request
(``<model>_n<k>.json``; ``*`` models match any), and faults queued with ``inject``
are applied to the next requests in order:

- ``"429"`` / ``"500"`` / ``"503"`` / ``"400"``: that status with an OpenAI-style error body
  (429 and 503 carry ``Retry-After: 0``);
- ``"timeout"``: sleep ``slow_s`` seconds before answering (longer than the client timeout);
- ``"malformed"``: a 200 with a body that is not JSON; ``"no_choices"``: JSON without choices;
- ``"drop"``: close the connection without an answer.

Every request's headers and JSON body are kept in ``server.log`` for assertions.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

RECORDED = Path(__file__).parent / "data" / "openai_recorded"


class ReplayServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay_s: float = 0.0, slow_s: float = 2.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.recordings: dict[tuple[str, int], dict[str, Any]] = {}
        for f in sorted(RECORDED.glob("*.json")):
            obj = json.loads(f.read_text())
            self.recordings[(obj["model"], len(obj["choices"]))] = obj
        self.faults: deque[str] = deque()
        self.log: list[dict[str, Any]] = []
        self.delay_s, self.slow_s = delay_s, slow_s
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def inject(self, *faults: str) -> None:
        with self.lock:
            self.faults.extend(faults)

    def recording(self, model: str, n: int) -> dict[str, Any] | None:
        for (m, k), obj in self.recordings.items():
            if k == n and (m == model or model.startswith(m) or m.startswith(model)):
                return obj
        return None

    def __enter__(self) -> ReplayServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ReplayServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        srv = self.server
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with srv.lock:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            fault = srv.faults.popleft() if srv.faults else None
        try:
            body = json.loads(raw)
            srv.log.append({"path": self.path, "headers": dict(self.headers), "body": body, "fault": fault})
            if srv.delay_s:
                time.sleep(srv.delay_s)
            if self.path != "/v1/chat/completions":
                return self._send(404, b'{"error": {"message": "not found"}}')
            if fault in ("429", "500", "503", "400"):
                err = {"error": {"message": f"injected {fault}", "type": "test", "code": fault}}
                hdr = {"Retry-After": "0"} if fault in ("429", "503") else {}
                return self._send(int(fault), json.dumps(err).encode(), hdr)
            if fault == "timeout":
                time.sleep(srv.slow_s)
            if fault == "malformed":
                return self._send(200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "mess')
            if fault == "no_choices":
                return self._send(200, b'{"id": "chatcmpl-x", "object": "chat.completion"}')
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return None
            rec = srv.recording(body["model"], int(body.get("n", 1)))
            if rec is None:
                err = {"error": {"message": f"no recording for model={body['model']} n={body.get('n')}"}}
                return self._send(400, json.dumps(err).encode())
            return self._send(200, json.dumps(rec).encode())
        finally:
            with srv.lock:
                srv.in_flight -= 1
