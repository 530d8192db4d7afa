"""Benchmark the CPU-side cost of `dbr eval`: answer parsing, ICL selection and table building.

Model inference dominates a real evaluation (GPU, seconds per batch); this measures what eval adds
on top of it, at OfficeHome scale (65 classes, 15,588 images, LODO = every image once per trial seed):

- parse: answers/s of each protocol on a realistic mix of answers (bare class names, sentences,
  chains with a conclusion, "Answer Choice:" lines, unparseable ones);
- icl: k=8 class-balanced example selections per second from a 3-domain pool;
- tables: seconds to aggregate N prediction records and write JSON/Markdown/LaTeX/PNG.

    .venv/bin/python bench/bench_eval.py [--records 62352] [--repeat 5]

Prints medians over --repeat runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time


def office_classes() -> list[str]:
    return ("Alarm_Clock Backpack Batteries Bed Bike Bottle Bucket Calculator Calendar Candles Chair Clipboards "
            "Computer Couch Curtains Desk_Lamp Drill Eraser Exit_Sign Fan File_Cabinet Flipflops Flowers Folder "
            "Fork Glasses Hammer Helmet Kettle Keyboard Knives Lamp_Shade Laptop Marker Monitor Mop Mouse Mug "
            "Notebook Oven Pan Paper_Clip Pen Pencil Postit_Notes Printer Push_Pin Radio Refrigerator Ruler "
            "Scissors Screwdriver Shelf Sink Sneakers Soda Speaker Spoon TV Table Telephone ToothBrush Toys "
            "Trash_Can Webcam").split()


def answers(mode: str, classes: list[str], n: int, rng: random.Random) -> list[str]:
    out = []
    for i in range(n):
        c = rng.choice(classes).replace("_", " ")
        if mode == "direct":
            out.append([c, f"{c.lower()}s.", f"The answer is: {c}", f"I think this is a {c}, not a pen."][i % 4])
        elif mode == "reasoning":
            body = (f"<SUMMARY>Identify the object.</SUMMARY><CAPTION>A {c} on a table.</CAPTION>"
                    f"<REASONING>It has the parts of a {c}; it is not a mug or a pen.</REASONING>"
                    f"<REFLECTION>Consistent.</REFLECTION><CONCLUSION>{c}</CONCLUSION>")
            out.append(body if i % 10 else body[:-30])  # 10% truncated
        else:
            out.append([f"Answer Choice: {c}", f"answer choice: [{c}]\nConfidence: 0.8", c][i % 3])
    return out


def bench_parse(repeat: int) -> dict[str, float]:
    from dbr_builder.stages.evaluate.parsing import load_synonyms, parse_answer

    classes = office_classes()
    syn = load_synonyms("OfficeHome", classes)
    rng = random.Random(0)
    res = {}
    for mode in ("direct", "reasoning", "choice"):
        texts = answers(mode, classes, 5000, rng)
        parse_answer(mode, texts[0], classes, syn)  # compile the matcher once, as a real run does
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for t in texts:
                parse_answer(mode, t, classes, syn)
            times.append(time.perf_counter() - t0)
        res[mode] = len(texts) / statistics.median(times)
    return res


def bench_icl(repeat: int) -> float:
    from dbr_builder.stages.evaluate.icl import group_pool, icl_pool, select_examples

    classes = office_classes()
    rows = [{"image_id": f"{d}-{c}-{i}", "domain": d, "class_name": c, "split": "in" if i % 5 else "out",
             "path": f"{d}/{c}/{i}.jpg"} for d in ("Art", "Clipart", "Product", "Real World")
            for c in classes for i in range(60)]
    pool = group_pool(icl_pool(rows, "Art", "in"))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for q in range(500):
            select_examples(pool, 8, 0, f"q{q}", "Art")
        times.append(time.perf_counter() - t0)
    return 500 / statistics.median(times)


def bench_tables(n: int, repeat: int) -> float:
    from dbr_builder.stages.evaluate.results import write_reports

    classes = office_classes()
    domains = ["Art", "Clipart", "Product", "Real World"]
    rng = random.Random(0)
    recs = []
    for i in range(n):
        label = rng.choice(classes)
        recs.append({"method": f"m{i % 4}", "dataset": "OfficeHome", "heldout_domain": domains[i % 4],
                     "trial_seed": (i // 4) % 3, "image_id": str(i), "label": label,
                     "pred": label if rng.random() < 0.8 else None, "status": "ok" if rng.random() < 0.95 else "no_answer"})
    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            write_reports(recs, d, {"OfficeHome": domains})
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=4 * 15588)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    for mode, rate in bench_parse(a.repeat).items():
        print(f"parse {mode:9s}: {rate:10.0f} answers/s (65 classes)")
    print(f"icl k=8 selection: {bench_icl(a.repeat):10.0f} queries/s (pool of {3 * 65 * 48} images)")
    print(f"tables ({a.records} records, JSON+MD+TeX+PNG): {bench_tables(a.records, a.repeat):.2f} s")


if __name__ == "__main__":
    main()
