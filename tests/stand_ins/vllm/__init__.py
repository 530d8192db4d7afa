"""A stand-in for the ``vllm`` package (no GPU here): the API surface the vLLM backend uses.

It mimics vLLM 0.33: ``LLM(**engine_args)`` (start-up errors as vLLM raises them),
``LLM.chat(messages, sampling_params=..., use_tqdm=..., lora_request=...)`` returning
``RequestOutput``-like objects, ``SamplingParams`` with vLLM's own argument checks,
``llm.llm_engine.engine_core.shutdown()``. Behaviour is set by the environment variable
``DBR_STANDIN_VLLM`` (JSON) so that a child process can be steered as well:

- ``fail_start``: ``"engine_core"`` (the parent-side error when the engine process dies during
  start-up, e.g. out of memory), ``"oom"`` (the in-process message), ``"arch"`` (unsupported
  architecture), or null;
- ``fail_text``: requests whose prompt text contains this string raise ``ValueError``;
- ``log``: a file to which every construction / chat / shutdown is appended as a JSON line.

Tests put ``tests/stand_ins`` first on ``sys.path`` (and on the child's ``PYTHONPATH``); the
real package is never touched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

__version__ = "0.33.0+standin"

_SAMPLING_EPS = 1e-5
_MAX_TEMP = 1e-2


def _cfg() -> dict:
    return json.loads(os.environ.get("DBR_STANDIN_VLLM") or "{}")


def _log(event: dict) -> None:
    path = _cfg().get("log")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, sort_keys=True, default=str) + "\n")


class SamplingParams:
    """vLLM's checks that reject a request (``SamplingParams._verify_args`` / greedy rules)."""

    def __init__(self, n: int = 1, temperature: float = 1.0, top_p: float = 1.0, max_tokens: int | None = 16,
                 seed: int | None = None, structured_outputs=None, **kw):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}.")
        if temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {temperature}.")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
        if 0 < temperature < _MAX_TEMP:  # vLLM raises tiny temperatures to 0.01
            temperature = _MAX_TEMP
        if temperature < _SAMPLING_EPS and n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {n}.")
        self.n, self.temperature, self.top_p, self.max_tokens, self.seed = n, temperature, top_p, max_tokens, seed
        self.structured_outputs = structured_outputs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = "stop"


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput] = field(default_factory=list)


class _EngineCore:
    def __init__(self, model: str):
        self.model = model
        self.alive = True

    def shutdown(self) -> None:
        self.alive = False
        _log({"event": "shutdown", "model": self.model})


class _LLMEngine:
    def __init__(self, model: str):
        self.engine_core = _EngineCore(model)


class LLM:
    """Starts (or fails to start) like ``vllm.LLM``; ``chat`` answers with a fixed chain."""

    def __init__(self, model: str, **kwargs):
        cfg = _cfg()
        _log({"event": "construct", "model": model, "kwargs": kwargs})
        fail = cfg.get("fail_start")
        if fail == "engine_core":
            # What LLM(...) raises in the parent when the engine-core process dies while starting
            # (vllm/v1/engine/utils.py, wait_for_engine_startup); the root cause is only logged.
            raise RuntimeError("Engine core initialization failed. See root cause above. "
                               "Failed core proc(s): {}")
        if fail == "oom":
            raise ValueError("Free memory on device cuda:0 (10.21/79.19 GiB) on startup is less than desired GPU "
                             "memory utilization (0.9, 71.27 GiB). Decrease GPU memory utilization or reduce GPU "
                             "memory used by other processes.")
        if fail == "arch":
            raise ValueError("Model architectures ['FooForConditionalGeneration'] are not supported for now.")
        self.model = model
        self.kwargs = kwargs
        self.llm_engine = _LLMEngine(model)

    def chat(self, messages, sampling_params=None, use_tqdm=True, lora_request=None, **kw):
        if not self.llm_engine.engine_core.alive:
            raise RuntimeError("EngineCore is dead")
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(convs)
        fail_text = _cfg().get("fail_text")
        _log({"event": "chat", "requests": len(convs), "lora": getattr(lora_request, "lora_path", None)})
        outs = []
        for i, (conv, sp) in enumerate(zip(convs, params, strict=True)):
            parts = conv[0]["content"]
            text = " ".join(p.get("text", "") for p in parts if p["type"] == "text")
            if not any(p["type"] == "image_pil" for p in parts):
                raise ValueError("stand-in: every request carries an image")
            if fail_text and fail_text in text:
                raise ValueError(f"stand-in: request rejected ({fail_text})")
            comps = [CompletionOutput(j, f"candidate {j} for {text[:20]}", [1, 2, 3]) for j in range(sp.n)]
            outs.append(RequestOutput(str(i), comps))
        return outs
