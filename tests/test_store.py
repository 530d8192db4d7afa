"""The generation store: upsert rules, resume, shard merge, and kill -9 at random points."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dbr_builder.backends import Request, Result
from dbr_builder.core import store
from dbr_builder.stages.generate import Job, run_jobs


def _row(key: str, text: str | None, error: str | None = None, image: str = "img") -> store.Row:
    return store.Row(key, image, "teacher", "pid", "m", "{}", 0, text, "stop" if text else None, 3, error)


def test_error_rows_are_replaced_good_rows_are_final(tmp_path: Path) -> None:
    with store.Store(tmp_path / "results.sqlite") as st:
        st.add([_row("a", None, "http 500: x"), _row("b", "first")])
        st.add([_row("a", None, "timeout: y"), _row("b", "second")])
        assert st.failed() == {"a": ("timeout: y", 2)}
        assert st.done_keys() == {"b"}
        st.add([_row("a", "ok")])
        assert st.done_keys() == {"a", "b"} and st.count() == (2, 0)
    con_rows = store._rows([tmp_path / "results.sqlite"])
    assert {r[0]: r[7] for r in con_rows} == {"a": "ok", "b": "first"}


def test_request_key_depends_on_every_part() -> None:
    base = ("img", "pid", "model", store.params_json({"temperature": 0.7, "top_p": 1}), 0)
    k = store.request_key(*base)
    assert len(k) == 32
    for i in range(5):
        changed = list(base)
        changed[i] = changed[i] + 1 if isinstance(changed[i], int) else changed[i] + "x"
        assert store.request_key(*changed) != k
    # key order and 1 vs 1.0 do not change the params
    assert store.params_json({"top_p": 1, "temperature": 0.7}) == base[3]


def test_read_results_and_merge_across_shards(tmp_path: Path) -> None:
    ds = "DS"
    with store.Store(store.shard_file(tmp_path, ds, 0, 2)) as a, store.Store(store.shard_file(tmp_path, ds, 1, 2)) as b:
        a.add([_row("k1", "one", image="i1"), _row("k2", None, "http 429: slow", image="i2")])
        b.add([_row("k3", "three", image="i3"), _row("k2", "two", image="i2")])
        a.set_state("complete", "{}")  # what a finished `dbr generate --shard` leaves
        b.set_state("complete", "{}")
    df = store.read_results(tmp_path, ds)
    assert df.columns == list(store.COLUMNS)
    assert df.height == 3 and df["error"].null_count() == 3  # the good k2 wins over the error row
    res = store.merge_dataset(tmp_path, ds)
    assert res == {"files": 2, "new_rows": 3}
    assert [f.name for f in store.store_files(tmp_path, ds)] == ["results.sqlite"]
    df2 = store.read_results(tmp_path, ds)
    assert df2.to_dicts() == df.to_dicts()
    assert store.merge_dataset(tmp_path, ds) == {"files": 0, "new_rows": 0}  # idempotent


class _FlakyBackend:
    """Fails every request whose key starts with 0-7 on its first attempt."""

    model = "flaky"
    wants_images = False

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def generate(self, requests: list[Request]) -> list[Result]:
        out = []
        for r in requests:
            if r.key[0] in "01234567" and r.key not in self.seen:
                self.seen.add(r.key)
                out.append(Result(r.key, [], 0, [], error="http 503: overloaded"))
            else:
                out.append(Result(r.key, [f"{r.key}/{j}" for j in range(r.n)], 2 * r.n, ["stop"] * r.n))
        return out


def _jobs(count: int) -> list[Job]:
    return [Job(f"img{i:04d}", [{"type": "text", "text": "q"}], "teacher", "pid") for i in range(count)]


def test_failures_are_recorded_and_retried_on_later_pass_and_rerun(tmp_path: Path) -> None:
    sampling = {"max_new_tokens": 8, "temperature": 0.7, "top_p": 1.0, "seed": 0}
    with store.Store(tmp_path / "results.sqlite") as st:
        s1 = run_jobs(st, _FlakyBackend(), _jobs(40), 2, sampling, batch_size=8, passes=1, progress=False)
        assert s1["failed_images"] > 0 and s1["failures_by_cause"] == {"http 503": s1["failed_images"]}
        assert st.count() == (2 * (40 - s1["failed_images"]), 2 * s1["failed_images"])
        s2 = run_jobs(st, _FlakyBackend(), _jobs(40), 2, sampling, batch_size=8, passes=2, progress=False)
        assert s2["failed_images"] == 0 and s2["already_done"] == 2 * (40 - s1["failed_images"])
        assert st.count() == (80, 0)
    with store.Store(tmp_path / "b.sqlite") as st:
        s = run_jobs(st, _FlakyBackend(), _jobs(40), 2, sampling, batch_size=8, passes=2, progress=False)
        assert s["failed_images"] == 0 and s["passes"] == 2 and st.count() == (80, 0)


CHILD = textwrap.dedent("""
    import sys, time
    from dbr_builder.backends import Result
    from dbr_builder.stages.generate import Job, run_jobs
    from dbr_builder.core.store import Store

    class Det:
        model = "det"
        wants_images = False
        def generate(self, reqs):
            time.sleep(0.002)
            return [Result(r.key, [f"{r.key}:{r.seed}:{j}" for j in range(r.n)], r.n, ["stop"] * r.n) for r in reqs]

    jobs = [Job(f"img{i:05d}", [{"type": "text", "text": "q"}], "teacher", "pid") for i in range(int(sys.argv[2]))]
    def tick(k):
        print("batch", flush=True)
    with Store(sys.argv[1]) as st:
        s = run_jobs(st, Det(), jobs, 3, {"max_new_tokens": 8, "temperature": 0.7, "top_p": 1.0, "seed": 1},
                     batch_size=7, progress=False, on_batch=tick)
    print("done", s["generated"], flush=True)
""")


def _run_child(script: Path, db: Path, count: int, kill_after: int | None) -> bool:
    """Run the generator; SIGKILL it after ``kill_after`` batches (+ a random delay). True if it finished."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(db), str(count)], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None
    batches = 0
    for line in proc.stdout:
        if line.startswith("batch"):
            batches += 1
            if kill_after is not None and batches >= kill_after:
                time.sleep(random.random() * 0.004)  # land anywhere: mid-generate, mid-commit, mid-scan
                proc.send_signal(signal.SIGKILL)
                break
        elif line.startswith("done"):
            break
    proc.wait(timeout=60)
    return proc.returncode == 0


def test_kill_9_at_random_points_then_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    random.seed(1234)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    count = 300
    ref, crash = tmp_path / "ref" / "results.sqlite", tmp_path / "crash" / "results.sqlite"
    assert _run_child(script, ref, count, None)
    kills = 0
    for _ in range(4):
        if not _run_child(script, crash, count, random.randint(2, 12)):
            kills += 1
    assert kills >= 3
    while not _run_child(script, crash, count, None):  # resume to the end
        pass
    a, b = store._rows([ref]), store._rows([crash])
    assert len(a) == len(b) == 3 * count
    assert sorted(a) == sorted(b)  # same keys, same texts: nothing lost, nothing duplicated
    with store.Store(crash) as st:
        assert st.count() == (3 * count, 0)


@pytest.mark.parametrize("bad", [b"garbage, not sqlite" * 100])
def test_corrupt_store_is_a_clear_error(tmp_path: Path, bad: bytes) -> None:
    p = tmp_path / "results.sqlite"
    p.write_bytes(bad)
    with pytest.raises(Exception, match="not a usable generation store"):
        store.Store(p)
