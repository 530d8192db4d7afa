"""transformers backend: batched ``generate`` with any ``AutoModelForImageTextToText``, CPU or GPU.

Prompts go through the processor's chat template (:mod:`dbr_builder.core.chat`: one image list
per text, no second BOS, images kept next to their text even where the template reorders them),
so any image-text-to-text model with a chat template works, including several images interleaved
with text in one turn (in-context examples). Requests with the same sampling settings are batched
together, ``batch_size`` sequences at a time (left padding); ``n`` candidates come from
``num_return_sequences``. Per-request seeds cannot be honoured inside one batch: a batch is seeded
with its first request's seed. ``adapter=<dir>`` loads a PEFT LoRA adapter (from ``dbr train``) on
top of the base model; ``processor_kwargs`` (a mapping, e.g. the settings a student was trained
with) are passed to every processor call. If a batch fails it is retried request by request; each
such fallback is logged and counted in ``fallbacks``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from dbr_builder.backends.base import BackendError, Request, Result
from dbr_builder.core import chat
from dbr_builder.core.imageprep import load_image
from dbr_builder.log import get_logger

log = get_logger(__name__)


def _processor_kwargs(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):  # inline spec option: processor_kwargs={"crop_to_patches":false}
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BackendError(f"hf backend: processor_kwargs={value!r} is not a JSON mapping") from None
    if not isinstance(value, dict):
        raise BackendError(f"hf backend: processor_kwargs must be a mapping, got {type(value).__name__}")
    return dict(value)


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise BackendError(f"hf backend: unknown dtype {dtype!r} (use auto, float32, bfloat16, float16)") from None


class HFBackend:
    """Generation with transformers (see module doc)."""

    wants_images = True

    def __init__(self, model: str, adapter: str | None = None, device: str | None = None, dtype: str = "auto",
                 batch_size: int = 8, max_pixels: int | None = None, min_pixels: int | None = None,
                 attn_implementation: str | None = None, trust_remote_code: bool = False,
                 merge_adapter: bool = False, local_files_only: bool | None = None, fixed_length: bool = False,
                 processor_kwargs: dict[str, Any] | str | None = None):
        if model.startswith(("/", "./", "../", "~")) and not Path(model).is_dir():
            # Hub ids never look like this; say "no such folder" (before slow imports), not "bad repo id".
            raise BackendError(f"hf backend: model folder {model!r} not found; give an existing folder or a Hub id")
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        is_dir = Path(model).is_dir()
        # A local folder never needs the network; a Hub id may (unless the caller forbids it).
        lfo = is_dir if local_files_only is None else local_files_only
        try:
            self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code,
                                                           local_files_only=lfo)
            kw: dict[str, Any] = {"dtype": _resolve_dtype(dtype, self.device),
                                  "trust_remote_code": trust_remote_code, "local_files_only": lfo}
            if attn_implementation:
                kw["attn_implementation"] = attn_implementation
            net = AutoModelForImageTextToText.from_pretrained(model, **kw)
        except (OSError, ValueError) as e:  # ValueError: a folder that holds no (known) model
            raise BackendError(f"hf backend: cannot load model {model!r}: {e}") from None
        if adapter:
            if not (Path(adapter) / "adapter_config.json").exists():
                raise BackendError(f"hf backend: {adapter}/adapter_config.json not found; "
                                   "adapter= must be a PEFT adapter folder (e.g. from `dbr train`)")
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, adapter)
            if merge_adapter:
                net = net.merge_and_unload()
        self.net = net.to(self.device).eval()
        self.processor_kwargs = _processor_kwargs(processor_kwargs)
        self.fallbacks = 0
        self.fixed_length = bool(fixed_length)  # benchmarks: always generate max_new_tokens
        self.model = f"{model}+{adapter}" if adapter else model
        self.batch_size = max(1, int(batch_size))
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        tok = getattr(self.processor, "tokenizer", self.processor)
        tok.padding_side = "left"  # generation continues from the right end of every row
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        gen_cfg = getattr(self.net, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) or tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = tok.pad_token_id

    @classmethod
    def from_loaded(cls, net: Any, processor: Any, name: str, batch_size: int = 8,
                    max_pixels: int | None = None, fixed_length: bool = False,
                    processor_kwargs: dict[str, Any] | None = None) -> HFBackend:
        """Wrap a model already in memory (e.g. the student during training)."""
        self = cls.__new__(cls)
        self.fixed_length = fixed_length
        self.processor_kwargs = _processor_kwargs(processor_kwargs)
        self.fallbacks = 0
        self.net, self.processor, self.model = net, processor, name
        self.device = str(next(net.parameters()).device)
        self.batch_size, self.max_pixels, self.min_pixels = batch_size, max_pixels, None
        tok = getattr(processor, "tokenizer", processor)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        eos = getattr(getattr(net, "generation_config", None), "eos_token_id", None) or tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = tok.pad_token_id
        return self

    def _prompt(self, req: Request) -> tuple[str, list[Any]]:
        """The rendered prompt of one request and its images, in order."""
        parts, images = [], []
        for p in req.content:
            if p.get("type") == "image":
                img = p.get("image") or load_image(p["path"], self.max_pixels, self.min_pixels)
                images.append(img)
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": p["text"]})
        return chat.render(self.processor, parts), images

    def _inputs(self, chunk: list[Request]) -> Any:
        texts, images = [], []
        for req in chunk:
            text, imgs = self._prompt(req)
            texts.append(text)
            images.append(imgs)
        return chat.encode(self.processor, texts, images, padding=True, **self.processor_kwargs).to(self.device)

    def _run_chunk(self, chunk: list[Request]) -> list[Result]:
        import torch

        inputs = self._inputs(chunk)
        r0 = chunk[0]
        do_sample = r0.temperature > 0
        gen_kw: dict[str, Any] = {"max_new_tokens": r0.max_new_tokens, "do_sample": do_sample,
                                  "num_return_sequences": r0.n, "pad_token_id": self.pad_id}
        if self.fixed_length:
            gen_kw["min_new_tokens"] = r0.max_new_tokens
        if do_sample:
            gen_kw.update(temperature=r0.temperature, top_p=r0.top_p)
        if r0.seed is not None:
            torch.manual_seed(r0.seed)
        with torch.inference_mode():
            out = self.net.generate(**inputs, **gen_kw)
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        results = []
        for i, req in enumerate(chunk):
            cands, finishes, ntok = [], [], 0
            for seq in new[i * req.n:(i + 1) * req.n]:
                stop_at = next((k for k, t in enumerate(seq) if t in self.eos_ids), None)
                body = seq if stop_at is None else seq[:stop_at]
                if stop_at is None and self.pad_id is not None:
                    while body and body[-1] == self.pad_id and self.pad_id not in self.eos_ids:
                        body = body[:-1]
                ntok += len(body) + (stop_at is not None)
                cands.append(self.tokenizer.decode(body, skip_special_tokens=True))
                finishes.append("stop" if stop_at is not None else "length")
            results.append(Result(req.key, cands, ntok, finishes))
        return results

    def generate(self, requests: list[Request]) -> list[Result]:
        """Generate for all requests, ``batch_size`` sequences per call.

        Requests are grouped by sampling settings only (not by seed: a batch is seeded with its
        first request's seed). A failing batch is retried request by request; the fallback is
        logged and counted in ``self.fallbacks``.
        """
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(r.n, r.max_new_tokens, r.temperature, r.top_p)].append(i)
        out: list[Result | None] = [None] * len(requests)
        for (n, *_), idx in groups.items():
            per = max(1, self.batch_size // max(1, n))  # batch_size counts sequences, n per request
            for s in range(0, len(idx), per):
                ids = idx[s:s + per]
                chunk = [requests[i] for i in ids]
                try:
                    res = self._run_chunk(chunk)
                except Exception as e:  # noqa: BLE001 - isolate the bad request, keep the run going
                    if len(chunk) == 1:
                        res = [Result(chunk[0].key, [], 0, [], error=f"{_cause(e)}: {e}"[:500])]
                    else:
                        self.fallbacks += 1
                        log.warning("hf backend: a batch of %d requests failed (%s: %s); retrying one by one "
                                    "(fallback %d)", len(chunk), type(e).__name__, str(e)[:200], self.fallbacks)
                        res = [self.generate([r])[0] for r in chunk]
                for i, r in zip(ids, res, strict=True):
                    out[i] = r
        return [r for r in out if r is not None]

    def score(self, requests: list[Request], candidates: list[str]) -> list[list[float]]:
        """Log-likelihood of each candidate answer (plus end of turn) after each request's prompt.

        The ``scored`` eval mode and model selection use this: the argmax over class names is
        the prediction, with no generation and no parsing. Answers are cut exactly as in
        training (:func:`dbr_builder.core.chat.answer_text`).
        """
        import torch

        out: list[list[float]] = []
        tok = self.tokenizer
        for req in requests:
            text, imgs = self._prompt(req)
            enc = chat.encode(self.processor, [text], [imgs], **self.processor_kwargs)
            msgs = chat.user_message(self.processor, [p if p.get("type") != "image" else {"type": "image"}
                                                      for p in req.content])
            answers = [tok(chat.answer_text(self.processor, msgs, c), add_special_tokens=False)["input_ids"]
                       for c in candidates]
            scores: list[float] = []
            per = max(1, self.batch_size)
            for lo in range(0, len(answers), per):
                group = answers[lo:lo + per]
                scores.extend(self._score_group(enc, group, torch))
            out.append(scores)
        return out

    def _score_group(self, enc: Any, answers: list[list[int]], torch: Any) -> list[float]:
        prompt = enc["input_ids"][0]
        n = prompt.shape[0]
        width = n + max(len(a) for a in answers)
        b = len(answers)
        ids = torch.full((b, width), self.pad_id if self.pad_id is not None else 0, dtype=torch.long)
        attn = torch.zeros((b, width), dtype=torch.long)
        for r, a in enumerate(answers):
            ids[r, :n] = prompt
            ids[r, n:n + len(a)] = torch.tensor(a, dtype=torch.long)
            attn[r, :n + len(a)] = 1
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": attn}
        for k, v in enc.items():
            if k in ("input_ids", "attention_mask"):
                continue
            if hasattr(v, "dim") and v.dim() == 2 and v.shape[0] == 1 and v.shape[1] == n:
                ext = torch.zeros((b, width), dtype=v.dtype)
                ext[:, :n] = v[0]
                inputs[k] = ext
            elif hasattr(v, "dim") and v.dim() >= 1:
                # vision tensors are laid out per image / tile / patch along axis 0: one copy per row
                inputs[k] = torch.cat([v] * b, dim=0)
            else:
                inputs[k] = v
        inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
        with torch.inference_mode():
            logits = self.net(**inputs).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        res = []
        for r, a in enumerate(answers):
            tgt = torch.tensor(a, device=logp.device)
            res.append(float(logp[r, n - 1:n - 1 + len(a)].gather(1, tgt[:, None]).sum()))
        return res
    def close(self) -> None:
        """Drop this backend's reference to the model and free cached GPU memory (safe to call twice).

        A model wrapped with :meth:`from_loaded` stays alive for its owner; only this reference goes.
        """
        import gc
        import sys

        if getattr(self, "net", None) is None:
            return
        self.net = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


def _cause(e: Exception) -> str:
    name = type(e).__name__
    if "OutOfMemory" in name:
        return "oom"
    if isinstance(e, OSError):
        return "image"
    return name
