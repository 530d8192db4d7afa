"""vLLM offline-engine backend (``vllm.LLM``), written against the vLLM 0.33 API.

- prompts go through the model's chat template with ``LLM.chat``; images are passed as
  ``image_pil`` content parts (already decoded and resized by :mod:`dbr_builder.core.imageprep`);
- ``SamplingParams(n=k, ...)`` gives k candidates per request, one prefill shared by all;
- ``regex=`` / ``json_schema=`` constrain the output with structured outputs
  (``SamplingParams(structured_outputs=StructuredOutputsParams(...))``, the API that replaced
  guided decoding);
- ``enable_prefix_caching`` (on by default) reuses the KV cache of the shared teacher prompt,
  which the generate stage puts before the image for that reason;
- ``limit_mm_per_prompt`` bounds the images per prompt; ``max_pixels`` / ``min_pixels`` go to
  the model's processor through ``mm_processor_kwargs`` (Qwen-VL style image budgets);
- ``adapter=<dir>`` serves a PEFT LoRA adapter with ``LoRARequest``.

vLLM is imported only when this backend is built, so the project works without it.
"""

from __future__ import annotations

import json
from typing import Any

from dbr_builder.backends.base import BackendError, Request, Result
from dbr_builder.core.imageprep import load_image


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise BackendError(
            "vllm backend: the vllm package is not installed; `pip install 'dbr-builder[vllm]'` on a CUDA "
            f"machine, or use --teacher hf:<model> / openai:<model>@<url> ({e})"
        ) from None
    return vllm


def structured_outputs(regex: str | None, json_schema: dict | str | None):
    """``StructuredOutputsParams`` for a regex or JSON schema, or None."""
    if regex is None and json_schema is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if regex is not None:
        return StructuredOutputsParams(regex=regex)
    schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
    return StructuredOutputsParams(json=schema)


def chat_messages(req: Request, max_pixels: int | None = None) -> list[dict[str, Any]]:
    """One OpenAI-style conversation for ``LLM.chat`` with PIL image parts, content order kept."""
    parts: list[dict[str, Any]] = []
    for p in req.content:
        if p.get("type") == "image":
            img = p.get("image") or load_image(p["path"], max_pixels)
            parts.append({"type": "image_pil", "image_pil": img})
        else:
            parts.append({"type": "text", "text": p["text"]})
    return [{"role": "user", "content": parts}]


class VLLMBackend:
    """Offline batched generation with vLLM (see module doc)."""

    wants_images = True

    def __init__(self, model: str, adapter: str | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.90, max_model_len: int | None = None, dtype: str = "auto",
                 enable_prefix_caching: bool = True, limit_images: int = 1, max_pixels: int | None = None,
                 min_pixels: int | None = None, regex: str | None = None, json_schema: dict | str | None = None,
                 max_lora_rank: int = 16, max_num_seqs: int | None = None, seed: int = 0,
                 trust_remote_code: bool = False, engine_kwargs: dict[str, Any] | str | None = None,
                 processor_kwargs: dict[str, Any] | str | None = None):
        vllm = _import_vllm()
        if isinstance(engine_kwargs, str):
            engine_kwargs = json.loads(engine_kwargs)
        if isinstance(processor_kwargs, str):
            processor_kwargs = json.loads(processor_kwargs)
        # processor settings (e.g. those a student was trained with) reach vLLM's HF processor
        mm_kwargs = {**(processor_kwargs or {}),
                     **{k: v for k, v in (("max_pixels", max_pixels), ("min_pixels", min_pixels)) if v}}
        kw: dict[str, Any] = {
            "model": model,
            "tensor_parallel_size": int(tensor_parallel_size),
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "dtype": dtype,
            "enable_prefix_caching": bool(enable_prefix_caching),
            "limit_mm_per_prompt": {"image": int(limit_images)},
            "seed": int(seed),
            "trust_remote_code": bool(trust_remote_code),
        }
        if max_model_len:
            kw["max_model_len"] = int(max_model_len)
        if max_num_seqs:
            kw["max_num_seqs"] = int(max_num_seqs)
        if mm_kwargs:
            kw["mm_processor_kwargs"] = mm_kwargs
        if adapter:
            kw.update(enable_lora=True, max_lora_rank=int(max_lora_rank))
        kw.update(engine_kwargs or {})
        # The engine starts on first use: a rerun with nothing left to generate (resume scan
        # only) must not spend minutes loading a 72B model.
        self._vllm, self._engine_kwargs, self._llm = vllm, kw, None
        self.lora = None
        if adapter:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(adapter))
        self.model = f"{model}+{adapter}" if adapter else model
        self.max_pixels = max_pixels
        self._structured = (regex, json_schema)

    @property
    def llm(self):
        """The ``vllm.LLM`` engine, started on first access."""
        if self._llm is None:
            self._llm = self._vllm.LLM(**self._engine_kwargs)
        return self._llm

    def sampling_params(self, req: Request):
        """``SamplingParams`` for one request (n candidates, optional structured output)."""
        from vllm import SamplingParams

        kw: dict[str, Any] = {"n": req.n, "temperature": req.temperature, "top_p": req.top_p,
                              "max_tokens": req.max_new_tokens, "seed": req.seed}
        so = structured_outputs(*self._structured)
        if so is not None:
            kw["structured_outputs"] = so
        return SamplingParams(**kw)

    def _chat(self, reqs: list[Request]) -> list[Result]:
        convs = [chat_messages(r, self.max_pixels) for r in reqs]
        outs = self.llm.chat(convs, sampling_params=[self.sampling_params(r) for r in reqs],
                             use_tqdm=False, lora_request=self.lora)
        results = []
        for r, o in zip(reqs, outs, strict=True):
            comps = sorted(o.outputs, key=lambda c: c.index)
            results.append(Result(r.key, [c.text for c in comps], sum(len(c.token_ids) for c in comps),
                                  [c.finish_reason or "stop" for c in comps]))
        return results

    def generate(self, requests: list[Request]) -> list[Result]:
        """All requests in one engine call (continuous batching); a failing batch is split per request."""
        if not requests:
            return []
        try:
            return self._chat(requests)
        except Exception as e:  # noqa: BLE001 - find the bad request, keep the others
            if len(requests) == 1:
                return [Result(requests[0].key, [], 0, [], error=f"{type(e).__name__}: {e}"[:500])]
        out = []
        for r in requests:
            try:
                out.extend(self._chat([r]))
            except Exception as e:  # noqa: BLE001
                out.append(Result(r.key, [], 0, [], error=f"{type(e).__name__}: {e}"[:500]))
        return out
