"""Tiny, randomly initialised students and teachers of every supported model family.

Each entry of :data:`FAMILIES` builds, offline, a model of one real transformers family from its
config classes, with the family's *real* processor class, its special tokens and its published
chat template (``trainers/chat_templates/<family>.jinja``), and a byte-level BPE tokenizer
trained here on the tiny student's corpus (``trainers.tiny_model``). The result loads through
the public path::

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)

so the conformance suite (tests/test_families.py) runs training, model selection, SARR, the hf
backend and ``dbr eval`` on every family the way a real checkpoint would be run. Models are a few
hundred thousand parameters and images a few dozen pixels, so the whole matrix runs on 2 CPU
cores in minutes. ``python -m trainers.families FAMILY [OUT]`` builds one.

| family | model class | processor | layout of |
|---|---|---|---|
| ``internvl`` | InternVLForConditionalGeneration | InternVLProcessor (GotOcr2 tiling) | OpenGVLab/InternVL3-8B-hf |
| ``qwen2_5_vl`` | Qwen2_5_VLForConditionalGeneration | Qwen2_5_VLProcessor | Qwen/Qwen2.5-VL-7B-Instruct (= ``tiny``) |
| ``qwen3_vl`` | Qwen3VLForConditionalGeneration | Qwen3VLProcessor | Qwen/Qwen3-VL-8B-Instruct |
| ``gemma3`` | Gemma3ForConditionalGeneration | Gemma3Processor | google/gemma-3-4b-it |
| ``idefics3`` | Idefics3ForConditionalGeneration | Idefics3Processor (image splitting) | HuggingFaceM4/Idefics3-8B-Llama3 |
| ``llava_onevision`` | LlavaOnevisionForConditionalGeneration | LlavaOnevisionProcessor (anyres) | llava-hf/llava-onevision-qwen2-7b-ov-hf |
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbr_builder.core.fsutil import stable_hash, swap_dir
from trainers import tiny_model
from trainers.tiny_model import CHAIN_TAGS, PRETOKENIZE_REGEX, TOKENIZER_VOCAB

BUILDER_VERSION = 1
MARKER = "tiny_family.json"
TEMPLATES = Path(__file__).with_name("chat_templates")

QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

# Small shared text model: 2 layers, 128 wide.
TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "head_dim": 32}


def chat_template(family: str) -> str:
    return (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# tokenizers


def _bpe(special: list[str]):
    """A byte-level BPE (Qwen2 pre-tokenisation) trained on the tiny corpus; ``special`` first."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=special[:1])
    tok.train_from_iterator(tiny_model._corpus(), trainer=trainer)
    return tok


def _add_tokens(tokenizer: Any, special: list[str]) -> Any:
    from transformers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in CHAIN_TAGS])
    return tokenizer


def qwen_tokenizer(extra_special: list[str], named: dict[str, str] | None = None, eos: str = "<|im_end|>") -> Any:
    """A ``Qwen2Tokenizer`` (the tokenizer class of Qwen2/2.5/3-VL, InternVL3 and LLaVA-OV-Qwen2)."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    special = QWEN_SPECIAL + [t for t in extra_special if t not in QWEN_SPECIAL]
    tok = _bpe(special)
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=tok.get_vocab(), merges=merges, unk_token=None, eos_token=eos, pad_token="<|endoftext|>",
        padding_side="left", model_max_length=TEXT["max_position_embeddings"], clean_up_tokenization_spaces=False,
        errors="replace", extra_special_tokens=named or {},
    )
    return _add_tokens(tokenizer, special)


def bos_tokenizer(special: list[str], bos: str, eos: str, pad: str, named: dict[str, str] | None = None,
                  unk: str | None = None) -> Any:
    """A fast tokenizer that prepends ``bos`` like Gemma's and Llama 3's (``add_special_tokens=True``)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(special)
    for t in special:
        tok.add_special_tokens([t])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, padding_side="left",
        model_max_length=TEXT["max_position_embeddings"], clean_up_tokenization_spaces=False,
        extra_special_tokens=named or {},
    )
    return _add_tokens(tokenizer, special)


def _vocab(tokenizer: Any) -> int:
    return (len(tokenizer) + 63) // 64 * 64


def _ids(tokenizer: Any, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _save(dest: Path, model_cls: Any, config: Any, processor: Any, seed: int, eos: list[int], pad: int,
          bos: int | None = None) -> None:
    """Random-init ``model_cls(config)`` from ``seed``, greedy generation config, model + processor into ``dest``."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, do_sample=False)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)


# ---------------------------------------------------------------------------------------------
# builders: each writes processor + model into ``dest``


def build_internvl(dest: Path, seed: int) -> None:
    """InternVL3 (-hf layout): InternViT + pixel-shuffle MLP projector + Qwen2 LM; GotOcr2 tiling."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    extra = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>"]
    tokenizer = qwen_tokenizer(extra, named)
    # 56 px tiles of 14 px patches, pixel shuffle 0.5 -> 4 tokens per tile (real: 448 px -> 256).
    tile, patch = 56, 14
    image_processor = GotOcr2ImageProcessor(size={"height": tile, "width": tile}, crop_to_patches=True,
                                            min_patches=1, max_patches=12)
    video_processor = InternVLVideoProcessor(size={"height": tile, "width": tile})
    seq = (tile // patch) ** 2 // 4
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=video_processor, image_seq_length=seq,
                                  chat_template=chat_template("internvl"))
    pad, eos, img = _ids(tokenizer, "<|endoftext|>", "<|im_end|>", "<IMG_CONTEXT>")
    config = InternVLConfig(
        vision_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                       "image_size": [tile, tile], "patch_size": [patch, patch], "use_qk_norm": False},
        text_config={"model_type": "qwen2", **TEXT, "vocab_size": _vocab(tokenizer), "bos_token_id": pad,
                     "eos_token_id": eos, "pad_token_id": pad, "tie_word_embeddings": False},
        image_token_id=img, downsample_ratio=0.5, vision_feature_layer=-1,
    )
    _save(dest, InternVLForConditionalGeneration, config, processor, seed, [eos, pad], pad)


def build_qwen3_vl(dest: Path, seed: int) -> None:
    """Qwen3-VL: ViT (patch 16, merge 2, deepstack) + Qwen3 LM with interleaved M-RoPE."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = qwen_tokenizer(["<think>", "</think>"])
    px = {"min_pixels": 64 * 64, "max_pixels": 128 * 128}
    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, **px)
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                            size={"shortest_edge": px["min_pixels"], "longest_edge": px["max_pixels"]})
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=chat_template("qwen3_vl"))
    ids = dict(zip(QWEN_SPECIAL, _ids(tokenizer, *QWEN_SPECIAL), strict=True))
    config = Qwen3VLConfig(
        text_config={**TEXT, "vocab_size": _vocab(tokenizer), "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                         "mrope_section": [4, 6, 6], "mrope_interleaved": True}},
        vision_config={"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": TEXT["hidden_size"],
                       "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    _save(dest, Qwen3VLForConditionalGeneration, config, processor, seed, [ids["<|im_end|>"], ids["<|endoftext|>"]], ids["<|endoftext|>"])


def build_gemma3(dest: Path, seed: int) -> None:
    """Gemma 3: SigLIP + average-pooled projector + Gemma3 LM; the template renders ``<bos>``."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
               "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = bos_tokenizer(special, bos="<bos>", eos="<end_of_turn>", pad="<pad>", named=named, unk="<unk>")
    side, patch, tokens = 32, 8, 4  # 4x4 patches pooled to 2x2 = 4 image tokens (real: 896 px -> 256)
    image_processor = Gemma3ImageProcessor(size={"height": side, "width": side}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens,
                                chat_template=chat_template("gemma3"))
    pad, eos, eot, bos, boi, eoi, img = _ids(tokenizer, "<pad>", "<eos>", "<end_of_turn>", "<bos>",
                                             "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    config = Gemma3Config(
        text_config={**TEXT, "vocab_size": _vocab(tokenizer), "bos_token_id": bos, "eos_token_id": eos,
                     "pad_token_id": pad, "sliding_window": 64, "query_pre_attn_scalar": 32},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": side, "patch_size": patch, "vision_use_head": False},
        mm_tokens_per_image=tokens, boi_token_index=boi, eoi_token_index=eoi, image_token_index=img,
        tie_word_embeddings=True,
    )
    _save(dest, Gemma3ForConditionalGeneration, config, processor, seed, [eot, eos], pad, bos)


def build_idefics3(dest: Path, seed: int) -> None:
    """Idefics3: SigLIP + pixel-shuffle connector + Llama 3 LM; images split into tiles + a global view."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<end_of_utterance>", "<fake_token_around_image>",
               "<image>", "<global-img>"]
    named = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    tokenizer = bos_tokenizer(special, bos="<|begin_of_text|>", eos="<end_of_utterance>", pad="<|end_of_text|>",
                              named=named)
    tile, patch, scale = 32, 8, 2  # 16 patches, pixel shuffle 2 -> 4 tokens per tile (real: 364 px -> 169)
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile},
                                             do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=(tile // patch) ** 2 // scale**2, chat_template=chat_template("idefics3"))
    bos, eot, eou, img = _ids(tokenizer, "<|begin_of_text|>", "<|end_of_text|>", "<end_of_utterance>", "<image>")
    config = Idefics3Config(
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": tile, "patch_size": patch},
        text_config={"model_type": "llama", **TEXT, "vocab_size": _vocab(tokenizer), "bos_token_id": bos,
                     "eos_token_id": eou, "pad_token_id": eot},
        image_token_id=img, scale_factor=scale, tie_word_embeddings=False, pad_token_id=eot,
    )
    _save(dest, Idefics3ForConditionalGeneration, config, processor, seed, [eou, eot], eot, bos)


def build_llava_onevision(dest: Path, seed: int) -> None:
    """LLaVA-OneVision (Qwen2): SigLIP + MLP projector, anyres tiling; the template puts images first."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = qwen_tokenizer(["<image>", "<video>"], {"image_token": "<image>", "video_token": "<video>"})
    side, patch = 32, 8
    pinpoints = [[side * i, side * j] for i in range(1, 4) for j in range(1, 4)]
    image_processor = LlavaOnevisionImageProcessor(size={"height": side, "width": side}, image_grid_pinpoints=pinpoints)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": side, "width": side})
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=video_processor, num_image_tokens=(side // patch) ** 2,
                                        vision_feature_select_strategy="full",
                                        chat_template=chat_template("llava_onevision"))
    pad, eos, img, vid = _ids(tokenizer, "<|endoftext|>", "<|im_end|>", "<image>", "<video>")
    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": side, "patch_size": patch,
                       "vision_use_head": False},
        text_config={"model_type": "qwen2", **TEXT, "vocab_size": _vocab(tokenizer), "bos_token_id": pad,
                     "eos_token_id": eos, "pad_token_id": pad},
        image_token_index=img, video_token_index=vid, image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False,
    )
    _save(dest, LlavaOnevisionForConditionalGeneration, config, processor, seed, [eos, pad], pad)


# ---------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Family:
    """One model family: how to build its tiny model and what a test may expect of it."""

    name: str
    model_class: str
    processor_class: str
    build: Callable[[Path, int], None] | None  # None: built by trainers.tiny_model
    available: Callable[[], bool] = lambda: True


def _has(*names: str) -> Callable[[], bool]:
    def check() -> bool:
        import transformers

        return all(hasattr(transformers, n) for n in names)

    return check


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("internvl", "InternVLForConditionalGeneration", "InternVLProcessor", build_internvl),
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", None),
    Family("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", build_qwen3_vl,
           _has("Qwen3VLForConditionalGeneration")),
    Family("gemma3", "Gemma3ForConditionalGeneration", "Gemma3Processor", build_gemma3),
    Family("idefics3", "Idefics3ForConditionalGeneration", "Idefics3Processor", build_idefics3),
    Family("llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor",
           build_llava_onevision),
]}


def available_families() -> list[str]:
    """The families the installed transformers can build."""
    return [n for n, f in FAMILIES.items() if f.available()]


def build_spec(family: str, seed: int = 0) -> dict[str, Any]:
    import inspect
    from importlib.metadata import version

    fam = FAMILIES[family]
    return {"builder_version": BUILDER_VERSION, "family": family, "seed": seed,
            "builder": stable_hash(inspect.getsource(fam.build)) if fam.build else None, "text": TEXT,
            "transformers": version("transformers"), "template": stable_hash(chat_template(family)),
            "tiny_model": tiny_model.BUILDER_VERSION, "corpus": stable_hash(tiny_model._corpus())}


def build_family(family: str, out_dir: str | Path | None = None, *, seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) the tiny model of ``family``; returns its folder (cached by spec hash)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    if not fam.available():
        raise ValueError(f"family {family!r} needs a newer transformers ({fam.model_class})")
    if fam.build is None:
        return tiny_model.build_tiny_model(out_dir, seed=seed, force=force)
    spec = build_spec(family, seed)
    h = stable_hash(spec)[:12]
    out = Path(out_dir) if out_dir is not None else tiny_model.default_cache_dir() / f"tiny-{family}-{h}"
    try:
        if json.loads((out / MARKER).read_text()).get("spec_hash") == h and not force:
            return out
    except (OSError, ValueError):
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        fam.build(tmp, seed)
        (tmp / MARKER).write_text(json.dumps({"spec_hash": h, "spec": spec}, indent=2, sort_keys=True) + "\n")
        swap_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.families", description="Build a tiny model of a family.")
    parser.add_argument("family", choices=list(FAMILIES))
    parser.add_argument("out_dir", nargs="?", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    print(build_family(args.family, args.out_dir, seed=args.seed, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
