"""End to end on a small SynthShapes: index -> oracle teacher -> filter (+ rationalization) -> publish;
the published folder loads with `datasets`, the card matches the files, reruns are byte-identical,
and the Hub push is tested at the huggingface_hub boundary (the Hub is unreachable here)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pytest

DS = "SynthShapes"


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(synth_root, tmp_path_factory):
    """A work dir through filter and publish; returns (workdir, filter summary, publish summary)."""
    from dbr_builder.stages import filter as filt
    from dbr_builder.stages import generate, publish
    from dbr_builder.stages.index import index_dataset

    wd = tmp_path_factory.mktemp("work")
    index_dataset(synth_root, DS, wd)
    generate.run({"stage": "generate", "dataset": DS, "teacher": "oracle", "n": 2, "progress": False,
                  "teacher_options": {"p_wrong": 0.4, "p_missing": 0.1}}, wd)
    fsum = filt.run({"stage": "filter", "dataset": DS, "template_collapse": {"max_images": 3},
                     "rationalize": {"enabled": True, "teacher": "oracle", "n": 2, "progress": False}}, wd)
    psum = publish.run({"stage": "publish", "datasets": [DS], "max_shard_mb": 0.02}, wd)
    return wd, fsum, psum


def test_filter_outputs_and_rationalization(built):
    from dbr_builder.core.manifest import load_manifest
    from dbr_builder.stages.filter import chains_path, rejects_path

    wd, fsum, _ = built
    man, _ = load_manifest(wd, DS)
    kept = pl.read_parquet(chains_path(wd, DS))
    rejects = pl.read_parquet(rejects_path(wd, DS))
    assert fsum["kept"] == kept.height and kept.height <= man.height
    assert fsum["rationalized"] > 0 and kept.get_column("hinted").sum() > 0  # p_wrong=0.4 leaves gaps
    assert (kept.get_column("conclusion").str.to_lowercase() == kept.get_column("class_name")).all()
    assert "wrong_label" in set(rejects.get_column("reason").to_list())
    stats = (wd / "reports" / DS / "stats.md").read_text()
    assert "| **all** | 96 |" in stats


def test_load_dataset_and_card(built):
    import datasets

    from dbr_builder.stages.publish import load_card_yaml

    wd, _, psum = built
    hub = wd / "hub"
    ds = datasets.load_dataset(str(hub), DS, split="photo")
    assert ds.num_rows == psum[DS]["photo"] > 0
    row = ds[0]
    assert row["image"].size[0] > 0 and row["chain"].startswith("<SUMMARY>")
    assert ds.features["label"].names == ["circle", "hexagon", "pentagon", "square", "star", "triangle"]
    assert ds.features["label"].int2str(row["label"]) == row["class_name"]
    card = load_card_yaml(hub)
    (cfg,) = card["configs"]
    files = sorted(p.relative_to(hub).as_posix() for p in (hub / "data" / DS).glob("*.parquet"))
    splits = {d["split"] for d in cfg["data_files"]}
    assert splits == {"cartoon", "painting", "photo", "sketch"}
    for d in cfg["data_files"]:  # every config pattern matches files, and every file is covered
        assert any(Path(f).match(d["path"]) for f in files)
    assert all(any(Path(f).match(d["path"]) for d in cfg["data_files"]) for f in files)
    assert len(files) > 4  # the tiny shard bound split domains into several shards
    assert {s["name"]: s["num_examples"] for s in card["dataset_info"][0]["splits"]} == psum[DS]
    text = (hub / "README.md").read_text()
    assert "2402.06599" in text and "Reasoning-Driven Multimodal LLM" in text and "oracle" in text


def test_publish_rerun_is_byte_identical(built):
    from dbr_builder.stages import publish

    wd, _, _ = built
    before = _digest(wd / "hub")
    publish.run({"stage": "publish", "datasets": [DS], "max_shard_mb": 0.02}, wd)
    assert _digest(wd / "hub") == before


def test_push_uses_hf_token_and_never_leaks_it(built, monkeypatch, capsys):
    """The Hub is unreachable here: HfApi's methods are replaced at the huggingface_hub boundary."""
    import huggingface_hub

    from dbr_builder.stages.publish.push import HubError, push_folder

    wd, _, _ = built
    calls: list[tuple[str, dict]] = []

    def fake_init(self, token=None, **kw):
        calls.append(("init", {"token": token}))

    for name in ("create_repo", "upload_large_folder", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name,
                            lambda self, *a, _n=name, **kw: calls.append((_n, {"args": a, **kw})), raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", fake_init)
    secret = "hf_secretTOKEN123"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubError, match="HF_TOKEN"):
        push_folder(wd / "hub", "me/dbr", private=True)
    assert calls == []
    monkeypatch.setenv("HF_TOKEN", secret)
    res = push_folder(wd / "hub", "me/dbr", private=True)
    assert calls[0] == ("init", {"token": secret})
    assert calls[1][0] == "create_repo" and calls[1][1]["private"] is True and calls[1][1]["exist_ok"] is True
    assert calls[1][1]["repo_type"] == "dataset"
    upload = calls[2]
    assert upload[0] in ("upload_large_folder", "upload_folder") and upload[1]["repo_id"] == "me/dbr"
    assert res["files"] == len([p for p in (wd / "hub").rglob("*") if p.is_file()])
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    assert all(secret not in p.read_bytes().decode("latin-1") for p in (wd / "hub").rglob("*") if p.is_file())


def test_push_dry_run_lists_files_without_calling_the_hub(built, monkeypatch, capsys):
    import huggingface_hub

    from dbr_builder.cli import main

    wd, _, _ = built
    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", lambda *a, **k: pytest.fail("dry run touched the Hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["publish", "--workdir", str(wd), "--no-write", "--push", "me/dbr", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "README.md" in out and f"data/{DS}/photo-00000-of-" in out
    assert main(["publish", "--workdir", str(wd), "--no-write", "--push", "not-a-repo"]) == 1


def test_safe_split_names_and_shard_plan():
    from dbr_builder.stages.publish import plan_shards, safe_split_name

    assert safe_split_name("Real World") == "Real_World" and safe_split_name("location_38") == "location_38"
    assert plan_shards([5, 5, 5, 20, 1], 10) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert plan_shards([], 10) == []


def test_filter_rerun_is_byte_identical(built):
    from dbr_builder.stages import filter as filt

    wd, _, _ = built
    before = _digest(wd / "chains")
    filt.run({"stage": "filter", "dataset": DS, "template_collapse": {"max_images": 3},
              "rationalize": {"enabled": True, "teacher": "oracle", "n": 2, "progress": False}}, wd)
    assert _digest(wd / "chains") == before


def test_published_rows_match_their_schema(built):
    import jsonschema
    import pyarrow.parquet as pq

    from dbr_builder.config import load_schema

    wd, _, _ = built
    validator = jsonschema.Draft202012Validator(load_schema("published_row.schema.json"))
    shard = sorted((wd / "hub" / "data" / DS).glob("*.parquet"))[0]
    rows = pq.read_table(shard).to_pylist()
    assert rows
    for row in rows:
        validator.validate(row)
