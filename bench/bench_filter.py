"""Benchmark: filter + stats over 1M candidate chains (goal <= 10 s on the project CPU).

    .venv/bin/python bench/bench_filter.py [--candidates 1000000] [--repeats 3]

Builds a synthetic OfficeHome-like manifest (250k images, 65 classes, 4 domains) and 4
candidates per image of realistic length (~110 words) with the failure modes the filter
meets (wrong label, missing stage, truncation, synonyms, ambiguous conclusions), then times
``evaluate_candidates`` + selection + ``compute_stats`` (no file writing, no charts).
Prints the median wall time and the machine's load average (the project CPU is shared, so
a number means little without it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import time

import polars as pl

from dbr_builder.stages.filter import Rules, evaluate_candidates, kept_table, rejects_table
from dbr_builder.stages.filter.stats import compute_stats

CLASSES = ["Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator",
           "Calendar",
           "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser",
           "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer",
           "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop", "Mouse",
           "Mug", "Notebook", "Oven", "Pan", "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin",
           "Radio", "Refrigerator", "Ruler", "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda",
           "Speaker", "Spoon", "TV", "Table", "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam"]
DOMAINS = ["Art", "Clipart", "Product", "Real World"]
WORDS = ("the object has a long handle curved edge flat surface metal plastic texture round base thin body "
         "visible parts shape outline proportions light shadow colour edge corner top bottom side").split()


def make_data(n_cand: int, per_image: int = 4, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    rng = random.Random(seed)
    n_img = n_cand // per_image
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n_img)]
    labels = [rng.randrange(len(CLASSES)) for _ in range(n_img)]
    doms = [rng.randrange(4) for _ in range(n_img)]
    man = pl.DataFrame({
        "image_id": ids, "dataset": "OfficeHome", "domain": [DOMAINS[d] for d in doms], "domain_index": doms,
        "class_name": [CLASSES[c] for c in labels], "label": labels,
        "path": [f"{DOMAINS[d]}/{CLASSES[c]}/{i:06d}.jpg" for i, (d, c) in enumerate(zip(doms, labels, strict=True))],
        "width": 300, "height": 300, "split": ["out" if i % 5 == 0 else "in" for i in range(n_img)],
    })
    texts, keys, img, sidx = [], [], [], []
    for i in range(n_img):
        cls = CLASSES[labels[i]].replace("_", " ")
        for s in range(per_image):
            r = rng.random()
            body = " ".join(rng.choices(WORDS, k=90))
            concl = cls if r > 0.2 else (CLASSES[rng.randrange(len(CLASSES))] if r > 0.05 else f"{cls} or a Mug")
            t = (f"<SUMMARY>I will examine image {i} and its shape.</SUMMARY>\n<CAPTION>An item {i}-{s}: "
                 f"{body[:120]}</CAPTION>\n<REASONING>{body}. Therefore it is a {cls.lower()}s.</REASONING>\n"
                 f"<REFLECTION>The evidence for {i} is consistent with the choice.</REFLECTION>\n"
                 f"<CONCLUSION>{concl}</CONCLUSION>")
            if 0.97 < r <= 0.985:
                t = t.replace("<REFLECTION>", "").replace("</REFLECTION>", "")
            elif r > 0.985:
                t = t[: len(t) // 2]
            texts.append(t)
            keys.append(hashlib.md5(f"{i}-{s}".encode()).hexdigest())
            img.append(ids[i])
            sidx.append(s)
    cands = pl.DataFrame({
        "request_key": keys, "image_id": img, "prompt_name": "teacher", "prompt_id": "0123456789abcdef",
        "model": "vllm:Qwen/Qwen2.5-VL-72B-Instruct-AWQ", "params": '{"temperature":0.7}', "sample_index": sidx,
        "text": texts, "finish_reason": "stop", "out_tokens": 200, "error": None,
    }, schema_overrides={"error": pl.String})
    return cands, man


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    cands, man = make_data(args.candidates)
    print(f"built {cands.height} candidates for {man.height} images in {time.perf_counter() - t0:.1f} s "
          f"({cands.get_column('text').str.len_bytes().sum() / 1e6:.0f} MB of text); threads={pl.thread_pool_size()}")
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        rules = Rules.from_cfg({}, "OfficeHome", CLASSES)
        ev = evaluate_candidates(cands, man, CLASSES, rules)
        t_eval = time.perf_counter() - t
        kept = kept_table(ev, man, rules.select)
        rejects = rejects_table(ev, man)
        stats = compute_stats(ev, man, kept)
        times.append(time.perf_counter() - t)
        print(f"  filter+stats {times[-1]:.2f} s (evaluate {t_eval:.2f} s): kept {kept.height}, "
              f"rejected {rejects.height}, acceptance {stats['candidates']['acceptance']}")
    print(f"median filter+stats over {args.candidates} candidates: {statistics.median(times):.2f} s "
          f"(load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
