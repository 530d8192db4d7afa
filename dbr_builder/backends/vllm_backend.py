"""vLLM offline-engine backend (``vllm.LLM``), written against the vLLM 0.33 API.

- prompts go through the model's chat template with ``LLM.chat``; images are passed as
  ``image_pil`` content parts (already decoded and resized by :mod:`dbr_builder.core.imageprep`);
- ``SamplingParams(n=k, ...)`` gives k candidates per request, one prefill shared by all;
- ``regex=`` / ``json_schema=`` constrain the output with structured outputs
  (``SamplingParams(structured_outputs=StructuredOutputsParams(...))``, the API that replaced
  guided decoding);
- ``enable_prefix_caching`` (on by default) reuses the KV cache of the shared teacher prompt,
  which the generate stage puts before the image for that reason;
- ``limit_mm_per_prompt`` bounds the images per prompt; ``max_pixels`` / ``min_pixels`` resize
  images here for every family and go to the processor (``mm_processor_kwargs``) only for the
  families whose processor reads them (Qwen-VL); other families would reject or ignore them;
- ``adapter=<dir>`` serves a PEFT LoRA adapter from ``dbr train``. What vLLM can serve depends
  on the architecture (:data:`FAMILIES`, checked against vLLM's own code by
  ``tests/contract/test_vllm_contract.py``): served directly with ``LoRARequest`` (with
  ``enable_tower_connector_lora`` when the adapter has vision-tower / projector modules and the
  architecture supports it), or merged into a copy of the base weights (PEFT
  ``merge_and_unload``) and served as a plain model, or refused before any work. Adapter modules
  are never dropped silently.

Engine start is one attempt: the engine starts on first use (a rerun with nothing left to do must
not load a 72B model) and a start failure raises :class:`EngineStartError` with one line naming
the model, the cause and the fix; it is remembered, so no later call starts the engine again.
Only failures of single requests after the start are isolated (``Result.error``) and counted in
``stats``. ``close()`` shuts the engine down and gives the GPU back.

vLLM is imported only when this backend is built, so the project works without it.
"""

from __future__ import annotations

import gc
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbr_builder.backends.base import BackendError, EngineError, EngineStartError, Request, Result
from dbr_builder.core.fsutil import atomic_dir, sha256_file, stable_hash, write_json_atomic
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


# --------------------------------------------------------------------------- model families


@dataclass(frozen=True)
class Family:
    """What vLLM 0.33 does with one architecture (see ``tests/contract/test_vllm_contract.py``).

    ``lm_lora`` / ``tower_lora`` / ``connector_lora``: leaf module names (as PEFT writes them for
    the transformers model) that vLLM's LoRA loader accepts in the language model, the vision
    tower and the projector; tower/connector ones only with ``enable_tower_connector_lora``.
    ``lora`` False: vLLM's class does not implement LoRA at all (every adapter is merged).
    """

    name: str
    pixel_kwargs: bool = False  # the HF processor reads max_pixels / min_pixels
    lora: bool = True
    lm_lora: frozenset[str] = frozenset()
    tower_lora: frozenset[str] = frozenset()
    connector_lora: frozenset[str] = frozenset()


_QWEN2_LM = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})

# Architectures of the supported student and teacher families (docs/generate.md, "Families").
FAMILIES: dict[str, Family] = {
    "Qwen2_5_VLForConditionalGeneration": Family(
        "Qwen2.5-VL", pixel_kwargs=True, lm_lora=_QWEN2_LM,
        # vision blocks: attn.qkv (fused), attn.proj, mlp gate/up/down; merger: mlp.0 / mlp.2
        tower_lora=frozenset({"qkv", "proj", "gate_proj", "up_proj", "down_proj"}),
        connector_lora=frozenset({"0", "2"})),
    "Qwen2VLForConditionalGeneration": Family(
        "Qwen2-VL", pixel_kwargs=True, lm_lora=_QWEN2_LM,
        tower_lora=frozenset({"qkv", "proj", "fc1", "fc2"}), connector_lora=frozenset({"0", "2"})),
    "Qwen3VLForConditionalGeneration": Family(
        "Qwen3-VL", pixel_kwargs=True, lm_lora=_QWEN2_LM,
        tower_lora=frozenset({"qkv", "proj", "linear_fc1", "linear_fc2"}),
        connector_lora=frozenset({"linear_fc1", "linear_fc2"})),
    # InternVL3-*-hf: vLLM 0.33 serves it with InternS1ForConditionalGeneration, whose vision
    # attention and projector are plain nn.Linear (its LoRA loader rejects projection_layer /
    # linear_1 / linear_2) and which has no tower/connector LoRA: only the language model.
    "InternVLForConditionalGeneration": Family("InternVL", lm_lora=_QWEN2_LM),
    # Gemma3: vLLM names the SigLIP tower differently from transformers 5, so tower LoRA weights
    # would load but match no module (silently unused): language model only.
    "Gemma3ForConditionalGeneration": Family("Gemma3", lm_lora=_QWEN2_LM),
    "Idefics3ForConditionalGeneration": Family(
        "Idefics3", lm_lora=_QWEN2_LM, tower_lora=frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
        connector_lora=frozenset({"proj"})),
    "SmolVLMForConditionalGeneration": Family(
        "SmolVLM", lm_lora=_QWEN2_LM, tower_lora=frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
        connector_lora=frozenset({"proj"})),
    # no SupportsLoRA in vLLM 0.33: every adapter is merged
    "LlavaOnevisionForConditionalGeneration": Family("LLaVA-OneVision", lora=False),
}

# Hub ids whose config cannot be read offline: architecture by name (case-insensitive search).
_NAME_HINTS = [
    (r"qwen2\.5-vl", "Qwen2_5_VLForConditionalGeneration"),
    (r"qwen2-vl", "Qwen2VLForConditionalGeneration"),
    (r"qwen3-vl", "Qwen3VLForConditionalGeneration"),
    (r"internvl[\d.]*-.*-hf$", "InternVLForConditionalGeneration"),
    (r"gemma-3", "Gemma3ForConditionalGeneration"),
    (r"smolvlm", "SmolVLMForConditionalGeneration"),
    (r"idefics3", "Idefics3ForConditionalGeneration"),
    (r"llava-onevision", "LlavaOnevisionForConditionalGeneration"),
]

# Module-path parts that put a LoRA module in the vision tower or the projector (transformers
# names of the families above).
_TOWER = re.compile(r"(^|\.)(visual|vision_tower|vision_model|vision_encoder)\.")
_CONNECTOR = re.compile(r"(^|\.)(multi_modal_projector|mlp1|connector|merger|visual\.merger)\.")


def model_architecture(model: str) -> str | None:
    """The ``architectures[0]`` of ``model`` (a folder, a cached Hub id, or a known Hub name), else None.

    Never touches the network: a local ``config.json``, then the Hugging Face cache, then the
    name patterns of the supported families.
    """
    cfg = None
    p = Path(model).expanduser()
    if (p / "config.json").is_file():
        cfg = p / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(model, "config.json")
            cfg = Path(hit) if isinstance(hit, str) else None
        except Exception:  # noqa: BLE001 - not a repo id, or no cache: fall back to the name
            cfg = None
    if cfg is not None:
        try:
            archs = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, ValueError):
            archs = []
        if archs:
            return str(archs[0])
    for pat, arch in _NAME_HINTS:
        if re.search(pat, model, re.I):
            return arch
    return None


def _adapter_module_paths(adapter: Path) -> list[str]:
    """Module paths with LoRA weights in a PEFT adapter folder (from the safetensors header)."""
    st = adapter / "adapter_model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), "pt") as f:
            keys = list(f.keys())
    elif (adapter / "adapter_model.bin").is_file():
        import torch

        keys = list(torch.load(adapter / "adapter_model.bin", map_location="cpu", weights_only=True))
    else:
        raise BackendError(f"vllm backend: {adapter} has no adapter_model.safetensors; adapter= must be a PEFT "
                           "adapter folder (e.g. a `dbr train` stage or final/ folder)")
    mods = set()
    for k in keys:
        m = re.match(r"(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]+)?\.weight$", k)
        mods.add(m.group(1) if m else k)  # a non-LoRA key (modules_to_save, DoRA magnitude): kept as is
    return sorted(mods)


def adapter_parts(adapter: str | Path) -> dict[str, set[str]]:
    """Leaf names of the adapter's modules by part: ``language``, ``tower``, ``connector``, ``other``.

    ``other`` holds weights that are not LoRA A/B pairs (``modules_to_save`` copies, DoRA
    magnitudes): vLLM serves none of them, so such an adapter is always merged.
    """
    out: dict[str, set[str]] = {"language": set(), "tower": set(), "connector": set(), "other": set()}
    for path in _adapter_module_paths(Path(adapter)):
        if path.endswith(".weight") or path.endswith(".bias") or ".modules_to_save." in path:
            out["other"].add(path)
            continue
        leaf = path.rsplit(".", 1)[-1]
        part = "connector" if _CONNECTOR.search(path) else "tower" if _TOWER.search(path) else "language"
        out[part].add(leaf)
    return out


@dataclass
class AdapterPlan:
    """How this backend serves an adapter: ``direct`` (LoRARequest), ``merge`` or ``refuse``."""

    action: str
    architecture: str | None
    reason: str
    tower_connector: bool = False
    unservable: dict[str, list[str]] = field(default_factory=dict)


ADAPTER_MODES = ("auto", "direct", "merge")


def plan_adapter(architecture: str | None, parts: dict[str, set[str]], mode: str = "auto") -> AdapterPlan:
    """Decide how to serve an adapter with these module ``parts`` on ``architecture``.

    ``auto``: direct when vLLM accepts every module (tower/connector LoRA switched on when needed),
    else merge. ``direct``: direct or refuse (never a partial adapter). ``merge``: always merge.
    """
    if mode not in ADAPTER_MODES:
        raise BackendError(f"vllm backend: adapter_mode={mode!r}; use one of {', '.join(ADAPTER_MODES)}")
    fam = FAMILIES.get(architecture or "")
    if mode == "merge":
        return AdapterPlan("merge", architecture, "adapter_mode=merge")
    if fam is None:
        why = (f"architecture {architecture} is not in the checked families" if architecture
               else "the model's architecture is unknown (no config.json found offline)")
        if mode == "direct":
            return AdapterPlan("refuse", architecture, f"{why}; cannot tell whether vLLM serves every adapter module")
        return AdapterPlan("merge", architecture, why)
    if not fam.lora:
        bad = {"all": sorted(set().union(*parts.values()))}
        why = f"vLLM's {fam.name} model class does not support LoRA"
        return AdapterPlan("refuse" if mode == "direct" else "merge", architecture, why, unservable=bad)
    bad = {
        "language": sorted(parts["language"] - fam.lm_lora),
        "tower": sorted(parts["tower"] - fam.tower_lora),
        "connector": sorted(parts["connector"] - fam.connector_lora),
        "other": sorted(parts["other"]),
    }
    bad = {k: v for k, v in bad.items() if v}
    tc = bool(parts["tower"] or parts["connector"])
    if not bad:
        why = f"vLLM serves every module of this {fam.name} adapter"
        return AdapterPlan("direct", architecture, why + (" (tower/connector LoRA on)" if tc else ""), tower_connector=tc)
    listed = "; ".join(f"{k}: {', '.join(v[:6])}" for k, v in bad.items())
    why = f"vLLM's {fam.name} class cannot take LoRA on {listed}"
    return AdapterPlan("refuse" if mode == "direct" else "merge", architecture, why, unservable=bad)


def merge_adapter(base: str, adapter: str | Path, dest: str | Path, trust_remote_code: bool = False) -> Path:
    """Merge a PEFT adapter into a copy of ``base`` (``merge_and_unload``) and save it to ``dest``.

    The copy is written atomically with the processor and a ``merged_from.json`` naming its
    inputs; an existing ``dest`` made from the same base and adapter bytes is reused.
    """
    dest = Path(dest)
    adapter = Path(adapter)
    st = adapter / "adapter_model.safetensors"
    key = {"base": str(base), "adapter": str(adapter.resolve()),
           "adapter_sha256": sha256_file(st) if st.is_file() else None}
    stamp = dest / "merged_from.json"
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == key:
        return dest
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        net = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BackendError(f"vllm backend: cannot load base model {base!r} to merge the adapter into ({e})") from None
    merged = PeftModel.from_pretrained(net, str(adapter)).merge_and_unload()
    with atomic_dir(dest) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json_atomic(tmp / "merged_from.json", key)
    del merged, net
    gc.collect()
    return dest


# --------------------------------------------------------------------------- start-up errors

_START_CAUSES: list[tuple[str, re.Pattern[str], str]] = [
    ("out of GPU memory",
     re.compile(r"out of memory|less than desired GPU memory utilization|No available memory for the cache"
                r"|larger than the available KV cache memory|CUDA error: out of memory|OutOfMemory", re.I),
     "lower gpu_memory_utilization or max_model_len, raise tensor_parallel_size, or free the GPU "
     "(another engine or the training model may still hold it)"),
    ("unknown or unsupported model",
     re.compile(r"not supported for now|Cannot find model module|is not a valid model identifier|"
                r"Repository Not Found|does not appear to have a file named config|No model architectures"
                r"|Unrecognized model|not a local folder and is not a valid", re.I),
     "check the model name or folder and that vLLM 0.33 supports its architecture (docs/generate.md)"),
    ("bad engine option",
     re.compile(r"unexpected keyword argument|validation error|Unknown .*option|must be one of|invalid choice", re.I),
     "fix the option (teacher_options / engine_kwargs) named above"),
    ("no GPU",
     re.compile(r"Failed to infer device type|No CUDA GPUs are available|Found no NVIDIA driver|"
                r"CUDA driver initialization failed|libcuda", re.I),
     "run on a machine with a CUDA GPU, or use hf:<model> (CPU) / openai:<model>@<url>"),
    ("engine process failed to start",
     re.compile(r"Engine core initialization failed|EngineCore failed", re.I),
     "the root cause is in vLLM's log above (most often GPU memory: lower gpu_memory_utilization or "
     "max_model_len, or free the GPU)"),
]


def describe_start_error(model: str, e: BaseException) -> str:
    """One line: the model, the cause (classified from vLLM's error) and what to change."""
    text = f"{type(e).__name__}: {e}"
    first = " ".join(text.split())[:300]
    for cause, pat, fix in _START_CAUSES:
        if pat.search(text):
            return f"vllm engine for {model!r} failed to start: {cause} ({first}); {fix}"
    return (f"vllm engine for {model!r} failed to start ({first}); check the model and teacher_options, "
            "and vLLM's log above")


def _is_fatal(e: BaseException) -> bool:
    """Errors after which no request can succeed (the engine process died)."""
    return type(e).__name__ in ("EngineDeadError", "EngineGenerateError") or "Engine core" in str(e)[:200]


# --------------------------------------------------------------------------- backend


class VLLMBackend:
    """Offline batched generation with vLLM (see module doc)."""

    wants_images = True

    def __init__(self, model: str, adapter: str | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.90, max_model_len: int | None = None, dtype: str = "auto",
                 enable_prefix_caching: bool = True, limit_images: int = 1, max_pixels: int | None = None,
                 min_pixels: int | None = None, regex: str | None = None, json_schema: dict | str | None = None,
                 max_lora_rank: int | None = None, max_num_seqs: int | None = None, seed: int = 0,
                 trust_remote_code: bool = False, engine_kwargs: dict[str, Any] | str | None = None,
                 adapter_mode: str = "auto", merge_dir: str | None = None, load_format: str | None = None,
                 mm_processor_kwargs: dict[str, Any] | str | None = None):
        vllm = _import_vllm()
        if isinstance(engine_kwargs, str):
            try:
                engine_kwargs = json.loads(engine_kwargs)
            except json.JSONDecodeError as e:
                raise BackendError(f"vllm backend: engine_kwargs is not valid JSON ({e})") from None
        if engine_kwargs is not None and not isinstance(engine_kwargs, dict):
            raise BackendError(f"vllm backend: engine_kwargs must be a JSON object, got {type(engine_kwargs).__name__}")
        self.base_model = model
        self.architecture = model_architecture(model)
        fam = FAMILIES.get(self.architecture or "")
        self.plan: AdapterPlan | None = None
        served = model
        lora_path = None
        if adapter:
            apath = Path(adapter)
            if not (apath / "adapter_config.json").is_file():
                raise BackendError(f"vllm backend: {adapter}/adapter_config.json not found; adapter= must be a "
                                   "PEFT adapter folder (e.g. from `dbr train`)")
            self.plan = plan_adapter(self.architecture, adapter_parts(apath), adapter_mode)
            if self.plan.action == "refuse":
                raise BackendError(f"vllm backend: cannot serve adapter {adapter} on {model}: {self.plan.reason}; "
                                   "use adapter_mode=merge (serve a merged copy) or the hf backend")
            if self.plan.action == "merge":
                dest = Path(merge_dir) if merge_dir else apath.parent / f"{apath.name}.merged-vllm"
                print(f"vllm backend: merging adapter {adapter} into a copy of {model} at {dest} "
                      f"({self.plan.reason})", file=sys.stderr)
                served = str(merge_adapter(model, apath, dest, trust_remote_code))
            else:
                lora_path = str(apath)
        mm_kwargs = {k: v for k, v in (("max_pixels", max_pixels), ("min_pixels", min_pixels)) if v}
        kw: dict[str, Any] = {
            "model": served,
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
        if load_format:
            kw["load_format"] = load_format
        # Only Qwen-VL image processors read max_pixels/min_pixels; the images are resized here
        # for every family anyway (chat_messages), so nothing is lost for the others.
        if not (fam is not None and fam.pixel_kwargs):
            mm_kwargs = {}
        if isinstance(mm_processor_kwargs, str):
            try:
                mm_processor_kwargs = json.loads(mm_processor_kwargs)
            except json.JSONDecodeError as e:
                raise BackendError(f"vllm backend: mm_processor_kwargs is not valid JSON ({e})") from None
        # Given explicitly (e.g. the student's training processor settings): passed as they are.
        mm_kwargs.update(mm_processor_kwargs or {})
        if mm_kwargs:
            kw["mm_processor_kwargs"] = mm_kwargs
        if lora_path:
            rank = max_lora_rank or _adapter_rank(Path(lora_path))
            kw.update(enable_lora=True, max_lora_rank=int(rank))
            if self.plan is not None and self.plan.tower_connector:
                kw["enable_tower_connector_lora"] = True
        kw.update(engine_kwargs or {})
        self._vllm, self.engine_kwargs, self._llm = vllm, kw, None
        self._start_error: str | None = None
        self.engine_starts = 0
        self.lora = None
        if lora_path:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, lora_path)
        self.model = f"{model}+{adapter}" if adapter else model
        self.max_pixels = max_pixels
        self._structured = (regex, json_schema)
        self.stats = {"requests": 0, "errors": 0, "batch_failures": 0}

    @property
    def llm(self):
        """The ``vllm.LLM`` engine, started on first access; a failed start is fatal and not retried."""
        if self._llm is None:
            if self._start_error is not None:
                raise EngineStartError(self._start_error)
            self.engine_starts += 1
            try:
                self._llm = self._vllm.LLM(**self.engine_kwargs)
            except Exception as e:  # noqa: BLE001 - every start failure becomes one clear, fatal error
                self._start_error = describe_start_error(self.base_model, e)
                _free_cuda()
                raise EngineStartError(self._start_error) from None
        return self._llm

    def start(self) -> None:
        """Start the engine now (raises :class:`EngineStartError` once, and on every later call)."""
        _ = self.llm

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

    def _one(self, r: Request) -> Result:
        try:
            return self._chat([r])[0]
        except EngineStartError:
            raise
        except Exception as e:  # noqa: BLE001 - one bad request fails alone
            if _is_fatal(e):
                raise EngineError(f"vllm engine for {self.base_model!r} died: {type(e).__name__}: {e}"[:400]) from None
            self.stats["errors"] += 1
            return Result(r.key, [], 0, [], error=f"{type(e).__name__}: {e}"[:500])

    def generate(self, requests: list[Request]) -> list[Result]:
        """All requests in one engine call (continuous batching); a failing batch is split per request.

        The engine is started before the try: a start failure raises (fatal), it is never
        retried or recorded as a per-request error.
        """
        if not requests:
            return []
        self.start()
        self.stats["requests"] += len(requests)
        try:
            return self._chat(requests)
        except Exception as e:  # noqa: BLE001 - find the bad request, keep the others
            if _is_fatal(e):
                raise EngineError(f"vllm engine for {self.base_model!r} died: {type(e).__name__}: {e}"[:400]) from None
            self.stats["batch_failures"] += 1
            if len(requests) == 1:
                self.stats["errors"] += 1
                return [Result(requests[0].key, [], 0, [], error=f"{type(e).__name__}: {e}"[:500])]
        return [self._one(r) for r in requests]

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back (safe to call twice or before start)."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()  # stops the engine-core process and its workers (vLLM V1)
            except Exception as e:  # noqa: BLE001 - a failed shutdown must not hide the run's result
                print(f"vllm backend: engine shutdown of {self.base_model!r} failed: {e}", file=sys.stderr)
        del llm, engine, core
        gc.collect()
        _free_cuda()


def _adapter_rank(adapter: Path) -> int:
    """The adapter's LoRA rank (vLLM needs ``max_lora_rank`` >= it; its choices are powers of two)."""
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 16
    ranks = [int(cfg.get("r") or 8), *map(int, (cfg.get("rank_pattern") or {}).values())]
    r = max(ranks)
    return max(8, 1 << (r - 1).bit_length())


def _free_cuda() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["ADAPTER_MODES", "FAMILIES", "AdapterPlan", "Family", "VLLMBackend", "adapter_parts", "chat_messages",
           "describe_start_error", "merge_adapter", "model_architecture", "plan_adapter", "stable_hash",
           "structured_outputs"]
