"""Benchmark: TerraIncognita selection (dbr_builder.stages.download.terra.plan_terra) is linear in annotations.

Synthetic CCT-style annotation data (images spread over 10 locations, ~1.1 annotations per image);
times the planning step (grouping + selection, no file copies) and, for small sizes only, DomainBed's
images x annotations loop for comparison. Usage:

    .venv/bin/python bench/bench_download_terra.py [--sizes 10000 100000 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from dbr_builder.stages.download.terra import plan_terra

CATS = ["bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel", "car", "deer"]


def synth(n_ann: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    n_img = int(n_ann / 1.1)
    images = [{"id": f"i{i}", "file_name": f"{i}.jpg", "location": rng.choice([38, 43, 46, 100, 7, 9, 12, 33, 61, 90])}
              for i in range(n_img)]
    anns = [{"id": f"a{k}", "image_id": f"i{k if k < n_img else rng.randrange(n_img)}",
             "category_id": rng.randrange(len(CATS))} for k in range(n_ann)]
    return {"images": images, "annotations": anns, "categories": [{"id": i, "name": c} for i, c in enumerate(CATS)]}


def domainbed_loop(data: dict) -> int:
    cat = {c["id"]: c["name"] for c in data["categories"]}
    n = 0
    for image in data["images"]:
        if str(image["location"]) not in ("38", "43", "46", "100"):
            continue
        for a in data["annotations"]:
            if a["image_id"] == image["id"] and cat[a["category_id"]] in CATS[:10]:
                n += 1
    return n


def timed(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--naive-sizes", type=int, nargs="+", default=[1_000, 4_000])
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print("| annotations | plan_terra median (s) | us / annotation |")
    print("|---:|---:|---:|")
    for n in a.sizes:
        d = synth(n)
        t = timed(lambda d=d: plan_terra(d, [38, 43, 46, 100], CATS[:10]), a.repeat)
        print(f"| {n} | {t:.3f} | {t / n * 1e6:.2f} |")
    print("\n| annotations | DomainBed loop median (s) |")
    print("|---:|---:|")
    for n in a.naive_sizes:
        d = synth(n)
        t = timed(lambda d=d: domainbed_loop(d), 1)
        print(f"| {n} | {t:.3f} |")


if __name__ == "__main__":
    main()
