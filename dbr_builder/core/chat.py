"""Chat prompts through any multimodal processor, the same way for training, SARR and the backends.

Model families differ in ways that break naive code (tests/test_families.py runs all of them):

- **Images per text.** Gemma3 and Idefics3 processors need one image list per text in a batch;
  every processor accepts that nesting, so :func:`encode` always passes it.
- **BOS.** Templates of Gemma3 and Llama-3-style models render ``bos_token`` themselves; tokenising
  the rendered prompt with ``add_special_tokens=True`` would add a second one. :func:`encode` turns
  special tokens off when the text already starts with the BOS token.
- **Interleaving.** LLaVA-OneVision's template writes all images of a turn before all its text, so
  in-context examples would lose their labels' positions. :func:`render` detects a template that
  does not keep images in place and then writes the image placeholders into the text itself.
- **Answer span.** LLaVA-OneVision renders an assistant turn as ``assistant \\n<answer>`` but the
  generation prompt as ``assistant\\n``. :func:`answer_text` finds the answer inside a rendered
  conversation (with a sentinel) and returns exactly what the model must generate after the
  generation prompt: the answer as the template writes it plus the template's end of turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dbr_builder.log import get_logger

log = get_logger(__name__)

_SENTINEL = "QQANSWERSENTINELQQ"
_PROBE_A, _PROBE_B = "QQPROBEAQQ", "QQPROBEBQQ"


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _apply(processor: Any, messages: list[dict[str, Any]], gen: bool) -> str:
    return processor.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)


def _cache(processor: Any) -> dict[str, Any]:
    c = getattr(processor, "_dbr_chat_cache", None)
    if c is None:
        c = {}
        try:
            processor._dbr_chat_cache = c
        except AttributeError:  # pragma: no cover - slotted objects
            pass
    return c


def image_placeholder(processor: Any) -> str:
    """The text the chat template writes for one image part (e.g. ``<image>``)."""
    c = _cache(processor)
    if "placeholder" not in c:
        with_img = _apply(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _PROBE_A}]}], False)
        without = _apply(processor, [{"role": "user", "content": [{"type": "text", "text": _PROBE_A}]}], False)
        i = 0
        while i < min(len(with_img), len(without)) and with_img[i] == without[i]:
            i += 1
        j = 0
        while j < min(len(with_img), len(without)) - i and with_img[-1 - j] == without[-1 - j]:
            j += 1
        c["placeholder"] = with_img[i:len(with_img) - j]
    return c["placeholder"]


def keeps_interleaving(processor: Any) -> bool:
    """Whether the chat template renders image parts where they are among the text parts."""
    c = _cache(processor)
    if "interleaves" not in c:
        text = _apply(processor, [{"role": "user", "content": [
            {"type": "text", "text": _PROBE_A}, {"type": "image"}, {"type": "text", "text": _PROBE_B}]}], False)
        ph = image_placeholder(processor).strip() or getattr(processor, "image_token", None) or ""
        a, b = text.find(_PROBE_A), text.find(_PROBE_B)
        k = text.find(ph, a + len(_PROBE_A)) if ph and a >= 0 else -1
        c["interleaves"] = bool(ph) and 0 <= a < k < b
        if not c["interleaves"]:
            log.info("chat template of %s does not keep images in place; placeholders are inlined into the text",
                     type(processor).__name__)
    return c["interleaves"]


def user_message(processor: Any, parts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One user turn of image/text parts (``{"type": "image"}`` / ``{"type": "text", "text": ...}``).

    Where the template would move images away from their text (LLaVA-OneVision), a turn with more
    than one image becomes one text part with the template's image placeholder written in place.
    """
    content = [{"type": "image"} if p.get("type") == "image" else {"type": "text", "text": p["text"]} for p in parts]
    n_img = sum(p["type"] == "image" for p in content)
    if n_img > 1 and not keeps_interleaving(processor):
        ph = image_placeholder(processor)
        text = "".join(ph if p["type"] == "image" else p["text"] for p in content)
        content = [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def render(processor: Any, parts: Sequence[dict[str, Any]]) -> str:
    """The prompt text (generation header included) for one user turn."""
    return _apply(processor, user_message(processor, parts), True)


def answer_text(processor: Any, messages: list[dict[str, Any]], answer: str) -> str:
    """What the model must generate after the generation prompt of ``messages`` to give ``answer``.

    That is the answer as the template writes it in an assistant turn, followed by the template's
    end of turn; template text between the turn header and the answer is kept only where the
    generation prompt does not already end the header (it never duplicates the header).
    """
    head = _apply(processor, messages, True)
    probe = _apply(processor, messages + [{"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}], False)
    pos = probe.find(_SENTINEL)
    if pos < 0:
        raise ValueError("the student's chat template does not render the assistant's text; cannot train on answers")
    pre, post = probe[:pos], probe[pos + len(_SENTINEL):]
    full = _apply(processor, messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}], False)
    if full.startswith(pre) and full.endswith(post) and len(full) >= len(pre) + len(post):
        body = full[len(pre):len(full) - len(post)]
    else:  # the template rewrites the answer in a way that moves its frame (not seen in practice)
        body = answer
    if pre.startswith(head):
        lead = pre[len(head):]
    else:
        # e.g. LLaVA-OneVision: turn header "assistant \n" vs generation prompt "assistant\n"; the
        # model answers right after the generation prompt, so the turn's own header text is dropped.
        lead = ""
        c = _cache(processor)
        if not c.get("warned_header"):
            c["warned_header"] = True
            log.info("chat template renders the assistant header differently from the generation prompt; "
                     "training on the answer and end of turn only")
    return lead + body + post


def _starts_with_bos(tok: Any, texts: Sequence[str]) -> bool:
    bos = getattr(tok, "bos_token", None)
    return bool(bos) and all(t.startswith(bos) for t in texts)


def encode(processor: Any, texts: Sequence[str], images: Sequence[Sequence[Any]], padding: bool = False,
           **kwargs: Any) -> Any:
    """``processor(text=texts, images=<one list per text>)`` without a duplicated BOS.

    ``images[i]`` are the images of ``texts[i]`` in order; ``kwargs`` are processor settings
    (e.g. ``max_pixels``, ``crop_to_patches``) and are passed on unchanged.
    """
    kw = dict(kwargs)
    if _starts_with_bos(tokenizer_of(processor), texts):
        kw.setdefault("add_special_tokens", False)
    imgs = [list(x) for x in images]
    has_images = any(imgs)
    return processor(text=list(texts), images=imgs if has_images else None, return_tensors="pt",
                     **({"padding": True} if padding else {}), **kw)


def token_count_of_answer(processor: Any, text: str) -> list[int]:
    """Token ids of an answer suffix (never with special tokens added)."""
    return tokenizer_of(processor)(text, add_special_tokens=False)["input_ids"]
