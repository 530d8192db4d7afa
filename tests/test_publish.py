"""End to end on a small SynthShapes: index -> oracle teacher -> filter (+ rationalization) -> publish;
the published folder loads with `datasets`, the card matches the files, reruns are byte-identical,
and the Hub push is tested at the huggingface_hub boundary (the Hub is unreachable here)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pytest
from hubfake import FakeHub, no_saved_login_fixture  # noqa: F401  (the no_saved_login fixture)

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


def test_push_is_one_commit_with_every_addition_and_deletion(built, monkeypatch, capsys, no_saved_login):
    """Mocked at HfApi.create_commit: one commit adds every local file and deletes stale remote shards."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    from dbr_builder.stages.publish.push import HubError, push_folder

    wd, _, _ = built
    hub = wd / "hub"
    local = sorted(p.relative_to(hub).as_posix() for p in hub.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(hub).parts))
    stale = [f"data/{DS}/photo-00007-of-00009.parquet", "data/PACS/photo-00000-of-00001.parquet"]
    fake = FakeHub(monkeypatch, remote=[".gitattributes", "README.md", "extra/notes.md", local[-1], *stale])
    with pytest.raises(HubError, match="hf auth login"):
        push_folder(hub, "me/dbr", private=True)
    assert fake.calls == []  # no token: nothing touched the Hub
    secret = "hf_secretTOKEN123"
    monkeypatch.setenv("HF_TOKEN", secret)
    res = push_folder(hub, "me/dbr", private=True, tag="v1.0")
    assert fake.named("init")[0][1] == {"token": secret}
    (_, kw), = fake.named("create_repo")
    assert kw["private"] is True and kw["exist_ok"] is True and kw["repo_type"] == "dataset"
    (args, kw), = fake.named("create_commit")  # exactly one commit
    ops = args[1]
    adds = sorted(o.path_in_repo for o in ops if isinstance(o, CommitOperationAdd))
    deletes = sorted(o.path_in_repo for o in ops if isinstance(o, CommitOperationDelete))
    assert adds == local  # every local file, README.md included
    assert deletes == sorted(stale)  # only stale files under data/; .gitattributes and extra/ stay
    assert kw["repo_type"] == "dataset" and kw["parent_commit"] == "a" * 40 and kw["create_pr"] is False
    assert all(Path(o.path_or_fileobj).is_relative_to(hub) for o in ops if isinstance(o, CommitOperationAdd))
    (_, kw), = fake.named("create_tag")
    assert kw["tag"] == "v1.0" and kw["revision"] == "c" * 40
    assert res["commit"] == "c" * 40 and res["files"] == len(local)
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    assert all(secret not in p.read_bytes().decode("latin-1") for p in hub.rglob("*") if p.is_file())


def test_push_branch_and_pull_request(built, monkeypatch, no_saved_login):
    from dbr_builder.stages.publish.push import HubError, push_folder

    wd, _, _ = built
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    fake = FakeHub(monkeypatch)
    push_folder(wd / "hub", "me/dbr", revision="v2-candidate", log=lambda m: None)
    assert fake.named("create_branch")[0][1]["branch"] == "v2-candidate"
    assert fake.named("create_commit")[0][1]["revision"] == "v2-candidate"
    fake = FakeHub(monkeypatch)
    res = push_folder(wd / "hub", "me/dbr", create_pr=True, log=lambda m: None)
    (_, kw), = fake.named("create_commit")
    assert kw["create_pr"] is True and res["pr_url"].endswith("/discussions/1")
    assert not fake.named("create_branch") and not fake.named("create_tag")
    with pytest.raises(HubError, match="--tag and --create-pr"):
        push_folder(wd / "hub", "me/dbr", create_pr=True, tag="v1")


def test_token_from_saved_login(built, monkeypatch, no_saved_login):
    """`hf auth login` saves the token to a file: get_token() finds it without HF_TOKEN."""
    from dbr_builder.stages.publish.push import get_token, push_folder

    assert get_token(required=False) is None
    no_saved_login.write_text("hf_savedLOGIN\n")
    assert get_token() == "hf_savedLOGIN"
    fake = FakeHub(monkeypatch)
    push_folder(built[0] / "hub", "me/dbr", log=lambda m: None)
    assert fake.named("init")[0][1] == {"token": "hf_savedLOGIN"}
    monkeypatch.setenv("HF_TOKEN", "hf_fromENV")  # the environment wins over the saved login
    assert get_token() == "hf_fromENV"


def test_push_dry_run_lists_the_exact_operations_and_writes_nothing(built, monkeypatch, capsys, no_saved_login):
    from dbr_builder.cli import main

    wd, _, _ = built
    fake = FakeHub(monkeypatch, remote=["README.md", f"data/{DS}/old-00000-of-00001.parquet"])
    assert main(["publish", "--workdir", str(wd), "--no-write", "--push", "me/dbr", "--dry-run", "--tag", "v1"]) == 0
    out = capsys.readouterr().out
    assert "add    README.md" in out and f"add    data/{DS}/photo-00000-of-" in out
    assert f"delete data/{DS}/old-00000-of-00001.parquet" in out and "1 deletions" in out and "tag v1" in out
    assert {n for n, _, _ in fake.calls} <= {"init", "repo_info"}  # read only, no token needed
    assert main(["publish", "--workdir", str(wd), "--no-write", "--push", "not-a-repo"]) == 1
    assert main(["publish", "--workdir", str(wd), "--no-write", "--tag", "v1"]) == 1  # --tag needs --push


def test_parquet_is_written_like_the_ecosystem(built):
    """Viewer-sized row groups, a page index, CDC where pyarrow has it, image bytes exactly as read."""
    import hashlib

    import pyarrow.parquet as pq

    from dbr_builder.core.manifest import load_manifest
    from dbr_builder.stages.publish import ROW_GROUP_ROWS, cdc_supported

    wd, _, _ = built
    _, meta = load_manifest(wd, DS)
    shard = sorted((wd / "hub" / "data" / DS).glob("photo-*.parquet"))[0]
    f = pq.ParquetFile(shard)
    md = f.metadata
    assert all(md.row_group(i).num_rows <= ROW_GROUP_ROWS for i in range(md.num_row_groups))
    names = [md.row_group(0).column(j).path_in_schema for j in range(md.num_columns)]
    img = md.row_group(0).column(names.index("image.bytes"))
    assert img.compression == "UNCOMPRESSED" and md.row_group(0).column(names.index("chain")).compression == "ZSTD"
    assert img.has_offset_index  # the page index: page locations for every column ...
    assert md.row_group(0).column(names.index("label")).has_column_index  # ... and min/max where they help
    kv = md.metadata or {}
    assert (b"content_defined_chunking" in kv) == cdc_supported()
    rows = f.read().to_pylist()
    for r in rows:  # no re-encoding: the stored bytes are the file's bytes
        assert hashlib.sha256(r["image"]["bytes"]).hexdigest() == r["image_id"]


def test_card_has_licences_provenance_and_statistics(built):
    from dbr_builder.core.prompts import template
    from dbr_builder.stages.publish import load_card_yaml

    wd, _, _ = built
    text = (wd / "hub" / "README.md").read_text()
    card = load_card_yaml(wd / "hub")
    assert card["license"] == "apache-2.0" and card["dbr_builder"]["mode"] == "full"  # SynthShapes' own licence
    sha = hashlib.sha256(template("teacher").encode()).hexdigest()
    assert f"sha256 `{sha}`" in text and template("teacher").splitlines()[0] in text  # prompt text + hash
    assert "## Provenance" in text and "dbr-builder 0.1.0" in text and "oracle(seed=0" in text  # teacher spec
    assert "max_repeat_fraction" in text and "template_max_images: 3" in text  # the effective filter rules
    assert "Coverage by DomainBed split" in text and "Chain length" in text and "wrong_label" in text
    assert "| SynthShapes | apache-2.0 |" in text and "redistribution" in text


def test_card_per_source_licences_differ(tmp_path):
    from dbr_builder.stages.publish.card import card_yaml, load_sources, render_card

    src = load_sources()
    assert {"PACS", "VLCS", "OfficeHome", "TerraIncognita"} <= set(src)
    assert src["TerraIncognita"]["licence"] == "cdla-permissive-1.0" and src["OfficeHome"]["redistribution"] == "restricted"
    assert len({src[d]["terms"] for d in ("PACS", "VLCS", "OfficeHome", "TerraIncognita")}) == 4
    stats = {"coverage": {"by_domain": [], "overall": {"images": 0, "covered": 0, "hinted": 0, "coverage": None}},
             "acceptance_by_domain": [], "teacher_zero_shot": {"by_domain": [], "overall": None},
             "candidates": {"acceptance": None}}
    infos = {ds: {"classes": ["a", "b"], "splits": [{"split": "x", "num_examples": 1, "num_bytes": 1}],
                  "stats": stats} for ds in ("PACS", "OfficeHome", "TerraIncognita")}
    full = render_card(infos)
    assert "Li, Da" in full and "Venkateswara" in full and "Beery, Sara" in full  # per-source citations
    assert "CDLA-Permissive-1.0" in full and "Non-commercial research" in full
    assert "consider publishing with `--mode gated`" in full  # PACS and OfficeHome are not clearly redistributable
    assert card_yaml(infos, "x")["license"] == "other"
    gated = card_yaml(infos, "x", mode="gated")
    assert "OfficeHome" in gated["extra_gated_prompt"] and gated["extra_gated_fields"]
    chains = render_card(infos, mode="chains_only")
    assert "Getting the images" in chains and "dbr download OfficeHome" in chains and "source_path" in chains


def test_chains_only_release_has_no_pixels(built, tmp_path, monkeypatch, no_saved_login):
    import datasets

    from dbr_builder.core.manifest import load_manifest
    from dbr_builder.stages import publish

    wd, _, psum = built
    out = tmp_path / "chains_hub"
    publish.run({"stage": "publish", "datasets": [DS], "out": str(out), "mode": "chains_only"}, wd)
    ds = datasets.load_dataset(str(out), DS, split="photo")
    assert "image" not in ds.features and ds.num_rows == psum[DS]["photo"]
    _, meta = load_manifest(wd, DS)
    root = Path(meta["root"]).parent
    row = ds[0]
    assert hashlib.sha256((root / row["source_path"]).read_bytes()).hexdigest() == row["image_id"]
    assert max(p.stat().st_size for p in out.rglob("*.parquet")) < 20_000  # chains, not images
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    fake = FakeHub(monkeypatch)
    publish.run({"stage": "publish", "datasets": [DS], "out": str(tmp_path / "gated"), "mode": "gated",
                 "push": "me/dbr"}, wd)
    (_, kw), = fake.named("update_repo_settings")
    assert kw["gated"] == "manual"


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
