"""The generate stage end to end on SynthShapes with the oracle teacher: store, shards, merge, rationalize."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from dbr_builder.config import ConfigError, stage_schema, validate
from dbr_builder.core import store
from dbr_builder.core.manifest import load_manifest
from dbr_builder.stages import generate
from dbr_builder.stages.index import index_dataset

DS = "SynthShapes"


@pytest.fixture(scope="module")
def workdir(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("gen")
    index_dataset(synth_root, DS, wd)
    return wd


def _cfg(**kw) -> dict:
    return {"dataset": DS, "teacher": "oracle", "n": 2, "progress": False, **kw}


def _copy_manifest(src: Path, dst: Path) -> Path:
    (dst / "manifest").mkdir(parents=True)
    for f in (src / "manifest").iterdir():
        (dst / "manifest" / f.name).write_bytes(f.read_bytes())
    return dst


def test_run_generates_n_candidates_per_image_and_resumes(workdir: Path, tmp_path: Path) -> None:
    wd = _copy_manifest(workdir, tmp_path / "w")
    df, meta = load_manifest(wd, DS)
    s = generate.run(_cfg(), wd)
    assert s["images"] == df.height and s["generated"] == 2 * df.height and s["failed_images"] == 0
    res = store.read_results(wd, DS)
    assert res.height == 2 * df.height and res["request_key"].n_unique() == res.height
    assert set(res["prompt_name"]) == {"teacher"} and res["error"].null_count() == res.height
    assert set(res["image_id"]) == set(df["image_id"])
    assert json.loads(res["params"][0]) == {"max_new_tokens": 1024.0, "seed": 0.0, "temperature": 0.7, "top_p": 1.0}
    # rerun: nothing new; more candidates: only the new sample indices are generated
    assert generate.run(_cfg(), wd)["generated"] == 0
    s3 = generate.run(_cfg(n=3), wd)
    assert s3["already_done"] == 2 * df.height and s3["generated"] == df.height
    assert json.loads(generate.summary_file(wd, DS, 0, 1).read_text())["generated"] == df.height


def test_teacher_prompt_withholds_the_label(workdir: Path) -> None:
    df, meta = load_manifest(workdir, DS)
    jobs = generate.build_jobs(df.head(3), meta, "teacher")
    texts = {j.content[0]["text"] for j in jobs}
    assert len(texts) == 1  # identical prompt for every image: the label cannot be in it
    assert all(Path(j.content[1]["path"]).exists() for j in jobs)
    hinted = generate.build_jobs(df.head(3), meta, "rationalize")
    for j, cls in zip(hinted, df.head(3)["class_name"], strict=True):
        assert f'the correct class is "{cls}"' in j.content[0]["text"]


def test_shards_cover_every_image_exactly_once_and_merge(workdir: Path, tmp_path: Path) -> None:
    wd = _copy_manifest(workdir, tmp_path / "w")
    ref = _copy_manifest(workdir, tmp_path / "ref")
    generate.run(_cfg(), ref)
    seen: list[str] = []
    for i in range(3):
        s = generate.run(_cfg(shard=i, num_shards=3), wd)
        assert s["store"].endswith(f"results-{i:05d}-of-00003.sqlite")
        with store.Store(s["store"]) as st:
            seen += list({r[1] for r in store._rows([st.path])})
    df, _ = load_manifest(wd, DS)
    assert sorted(seen) == sorted(df["image_id"].unique())  # disjoint and complete
    before = store.read_results(wd, DS)
    assert generate.main(_args(wd, merge=True)) == 0
    assert [f.name for f in store.store_files(wd, DS)] == ["results.sqlite"]
    after = store.read_results(wd, DS)
    assert after.to_dicts() == before.to_dicts()
    # the oracle is deterministic and keys do not depend on sharding: same as one unsharded run
    assert after.to_dicts() == store.read_results(ref, DS).to_dicts()


def _args(wd: Path, **kw):
    import argparse

    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    argv = [DS, "-w", str(wd), "--no-progress"]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return p.parse_args(argv)


def test_rationalize_round_stores_hinted_results(workdir: Path, tmp_path: Path) -> None:
    wd = _copy_manifest(workdir, tmp_path / "w")
    df, _ = load_manifest(wd, DS)
    ids = df["image_id"].head(10).to_list()
    s = generate.generate_for_images(wd, DS, ids, "oracle,p_wrong=1.0,p_missing=0,p_reorder=0,p_malformed=0",
                                     n=2, progress=False)
    assert s["generated"] == 20 and s["prompt"] == "rationalize"
    res = store.read_results(wd, DS).join(df.select("image_id", "class_name"), on="image_id")
    assert set(res["prompt_name"]) == {"rationalize"}
    concl = [re.search(r"<CONCLUSION>(.*)</CONCLUSION>", t).group(1) for t in res["text"]]
    assert concl == res["class_name"].to_list()  # hinted: right even with p_wrong=1
    with pytest.raises(KeyError, match="not in the SynthShapes manifest"):
        generate.generate_for_images(wd, DS, ["nope"], "oracle", n=1, progress=False)


def test_failures_never_kill_the_run(workdir: Path, tmp_path: Path) -> None:
    wd = _copy_manifest(workdir, tmp_path / "w")
    df, meta = load_manifest(wd, DS)
    # make one image unknown to the oracle: its request fails, the others succeed
    broken = df.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("cartoon/circle/missing.png"))
                             .otherwise(pl.col("path")).alias("path"))
    broken.write_parquet(wd / "manifest" / f"{DS}.parquet")
    s = generate.run(_cfg(passes=2), wd)
    assert s["failed_images"] == 1 and s["failures_by_cause"] == {"scene": 1}
    assert s["generated"] == 2 * (df.height - 1)
    with store.Store(store.shard_file(wd, DS)) as st:
        assert all(att == 2 for _, att in st.failed().values())  # retried on the second pass
    assert generate.main(_args(wd, teacher="oracle", n=2)) == 3  # nonzero exit says some failed


def test_config_schema_and_errors(workdir: Path) -> None:
    schema = stage_schema("generate")
    validate({"stage": "generate", "teacher": "vllm:Qwen/Qwen2.5-VL-7B-Instruct", "n": 8}, schema, "x.yaml")
    with pytest.raises(ConfigError, match=r"n: 0 is less than"):
        validate({"stage": "generate", "teacher": "oracle", "n": 0}, schema, "x.yaml")
    with pytest.raises(ConfigError, match="teacher"):
        validate({"stage": "generate", "teacher": "gpt4"}, schema, "x.yaml")
    with pytest.raises(ConfigError, match="out of range"):
        generate.run(_cfg(shard=3, num_shards=3), workdir)
    from dbr_builder.cli import main

    assert main(["generate", DS, "-w", str(workdir), "--teacher", "nonsense:x"]) == 1
