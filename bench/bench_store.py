"""Benchmark: store + scheduling overhead with a zero-latency backend, and the resume scan.

    .venv/bin/python bench/bench_store.py [--images 25000] [--n 4] [--resume-rows 1000000] [--repeats 3]

Goals (issue 4): >= 20,000 results/s recorded; resume scan of 1M stored results < 5 s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from dbr_builder.backends import Request, Result
from dbr_builder.core.store import Store
from dbr_builder.stages.generate import Job, run_jobs

SAMPLING = {"max_new_tokens": 512, "temperature": 0.7, "top_p": 1.0, "seed": 0}
TEXT = "<SUMMARY>s</SUMMARY><CAPTION>c</CAPTION><REASONING>" + "r" * 600 + "</REASONING><REFLECTION>x</REFLECTION><CONCLUSION>dog</CONCLUSION>"


class ZeroLatency:
    """Answers instantly with a realistic-size chain."""

    model = "zero-latency"
    wants_images = False

    def generate(self, requests: list[Request]) -> list[Result]:
        return [Result(r.key, [TEXT] * r.n, 200 * r.n, ["stop"] * r.n) for r in requests]


def jobs(count: int) -> list[Job]:
    return [Job(f"{i:064x}", [{"type": "text", "text": "q"}, {"type": "image", "path": f"/x/{i}.jpg"}],
                "teacher", "0123456789abcdef") for i in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=25_000)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--resume-rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    rates = []
    for _ in range(a.repeats):
        with tempfile.TemporaryDirectory() as d, Store(Path(d) / "results.sqlite") as st:
            t0 = time.perf_counter()
            s = run_jobs(st, ZeroLatency(), jobs(a.images), a.n, SAMPLING, batch_size=a.batch_size, progress=False)
            rates.append(s["generated"] / (time.perf_counter() - t0))
    print(f"record: {a.images} images x n={a.n}: median {statistics.median(rates):,.0f} results/s "
          f"(runs: {', '.join(f'{r:,.0f}' for r in rates)})")

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "results.sqlite"
        imgs = a.resume_rows // a.n
        t0 = time.perf_counter()
        with Store(path) as st:
            run_jobs(st, ZeroLatency(), jobs(imgs), a.n, SAMPLING, batch_size=1024, progress=False)
        print(f"filled {imgs * a.n:,} results in {time.perf_counter() - t0:.1f}s "
              f"({path.stat().st_size / 2**20:.0f} MiB)")
        scans, fulls = [], []
        for _ in range(a.repeats):
            with Store(path) as st:
                t0 = time.perf_counter()
                keys = st.done_keys()
                scans.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                s = run_jobs(st, ZeroLatency(), jobs(imgs), a.n, SAMPLING, progress=False)
                fulls.append(time.perf_counter() - t0)
                assert s["generated"] == 0 and s["already_done"] == len(keys) == imgs * a.n
        print(f"resume of {imgs * a.n:,} results: key scan median {statistics.median(scans):.2f}s, "
              f"full resume pass (scan + key hashing + nothing to do) median {statistics.median(fulls):.2f}s")


if __name__ == "__main__":
    main()
