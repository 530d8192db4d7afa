"""Clean failures: full and read-only disks, corrupt internal files, zero-row chains, bad numbers,
lone surrogates, misbehaving OpenAI-compatible servers, and secrets.

Every failure must be one error line that names the file (or flag) and the fix, exit 1, and
leave the previous outputs byte for byte as they were. A full disk is a real small tmpfs when
the test can mount one (root with CAP_SYS_ADMIN), and always also an error injected at the
write boundary (the writer libraries' own exception types). Servers are loopback only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path

import polars as pl
import pytest

from dbr_builder.backends import Request, Result, make_backend
from dbr_builder.cli import main
from dbr_builder.core import store as store_mod
from dbr_builder.core.sanitize import clean_text, redact
from dbr_builder.stages import generate

DS = "SynthShapes"
KEY = "sk-proj-" + "Zq9Xw8Vu7Ts6" * 3


def _quiet(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


def _error(capsys, argv: list[str]) -> str:
    """Run ``argv``; it must fail with exit 1 and exactly one error line, no traceback."""
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 1, (argv, out.out[-2000:], out.err[-2000:])
    assert "Traceback" not in out.err + out.out
    lines = [x for x in out.err.splitlines() if "error:" in x]
    assert len(lines) == 1, out.err
    return lines[0]


def _snapshot(w: Path) -> dict[str, bytes]:
    """Every finished output (hidden temporaries, locks and SQLite sidecars aside)."""
    out = {}
    for p in sorted(w.rglob("*")):
        rel = p.relative_to(w).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(w).parts) \
                and not rel.endswith(("-wal", "-shm", "-journal")):
            out[rel] = p.read_bytes()
    return out


# --- a real full / read-only file system ----------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 16 MB tmpfs (skipped where this process cannot mount one)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-error tests cover this path")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path) -> None:
    """Use up every free byte of ``folder``'s file system."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


def test_full_disk_gives_one_line_and_keeps_outputs(built, small_fs, capsys):
    w = small_fs / "w"
    shutil.copytree(built, w, symlinks=True)
    # the manifest points at the built tree's images (outside the tmpfs): only outputs fill up
    _fill(small_fs)
    before = _snapshot(w)
    for argv, names in (
        (["generate", DS, "-w", str(w), "--teacher", "oracle", "--n", "4", "--no-progress"], "results.sqlite"),
        (["filter", DS, "-w", str(w)], DS),
        (["index", DS, "--root", str(built / "raw"), "-w", str(w), "--workers", "1"], "manifest"),
        (["publish", "-w", str(w)], "hub"),
    ):
        line = _error(capsys, argv)
        assert "disk is full" in line and names in line and str(w) in line, line
        assert _snapshot(w) == before, argv
    (small_fs / "filler").unlink()
    assert _quiet(["generate", DS, "-w", str(w), "--teacher", "oracle", "--n", "4", "--no-progress"]) == 0


def test_read_only_work_directory(built, small_fs, capsys):
    w = small_fs / "w"
    shutil.copytree(built, w, symlinks=True)
    before = _snapshot(w)
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True).returncode == 0
    for argv in (["generate", DS, "-w", str(w), "--teacher", "oracle", "--n", "4", "--no-progress"],
                 ["filter", DS, "-w", str(w)],
                 ["index", DS, "--root", str(built / "raw"), "-w", str(w), "--workers", "1"],
                 ["publish", "-w", str(w)]):
        line = _error(capsys, argv)
        assert "read-only" in line and str(w) in line, line
    assert _snapshot(w) == before


# --- the same failures injected at the write boundary ---------------------------------------


def test_full_disk_while_writing_parquet(work, monkeypatch, capsys):
    before = _snapshot(work)

    def full(self, *a, **kw):
        raise pl.exceptions.ComputeError("parquet: underlying IO error: No space left on device (os error 28)")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full)
    line = _error(capsys, ["filter", DS, "-w", str(work)])
    assert str(work / "chains" / f"{DS}.parquet") in line and "disk is full" in line and "free space" in line
    line = _error(capsys, ["index", DS, "--root", str(_raw(work)), "-w", str(work), "--workers", "1"])
    assert str(work / "manifest" / f"{DS}.parquet") in line and "disk is full" in line
    assert _snapshot(work) == before
    assert not [p for p in (work / "chains").iterdir() if p.name.startswith(".")]


def _raw(work: Path) -> Path:
    return Path(json.loads((work / "manifest" / f"{DS}.json").read_text())["root"]).parent


def test_full_disk_in_the_generation_store(work, monkeypatch, capsys):
    before = _snapshot(work)
    real = store_mod._connect

    def tiny(path, readonly=False):
        con = real(path, readonly)
        if not readonly:  # SQLite's own "database or disk is full" once the file would grow
            n = con.execute("PRAGMA page_count").fetchone()[0]
            con.execute(f"PRAGMA max_page_count = {n}")
        return con

    monkeypatch.setattr(store_mod, "_connect", tiny)
    line = _error(capsys, ["generate", DS, "-w", str(work), "--teacher", "oracle", "--n", "6", "--no-progress"])
    assert str(work / "generations" / DS / "results.sqlite") in line and "disk is full" in line
    assert "stored work is kept" in line
    monkeypatch.undo()
    assert _snapshot(work).keys() == before.keys()
    assert store_mod.read_results(work, DS).height == 2 * 48  # every earlier row still there
    assert _quiet(["generate", DS, "-w", str(work), "--teacher", "oracle", "--n", "6", "--no-progress"]) == 0


def test_read_only_error_names_the_output(work, monkeypatch, capsys):
    import errno

    from dbr_builder.core import fsutil

    def ro(dest, suffix=""):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(dest).parent / ".x.tmp"))

    monkeypatch.setattr(fsutil, "temp_beside", ro)
    line = _error(capsys, ["index", DS, "--root", str(_raw(work)), "-w", str(work), "--workers", "1"])
    assert str(work / "manifest" / f"{DS}.parquet") in line and "read-only" in line and ".x.tmp" not in line


# --- corrupt internal files -----------------------------------------------------------------


def test_corrupt_stamp_reruns_the_stage(tmp_path, capsys):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"datasets: [{DS}]\nstages:\n  - stage: synth\n    per_class: 1\n    image_size: 32\n"
                    "  - stage: index\n    workers: 1\n")
    w = tmp_path / "w"
    assert _quiet(["run", str(pipe), "-w", str(w)]) == 0
    stamp = w / ".stamps" / f"index--{DS}.json"
    stamp.write_text("{torn")
    capsys.readouterr()
    assert main(["run", str(pipe), "-w", str(w)]) == 0
    out = capsys.readouterr()
    assert f"{stamp}: corrupt stamp" in out.out + out.err and "Traceback" not in out.err
    assert json.loads(stamp.read_text())["key"]


def test_corrupt_filter_report(work, capsys):
    stats = work / "reports" / DS / "stats.json"
    stats.write_text("{not json")
    line = _error(capsys, ["publish", "-w", str(work)])
    assert str(stats) in line and "corrupt JSON" in line and "dbr filter" in line


def test_zero_row_chains_are_not_published(work, capsys):
    chains = work / "chains" / f"{DS}.parquet"
    pl.read_parquet(chains).head(0).write_parquet(chains)
    before = _snapshot(work / "hub")
    line = _error(capsys, ["publish", "-w", str(work)])
    assert str(chains) in line and "0 rows" in line and "--datasets" in line
    assert _snapshot(work / "hub") == before


# --- numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,flag", [
    (["generate", DS, "-w", "W", "--teacher", "oracle", "--temperature", "nan"], "--temperature"),
    (["generate", DS, "-w", "W", "--teacher", "oracle", "--top-p", "inf"], "--top-p"),
    (["synth", "--root", "R", "--seed", "-1"], "--seed"),
    (["synth", "--root", "R", "--image-size", "4096"], "--image-size"),
    (["synth", "--root", "R", "--image-size", "99999"], "--image-size"),
    (["download", "PACS", "--root", "R", "--timeout", "nan"], "--timeout"),
])
@pytest.mark.timeout(60)
def test_numeric_flags_are_range_checked(tmp_path, capsys, argv, flag):
    argv = [str(tmp_path / a) if a in ("W", "R") else a for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusal (exit 2) is fine too
        rc = e.code
    out = capsys.readouterr()
    assert rc in (1, 2) and flag in out.err and "Traceback" not in out.err
    assert not (tmp_path / "R").exists() and not (tmp_path / "W" / "generations").exists()


def test_nan_in_a_pipeline_config_is_refused(tmp_path, capsys):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"datasets: [{DS}]\nstages:\n  - stage: generate\n    teacher: oracle\n    temperature: .nan\n")
    capsys.readouterr()
    assert main(["run", str(pipe), "-w", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert "stages[0].temperature: nan is not a finite number" in err and "Traceback" not in err


# --- text from backends ---------------------------------------------------------------------


class _Surrogates:
    model = "surrogates"
    wants_images = False

    def generate(self, requests):
        return [Result(r.key, ["half an emoji \ud83d here" for _ in range(r.n)], 3, ["stop"] * r.n)
                for r in requests]


def test_lone_surrogates_are_stored_sanitized(work):
    path = store_mod.shard_file(work, DS)
    df, meta = generate.load_manifest(work, DS)
    jobs = generate.build_jobs(df.head(3), meta, "teacher")
    for _ in range(2):  # a rerun works too
        with store_mod.Store(path) as st:
            generate.run_jobs(st, _Surrogates(), jobs, 2, {"max_new_tokens": 8, "temperature": 0.7, "top_p": 1.0,
                                                           "seed": 0}, progress=False)
    texts = store_mod.read_results(work, DS).filter(pl.col("model") == "surrogates")["text"].to_list()
    assert len(texts) == 6 and all(t == "half an emoji \ufffd here" for t in texts)
    assert clean_text("\ud83d\ude00") == "\U0001f600" and clean_text(None) is None


# --- OpenAI-compatible servers on loopback --------------------------------------------------


class RawServer:
    """A loopback TCP server running ``handler(conn)`` per connection (misbehaving on purpose)."""

    def __init__(self, handler, accept: bool = True):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.handler, self.stop = handler, threading.Event()
        self.conns: list[socket.socket] = []
        if accept:
            threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        with contextlib.suppress(OSError):
            self.handler(conn, self.stop)

    def close(self):
        self.stop.set()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()
        self.sock.close()


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    n = int(next(x.split(b":")[1] for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")))
    while len(body) < n:
        body += conn.recv(65536)
    return body


def _ok_body(text: str = "ok") -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}],
                       "usage": {"completion_tokens": 1}}).encode()


def _trickle(where: str):
    def handler(conn, stop):
        _read_request(conn)
        body = _ok_body()
        msg = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        start = 0 if where == "headers" else msg.index(b"\r\n\r\n") + 4
        conn.sendall(msg[:start])
        for i in range(start, len(msg)):  # one byte a second
            if stop.is_set():
                return
            conn.sendall(msg[i:i + 1])
            time.sleep(1.0)
    return handler


def _req(key: str = "k") -> Request:
    return Request(key, [{"type": "text", "text": "hi"}], n=1, max_new_tokens=4)


@pytest.mark.parametrize("where", ["body", "headers"])
@pytest.mark.timeout(60)
def test_trickling_server_is_cut_off_at_the_deadline(where):
    srv = RawServer(_trickle(where))
    try:
        be = make_backend(f"openai:m@{srv.url}", timeout=2, max_retries=0)
        t0 = time.perf_counter()
        [res] = be.generate([_req()])
        took = time.perf_counter() - t0
        be.close()
    finally:
        srv.close()
    assert res.error is not None and res.error.startswith("timeout") and took < 4, (res.error, took)


@pytest.mark.timeout(120)
def test_dead_endpoint_fails_fast():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: connections are refused
    be = make_backend(f"openai:m@http://127.0.0.1:{port}/v1", backoff_base=0.05, backoff_max=0.2, concurrency=4)
    t0 = time.perf_counter()
    results = be.generate([_req(str(i)) for i in range(200)])
    results += be.generate([_req(str(i)) for i in range(200, 400)])  # a second pass: at once
    took = time.perf_counter() - t0
    be.close()
    assert all(r.error and r.error.startswith("connection") for r in results)
    assert any("unreachable" in r.error for r in results)
    # one request's retries (6 attempts) per worker at most, not 6 for each of the 400
    assert be.stats["attempts"] <= 4 * 6 and took < 10, (be.stats, took)


@pytest.mark.timeout(120)
def test_black_hole_endpoint_fails_fast():
    srv = RawServer(lambda conn, stop: stop.wait(60))  # accepts, reads nothing, never answers
    try:
        be = make_backend(f"openai:m@{srv.url}", timeout=0.5, max_retries=2, backoff_base=0.01, concurrency=2)
        t0 = time.perf_counter()
        results = be.generate([_req(str(i)) for i in range(50)])
        took = time.perf_counter() - t0
        be.close()
    finally:
        srv.close()
    assert all(r.error for r in results) and any("unreachable" in r.error for r in results)
    assert took < 2 * 3 * 0.5 + 3, took  # about one request's attempts per worker


def test_server_echoing_the_key_is_redacted_in_the_store(work, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)

    def handler(conn, stop):
        while not stop.is_set():
            _read_request(conn)
            body = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}. Bearer {KEY}"}}).encode()
            conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)

    srv = RawServer(handler)
    try:
        rc = main(["generate", DS, "-w", str(work), "--teacher", f"openai:m@{srv.url}", "--n", "1",
                   "--limit", "3", "--no-progress"])
    finally:
        srv.close()
    out = capsys.readouterr()
    assert rc in (1, 3) and KEY not in out.out + out.err
    errors = store_mod.read_results(work, DS).filter(pl.col("model") == "m")["error"].to_list()
    assert errors and all(e and "http 401" in e and KEY not in e and "***" in e for e in errors)
    for f in (work / "generations" / DS).iterdir():
        assert KEY.encode() not in f.read_bytes()


@pytest.mark.parametrize("verb", ["generate", "eval"])
def test_key_pasted_as_teacher_is_never_echoed(tmp_path, capsys, verb):
    argv = (["generate", DS, "-w", str(tmp_path), "--teacher", KEY] if verb == "generate"
            else ["eval", "-w", str(tmp_path), "--model", KEY, "--dataset", DS])
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    assert rc in (1, 2) and KEY not in out.out + out.err and KEY[8:20] not in out.err
    assert "Traceback" not in out.err


def test_redact_masks_key_shapes_and_env_secrets(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "plain-looking-value-123")
    text = f"a {KEY} b hf_{'a1B2' * 8} c Bearer abc.def.ghi d plain-looking-value-123 e hf_backend.py"
    got = redact(text)
    assert KEY not in got and "hf_a1B2" not in got and "abc.def.ghi" not in got
    assert "plain-looking-value-123" not in got and "hf_backend.py" in got


# --- eval ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["nosuch:x", "hf:/no/such/model/" + uuid.uuid4().hex])
def test_failed_eval_leaves_no_empty_run_folders(work, capsys, spec):
    runs_before = sorted(p.name for p in (work / "runs").iterdir()) if (work / "runs").exists() else []
    _error(capsys, ["eval", "-w", str(work), "--model", spec, "--dataset", DS, "--limit", "2"])
    runs_after = sorted(p.name for p in (work / "runs").iterdir()) if (work / "runs").exists() else []
    assert runs_after == runs_before


def test_sqlite_errors_never_escape_as_tracebacks(tmp_path):
    err = store_mod._unusable(tmp_path / "r.sqlite", sqlite3.OperationalError("attempt to write a readonly database"))
    assert "read-only" in str(err)
