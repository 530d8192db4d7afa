"""SynthShapes: deterministic per seed, different across seeds, DomainBed layout, scene sidecar."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from dbr_builder.stages.synth import CLASSES, DOMAINS, load_scenes, write_synthshapes


def _digest(tree: Path) -> dict[str, str]:
    return {p.relative_to(tree).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tree.rglob("*")) if p.is_file()}


def test_layout_and_scenes(synth_root: Path) -> None:
    ds = synth_root / "SynthShapes"
    assert sorted(p.name for p in ds.iterdir() if p.is_dir()) == sorted(DOMAINS)
    for dom in DOMAINS:
        assert sorted(p.name for p in (ds / dom).iterdir()) == sorted(CLASSES)
        for cls in CLASSES:
            assert len(list((ds / dom / cls).glob("*.png"))) == 4
    scenes = load_scenes(ds)
    assert len(scenes) == len(DOMAINS) * len(CLASSES) * 4
    for rel, s in scenes.items():
        dom, cls, _ = rel.split("/")
        assert (s["domain"], s["class_name"], s["shape"]) == (dom, cls, cls)
        assert s["corners"] == CLASSES[cls][0]
        assert (ds / rel).exists()


def test_deterministic_per_seed_and_differs_across_seeds(tmp_path: Path) -> None:
    a = write_synthshapes(tmp_path / "a", seed=3, per_class=2, image_size=64)
    b = write_synthshapes(tmp_path / "b", seed=3, per_class=2, image_size=64)
    c = write_synthshapes(tmp_path / "c", seed=4, per_class=2, image_size=64)
    assert _digest(a) == _digest(b)
    da, dc = _digest(a), _digest(c)
    images = [k for k in da if k.endswith(".png")]
    assert sum(da[k] != dc[k] for k in images) == len(images)


def test_domains_are_visually_distinct(synth_root: Path) -> None:
    """Mean colour statistics differ between domains (sketch is near-white, cartoon has black outlines)."""
    ds = synth_root / "SynthShapes"
    stats = {}
    for dom in DOMAINS:
        arrs = [np.asarray(Image.open(p).convert("L"), dtype=float) for p in sorted((ds / dom).rglob("*.png"))]
        stats[dom] = (np.mean([a.mean() for a in arrs]), np.mean([(a < 30).mean() for a in arrs]))
    assert stats["sketch"][0] > stats["photo"][0]
    assert stats["cartoon"][1] > 5 * stats["painting"][1]  # thick black outlines only in cartoons


def test_rewrite_is_idempotent_and_atomic(tmp_path: Path) -> None:
    dest = write_synthshapes(tmp_path, seed=0, per_class=1, image_size=48)
    mtime = (dest / "scenes.jsonl").stat().st_mtime_ns
    assert write_synthshapes(tmp_path, seed=0, per_class=1, image_size=48) == dest
    assert (dest / "scenes.jsonl").stat().st_mtime_ns == mtime  # identical tree kept
    write_synthshapes(tmp_path, seed=0, per_class=2, image_size=48)
    assert len(load_scenes(dest)) == len(DOMAINS) * len(CLASSES) * 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".locks"]  # no temp folders left
