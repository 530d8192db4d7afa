"""Build a tiny, randomly initialised Qwen2.5-VL student for tests and the offline demo.

Nothing is downloaded: the model comes from a config, the byte-level BPE tokenizer is trained
here with the ``tokenizers`` library on a small built-in corpus, and the processor is the real
``Qwen2_5_VLProcessor`` (Qwen2-VL image processor set up for small images) with the Qwen2-VL chat
template. The result loads through the real path::

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)

Builds are cached under a folder named after a hash of the whole build spec, and written
atomically (built in a temporary sibling folder, then renamed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from dbr_builder.core.fsutil import honour_umask, make_temp_dir, stable_hash, swap_dir
from dbr_builder.core.scenes import CLASSES, shape_vertices
from dbr_builder.errors import UserError
from dbr_builder.log import show_progress

log = logging.getLogger("dbr.tiny_model")

# Bump when the build recipe changes in a way the spec below does not capture.
BUILDER_VERSION = 1

# Reasoning-chain tags (DESIGN.md): each becomes one added (non-special) token so chains stay
# short and survive ``skip_special_tokens=True`` decoding.
CHAIN_TAGS = [
    "<SUMMARY>", "</SUMMARY>", "<CAPTION>", "</CAPTION>", "<REASONING>", "</REASONING>",
    "<REFLECTION>", "</REFLECTION>", "<CONCLUSION>", "</CONCLUSION>",
]  # fmt: skip

# Special tokens of the real Qwen2-VL / Qwen2.5-VL tokenizer, in their upstream order; the
# processor needs the vision ones, the chat template the im_* ones.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

# The chat template shipped with Qwen2-VL-Instruct / Qwen2.5-VL-Instruct.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Same pre-tokenisation as transformers' Qwen2Tokenizer, so the trained tokenizer behaves like
# the real one (and like it when re-created from vocab + merges).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Image processing: patch 14 x merge 2 = 28 px per visual token side. Between 112x112 and
# 224x224 resized pixels, an image gives 16..64 visual tokens (64 px -> 16, 128 px -> 25,
# 227 px (PACS) -> 64).
PATCH_SIZE = 14
MERGE_SIZE = 2
MIN_PIXELS = 112 * 112
MAX_PIXELS = 224 * 224

# Labels of the tower's pretraining corpus (``silhouette``): all six SynthShapes outlines.
PRETRAIN_SHAPES = tuple(sorted(CLASSES))

MARKER = "tiny_model.json"  # written into a build folder last: {spec_hash, spec}
TOKENIZER_VOCAB = 2048  # BPE target, before added tokens

TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "use_sliding_window": False,
    # head_dim 32 -> mrope sections (temporal, height, width) must sum to head_dim / 2.
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
}

VISION_CONFIG: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 2,
    "in_channels": 3,
    "patch_size": PATCH_SIZE,
    "spatial_merge_size": MERGE_SIZE,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "hidden_act": "silu",
}

# Named vision towers (``build_tiny_model(tower=...)``, student spec ``tiny:<tower>``): overrides of
# VISION_CONFIG plus the processor's patch size and pixel bounds. ``default`` is the tower the
# tests use (16..64 visual tokens). ``shapes`` is the one chosen for the SynthShapes shortcut
# variant on training-domain validation (docs/RESULTS.md): see SHAPES_TOWER.
TOWER_KEYS = ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "spatial_merge_size",
              "min_pixels", "max_pixels",
              "fullatt_block_indexes", "window_size", "initializer_range", "pretrain")
PRETRAIN_KEYS = ("steps", "batch_size", "lr", "seed", "image_size")
SHAPES_TOWER: dict[str, Any] = {
    # No 2x2 merge: 64 visual tokens per 64-112 px image instead of 16, so the image is a third of
    # the q_cls prompt rather than an eighth; measured to learn the shapes faster from scratch
    # (training-domain validation 42-46 % vs 39 % after 156 steps; docs/RESULTS.md).
    "spatial_merge_size": 1,
    # The paper's students are pretrained MLLMs whose vision encoder already sees; a tower trained
    # from scratch inside the fine-tune does not learn shapes within CPU minutes (45-48 % training-
    # domain validation after 300-600 steps). So this tower is pretrained once, at build time, on a
    # neutral corpus (pretrain_tower: flat silhouettes of the six SynthShapes outlines, random
    # colours, none of the four domain styles): 1200 steps -> 81 % validation after 200 fine-tune
    # steps (docs/RESULTS.md). The language model stays random: it still has to learn to use the image.
    "pretrain": {"steps": 1200, "batch_size": 32, "lr": 3e-3, "seed": 0, "image_size": 64},
}
TOWERS: dict[str, dict[str, Any]] = {
    "default": {},
    "shapes": SHAPES_TOWER,
}


def tower_settings(tower: str | dict[str, Any] = "default") -> dict[str, Any]:
    """(vision config, min_pixels, max_pixels) of a named tower or an override dict, as one dict."""
    if isinstance(tower, str):
        if tower not in TOWERS:
            raise UserError(f"tiny model tower {tower!r}: unknown; choose one of {', '.join(TOWERS)}")
        tower = TOWERS[tower]
    bad = sorted(set(tower) - set(TOWER_KEYS))
    if bad:
        raise UserError(f"tiny model tower: unknown setting(s) {', '.join(bad)}; allowed: {', '.join(TOWER_KEYS)}")
    pretrain = tower.get("pretrain")
    if pretrain is not None:
        bad = sorted(set(pretrain) - set(PRETRAIN_KEYS))
        if bad or not isinstance(pretrain.get("steps"), int) or pretrain["steps"] < 1:
            raise UserError(f"tiny model tower: `pretrain` takes {', '.join(PRETRAIN_KEYS)} with steps >= 1"
                            + (f"; unknown: {', '.join(bad)}" if bad else ""))
        pretrain = {"batch_size": 32, "lr": 3e-3, "seed": 0, "image_size": 64, **pretrain}
    skip = ("min_pixels", "max_pixels", "pretrain")
    vision = {**VISION_CONFIG, **{k: v for k, v in tower.items() if k not in skip}}
    return {"vision_config": vision, "min_pixels": int(tower.get("min_pixels", MIN_PIXELS)),
            "max_pixels": int(tower.get("max_pixels", MAX_PIXELS)), "pretrain": pretrain}


# ---------------------------------------------------------------------------------------------
# Tokenizer corpus: prose about images, the class and domain names of the DomainBed datasets and
# SynthShapes, and example reasoning chains.

DATASET_CLASSES: dict[str, list[str]] = {
    "PACS": ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"],
    "VLCS": ["bird", "car", "chair", "dog", "person"],
    "OfficeHome": [
        "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator",
        "Calendar", "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp",
        "Drill", "Eraser", "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder",
        "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade",
        "Laptop", "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan",
        "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio",
        "Refrigerator", "Ruler", "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda",
        "Speaker", "Spoon", "TV", "Table", "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam",
    ],
    "TerraIncognita": [
        "bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel",
    ],
    "SynthShapes": ["circle", "hexagon", "pentagon", "square", "star", "triangle"],
}  # fmt: skip

DATASET_DOMAINS: dict[str, list[str]] = {
    "PACS": ["art_painting", "cartoon", "photo", "sketch"],
    "VLCS": ["Caltech101", "LabelMe", "SUN09", "VOC2007"],
    "OfficeHome": ["Art", "Clipart", "Product", "Real World"],
    "TerraIncognita": ["location_100", "location_38", "location_43", "location_46"],
    "SynthShapes": ["cartoon", "painting", "photo", "sketch"],
}

_PROSE = """\
The image shows a single object in the center of the frame against a plain background.
This picture is a photo taken outdoors in daylight; the colors are natural and the edges are soft.
The drawing is a pencil sketch on white paper with thin gray lines and light shading.
The painting uses thick brush strokes, warm colors and a textured canvas.
The cartoon has flat colors, a thick black outline and no shadows.
A camera trap captured this frame at night, so the scene is dark and grainy.
Look at the shape: count the corners and the straight sides, then compare their lengths.
A triangle has three corners, a square has four equal sides, a pentagon has five corners,
a hexagon has six corners, a star has ten corners with five sharp points, and a circle has none.
The object is small, rotated slightly to the left, and placed near the top right corner.
The main color is red, with blue, green, yellow, orange, purple, black, white and gray details.
First I describe what I see, then I reason about the features that tell the classes apart.
The answer must be exactly one class name from the list of options.
Which of the following options best describes the object in the image?
Answer with the class name only. Please choose from the following options:
Question: what is the main object? Answer: the main object is shown clearly.
The style of the image is different from the training domains, but the shape is the same.
The animal has four legs, a long tail, fur, ears and eyes; it stands on the grass near trees.
The person wears a shirt and is standing next to a house with windows and a door.
In-context examples: here are a few images with their labels, then a new image to classify.
Picture 1 is a dog. Picture 2 is a horse. What is Picture 3?
"""


# Broader vocabulary so free-form captions and teacher chains do not fall back to single bytes.
_WORDS: dict[str, str] = {
    "color": "red blue green yellow orange purple pink brown black white gray grey cyan magenta "
    "beige violet turquoise gold silver dark light pale bright vivid muted colorful monochrome",
    "texture": "smooth rough striped dotted spotted checkered wooden metal plastic glass fabric "
    "leather paper stone concrete furry feathered shiny matte glossy transparent blurry sharp "
    "noisy grainy faded watercolor oil acrylic charcoal ink crayon pastel hatching stippled",
    "animal": "cat kitten puppy cow sheep goat pig deer fox wolf bear lion tiger zebra monkey "
    "mouse rat duck chicken owl eagle parrot fish shark whale turtle snake lizard frog insect "
    "butterfly spider animals mammal wildlife fur paws tail snout whiskers mane trunk tusks hooves",
    "object": "cup plate bowl glass bottle box bag ball book phone screen lamp light window door "
    "wall floor roof stairs fence road street bridge tree flower leaf branch grass sky cloud sun "
    "moon water river lake sea beach sand snow mountain hill rock field forest garden park city "
    "building tower vehicle truck bus bicycle motorcycle boat train plane wheel engine seat sofa "
    "bench desk shelf cabinet drawer clock watch camera toy doll bear instrument piano violin "
    "drum strings neck body head face eye ear nose mouth hand arm leg foot shoe hat coat shirt "
    "dress hair child man woman people crowd player",
    "scene": "indoor outdoor kitchen office bedroom living room bathroom street market farm zoo "
    "studio museum gallery stage background foreground center corner edge border left right top "
    "bottom middle front behind above below beside between inside outside near far close",
    "verb": "is are was were has have shows show appears looks seems contains holds stands sits "
    "lies runs walks flies swims jumps plays eats drinks sleeps smiles points faces carries "
    "wears covers surrounds touches crosses leans hangs rests grows shines reflects casts "
    "identify describe classify recognize compare count measure notice observe consider "
    "conclude decide verify check confirm suggests indicates implies matches differs resembles",
    "adjective": "large small big tiny huge long short tall wide narrow thick thin round "
    "square curved straight pointed flat deep shallow old young new modern ancient simple "
    "complex detailed abstract realistic stylized hand-drawn digital printed natural artificial "
    "wild domestic happy calm busy empty crowded visible hidden partial whole main typical "
    "distinctive similar different clear unclear likely unlikely possible correct wrong",
    "function": "the a an of in on at to from with without by for and or but not no yes this "
    "that these those it its they their there here which what who where when why how because "
    "so then than as if while each every some any all both either neither one two three four "
    "five six seven eight nine ten first second third last also only very more most less least",
}  # fmt: skip


def _corpus() -> list[str]:
    """Lines of text the tokenizer is trained on (deterministic)."""
    lines = _PROSE.splitlines()
    for kind, words in _WORDS.items():
        ws = words.split()
        lines.append(f"{kind.capitalize()} words: " + ", ".join(ws) + ".")
        lines.append(" ".join(w.capitalize() for w in ws))
    for dataset, classes in DATASET_CLASSES.items():
        domains = DATASET_DOMAINS[dataset]
        names = [c.replace("_", " ") for c in classes]
        lines.append(f"{dataset} classes: " + ", ".join(classes) + ".")
        lines.append(f"{dataset} domains: " + ", ".join(domains) + ".")
        for i, name in enumerate(names):
            domain = domains[i % len(domains)]
            lines.append(
                f"<SUMMARY>I will identify the object in this {domain} image.</SUMMARY>"
                f"<CAPTION>The image shows a {name} in the {domain} style.</CAPTION>"
                f"<REASONING>The shape, parts and texture match a {name}, not the other "
                f"classes of {dataset}.</REASONING>"
                f"<REFLECTION>The style is {domain}, but the features still fit a {name}."
                f"</REFLECTION><CONCLUSION>{classes[i]}</CONCLUSION>"
            )
            lines.append(f"This is a {name}. The answer is {classes[i]}.")
    return lines


# ---------------------------------------------------------------------------------------------


def build_spec(seed: int = 0, tower: str | dict[str, Any] = "default") -> dict[str, Any]:
    """The full description of a build; its hash names the cache folder."""
    from importlib.metadata import version

    t = tower_settings(tower)
    return {
        "builder_version": BUILDER_VERSION,
        # Saved-file formats change across transformers majors (v4 vs v5 tokenizer/processor files).
        "transformers_major": version("transformers").split(".")[0],
        "seed": seed,
        "text_config": TEXT_CONFIG,
        "vision_config": t["vision_config"],
        "min_pixels": t["min_pixels"],
        "max_pixels": t["max_pixels"],
        **({"pretrain": t["pretrain"]} if t["pretrain"] else {}),
        "tokenizer_vocab": TOKENIZER_VOCAB,
        "special_tokens": SPECIAL_TOKENS,
        "chain_tags": CHAIN_TAGS,
        "chat_template": CHAT_TEMPLATE,
        "corpus": stable_hash(_corpus()),
    }


def default_cache_dir() -> Path:
    """``$DBR_CACHE_DIR`` if set, else ``~/.cache/dbr-builder``."""
    env = os.environ.get("DBR_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dbr-builder"


def _train_tokenizer() -> Any:
    """Train the byte-level BPE and wrap it as a ``Qwen2Tokenizer`` with the Qwen special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=1,
        show_progress=False,
        # Every byte is in the vocabulary, so any text (any language) encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    # Chain tags are split out of the training text: they become whole added tokens below.
    text = _corpus()
    tok.train_from_iterator(text, trainer=trainer)

    vocab = tok.get_vocab()
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",  # chat models stop at the end of the assistant turn
        pad_token="<|endoftext|>",
        padding_side="left",  # decoder-only batched generation pads on the left
        model_max_length=TEXT_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        errors="replace",
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in CHAIN_TAGS])
    return tokenizer


def silhouette(rng: random.Random, size: int = 64) -> tuple[Any, int]:
    """One image of the tower's pretraining corpus and its label (index into ``PRETRAIN_SHAPES``).

    A flat silhouette of one of the six SynthShapes outlines, upright within 15 degrees, in a random
    dark colour on a random light background: no outline, texture, hatching or shading, so it is none
    of the four domain styles, and no colour says anything about the shape.
    """
    from PIL import Image, ImageDraw

    label = rng.randrange(len(PRETRAIN_SHAPES))
    shape = PRETRAIN_SHAPES[label]
    light = rng.randint(150, 255)
    bg = tuple(min(255, light + rng.randint(-40, 0)) for _ in range(3))
    ink = tuple(rng.randint(0, 110) for _ in range(3))
    r, cx, cy = rng.uniform(0.2, 0.4), rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6)
    rot = 0.0 if shape == "circle" else math.radians(rng.uniform(-15, 15))
    img = Image.new("RGB", (size, size), bg)
    ImageDraw.Draw(img).polygon([(x * size, y * size) for x, y in shape_vertices(shape, cx, cy, r, rot)], fill=ink)
    return img, label


def pretrain_tower(model: Any, processor: Any, steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                   image_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Train ``model``'s vision tower (with a throw-away linear head on its mean visual token) to
    name the silhouette of :func:`silhouette`; the language model is not touched.

    Stands in for the pretrained vision encoder of a real student (docs/RESULTS.md). AdamW with
    beta2 0.95, 10 warmup steps then cosine decay, gradient norm clipped at 1. Returns the
    accuracy over the last 50 batches and the time taken.
    """
    import torch
    from tqdm import tqdm

    visual = model.model.visual
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(PRETRAIN_SHAPES))
    params = list(visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(f"tower-pretrain-{seed}")
    correct: list[float] = []
    t0 = time.perf_counter()
    visual.train()
    for step in tqdm(range(steps), desc="pretrain tower", unit="step", disable=not show_progress(progress)):
        scale = min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        images, labels = zip(*(silhouette(rng, image_size) for _ in range(batch_size)), strict=True)
        px = processor.image_processor(images=list(images), return_tensors="pt")
        feats = model.model.get_image_features(px["pixel_values"], px["image_grid_thw"]).pooler_output
        logits = head(torch.stack([f.mean(0) for f in feats]))
        y = torch.tensor(labels)
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        correct.append(float((logits.argmax(-1) == y).float().mean()))
    visual.eval()
    tail = correct[-50:]
    return {"steps": steps, "accuracy_last_50_batches": round(sum(tail) / len(tail), 4),
            "chance": round(1 / len(PRETRAIN_SHAPES), 4), "seconds": round(time.perf_counter() - t0, 1)}


def _build_into(dest: Path, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Write tokenizer, processor and a seeded random model (``spec``'s towers, pretrained if the
    spec says so) into ``dest``; returns what the tower pretraining measured (or ``{}``)."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _train_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # Round the embedding table up to a multiple of 64 (as real checkpoints do) so that a few
    # tokens can be added later without resizing.
    vocab_size = (len(tokenizer) + 63) // 64 * 64

    vcfg = spec["vision_config"]
    pixels = {"min_pixels": spec["min_pixels"], "max_pixels": spec["max_pixels"],
              "patch_size": vcfg["patch_size"], "merge_size": vcfg["spatial_merge_size"]}
    image_processor = Qwen2VLImageProcessor(**pixels)
    video_processor = Qwen2VLVideoProcessor(**pixels)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )

    text_config = dict(
        TEXT_CONFIG,
        # a tower's init scale applies to the whole student (language model included)
        **({"initializer_range": vcfg["initializer_range"]} if "initializer_range" in vcfg else {}),
        vocab_size=vocab_size,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(vcfg, out_hidden_size=TEXT_CONFIG["hidden_size"])
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    measured: dict[str, Any] = {}
    if spec.get("pretrain"):
        log.info("pretraining the tiny student's vision tower (%d steps; cached with the build)", spec["pretrain"]["steps"])
        measured = pretrain_tower(model, processor, **spec["pretrain"])
        log.info("tower pretraining: accuracy %.2f (chance %.2f) in %.0f s", measured["accuracy_last_50_batches"],
                 measured["chance"], measured["seconds"])
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return measured


def _is_build(out: Path, spec_hash: str) -> bool:
    """Whether ``out`` holds a complete build of this spec (the marker is written last)."""
    try:
        return json.loads((out / MARKER).read_text()).get("spec_hash") == spec_hash
    except (OSError, ValueError):
        return False


def build_tiny_model(out_dir: str | Path | None = None, *, seed: int = 0, force: bool = False,
                     tower: str | dict[str, Any] = "default") -> Path:
    """Build (or reuse) the tiny Qwen2.5-VL student and return its folder.

    ``tower`` names a vision tower of ``TOWERS`` (or gives overrides). ``out_dir`` defaults to
    ``default_cache_dir()/tiny-qwen2vl-<spec hash>``. An existing complete
    build with the same spec is returned at once unless ``force``; a folder holding something else
    is rebuilt (only if it is a previous tiny-model build) or refused.
    """
    spec = build_spec(seed, tower)
    spec_hash = stable_hash(spec)[:12]
    out = Path(out_dir) if out_dir is not None else default_cache_dir() / f"tiny-qwen2vl-{spec_hash}"
    if _is_build(out, spec_hash) and not force:
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / MARKER).exists():
        raise UserError(
            f"{out} exists and is not a tiny-model build; choose an empty or new folder for the tiny model"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, out.name)  # umask modes, not mkdtemp's private 0700
    try:
        measured = _build_into(tmp, seed, spec)
        marker = {"spec_hash": spec_hash, "spec": spec, **({"pretrain_measured": measured} if measured else {})}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if _is_build(out, spec_hash) and not force:
            # A concurrent builder finished the identical build first: keep it.
            return out
        honour_umask(tmp)  # safetensors writes its file 0600
        swap_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m trainers.tiny_model [OUT_DIR] [--seed S] [--force]``: build and print the path."""
    parser = argparse.ArgumentParser(
        prog="python -m trainers.tiny_model", description="Build the tiny Qwen2.5-VL test student."
    )
    parser.add_argument("out_dir", nargs="?", default=None, help="output folder (default: cache folder)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out_dir, seed=args.seed, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
