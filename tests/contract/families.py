"""Config-only tiny models of the supported student / teacher families (for the vLLM contract test).

Each builder writes a ``config.json`` folder (what vLLM resolves the architecture from; no weights
are needed, vLLM's model classes are built on the meta device) and returns the matching randomly
initialised transformers model, on which the adapter is made exactly as ``dbr train`` makes it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024, "head_dim": 16}


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config={**TEXT, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                                 "rope_theta": 10000.0}},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": 64, "fullatt_block_indexes": [0], "window_size": 56},
        image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)


def _qwen2_vl():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config={**TEXT, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                                 "rope_theta": 10000.0}},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 2},
        image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)


def _qwen3_vl():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config={**TEXT, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                                 "mrope_interleaved": True, "rope_theta": 10000.0}},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": 64, "deepstack_visual_indexes": [0], "num_position_embeddings": 64},
        image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)


def _internvl():
    from transformers import InternVLConfig

    return InternVLConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": [28, 28], "patch_size": [14, 14]},
        text_config={**TEXT, "model_type": "qwen2"}, image_token_id=500, downsample_ratio=0.5)


def _gemma3():
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config={**TEXT, "model_type": "gemma3_text", "sliding_window": 64},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4, image_token_index=500, boi_token_index=501, eoi_token_index=502)


def _idefics3():
    from transformers import Idefics3Config

    return Idefics3Config(
        text_config={**TEXT, "model_type": "llama"},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14}, scale_factor=2, image_token_id=500)


def _smolvlm():
    from transformers import SmolVLMConfig

    return SmolVLMConfig(
        text_config={**TEXT, "model_type": "llama"},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14}, scale_factor=2, image_token_id=500)


def _llava_onevision():
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        text_config={**TEXT, "model_type": "qwen2"},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        vision_feature_layer=-1, image_token_index=500, video_token_index=501)


BUILDERS: dict[str, Callable[[], Any]] = {
    "Qwen2_5_VLForConditionalGeneration": _qwen2_5_vl,
    "Qwen2VLForConditionalGeneration": _qwen2_vl,
    "Qwen3VLForConditionalGeneration": _qwen3_vl,
    "InternVLForConditionalGeneration": _internvl,
    "Gemma3ForConditionalGeneration": _gemma3,
    "Idefics3ForConditionalGeneration": _idefics3,
    "SmolVLMForConditionalGeneration": _smolvlm,
    "LlavaOnevisionForConditionalGeneration": _llava_onevision,
}


def build(arch: str, dest: Path) -> Any:
    """Write ``dest/config.json`` for ``arch`` and return the random transformers model."""
    import torch
    from transformers import AutoModelForImageTextToText

    cfg = BUILDERS[arch]()
    cfg.architectures = [arch]
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg)
    dest.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(dest)
    return model


def train_adapter(model: Any, dest: Path, vision: bool = True) -> Path:
    """Save a LoRA adapter with `dbr train`'s settings (the train schema's `lora` defaults, VISION_MODULES)."""
    from peft import LoraConfig, get_peft_model

    from dbr_builder.config import schema_defaults
    from trainers.train import VISION_MODULES

    lc = schema_defaults("train")["lora"]
    conf = LoraConfig(r=int(lc["r"]), lora_alpha=int(lc["alpha"]), lora_dropout=float(lc["dropout"]),
                      target_modules=lc["target_modules"], exclude_modules=None if vision else VISION_MODULES,
                      bias="none")
    get_peft_model(model, conf).save_pretrained(dest)
    return dest
