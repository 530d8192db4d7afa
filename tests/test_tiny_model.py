"""The tiny Qwen2.5-VL student: real Auto-class loading, generation, tokenizer, caching, LoRA."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from dbr_builder.errors import UserError
from trainers.tiny_model import CHAIN_TAGS, SPECIAL_TOKENS, build_tiny_model, main


@pytest.fixture(scope="module")
def loaded(tiny_model_path: Path):
    """(processor, model) loaded through the public Auto classes, as every consumer does."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_path)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path).eval()
    return processor, model


def _image(w: int, h: int, color: str = "red"):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=color)
    return img


def _messages(images: list, text: str) -> list[dict]:
    """One user turn: the images first, then the question."""
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def _encode(processor, conversations: list[list[dict]]):
    return processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )


def _weights_hash(path: Path) -> str:
    """sha256 over every tensor's name and bytes, in name order."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(path / "model.safetensors")
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_loads_through_auto_classes_as_qwen2_5_vl(loaded) -> None:
    processor, model = loaded
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert processor.tokenizer.padding_side == "left"
    assert processor.tokenizer.pad_token == "<|endoftext|>"
    # Tiny: well under 2M parameters, 2 text layers, 2 vision blocks.
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert model.config.text_config.num_hidden_layers == 2
    assert model.config.vision_config.depth == 2
    assert model.config.text_config.vocab_size >= len(processor.tokenizer)


def test_single_image_generate(loaded) -> None:
    processor, model = loaded
    inputs = _encode(processor, [_messages([_image(96, 96)], "What shape is in the image?")])
    prompt = processor.tokenizer.decode(inputs["input_ids"][0])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert 1 <= new.numel() <= 6
    assert isinstance(processor.decode(new, skip_special_tokens=True), str)


def test_batched_left_padded_generation_equals_one_by_one(loaded) -> None:
    """Mixed image sizes and counts in one left-padded batch give the same greedy tokens as alone."""
    processor, model = loaded
    convs = [
        _messages([_image(64, 64)], "Which class?"),
        _messages([_image(128, 96, "blue"), _image(227, 227, "green")], "Compare these two pictures please."),
        _messages([_image(100, 140, "purple")], "Describe it."),
    ]
    batch = _encode(processor, convs)
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padding
    n = 5
    out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    width = batch["input_ids"].shape[1]
    for i, conv in enumerate(convs):
        alone = _encode(processor, [conv])
        ref = model.generate(**alone, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out[i, width:].tolist() == ref[0, alone["input_ids"].shape[1] :].tolist()


def test_interleaved_images_and_image_token_counts(loaded) -> None:
    """In-context style prompt: each image's placeholder run matches its grid, 16..64 tokens each."""
    import torch

    processor, model = loaded
    tok = processor.tokenizer
    sizes = [(64, 64), (128, 128), (227, 227), (80, 200)]
    content = []
    for k, (w, h) in enumerate(sizes):
        content += [{"type": "text", "text": f"Picture {k + 1}:"}, {"type": "image", "image": _image(w, h)}]
        content += [{"type": "text", "text": "This is a circle." if k < 3 else "What is it?"}]
    inputs = _encode(processor, [[{"role": "user", "content": content}]])
    grid = inputs["image_grid_thw"]
    assert grid.shape == (len(sizes), 3)
    merge = processor.image_processor.merge_size
    per_image = (grid.prod(-1) // merge**2).tolist()
    ids = inputs["input_ids"][0].tolist()
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    start_id = tok.convert_tokens_to_ids("<|vision_start|>")
    # Runs of <|image_pad|> after each <|vision_start|>, in order.
    runs = []
    for i, t in enumerate(ids):
        if t == start_id:
            j = i + 1
            while ids[j] == image_id:
                j += 1
            runs.append(j - i - 1)
    assert runs == per_image
    assert per_image[0] == 16 and per_image[2] == 64  # 64 px -> 16 tokens, PACS 227 px -> 64
    assert all(16 <= n <= 64 for n in per_image)
    expected = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])
    assert expected["num_image_tokens"] == per_image
    # The vision tower emits exactly that many embeddings, so the model accepts the prompt.
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], grid)
    feats = getattr(feats, "pooler_output", feats)
    assert [f.shape[0] for f in feats] == per_image
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_tokenizer_chain_tags_and_round_trip(loaded) -> None:
    tok = loaded[0].tokenizer
    assert 2000 <= len(tok) <= 4096
    for tag in CHAIN_TAGS + SPECIAL_TOKENS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
    chain = (
        "<SUMMARY>I will classify the sketch.</SUMMARY><CAPTION>A hexagon drawn in pencil.</CAPTION>"
        "<REASONING>It has six corners.</REASONING><REFLECTION>The style does not matter.</REFLECTION>"
        "<CONCLUSION>hexagon</CONCLUSION>"
    )
    ids = tok.encode(chain, add_special_tokens=False)
    assert sum(i in ids for i in tok.convert_tokens_to_ids(CHAIN_TAGS)) == len(CHAIN_TAGS)
    # Chain tags are not special: they survive skip_special_tokens decoding.
    assert tok.decode(ids, skip_special_tokens=True) == chain
    for text in [chain, "Real World  photo\n\tÜmlaut 日本語 🙂 123.45", " leading space, Alarm_Clock"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # Trained vocabulary covers the domain words: common class names are short.
    for word in [" giraffe", " hexagon", " elephant", " pentagon"]:
        assert len(tok.encode(word, add_special_tokens=False)) <= 2, word


def test_build_is_cached_and_deterministic(tiny_model_path: Path, tmp_path: Path, monkeypatch) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_path.iterdir()}
    t0 = time.perf_counter()
    again = build_tiny_model(tiny_model_path)
    assert again == tiny_model_path
    assert time.perf_counter() - t0 < 0.5
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_path.iterdir()} == before

    same_seed = build_tiny_model(tmp_path / "seed0")
    assert _weights_hash(same_seed) == _weights_hash(tiny_model_path)
    assert (same_seed / "tokenizer.json").read_bytes() == (tiny_model_path / "tokenizer.json").read_bytes()

    # Default location: $DBR_CACHE_DIR/tiny-qwen2vl-<hash>, distinct per seed.
    monkeypatch.setenv("DBR_CACHE_DIR", str(tmp_path / "cache"))
    other = build_tiny_model(seed=1)
    assert other.parent == tmp_path / "cache" and other.name.startswith("tiny-qwen2vl-")
    assert _weights_hash(other) != _weights_hash(tiny_model_path)
    assert build_tiny_model(seed=1) == other
    assert build_tiny_model(seed=0) != other
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a tiny-model build"):
        build_tiny_model(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_prints_path(tiny_model_path: Path, capsys) -> None:
    assert main([str(tiny_model_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_model_path)


def test_lora_wraps_vision_and_language_linears(loaded) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    processor, model = loaded
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    try:
        lora = [n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")]
        assert any(".visual." in n for n in lora)
        assert any(".language_model." in n for n in lora)
        assert not any("lm_head" in n for n in lora)  # all-linear leaves the output head alone
        batch = _encode(processor, [_messages([_image(64, 64)], "Which class?")])
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = peft_model(**batch, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        assert grads and all("lora_" in n for n in grads)
        # lora_B starts at zero, so the first step moves B (A gets gradient only once B != 0).
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    finally:
        peft_model.unload()  # the module-scoped model is shared with other tests


def test_tower_pretraining_corpus_and_settings() -> None:
    """The silhouette corpus is deterministic, covers all six outlines, and carries no colour cue;
    bad `pretrain` settings are refused with the allowed keys named."""
    import random

    from trainers.tiny_model import PRETRAIN_SHAPES, build_spec, silhouette, tower_settings

    a = [silhouette(random.Random(7)) for _ in range(3)]
    b = [silhouette(random.Random(7)) for _ in range(3)]
    assert [x[1] for x in a] == [x[1] for x in b] and a[0][0].tobytes() == b[0][0].tobytes()
    rng = random.Random(0)
    samples = [silhouette(rng, 32) for _ in range(240)]
    assert {label for _, label in samples} == set(range(len(PRETRAIN_SHAPES))) and len(PRETRAIN_SHAPES) == 6
    # The corner pixel is the background; its mean colour must not tell the shapes apart.
    means = {}
    for img, label in samples:
        means.setdefault(label, []).append(sum(img.getpixel((0, 0))) / 3)
    per_class = [sum(v) / len(v) for v in means.values()]
    assert max(per_class) - min(per_class) < 25, per_class

    assert tower_settings("shapes")["pretrain"]["steps"] == 1200
    assert tower_settings("default")["pretrain"] is None
    assert "pretrain" in build_spec(0, "shapes") and "pretrain" not in build_spec(0, "default")
    with pytest.raises(UserError, match="steps >= 1"):
        tower_settings({"pretrain": {"steps": 0}})
    with pytest.raises(UserError, match="unknown: epochs"):
        tower_settings({"pretrain": {"steps": 5, "epochs": 2}})


def test_tower_pretraining_moves_only_the_tower(tmp_path: Path) -> None:
    """A few pretraining steps change the vision tower, leave the language model bit-identical, and
    the measured accuracy is recorded in the build marker."""
    import json

    import torch
    from transformers import AutoModelForImageTextToText

    from trainers.tiny_model import MARKER

    plain = build_tiny_model(tmp_path / "plain")
    pre = build_tiny_model(tmp_path / "pre", tower={"pretrain": {"steps": 3, "batch_size": 4}})
    m0 = AutoModelForImageTextToText.from_pretrained(plain)
    m1 = AutoModelForImageTextToText.from_pretrained(pre)
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert s0.keys() == s1.keys()
    changed = {k for k in s0 if not torch.equal(s0[k], s1[k])}
    assert changed and all(".visual." in k or k.startswith("visual.") or "visual" in k for k in changed), sorted(changed)[:5]
    measured = json.loads((pre / MARKER).read_text())["pretrain_measured"]
    assert measured["steps"] == 3 and 0.0 <= measured["accuracy_last_50_batches"] <= 1.0
