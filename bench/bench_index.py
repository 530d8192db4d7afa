"""Index throughput on a PACS-size tree: ~20k 227x227 JPEGs, decode check and sha256 included.

    .venv/bin/python bench/bench_index.py [--images 20000] [--repeats 3] [--workers N]

Prints images/s per run and the median; goal >= 1,000 images/s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_tree(root: Path, n_images: int, size: int = 227) -> Path:
    """A DomainBed-layout tree of JPEGs with natural-ish content (gradients and shapes)."""
    ds = root / "BenchPACS"
    if (ds / ".complete").exists():
        return ds
    rng = np.random.RandomState(0)
    domains, classes = ["art_painting", "cartoon", "photo", "sketch"], [f"class{i}" for i in range(7)]
    per = n_images // (len(domains) * len(classes))
    grad = np.linspace(0, 1, size)[None, :, None]
    for d in domains:
        for c in classes:
            out = ds / d / c
            out.mkdir(parents=True, exist_ok=True)
            for i in range(per):
                base = rng.randint(0, 255, 3) * grad + rng.randint(0, 255, 3) * (1 - grad)
                img = Image.fromarray(np.repeat(base, size, axis=0).astype(np.uint8))
                dr = ImageDraw.Draw(img)
                for _ in range(4):
                    x, y = rng.randint(0, size, 2)
                    dr.ellipse([x, y, x + rng.randint(10, 80), y + rng.randint(10, 80)], fill=tuple(rng.randint(0, 255, 3)))
                img.save(out / f"{i:05d}.jpg", quality=90)
    (ds / ".complete").touch()
    return ds


def main() -> None:
    from dbr_builder.stages.index import index_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--tree", default="work/bench", help="where the generated tree is cached")
    a = ap.parse_args()
    ds = make_tree(Path(a.tree), a.images)
    rates = []
    for r in range(a.repeats):
        with tempfile.TemporaryDirectory() as wd:
            t0 = time.perf_counter()
            meta = index_dataset(ds.parent, ds.name, wd, workers=a.workers, progress=False)
            dt = time.perf_counter() - t0
        rates.append(meta["images"] / dt)
        print(f"run {r}: {meta['images']} images in {dt:.2f} s = {rates[-1]:.0f} images/s")
    print(f"median: {statistics.median(rates):.0f} images/s over {a.repeats} runs")


if __name__ == "__main__":
    main()
