"""transformers backend with the tiny Qwen2.5-VL student: batching, n samples, mixed sizes, ICL, adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dbr_builder.backends import BackendError, Request, make_backend


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("imgs")
    out = []
    for i, (size, fmt, mode) in enumerate([((64, 48), "PNG", "RGBA"), ((227, 227), "JPEG", "RGB"), ((300, 120), "PNG", "L")]):
        p = d / f"i{i}.{fmt.lower()}"
        Image.new(mode, size, 90 + 40 * i).save(p, format=fmt)
        out.append(str(p))
    return out


@pytest.fixture(scope="module")
def backend(tiny_model_path: Path):
    return make_backend(f"hf:{tiny_model_path}", batch_size=4, device="cpu")


def _req(key: str, img: str, n: int = 1, temperature: float = 0.0, seed: int | None = None) -> Request:
    return Request(key, [{"type": "text", "text": "Which shape?"}, {"type": "image", "path": img}],
                   n=n, max_new_tokens=6, temperature=temperature, seed=seed)


def test_batched_n_samples_mixed_sizes(backend, images) -> None:
    reqs = [_req(f"k{i}", img, n=2, temperature=1.0, seed=3) for i, img in enumerate(images)]
    res = backend.generate(reqs)  # batch_size 4 sequences / n=2 -> chunks of 2 requests
    assert [r.key for r in res] == ["k0", "k1", "k2"]
    for r in res:
        assert r.error is None and len(r.texts) == 2 and len(r.finish_reasons) == 2
        assert set(r.finish_reasons) <= {"stop", "length"} and 0 < r.out_tokens <= 12
    again = backend.generate(reqs)
    assert [r.texts for r in again] == [r.texts for r in res]  # seeded sampling is reproducible


def test_greedy_batched_equals_single(backend, images) -> None:
    batched = backend.generate([_req("a", images[0]), _req("b", images[1]), _req("c", images[2])])
    single = [backend.generate([_req(k, img)])[0] for k, img in zip("abc", images, strict=True)]
    assert [r.texts for r in batched] == [r.texts for r in single]


def test_interleaved_images_for_in_context_learning(backend, images) -> None:
    content = [{"type": "text", "text": "Example:"}, {"type": "image", "path": images[0]},
               {"type": "text", "text": "circle. Now:"}, {"type": "image", "path": images[1]},
               {"type": "text", "text": "and"}, {"type": "image", "path": images[2]}]
    [r] = backend.generate([Request("icl", content, max_new_tokens=4, temperature=0.0)])
    assert r.error is None and len(r.texts) == 1


def test_bad_image_fails_only_its_request(backend, images, tmp_path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    res = backend.generate([_req("ok", images[0]), _req("bad", str(bad))])
    assert res[0].error is None and res[1].error and res[1].texts == []


def test_adapter_loads_and_changes_the_model(tiny_model_path: Path, tmp_path: Path, backend, images) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_path)
    cfg = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(tmp_path / "adapter")
    tuned = make_backend(f"hf:{tiny_model_path},adapter={tmp_path / 'adapter'}", device="cpu")
    assert tuned.model == f"{tiny_model_path}+{tmp_path / 'adapter'}"
    reqs = [_req(str(i), img) for i, img in enumerate(images)]
    reqs = [Request(r.key, r.content, max_new_tokens=12, temperature=0.0) for r in reqs]
    assert [r.texts for r in tuned.generate(reqs)] != [r.texts for r in backend.generate(reqs)]
    with pytest.raises(BackendError, match="adapter_config.json"):
        make_backend(f"hf:{tiny_model_path}", adapter=str(tmp_path))
