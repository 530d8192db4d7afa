"""vLLM backend: lazy import with a clear error, message building; the engine itself needs a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from PIL import Image

from dbr_builder.backends import BackendError, Request, make_backend, parse_spec
from dbr_builder.backends.vllm_backend import chat_messages, structured_outputs

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_module_imports_without_vllm() -> None:
    assert "dbr_builder.backends.vllm_backend" in sys.modules
    assert structured_outputs(None, None) is None


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_missing_vllm_is_a_clear_error() -> None:
    with pytest.raises(BackendError, match=r"pip install 'dbr-builder\[vllm\]'"):
        make_backend("vllm:Qwen/Qwen2.5-VL-7B-Instruct", tensor_parallel_size=2)


def test_chat_messages_keep_interleaved_order_with_pil_images(tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.new("L", (400, 300), 128).save(a)
    Image.new("RGB", (50, 50)).save(b)
    req = Request("k", [{"type": "text", "text": "ex"}, {"type": "image", "path": str(a)},
                        {"type": "text", "text": "q"}, {"type": "image", "path": str(b)}])
    [msg] = chat_messages(req, max_pixels=100 * 100)
    parts = msg["content"]
    assert msg["role"] == "user" and [p["type"] for p in parts] == ["text", "image_pil", "text", "image_pil"]
    assert parts[1]["image_pil"].mode == "RGB" and parts[1]["image_pil"].width * parts[1]["image_pil"].height <= 10000
    assert parts[3]["image_pil"].size == (50, 50)


def test_spec_parsing_and_errors() -> None:
    assert parse_spec("vllm:Qwen/Qwen2.5-VL-7B-Instruct,tensor_parallel_size=2,enable_prefix_caching=false") == (
        "vllm", "Qwen/Qwen2.5-VL-7B-Instruct", {"tensor_parallel_size": 2, "enable_prefix_caching": False})
    assert parse_spec("openai:gpt-4o@http://h:8000/v1") == ("openai", "gpt-4o@http://h:8000/v1", {})
    assert parse_spec("oracle")[0] == "oracle"
    for bad, msg in (("gpt4", "unknown backend"), ("hf:", "give a model"), ("hf:x,adapter", "key=value"), ("", "non-empty")):
        with pytest.raises(BackendError, match=msg):
            parse_spec(bad)
