"""OpenAI-compatible backend against a real loopback HTTP server replaying recorded responses."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from dbr_builder.backends import BackendError, Request, make_backend
from tests.openai_replay_server import ReplayServer


@pytest.fixture()
def image(tmp_path: Path) -> str:
    p = tmp_path / "img.png"
    Image.new("RGBA", (300, 120), (200, 30, 30, 255)).save(p)
    return str(p)


@pytest.fixture()
def server():
    with ReplayServer(slow_s=1.0) as srv:
        yield srv


def _req(key: str, image: str, n: int = 1, seed: int | None = 7) -> Request:
    return Request(key, [{"type": "text", "text": "Which shape?"}, {"type": "image", "path": image}],
                   n=n, max_new_tokens=64, temperature=0.5, seed=seed)


def _backend(server: ReplayServer, model: str = "gpt-4o", **kw):
    opts = {"backoff_base": 0.01, "backoff_max": 0.05, "timeout": 0.5, **kw}
    return make_backend(f"openai:{model}@{server.base_url}", **opts)


def test_happy_path_sends_images_and_reads_n_candidates(server, image, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    be = _backend(server, max_pixels=64 * 64)
    [res] = be.generate([_req("a", image, n=3)])
    assert res.error is None
    assert len(res.texts) == 3 and res.texts[0].endswith("<CONCLUSION>pentagon</CONCLUSION>")
    assert res.finish_reasons == ["stop", "stop", "length"]
    assert res.out_tokens == 196  # usage.completion_tokens of the recording
    sent = server.log[0]
    assert sent["headers"]["Authorization"] == "Bearer sk-test-secret"
    body = sent["body"]
    assert body["n"] == 3 and body["seed"] == 7 and body["max_tokens"] == 64 and body["model"] == "gpt-4o"
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url"]
    url = parts[1]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    import base64
    import io

    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.mode == "RGB" and img.width * img.height <= 64 * 64  # resized to the pixel budget
    assert "sk-test-secret" not in json.dumps(res.__dict__)


def test_retries_429_500_timeout_malformed_then_succeeds(server, image) -> None:
    server.inject("429", "500", "timeout", "malformed", "no_choices", "drop")
    be = _backend(server, max_retries=6)
    t0 = time.perf_counter()
    [res] = be.generate([_req("a", image)])
    assert res.error is None and len(res.texts) == 1
    assert be.stats["retries"] == 6 and be.stats["attempts"] == 7
    assert time.perf_counter() - t0 < 5
    assert [e["fault"] for e in server.log] == ["429", "500", "timeout", "malformed", "no_choices", "drop", None]


def test_retries_are_bounded_and_failures_are_per_request(server, image) -> None:
    server.inject("500", "500", "500")
    be = _backend(server, max_retries=2, concurrency=1)
    res = be.generate([_req("a", image), _req("b", image)])
    assert res[0].texts == [] and res[0].error.startswith("http 500")
    assert "gave up after 3 attempts" in res[0].error
    assert res[1].error is None and len(res[1].texts) == 1  # the other request is unaffected


def test_client_errors_are_not_retried(server, image) -> None:
    server.inject("400")
    be = _backend(server, max_retries=5)
    [res] = be.generate([_req("a", image)])
    assert res.error.startswith("http 400") and be.stats["attempts"] == 1


def test_concurrency_limit(image) -> None:
    with ReplayServer(delay_s=0.05) as srv:
        be = _backend(srv, concurrency=2)
        res = be.generate([_req(str(i), image) for i in range(6)])
        assert all(r.error is None for r in res) and [r.key for r in res] == [str(i) for i in range(6)]
        assert srv.max_in_flight <= 2


def test_vllm_serve_recording_and_extra_body(server, image) -> None:
    be = _backend(server, model="Qwen/Qwen2.5-VL-7B-Instruct",
                  extra_body='{"structured_outputs": {"regex": "<SUMMARY>.*"}}')
    [res] = be.generate([_req("a", image, n=2, seed=None)])
    assert res.texts[1].endswith("<CONCLUSION>star</CONCLUSION>") and res.out_tokens == 96
    body = server.log[0]["body"]
    assert body["structured_outputs"] == {"regex": "<SUMMARY>.*"} and "seed" not in body
    assert "Authorization" not in server.log[0]["headers"]  # no key in the environment, none sent


def test_missing_key_for_openai_api_and_bad_url(monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(BackendError, match="OPENAI_API_KEY"):
        make_backend("openai:gpt-4o")
    with pytest.raises(BackendError, match="not an http"):
        make_backend("openai:gpt-4o@ftp://x")


def test_unreadable_image_is_a_request_error(server, tmp_path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    be = _backend(server)
    [res] = be.generate([_req("a", str(bad))])
    assert res.error.startswith("image:") and str(bad) in res.error
    assert server.log == []
