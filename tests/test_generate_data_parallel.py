"""One node, many GPUs, no Slurm: `vllm serve MODEL --data-parallel-size G` behind the OpenAI backend.

vLLM cannot run here; a real loopback HTTP server speaking the chat-completions protocol stands in
for the data-parallel server: it serves several requests at once (one thread each) and answers
with a recorded `vllm serve` response after a delay, so overlapping requests are visible.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dbr_builder.core import store
from dbr_builder.stages import generate
from dbr_builder.stages.index import index_dataset
from tests.openai_replay_server import ReplayServer

DS = "SynthShapes"
MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.fixture(scope="module")
def workdir(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("gen-dp")
    index_dataset(synth_root, DS, wd)
    return wd


def test_generate_keeps_concurrency_requests_in_flight_against_a_data_parallel_server(workdir: Path) -> None:
    delay, images, concurrency = 0.3, 16, 8
    with ReplayServer(delay_s=delay) as srv:
        cfg = {"dataset": DS, "teacher": f"openai:{MODEL}@{srv.base_url}", "n": 2, "limit": images,
               "batch_size": images, "progress": False, "teacher_options": {"concurrency": concurrency}}
        t0 = time.perf_counter()
        s = generate.run(cfg, workdir)
        wall = time.perf_counter() - t0
        # every request of a batch is sent at once, up to `concurrency` (the client never serialises)
        assert srv.max_in_flight == concurrency
        assert len(srv.log) == images and all(e["body"]["n"] == 2 for e in srv.log)
    assert s["failed_images"] == 0 and s["generated"] == 2 * images
    assert store.read_results(workdir, DS).height == 2 * images
    assert wall < images * delay / 2  # overlapped: serial requests would take images * delay
