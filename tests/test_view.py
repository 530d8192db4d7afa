"""`dbr view`: the static chain viewer. Files and sampling always; the page itself in a real headless
Chromium (Debian's `chromium` package) when it is installed: elements present, filters applied from the
URL, every image on the page loaded, a screenshot that is not blank. Skipped cleanly without Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DS = "SynthShapes"
CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"))
                 if p and Path(p).exists()), None)


@pytest.fixture(scope="module")
def viewed(synth_root, tmp_path_factory):
    """index -> oracle teacher (with errors) -> filter -> view; returns (workdir, view index)."""
    from dbr_builder.stages import filter as filt
    from dbr_builder.stages import generate
    from dbr_builder.stages.index import index_dataset
    from dbr_builder.stages.view import build_view

    wd = tmp_path_factory.mktemp("work")
    index_dataset(synth_root, DS, wd)
    generate.run({"stage": "generate", "dataset": DS, "teacher": "oracle", "n": 2, "progress": False,
                  "teacher_options": {"p_wrong": 0.4, "p_missing": 0.2}}, wd)
    filt.run({"stage": "filter", "dataset": DS}, wd)
    return wd, build_view(wd, [DS], per_group=2, page_size=10)


def test_view_files_and_sampling(viewed):
    wd, idx = viewed
    view = wd / "view"
    assert (view / "index.html").exists() and (view / "data" / "index.js").exists()
    (d,) = idx["datasets"]
    assert [x["name"] for x in d["domains"]] == ["cartoon", "painting", "photo", "sketch"]
    assert all(x["sampled"] == 6 * 2 for x in d["domains"])  # per_group per class
    thumbs = list((view / "img").rglob("*.jpg"))
    assert len(thumbs) == 4 * 6 * 2 and max(t.stat().st_size for t in thumbs) < 30_000
    text = (view / "data" / DS / "photo.js").read_text()
    items = json.loads(re.match(r"DBR\.loaded\((.*)\);\n$", text, re.S).group(1))["items"]
    assert {"id", "class", "thumb", "kept", "rejected", "reasons"} <= set(items[0])
    assert any(it["rejected"] for it in items) and any(r["reason"] == "wrong_label" for r in d["reasons"])
    for it in items:
        assert (view / it["thumb"]).exists()
        assert all(r["reason"] in it["reasons"] for r in it["rejected"])


def test_sampling_keeps_the_page_light_for_large_datasets():
    import polars as pl

    from dbr_builder.stages.view import sample_rows

    n = 12_000
    big = pl.DataFrame({"domain": [f"d{i % 4}" for i in range(n)], "class_name": [f"c{i % 65}" for i in range(n)],
                        "image_id": [f"{i:064x}" for i in range(n)], "path": [f"p/{i}.jpg" for i in range(n)]})
    s = sample_rows(big, 3, seed=0)
    assert s.height == 4 * 65 * 3
    assert s.equals(sample_rows(big, 3, seed=0))  # deterministic
    assert sample_rows(big, 0, seed=0).height == n


def test_dbr_view_cli(viewed, capsys):
    from dbr_builder.cli import main

    wd, _ = viewed
    assert main(["view", "-w", str(wd), "--out", str(wd / "v2"), "--per-group", "1"]) == 0
    assert "file://" in capsys.readouterr().out and (wd / "v2" / "index.html").exists()
    assert main(["view", "-w", str(wd), "--page-size", "0"]) == 1


def _chromium(args: list[str], url: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-default-apps", "--disable-extensions",
                           "--disable-sync", "--no-first-run", "--mute-audio", f"--user-data-dir={tmp / 'profile'}",
                           "--virtual-time-budget=15000", *args, url],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian package `chromium`)")
def test_viewer_in_headless_chromium(viewed, tmp_path):
    wd, _ = viewed
    page = (wd / "view" / "index.html").resolve().as_uri()
    # filters from the URL hash: one domain, one rejection reason; eager images so every one loads
    r = _chromium(["--dump-dom"], f"{page}?eager=1#ds={DS}&domain=photo&reason=wrong_label", tmp_path)
    dom = r.stdout
    assert r.returncode == 0 and "<main id=\"cards\">" in dom, r.stderr[-2000:]
    for el in ('id="dataset"', 'id="domain"', 'id="class"', 'id="reason"', 'id="pager"'):
        assert el in dom
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))
    cards = int(attrs["cards"])
    assert 0 < cards <= 10 and int(attrs["matching"]) >= cards  # paged: at most page_size cards
    assert int(attrs["images-ok"]) == cards and attrs["images-failed"] == "0"  # every thumbnail loaded
    reasons = re.findall(r'<article class="card" data-class="[^"]*" data-reasons="([^"]*)"', dom)
    assert len(reasons) == cards and all("wrong_label" in r.split() for r in reasons)
    assert 'class="code">wrong_label<' in dom
    # a screenshot of the default view: the page draws (images, text), not a blank canvas
    shot = tmp_path / "view.png"
    r = _chromium([f"--screenshot={shot}", "--window-size=1280,1400", "--hide-scrollbars"], f"{page}?eager=1",
                  tmp_path)
    assert shot.exists(), r.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert im.size == (1280, 1400) and len(colors) > 200
