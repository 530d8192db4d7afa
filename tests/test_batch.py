"""Teacher at scale: batch files, the OpenAI Batch API (loopback), usage and cost, --estimate.

The OpenAI endpoints are a real HTTP server on loopback (tests/openai_replay_server.py) that
speaks chat completions and the files + batches endpoints; nothing is mocked inside the project.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbr_builder.backends.batchfile import read_output_file
from dbr_builder.backends.openai_batch import BatchClient
from dbr_builder.core import store
from dbr_builder.core.manifest import load_manifest
from dbr_builder.core.workdir import reports_dir
from dbr_builder.errors import UserError
from dbr_builder.stages import generate
from dbr_builder.stages.index import index_dataset
from tests.openai_replay_server import ReplayServer

DS = "SynthShapes"
LIMIT = 6


@pytest.fixture(scope="module")
def indexed(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("batch")
    index_dataset(synth_root, DS, wd)
    return wd


@pytest.fixture()
def work(indexed: Path, tmp_path: Path) -> Path:
    """A fresh work dir holding only the manifest (each test starts with an empty store)."""
    (tmp_path / "w" / "manifest").mkdir(parents=True)
    for f in (indexed / "manifest").iterdir():
        (tmp_path / "w" / "manifest" / f.name).write_bytes(f.read_bytes())
    return tmp_path / "w"


@pytest.fixture()
def server():
    with ReplayServer(synth_usage=True) as srv:
        yield srv


def _cfg(teacher: str, **kw) -> dict:
    return {"dataset": DS, "teacher": teacher, "n": 3, "limit": LIMIT, "progress": False, **kw}


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _run_remote_batch(srv: ReplayServer, input_file: Path, out: Path) -> None:
    """What a user does by hand between export and import: upload, create, wait, download."""
    client = BatchClient(srv.base_url)
    b = client.create(client.upload(input_file))
    while b["status"] != "completed":
        b = client.retrieve(b["id"])
    data = client.content(b["output_file_id"])
    if b.get("error_file_id"):
        data += client.content(b["error_file_id"])
    out.write_bytes(data)


def test_export_run_import_is_idempotent_and_usage_matches_server(work: Path, server: ReplayServer,
                                                                   tmp_path: Path) -> None:
    df, meta = load_manifest(work, DS)
    teacher = f"openai:gpt-4o@{server.base_url}"
    batch_in = tmp_path / "requests.jsonl"
    s = generate.run(_cfg(teacher, export_batch=str(batch_in)), work)
    assert s["requests"] == LIMIT and s["candidates"] == 3 * LIMIT and server.log == []  # nothing sent
    lines = _lines(batch_in)
    params = store.params_json(generate._sampling({**generate.DEFAULTS, "max_new_tokens": 1024}))
    jobs = generate.build_jobs(generate.select_rows(df, {"limit": LIMIT, "dataset": DS}), meta, "teacher")
    want = [store.request_key(j.image_id, j.prompt_id, "gpt-4o", params, 0) for j in jobs]
    assert [x["custom_id"] for x in lines] == want
    assert all(x["method"] == "POST" and x["url"] == "/v1/chat/completions" for x in lines)
    body = lines[0]["body"]
    assert body["model"] == "gpt-4o" and body["n"] == 3
    img = [p for p in body["messages"][0]["content"] if p["type"] == "image_url"][0]
    assert img["image_url"]["url"].startswith("data:image/jpeg;base64,")

    server.fail_ids = {want[-1]}  # one request fails inside the batch: it must be stored as an error
    results = tmp_path / "results.jsonl"
    _run_remote_batch(server, batch_in, results)
    s = generate.run(_cfg(teacher, import_batch=[str(results)]), work)
    assert s["generated"] == 3 * (LIMIT - 1) and s["errors"] == 3 and s["unknown"] == 0
    res = store.read_results(work, DS)
    assert res.filter(res["error"].is_null()).height == 3 * (LIMIT - 1)
    assert res.filter(res["error"].is_not_null())["error"].to_list() == ["batch error: server_error: injected batch failure"] * 3
    assert set(res.filter(res["error"].is_null())["route"]) == {"batch"}

    # usage: what the server billed, to the token, in the run and the report
    sent = server.usage_sent
    rep = json.loads((reports_dir(work, DS) / "generate_usage.json").read_text())
    assert rep["this_run"]["in_tokens"] == sent["prompt_tokens"] == s["in_tokens"]
    assert rep["this_run"]["out_tokens"] == sent["completion_tokens"] == s["out_tokens"]
    assert rep["store"]["total"]["requests"] == sent["requests"] == LIMIT - 1
    expect = (sent["prompt_tokens"] * 2.50 + sent["completion_tokens"] * 10.00) / 1e6 * 0.5  # batch price
    assert rep["store"]["total"]["cost_usd"] == pytest.approx(expect, rel=1e-6)

    # importing the same file again changes nothing
    again = generate.run(_cfg(teacher, import_batch=[str(results)]), work)
    assert again["generated"] == 0 and again["already_done"] == 3 * (LIMIT - 1)
    assert store.read_results(work, DS).height == res.height
    # the export now holds only the failed request
    s = generate.run(_cfg(teacher, export_batch=str(batch_in)), work)
    assert [x["custom_id"] for x in _lines(batch_in)] == [want[-1]]


def test_vllm_run_batch_output_imports_into_another_workdir(work: Path, tmp_path: Path, indexed: Path) -> None:
    """Export for `vllm run-batch` (images by path), results written elsewhere, imported by custom_id."""
    teacher = "vllm:Qwen/Qwen2.5-VL-7B-Instruct"  # never built: export and import need no engine
    batch_in = tmp_path / "vllm-in.jsonl"
    generate.run(_cfg(teacher, n=2, export_batch=str(batch_in), batch_images="path"), work)
    lines = _lines(batch_in)
    url = [p for p in lines[0]["body"]["messages"][0]["content"] if p["type"] == "image_url"][0]["image_url"]["url"]
    assert url.startswith("file:///") and Path(url[7:]).is_file()
    # vLLM's BatchRequestOutput lines: ids "vllm-...", errors as a plain string with status 400
    out = []
    for i, x in enumerate(lines):
        if i == 0:
            out.append({"id": "vllm-e1", "custom_id": x["custom_id"],
                        "response": {"status_code": 400, "request_id": "vllm-batch-e1"},
                        "error": "image too large"})
            continue
        body = {"id": f"chatcmpl-{i}", "object": "chat.completion", "model": x["body"]["model"],
                "choices": [{"index": j, "message": {"role": "assistant", "content": f"<SUMMARY>s{i}.{j}</SUMMARY>"},
                             "finish_reason": "stop"} for j in range(2)],
                "usage": {"prompt_tokens": 300 + i, "completion_tokens": 40 + i, "total_tokens": 340 + 2 * i}}
        out.append({"id": f"vllm-{i}", "custom_id": x["custom_id"],
                    "response": {"status_code": 200, "request_id": f"vllm-batch-{i}", "body": body}, "error": None})
    results = tmp_path / "vllm-out.jsonl"
    results.write_text("".join(json.dumps(o) + "\n" for o in out[::-1]))  # any order

    # another work dir (no record of the export): the same flags rebuild the custom_ids
    other = tmp_path / "other"
    (other / "manifest").mkdir(parents=True)
    for f in (work / "manifest").iterdir():
        (other / "manifest" / f.name).write_bytes(f.read_bytes())
    s = generate.run(_cfg(teacher, n=2, import_batch=[str(results)]), other)
    assert s["generated"] == 2 * (LIMIT - 1) and s["errors"] == 2 and s["unknown"] == 0
    assert s["errors_by_cause"] == {"batch 400": 1}
    res = store.read_results(other, DS)
    good = res.filter(res["error"].is_null())
    assert good["in_tokens"].sum() == sum(300 + i for i in range(1, LIMIT))
    assert good["out_tokens"].sum() == sum(40 + i for i in range(1, LIMIT))
    assert set(good["model"]) == {"Qwen/Qwen2.5-VL-7B-Instruct"}
    # with other sampling flags nothing matches: one clear error, nothing stored
    with pytest.raises(UserError, match="none of its 6 custom_id"):
        generate.run(_cfg(teacher, n=2, temperature=0.1, import_batch=[str(results)]), tmp_path / "other")


def test_bad_results_file_is_one_line_error(work: Path, tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {}}) + "\n")
    with pytest.raises(UserError, match=r"in.jsonl:1: .*input"):
        list(read_output_file(f))
    f.write_text("{not json\n")
    with pytest.raises(UserError, match=r"in.jsonl:1: not a batch output line"):
        list(read_output_file(f))


def test_batch_teacher_end_to_end_resumes_the_same_batch_after_kill9(work: Path, server: ReplayServer) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("OPENAI_API_KEY", None)
    argv = [sys.executable, "-m", "dbr_builder", "generate", DS, "-w", str(work), "--n", "3", "--limit", str(LIMIT),
            "--teacher", f"batch:gpt-4o@{server.base_url},poll_s=0.05", "--no-progress"]
    server.batch_polls = 10**9  # never finishes while the first process polls
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while len(server.paths("/v1/batches/")) < 3 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert server.paths("/v1/files") == ["POST /v1/files"] and server.paths("/v1/batches") [:1] == ["POST /v1/batches"]
    (bid,) = server.batches
    con = sqlite3.connect(work / "generations" / DS / "results.sqlite")
    assert con.execute("SELECT batch_id, imported FROM batches").fetchall() == [(bid, 0)]
    con.close()

    server.batch_polls = 0  # the batch completes at the next retrieval
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"batches: {bid} (1 resumed)" in r.stdout
    assert server.paths("/v1/files") == ["POST /v1/files"] + [f"GET /v1/files/{server.batches[bid]['output_file_id']}/content"]
    assert [x for x in server.paths("/v1/batches") if x.startswith("POST")] == ["POST /v1/batches"]  # same batch
    res = store.read_results(work, DS)
    assert res.filter(res["error"].is_null()).height == 3 * LIMIT
    assert "usage: 6 requests" in r.stdout
    # a third run finds everything done and sends nothing new
    n_log = len(server.log)
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and len(server.log) == n_log


def test_live_usage_report_equals_server_sums(work: Path, server: ReplayServer) -> None:
    s = generate.run(_cfg(f"openai:gpt-4o@{server.base_url}", n=1, teacher_options={"concurrency": 2}), work)
    assert s["generated"] == LIMIT
    rep = json.loads((reports_dir(work, DS) / "generate_usage.json").read_text())
    sent = server.usage_sent
    assert (rep["this_run"]["in_tokens"], rep["this_run"]["out_tokens"]) == (sent["prompt_tokens"],
                                                                            sent["completion_tokens"])
    assert rep["store"]["by_model"][0]["route"] == "live"
    expect = (sent["prompt_tokens"] * 2.50 + sent["completion_tokens"] * 10.00) / 1e6  # list price
    assert rep["this_run"]["cost_usd"] == pytest.approx(expect, rel=1e-6)
    assert "usage: 6 requests" in generate.format_summary(s)


def test_estimate_sends_nothing_and_counts_image_tiles(work: Path, server: ReplayServer, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("OPENAI_API_KEY", None)  # an estimate needs no key
    r = subprocess.run([sys.executable, "-m", "dbr_builder", "generate", DS, "-w", str(work), "--estimate",
                        "--teacher", f"openai:gpt-4o@{server.base_url}", "--n", "4",
                        "--expected-output-tokens", "250"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert server.log == []  # the loopback server saw zero requests
    df, _ = load_manifest(work, DS)
    images = df.height
    assert f"{images} requests for {4 * images} candidates pending" in r.stdout
    assert f"output tokens {4 * images * 250:,}" in r.stdout
    # every SynthShapes image fits one 512 px tile: 85 + 170 tokens each
    assert f"images {255 * images:,}: gpt-4o tiles" in r.stdout
    assert "with the Batch API" in r.stdout and "$" in r.stdout
    s = generate.run(_cfg(f"openai:gpt-4o@{server.base_url}", estimate=True, limit=None, n=4,
                          expected_output_tokens=250), work)
    assert s["cost_usd"] == pytest.approx((s["in_tokens"] * 2.5 + s["out_tokens"] * 10) / 1e6, abs=1e-4)
    assert s["batch_cost_usd"] == pytest.approx(s["cost_usd"] / 2, abs=1e-4)
    # a user price table overrides the shipped one
    prices = tmp_path / "p.yaml"
    prices.write_text("as_of: '2030-01-01'\nmodels:\n  gpt-4o: {input: 1.0, output: 1.0, images: {base: 85, tile: 170}}\n")
    s2 = generate.run(_cfg(f"openai:gpt-4o@{server.base_url}", estimate=True, prices=str(prices)), work)
    assert s2["prices_as_of"] == "2030-01-01"
    assert s2["cost_usd"] == pytest.approx((s2["in_tokens"] + s2["out_tokens"]) / 1e6, abs=1e-4)
    assert server.log == []
