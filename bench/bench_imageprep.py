"""Benchmark: image preparation (decode, RGB, resize to a pixel budget) in worker threads.

    .venv/bin/python bench/bench_imageprep.py [--count 2000] [--workers 2] [--max-pixels 50176]

Goal (issue 4): >= 1,000 PACS-size (227x227 JPEG) images/s on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dbr_builder.core.imageprep import parallel_map, prepare_content


def make_images(d: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (227, 227, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:227, 0:227]
    paths = []
    for i in range(count):
        # smooth content + noise: compresses like a photo (~15-25 kB at quality 90)
        img = ((base // 4) + ((xx + yy + i) % 255)[..., None] // 2).astype(np.uint8)
        p = d / f"{i:05d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-pixels", type=int, default=224 * 224, help="0 = decode only, no resize")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        paths = make_images(Path(d), a.count)
        contents = [[{"type": "text", "text": "q"}, {"type": "image", "path": str(p)}] for p in paths]
        rates = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = parallel_map(lambda c: prepare_content(c, a.max_pixels or None), contents, a.workers)
            rates.append(len(out) / (time.perf_counter() - t0))
        size = out[0][1]["image"].size
    print(f"{a.count} 227x227 JPEGs -> RGB {size[0]}x{size[1]}, {a.workers} workers: "
          f"median {statistics.median(rates):,.0f} images/s (runs: {', '.join(f'{r:,.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
