"""Protocol fidelity (DESIGN.md, DomainBed): SARR keeps only correct self chains by default, DomainBed's
training-domain validation, per-trial-seed splits, the test domain's `in` split, the zero-shot prompt,
and processor settings that travel with the student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dbr_builder.core import prompts
from dbr_builder.core.manifest import load_manifest, load_quarantine, manifest_splits, splits_for_seed
from trainers.data import Example
from trainers.sarr import SarrConfig, self_label
from trainers.select import summarize_validation

CHAIN = ("<SUMMARY>s</SUMMARY><CAPTION>c</CAPTION><REASONING>r</REASONING><REFLECTION>f</REFLECTION>"
         "<CONCLUSION>{}</CONCLUSION>")


def test_sarr_drops_images_without_a_correct_self_chain_by_default() -> None:
    assert SarrConfig().no_correct == "drop"
    exs = [Example(f"i{k}", None, "dog" if k % 2 else "cat", chain="teacher chain") for k in range(4)]
    texts = [[CHAIN.format(ex.class_name if k < 2 else "bird")] for k, ex in enumerate(exs)]
    kept, stats, _ = self_label(exs, ["cat", "dog", "bird"], lambda e: texts, SarrConfig())
    assert [e.image_id for e in kept] == ["i0", "i1"] and all(e.chain_source == "self" for e in kept)
    assert stats["teacher_chains"] == 0 and stats["self_chains"] == 2
    kept, stats, _ = self_label(exs, ["cat", "dog", "bird"], lambda e: texts, SarrConfig(no_correct="keep_teacher"))
    assert len(kept) == 4 and stats["teacher_chains"] == 2


def test_validation_is_the_mean_of_per_domain_accuracies() -> None:
    exs = [Example(f"a{k}", None, "dog", domain="A") for k in range(8)] + [Example("b0", None, "dog", domain="B")]
    preds = ["dog"] * 8 + ["cat"]
    v = summarize_validation(exs, preds)
    assert v["accuracy"] == pytest.approx(0.5)  # mean(1.0, 0.0), not the pooled 8/9
    assert v["pooled_accuracy"] == pytest.approx(8 / 9) and v["per_domain"] == {"A": 1.0, "B": 0.0}


@pytest.fixture(scope="module")
def manifests(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from dbr_builder.stages.index import index_dataset

    w0, w1 = tmp_path_factory.mktemp("m0"), tmp_path_factory.mktemp("m1")
    index_dataset(synth_root, "SynthShapes", w0, trial_seed=0, progress=False)
    index_dataset(synth_root, "SynthShapes", w1, trial_seed=1, progress=False)
    return w0, w1


def test_trial_seeds_resplit_like_domainbed(manifests: tuple[Path, Path]) -> None:
    w0, w1 = manifests
    rows0 = load_manifest(w0, "SynthShapes")[0].to_dicts()
    rows1 = load_manifest(w1, "SynthShapes")[0].to_dicts()
    got = splits_for_seed(rows0, load_quarantine(w0, "SynthShapes"), 1)
    assert got == [r["split"] for r in rows1]  # what `dbr index --trial-seed 1` computes
    assert got != [r["split"] for r in rows0]
    by_key = manifest_splits(w0, "SynthShapes", 1)
    assert sorted(s for v in by_key.values() for s in v) == sorted(got)


def test_train_resplits_examples_per_trial_seed(manifests: tuple[Path, Path]) -> None:
    from trainers.train import resplit

    w0, w1 = manifests
    rows0 = load_manifest(w0, "SynthShapes")[0].to_dicts()
    rows1 = {(r["domain"], r["image_id"]): r["split"] for r in load_manifest(w1, "SynthShapes")[0].to_dicts()}
    by_domain: dict[str, list[Example]] = {}
    for r in rows0:
        by_domain.setdefault(r["domain"], []).append(
            Example(r["image_id"], None, r["class_name"], domain=r["domain"], dg_split=r["split"]))
    same = resplit(by_domain, {"resplit": True}, w0, "SynthShapes", 0)
    assert same is by_domain
    new = resplit(by_domain, {"resplit": True}, w0, "SynthShapes", 1)
    assert all(ex.dg_split == rows1[(ex.domain, ex.image_id)] for exs in new.values() for ex in exs)
    assert resplit(by_domain, {"resplit": False}, w0, "SynthShapes", 1) is by_domain


def test_eval_reads_the_test_domains_in_split_of_the_trial_seed(manifests: tuple[Path, Path]) -> None:
    from dbr_builder.stages.evaluate import DatasetData, Job, _eval_items, _load_datasets

    w0, w1 = manifests
    data: DatasetData = _load_datasets(w0, ["SynthShapes"])["SynthShapes"]
    job = Job("m", "hf:x", None, "direct", 0, "SynthShapes", "photo", 1)
    items = _eval_items(job, data, None)
    expect = [r["image_id"] for r in load_manifest(w1, "SynthShapes")[0].to_dicts()
              if r["domain"] == "photo" and r["split"] == "in"]
    assert [r["image_id"] for r in items] == expect
    assert len(_eval_items(job, data, None, "all")) > len(items) > 0


def test_zero_shot_prompt_follows_the_papers_evaluation_code() -> None:
    text = prompts.render("zeroshot_choice", choices="dog, horse")
    for part in ("using the specified format", "What is in this image?", "Choices: [dog, horse]",
                 "---BEGIN FORMAT TEMPLATE---", "Answer Choice: [", "Confidence Score: [", "Reasoning: [",
                 "---END FORMAT TEMPLATE---", "Do not deviate"):
        assert part in text, part
    ex = prompts.render("icl_example", answer="dog", choices="dog, horse", index=1, num_examples=2)
    assert "the image above" in ex and "Answer Choice: dog" in ex and "Confidence" not in ex


def test_students_are_evaluated_with_their_trained_processor_settings(tmp_path: Path) -> None:
    from dbr_builder.stages import evaluate

    final = tmp_path / "runs" / "r" / "Mini" / "photo" / "seed0" / "final"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text("{}")
    info = {"base_model": "/models/internvl", "dataset": "Mini", "heldout_domain": "photo", "trial_seed": 0,
            "classes": ["dog"], "adapter": str(final), "processor_kwargs": {"crop_to_patches": False}}
    (final / "student.json").write_text(json.dumps(info))
    jobs = evaluate.plan_jobs({"run": "r", "student_options": {"dtype": "float32"}}, tmp_path, {"Mini": ["photo"]})
    assert {j.mode for j in jobs} == {"scored", "direct", "reasoning"}
    assert all(json.loads(j.options) == {"dtype": "float32", "processor_kwargs": {"crop_to_patches": False}}
               for j in jobs)
    import argparse

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    cfg = evaluate.config_from_args(parser.parse_args(["--adapter", str(final)]))
    assert cfg["models"][0]["options"] == {"processor_kwargs": {"crop_to_patches": False}}


def test_internvl_defaults_to_one_tile_and_backends_apply_processor_settings(tmp_path: Path) -> None:
    from PIL import Image

    from dbr_builder.backends import Request, make_backend
    from trainers.families import build_family
    from trainers.train import effective_processor_kwargs

    path = build_family("internvl", tmp_path / "internvl")
    img = tmp_path / "big.png"
    Image.new("RGB", (640, 480), "blue").save(img)
    req = Request(key="q", content=[{"type": "image", "path": str(img)}, {"type": "text", "text": "What?"}])
    tiled = make_backend(f"hf:{path}", dtype="float32")
    assert tiled._inputs([req])["pixel_values"].shape[0] > 1  # the processor's own default: many tiles
    kw = effective_processor_kwargs(tiled.processor, {})
    assert kw == {"crop_to_patches": False}
    assert effective_processor_kwargs(tiled.processor, {"crop_to_patches": True}) == {"crop_to_patches": True}
    one = make_backend(f"hf:{path}", dtype="float32", processor_kwargs=kw)
    assert one._inputs([req])["pixel_values"].shape[0] == 1
    inline = make_backend(f'hf:{path},processor_kwargs={{"crop_to_patches":false}}', dtype="float32")
    assert inline.processor_kwargs == kw
