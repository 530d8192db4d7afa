"""index: manifest columns, DomainBed splits (checked against torchvision's ImageFolder), quarantine, errors."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dbr_builder.core.manifest import MANIFEST_COLUMNS, load_manifest
from dbr_builder.stages.index import LayoutError, index_dataset


def _domainbed_reference(ds_dir: Path, trial_seed: int, holdout: float = 0.2) -> dict[str, tuple[int, str]]:
    """DomainBed's own procedure, independently: ImageFolder per env + seed_hash + RandomState shuffle."""
    from torchvision.datasets import ImageFolder

    def seed_hash(*args):
        return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)

    envs = sorted(f.name for f in ds_dir.iterdir() if f.is_dir())
    ref = {}
    for env_i, env in enumerate(envs):
        folder = ImageFolder(str(ds_dir / env))
        keys = list(range(len(folder)))
        np.random.RandomState(seed_hash(trial_seed, env_i)).shuffle(keys)
        out = set(keys[: int(len(folder) * holdout)])
        for k, (path, label) in enumerate(folder.samples):
            rel = Path(path).relative_to(ds_dir).as_posix()
            ref[rel] = (label, "out" if k in out else "in")
    return ref


@pytest.mark.parametrize("trial_seed", [0, 1])
def test_manifest_matches_domainbed(synth_root: Path, tmp_path: Path, trial_seed: int) -> None:
    meta = index_dataset(synth_root, "SynthShapes", tmp_path, trial_seed=trial_seed, progress=False, workers=1)
    df, meta2 = load_manifest(tmp_path, "SynthShapes")
    assert meta == meta2 and df.columns == MANIFEST_COLUMNS
    ref = _domainbed_reference(synth_root / "SynthShapes", trial_seed)
    got = {r["path"]: (r["label"], r["split"]) for r in df.iter_rows(named=True)}
    assert got == ref
    # 20% of each domain is `out`, and the split depends on the trial seed
    for dom, n in meta["counts"].items():
        assert df.filter((pl.col("domain") == dom) & (pl.col("split") == "out")).height == int(n * 0.2)
    first = df.row(0, named=True)
    assert first["image_id"] == hashlib.sha256((synth_root / "SynthShapes" / first["path"]).read_bytes()).hexdigest()
    assert (first["width"], first["height"]) == (128, 128)


def test_trial_seeds_give_different_splits(synth_root: Path, tmp_path: Path) -> None:
    index_dataset(synth_root, "SynthShapes", tmp_path / "a", trial_seed=0, progress=False, workers=1)
    index_dataset(synth_root, "SynthShapes", tmp_path / "b", trial_seed=1, progress=False, workers=1)
    a, _ = load_manifest(tmp_path / "a", "SynthShapes")
    b, _ = load_manifest(tmp_path / "b", "SynthShapes")
    assert a["split"].to_list() != b["split"].to_list()


def _tree(tmp_path: Path) -> Path:
    ds = tmp_path / "raw" / "Toy"
    rng = np.random.RandomState(0)
    for dom in ("Real World", "clip árt"):
        for cls in ("alarm_clock", "bike"):
            d = ds / dom / cls
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.randint(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"im {i}.jpg")
    return ds


def test_quarantine_and_odd_modes(tmp_path: Path) -> None:
    ds = _tree(tmp_path)
    good = ds / "Real World" / "bike"
    Image.new("CMYK", (10, 10)).save(good / "cmyk.jpg")
    Image.new("LA", (10, 10)).save(good / "gray_alpha.png")
    Image.new("I;16", (10, 10)).save(good / "sixteen.png")
    Image.new("RGBA", (10, 10)).save(good / "alpha.webp")
    (good / "empty.jpg").write_bytes(b"")
    (good / "text.png").write_text("not an image")
    blob = (good / "im 0.jpg").read_bytes()
    (good / "trunc.jpg").write_bytes(blob[: len(blob) // 2])
    Image.new("L", (400, 400)).save(good / "bomb.png")
    (good / "notes.txt").write_text("ignored: not an image extension")
    meta = index_dataset(tmp_path / "raw", "Toy", tmp_path / "w", max_pixels=100_000, progress=False, workers=1)
    df, _ = load_manifest(tmp_path / "w", "Toy")
    q = pl.read_ndjson(tmp_path / "w" / "manifest" / "Toy.quarantine.jsonl")
    reasons = {Path(p).name: r for p, r in zip(q["path"], q["reason"], strict=True)}
    assert set(reasons) == {"empty.jpg", "text.png", "trunc.jpg", "bomb.png"}
    assert reasons["empty.jpg"].startswith("empty") and reasons["text.png"].startswith("not an image")
    assert reasons["trunc.jpg"].startswith(("truncated", "undecodable"))
    assert reasons["bomb.png"].startswith("decompression bomb")
    names = set(df["path"].map_elements(lambda p: Path(p).name, return_dtype=pl.String))
    assert {"cmyk.jpg", "gray_alpha.png", "sixteen.png", "alpha.webp"} <= names
    assert meta["domains"] == ["Real World", "clip árt"] and meta["quarantined"] == 4
    # splits still DomainBed's: computed over the full listing, broken files dropped afterwards
    ref = _domainbed_reference(ds, 0)
    assert {r["path"]: (r["label"], r["split"]) for r in df.iter_rows(named=True)} == {
        k: v for k, v in ref.items() if Path(k).name not in reasons}


def test_parallel_equals_serial(synth_root: Path, tmp_path: Path) -> None:
    index_dataset(synth_root, "SynthShapes", tmp_path / "s", progress=False, workers=1)
    index_dataset(synth_root, "SynthShapes", tmp_path / "p", progress=False, workers=2)
    a = (tmp_path / "s" / "manifest" / "SynthShapes.parquet").read_bytes()
    assert a == (tmp_path / "p" / "manifest" / "SynthShapes.parquet").read_bytes()


@pytest.mark.parametrize("breakage,needle", [
    ("empty_class", "class folder has no images"),
    ("flat", "images directly in a domain folder"),
    ("class_mismatch", "classes differ"),
    ("no_domains", "no domain folders"),
])
def test_layout_errors(tmp_path: Path, breakage: str, needle: str) -> None:
    ds = _tree(tmp_path)
    if breakage == "empty_class":
        for f in (ds / "clip árt" / "bike").iterdir():
            f.unlink()
    elif breakage == "flat":
        shutil.copy(ds / "clip árt" / "bike" / "im 0.jpg", ds / "clip árt" / "loose.jpg")
    elif breakage == "class_mismatch":
        shutil.rmtree(ds / "clip árt" / "bike")
    else:
        shutil.rmtree(ds)
        ds.mkdir()
    with pytest.raises(LayoutError, match=needle):
        index_dataset(tmp_path / "raw", "Toy", tmp_path / "w", progress=False)
    assert not (tmp_path / "w" / "manifest" / "Toy.parquet").exists()


def test_missing_dataset_names_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dbr download Nope"):
        index_dataset(tmp_path, "Nope", tmp_path / "w", progress=False)
