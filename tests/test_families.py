"""Conformance matrix: every supported student / teacher family through the public paths.

Each family's tiny model (trainers/families.py: real config, processor class, special tokens and
chat template) is loaded with LoRA, trained one MTCT step on a micro-batch of mixed image sizes,
used for model selection and SARR generation (n = 2), served by the hf backend (batched, n = 2,
no silent fallback) and evaluated by ``dbr eval`` in every mode, with in-context labels checked to
stay next to their images.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from dbr_builder.core import chat
from trainers.families import FAMILIES, available_families, build_family

SIZES = [(96, 96), (300, 120), (640, 480)]
CLASSES = ["dog", "horse"]
CHAIN = ("<SUMMARY>I look at it.</SUMMARY><CAPTION>A dog.</CAPTION><REASONING>Four legs.</REASONING>"
         "<REFLECTION>Fine.</REFLECTION><CONCLUSION>dog</CONCLUSION>")

# (vision encoder, projector) module name parts each family's LoRA must reach
VISION_PARTS = {
    "internvl": ("vision_tower", "multi_modal_projector"),
    "qwen2_5_vl": ("visual.blocks", "visual.merger"),
    "qwen3_vl": ("visual.blocks", "visual.merger"),
    "gemma3": ("vision_tower", None),  # Gemma3's projector is a bare weight matrix + norm: no Linear
    "idefics3": ("vision_model", "connector"),
    "llava_onevision": ("vision_tower", "multi_modal_projector"),
}

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module", params=available_families())
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    name = request.param
    return name, build_family(name, tmp_path_factory.mktemp(f"fam-{name}") / "model")


@pytest.fixture(scope="module")
def images() -> list[Any]:
    from PIL import Image

    colors = ["red", "green", "blue"]
    return [Image.new("RGB", s, c) for s, c in zip(SIZES, colors, strict=True)]


def _examples(images: list[Any]):
    from trainers.data import Example

    return [Example(image_id=f"i{k}", image=im, class_name=CLASSES[k % 2], domain=f"d{k % 2}", chain=CHAIN)
            for k, im in enumerate(images)]


def _load(path: Path, lora: bool = True):
    import torch

    from trainers.train import _cfg, load_student

    c = _cfg({"finetune": "lora" if lora else "full"})  # the train schema's defaults
    return load_student(str(path), c, torch.device("cpu"))


def test_every_family_is_registered() -> None:
    assert set(FAMILIES) == set(VISION_PARTS)
    assert {"internvl", "qwen2_5_vl", "gemma3", "idefics3", "llava_onevision"} <= set(available_families())


def test_loads_with_lora_on_vision_and_projector(family: tuple[str, Path]) -> None:
    name, path = family
    processor, model = _load(path)
    assert type(processor).__name__ == FAMILIES[name].processor_class
    assert type(model.get_base_model()).__name__ == FAMILIES[name].model_class
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    vision, projector = VISION_PARTS[name]
    assert any(vision in n for n in adapted), f"{name}: LoRA does not reach the vision encoder"
    if projector:
        assert any(projector in n for n in adapted), f"{name}: LoRA does not reach the projector"
    assert any("language_model" in n or ".layers." in n and "vision" not in n for n in adapted)


def test_samples_mask_and_single_bos(family: tuple[str, Path], images: list[Any]) -> None:
    from trainers.data import KIND_CLS, KIND_REASON, SampleEncoder

    name, path = family
    processor, _ = _load(path, lora=False)
    enc = SampleEncoder(processor, CLASSES)
    tok = processor.tokenizer
    for kind, prompt, answer in ((KIND_CLS, enc.q_cls, "dog"), (KIND_REASON, enc.q_reason, CHAIN)):
        s = enc.encode(images[2], prompt, answer, kind)
        trained = [t for t, lab in zip(s.input_ids, s.labels, strict=True) if lab != -100]
        text = tok.decode(trained, skip_special_tokens=True)
        assert text.strip() == answer, f"{name}: trained span {text!r}"
        # the trained span ends with the template's end of turn, which is what generation stops at
        assert any(t in tok.all_special_ids for t in trained[-3:]), f"{name}: no end of turn trained"
        if tok.bos_token_id is not None:
            assert s.input_ids.count(tok.bos_token_id) <= 1, f"{name}: BOS twice"
        # prompt + trained span = the prompt the model sees at inference + what it should generate
        head = enc.encode_prompt(images[2], prompt)["input_ids"][0].tolist()
        assert s.input_ids[: len(head)] == head


def test_mtct_step_on_mixed_image_sizes(family: tuple[str, Path], images: list[Any], tmp_path: Path) -> None:
    from trainers.data import SampleEncoder
    from trainers.loop import LoopConfig, train_stage

    _, path = family
    processor, model = _load(path)
    enc = SampleEncoder(processor, CLASSES, max_length=4096)
    lc = LoopConfig(batch_size=3, micro_batch_size=3, max_steps=1, epochs=1, lr=1e-3, checkpoint_every=1)
    res = train_stage(model, enc, _examples(images), lc, tmp_path / "w", log=lambda _: None)
    assert res.summary()["samples"] == 6 and res.truncated_samples == 0
    assert res.losses and res.losses[0] == res.losses[0]  # finite, not NaN


def test_truncation_is_counted_and_refused(family: tuple[str, Path], images: list[Any], tmp_path: Path) -> None:
    from trainers.data import SampleEncoder
    from trainers.loop import LoopConfig, TruncationError, train_stage

    _, path = family
    processor, model = _load(path)
    enc = SampleEncoder(processor, CLASSES)
    longest = max(len(enc.encode_prompt(im, enc.q_reason)["input_ids"][0]) for im in images)
    enc.max_length = longest + 3  # every chain is cut, class answers fit
    lc = LoopConfig(batch_size=3, micro_batch_size=3, max_steps=1, epochs=1, max_truncated_fraction=0.9)
    logs: list[str] = []
    res = train_stage(model, enc, _examples(images), lc, tmp_path / "a", log=logs.append)
    assert res.truncated_samples >= 1 and any("cut by max_length" in m for m in logs)
    assert res.summary()["truncated_samples"] == res.truncated_samples
    lc.max_truncated_fraction = 0.1
    with pytest.raises(TruncationError, match="max_truncated_fraction"):
        train_stage(model, enc, _examples(images), lc, tmp_path / "b", log=logs.append)


def test_model_selection_and_sarr_generation(family: tuple[str, Path], images: list[Any]) -> None:
    from trainers.data import SampleEncoder
    from trainers.sarr import SarrConfig, generate_with_model
    from trainers.select import predict_classes, summarize_validation

    _, path = family
    processor, model = _load(path)
    enc = SampleEncoder(processor, CLASSES)
    exs = _examples(images)
    preds = predict_classes(model, enc, exs, "scored", seq_batch=4)
    assert all(p in CLASSES for p in preds)
    direct = predict_classes(model, enc, exs, "direct", max_new_tokens=3, batch_size=3)
    assert len(direct) == 3
    val = summarize_validation(exs, preds)
    assert val["accuracy"] == pytest.approx(sum(val["per_domain"].values()) / 2)
    sc = SarrConfig(n=2, max_new_tokens=4, temperature=0.7, batch_size=3)
    out = generate_with_model(model, enc, exs, sc, seed=0)
    assert [len(x) for x in out] == [2, 2, 2]


def test_hf_backend_batches_without_fallback(family: tuple[str, Path], images: list[Any], tmp_path: Path) -> None:
    from dbr_builder.backends import Request, make_backend

    name, path = family
    paths = []
    for k, im in enumerate(images):
        paths.append(tmp_path / f"{k}.png")
        im.save(paths[-1])
    backend = make_backend(f"hf:{path}", batch_size=6, dtype="float32")
    calls: list[int] = []
    run_chunk = backend._run_chunk

    def counting(chunk):
        calls.append(len(chunk))
        return run_chunk(chunk)

    backend._run_chunk = counting
    reqs = [Request(key=f"k{k}", content=[{"type": "image", "path": str(p)}, {"type": "text", "text": "What is it?"}],
                    n=2, max_new_tokens=3, temperature=0.7, seed=k) for k, p in enumerate(paths)]
    res = backend.generate(reqs)
    assert [r.error for r in res] == [None] * 3 and all(len(r.texts) == 2 for r in res)
    assert calls == [3], f"{name}: requests were not batched ({calls})"  # 6 sequences = 3 requests x n=2
    assert backend.fallbacks == 0
    scores = backend.score(reqs[:1], CLASSES)
    assert len(scores[0]) == 2 and all(s < 0 for s in scores[0])


def test_hf_backend_fallback_is_counted_and_logged(family: tuple[str, Path], tmp_path: Path, caplog) -> None:
    from PIL import Image

    from dbr_builder.backends import Request, make_backend

    _, path = family
    good = tmp_path / "g.png"
    Image.new("RGB", (64, 64), "red").save(good)
    backend = make_backend(f"hf:{path}", batch_size=4, dtype="float32")
    reqs = [Request(key="ok", content=[{"type": "image", "path": str(good)}, {"type": "text", "text": "Hi"}],
                    max_new_tokens=2, temperature=0.0),
            Request(key="bad", content=[{"type": "image", "path": str(tmp_path / "missing.png")},
                                        {"type": "text", "text": "Hi"}], max_new_tokens=2, temperature=0.0)]
    with caplog.at_level("WARNING"):
        res = backend.generate(reqs)
    assert res[0].error is None and res[1].error
    assert backend.fallbacks == 1 and any("retrying one by one" in r.message for r in caplog.records)


def test_icl_labels_stay_next_to_their_images(family: tuple[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    from dbr_builder.backends import Request, make_backend
    from dbr_builder.stages.evaluate.icl import icl_content

    name, path = family
    files = []
    for k in range(3):
        files.append(str(tmp_path / f"{k}.png"))
        Image.new("RGB", (64, 64), "red").save(files[-1])
    content = icl_content([(files[0], "dog"), (files[1], "horse")], files[2], CLASSES)
    backend = make_backend(f"hf:{path}", dtype="float32")
    text, imgs = backend._prompt(Request(key="q", content=content))
    assert len(imgs) == 3
    ph = chat.image_placeholder(backend.processor).strip()
    pos_img = [m.start() for m in re.finditer(re.escape(ph), text)]
    pos_lab = [text.index("Answer Choice: dog"), text.index("Answer Choice: horse")]
    assert len(pos_img) == 3, f"{name}: {text!r}"
    assert pos_img[0] < pos_lab[0] < pos_img[1] < pos_lab[1] < pos_img[2], f"{name}: labels moved: {text!r}"
    res = backend.generate([Request(key="q", content=content, max_new_tokens=2, temperature=0.0)])
    assert res[0].error is None


@pytest.fixture(scope="module")
def eval_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DomainBed tree (2 domains x 2 classes x 3 images of mixed sizes), indexed."""
    from PIL import Image

    from dbr_builder.stages.index import index_dataset

    root = tmp_path_factory.mktemp("famraw")
    for d, dom in enumerate(["art", "photo"]):
        for c, cls in enumerate(CLASSES):
            for k, size in enumerate(SIZES):
                p = root / "Mini" / dom / cls / f"{k}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", size, (40 * d + 20 * k, 100 * c, 50)).save(p)
    w = tmp_path_factory.mktemp("famwork")
    index_dataset(root, "Mini", w, trial_seed=0, progress=False)
    return w


def test_dbr_eval_every_mode(family: tuple[str, Path], eval_workdir: Path) -> None:
    from dbr_builder.stages import evaluate

    name, path = family
    cfg = {"stage": "eval", "run": f"fam-{name}", "datasets": ["Mini"], "heldout_domains": ["photo"],
           "students": False, "test_split": "all",
           "models": [{"name": name, "spec": f"hf:{path}", "modes": ["scored", "direct", "reasoning", "choice", "icl"],
                       "shots": [2], "options": {"dtype": "float32", "batch_size": 8}}],
           "limit": 3, "batch_size": 3, "max_new_tokens": 4}
    s = evaluate.run(cfg, eval_workdir, progress=False, log=lambda _: None)
    assert s["jobs"] == 5 and s["errors"] == 0 and s["records"] == 15
    preds = sorted((eval_workdir / "runs" / f"fam-{name}" / "eval" / "predictions").glob("*__icl2__*.jsonl"))
    recs = [json.loads(x) for x in preds[0].read_text().splitlines()]
    assert all(len(r["examples"]) == 2 and r["prompt_id"] for r in recs)
