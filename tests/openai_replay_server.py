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

With ``synth_usage=True`` each chat completion carries a ``usage`` computed from the request
(so requests differ; else the recording's); the server adds up what it sent in ``usage_sent``; ``ratelimit_headers`` are added to every
answer (``x-ratelimit-*``), and ``times`` records when each completion request arrived.

It also speaks the OpenAI files and batches endpoints, as the Batch API does:
``POST /v1/files`` (multipart, ``purpose=batch``), ``POST /v1/batches``,
``GET /v1/batches/{id}`` (a batch is ``in_progress`` for ``batch_polls`` retrievals, then
``completed`` with an output file and, for custom ids in ``fail_ids``, an error file),
``GET /v1/files/{id}/content``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

RECORDED = Path(__file__).parent / "data" / "openai_recorded"


class ReplayServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay_s: float = 0.0, slow_s: float = 2.0, synth_usage: bool = False):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.recordings: dict[tuple[str, int], dict[str, Any]] = {}
        for f in sorted(RECORDED.glob("*.json")):
            obj = json.loads(f.read_text())
            self.recordings[(obj["model"], len(obj["choices"]))] = obj
        self.faults: deque[str] = deque()
        self.log: list[dict[str, Any]] = []
        self.delay_s, self.slow_s = delay_s, slow_s
        self.lock = threading.RLock()  # batch processing (under the lock) adds up usage too
        self.in_flight = 0
        self.max_in_flight = 0
        self.usage_sent = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.ratelimit_headers: dict[str, str] = {}
        self.times: list[float] = []
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_polls = 2
        self.synth_usage = synth_usage
        self.fail_ids: set[str] = set()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def inject(self, *faults: str) -> None:
        with self.lock:
            self.faults.extend(faults)

    def completion(self, body: dict[str, Any], raw: bytes) -> dict[str, Any] | None:
        """The recorded answer for a request body, with a usage derived from the request (summed)."""
        n = int(body.get("n", 1))
        rec = self.recording(body["model"], n)
        if rec is None:
            return None
        rec = json.loads(json.dumps(rec))
        if self.synth_usage:
            prompt, completion = 100 + len(raw) % 53, 17 * n + len(raw) % 11
            rec["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                            "total_tokens": prompt + completion}
        prompt, completion = rec["usage"]["prompt_tokens"], rec["usage"]["completion_tokens"]
        with self.lock:
            self.usage_sent["requests"] += 1
            self.usage_sent["prompt_tokens"] += prompt
            self.usage_sent["completion_tokens"] += completion
        return rec

    def paths(self, prefix: str = "") -> list[str]:
        """Method and path of every logged request that starts with ``prefix``."""
        return [f"{e['method']} {e['path']}" for e in self.log if e["path"].startswith(prefix)]

    def _run_batch(self, b: dict[str, Any]) -> None:
        """Answer every line of a batch's input file (as the Batch API does when it completes)."""
        out, err = [], []
        for line in self.files[b["input_file_id"]].decode().splitlines():
            if not line.strip():
                continue
            req = json.loads(line)
            cid = req["custom_id"]
            if cid in self.fail_ids:
                err.append({"id": f"batch_req_{uuid.uuid4().hex[:12]}", "custom_id": cid, "response": None,
                            "error": {"code": "server_error", "message": "injected batch failure"}})
                continue
            rec = self.completion(req["body"], line.encode())
            if rec is None:
                err.append({"id": f"batch_req_{uuid.uuid4().hex[:12]}", "custom_id": cid,
                            "response": {"status_code": 400, "request_id": "r", "body": {
                                "error": {"message": "no recording", "type": "invalid_request_error"}}},
                            "error": None})
                continue
            out.append({"id": f"batch_req_{uuid.uuid4().hex[:12]}", "custom_id": cid,
                        "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex[:8]}", "body": rec},
                        "error": None})
        b["output_file_id"] = self._add_file("".join(json.dumps(o) + "\n" for o in out).encode())
        b["error_file_id"] = self._add_file("".join(json.dumps(o) + "\n" for o in err).encode()) if err else None
        b["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}
        b["status"] = "completed"

    def _add_file(self, data: bytes) -> str:
        fid = f"file-{uuid.uuid4().hex[:16]}"
        self.files[fid] = data
        return fid

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
        for k, v in {**self.server.ratelimit_headers, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        srv = self.server
        srv.log.append({"method": "GET", "path": self.path, "headers": dict(self.headers), "body": None})
        parts = self.path.strip("/").split("/")
        if parts[:2] == ["v1", "batches"] and len(parts) == 3 and parts[2] in srv.batches:
            with srv.lock:
                b = srv.batches[parts[2]]
                b["polls"] += 1
                if b["status"] != "completed":
                    if b["polls"] >= srv.batch_polls:
                        srv._run_batch(b)
                    else:
                        b["status"] = "in_progress"
                view = {k: v for k, v in b.items() if k != "polls"}
            return self._send(200, json.dumps(view).encode())
        if parts[:2] == ["v1", "files"] and len(parts) == 4 and parts[3] == "content" and parts[2] in srv.files:
            return self._send(200, srv.files[parts[2]])
        return self._send(404, b'{"error": {"message": "not found"}}')

    def _files_or_batches(self, raw: bytes) -> None:
        srv = self.server
        if self.path == "/v1/files":
            msg = BytesParser(policy=HTTP).parsebytes(
                f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw)
            fields = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                      for p in msg.iter_parts()}
            if fields.get("purpose") != b"batch" or not fields.get("file"):
                return self._send(400, b'{"error": {"message": "need purpose=batch and a file"}}')
            with srv.lock:
                fid = srv._add_file(fields["file"])
            srv.log.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": None})
            return self._send(200, json.dumps({"id": fid, "object": "file", "purpose": "batch",
                                               "bytes": len(fields["file"])}).encode())
        body = json.loads(raw)
        srv.log.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
        if body.get("input_file_id") not in srv.files or body.get("endpoint") != "/v1/chat/completions":
            return self._send(400, b'{"error": {"message": "unknown input_file_id or endpoint"}}')
        bid = f"batch_{uuid.uuid4().hex[:16]}"
        n = sum(1 for line in srv.files[body["input_file_id"]].splitlines() if line.strip())
        b = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "input_file_id": body["input_file_id"],
             "completion_window": body.get("completion_window"), "status": "validating", "output_file_id": None,
             "error_file_id": None, "request_counts": {"total": n, "completed": 0, "failed": 0},
             "metadata": body.get("metadata"), "polls": 0}
        with srv.lock:
            srv.batches[bid] = b
        return self._send(200, json.dumps({k: v for k, v in b.items() if k != "polls"}).encode())

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        srv = self.server
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path in ("/v1/files", "/v1/batches"):
            return self._files_or_batches(raw)
        with srv.lock:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            fault = srv.faults.popleft() if srv.faults else None
        try:
            body = json.loads(raw)
            srv.log.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body,
                            "fault": fault})
            srv.times.append(time.monotonic())
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
            rec = srv.completion(body, raw)
            if rec is None:
                err = {"error": {"message": f"no recording for model={body['model']} n={body.get('n')}"}}
                return self._send(400, json.dumps(err).encode())
            return self._send(200, json.dumps(rec).encode())
        finally:
            with srv.lock:
                srv.in_flight -= 1
