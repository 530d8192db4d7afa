"""GPU check for a lent GPU: the vLLM paths, the transformers fallback and the training benchmark, one table.

    bash bench/gpu_check.sh                 # sets up .venv-vllm (make target) and runs this file with it
    .venv-vllm/bin/python bench/gpu_check.py [--only NAME ...] [--timeout 600]

Nothing is downloaded: vLLM runs with ``load_format: dummy`` (random weights) on config-only model
folders - Qwen2.5-VL-7B's architecture with the tiny student's tokenizer, processor and chat
template (its token ids are valid in the 152k vocabulary) - and the tiny student itself. Every
check runs in its own child process (a crash or hang costs one row, and the GPU is free again for
the next) and prints one JSON line; the parent prints the table:

| check | what it shows |
|---|---|
| vllm-teacher | the teacher path (``VLLMBackend`` as ``dbr generate`` uses it): n=4 candidates per image, tokens/s, request errors, GPU memory given back by ``close()`` |
| vllm-adapter-direct | serving a trained adapter (all-linear, vision included, as ``dbr train`` writes it) on Qwen2.5-VL: plan ``direct`` with ``enable_tower_connector_lora`` |
| vllm-adapter-merge | ``adapter_mode: merge`` on the tiny student (real weights): merged copy served without LoRA |
| vllm-start-failure | an engine that cannot start (``max_model_len`` beyond the KV cache): one attempt, one classified line |
| hf-fallback | the transformers backend (bench/bench_hf_generate_gpu.py, 7B random, bf16) |
| train | the training benchmark (bench/bench_train_gpu.py, our loop) |
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CHECKS = ["vllm-teacher", "vllm-adapter-direct", "vllm-adapter-merge", "vllm-start-failure", "hf-fallback", "train"]


def _qwen7b_folder(dest: Path) -> Path:
    """Qwen2.5-VL-7B architecture (config only) + the tiny student's tokenizer / processor files."""
    from bench_hf_generate_gpu import QWEN25_VL_7B

    from trainers.tiny_model import build_tiny_model

    tiny = Path(build_tiny_model())
    dest.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "tiny_model.json"):
            shutil.copy2(f, dest / f.name)
    (dest / "config.json").write_text(json.dumps(QWEN25_VL_7B, indent=1))
    return dest


def _images(n: int, d: Path) -> list[str]:
    from PIL import Image

    out = []
    for i in range(n):
        p = d / f"{i}.jpg"
        Image.new("RGB", (227, 227), (i * 13 % 255, 90, 160)).save(p)
        out.append(str(p))
    return out


def _requests(paths: list[str], n: int, new_tokens: int):
    from dbr_builder.backends import Request
    from dbr_builder.core.prompts import teacher_prompt

    text = teacher_prompt("teacher", ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"])
    return [Request(str(i), [{"type": "text", "text": text}, {"type": "image", "path": p}], n=n,
                    max_new_tokens=new_tokens, temperature=0.7, seed=i) for i, p in enumerate(paths)]


def _free_gib() -> float:
    import torch

    return torch.cuda.mem_get_info()[0] / 2**30


def _serve(backend, reqs) -> dict:
    t0 = time.perf_counter()
    backend.start()
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = backend.generate(reqs)
    gen_s = time.perf_counter() - t0
    toks = sum(r.out_tokens for r in res)
    before_close = _free_gib()
    backend.close()
    return {"start_s": round(start_s, 1), "requests": len(reqs), "errors": sum(r.error is not None for r in res),
            "out_tok_s": round(toks / gen_s), "free_gib_before_close": round(before_close, 1),
            "free_gib_after_close": round(_free_gib(), 1)}


def _random_adapter(base_folder: Path, dest: Path) -> Path:
    """A LoRA adapter with `dbr train`'s settings for a config-only model: built on the meta device,
    its LoRA tensors then filled with random values (PEFT key names and config as PEFT writes them)."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    from dbr_builder.config import schema_defaults

    lc = schema_defaults("train")["lora"]
    cfg = AutoConfig.from_pretrained(base_folder)
    with torch.device("meta"):
        net = AutoModelForImageTextToText.from_config(cfg)
    peft = get_peft_model(net, LoraConfig(r=int(lc["r"]), lora_alpha=int(lc["alpha"]),
                                          target_modules=lc["target_modules"], bias="none"))
    state = {k: torch.randn(tuple(v.shape), dtype=torch.bfloat16) * 0.01
             for k, v in get_peft_model_state_dict(peft).items()}
    dest.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dest / "adapter_model.safetensors"))
    peft.peft_config["default"].save_pretrained(str(dest))
    return dest


def check(name: str, work: Path) -> dict:
    """Run one check in this process; return its row."""
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "note": "no CUDA GPU"}
    from dbr_builder.backends import EngineStartError, make_backend

    if name == "vllm-teacher":
        folder = _qwen7b_folder(work / "qwen7b")
        b = make_backend(f"vllm:{folder}", load_format="dummy", max_model_len=4096, gpu_memory_utilization=0.85,
                         max_pixels=200704)
        row = _serve(b, _requests(_images(64, work), 4, 128))
        row["status"] = "ok" if row["errors"] == 0 else "errors"
        return row
    if name == "vllm-adapter-direct":
        folder = _qwen7b_folder(work / "qwen7b")
        adapter = _random_adapter(folder, work / "adapter")
        b = make_backend(f"vllm:{folder}", adapter=str(adapter), load_format="dummy", max_model_len=4096,
                         gpu_memory_utilization=0.85)
        plan = {"plan": b.plan.action, "tower_connector": b.plan.tower_connector}
        row = {**plan, **_serve(b, _requests(_images(16, work), 1, 64))}
        row["status"] = "ok" if row["errors"] == 0 and plan["plan"] == "direct" else "errors"
        return row
    if name == "vllm-adapter-merge":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForImageTextToText

        from trainers.tiny_model import build_tiny_model

        tiny = build_tiny_model()
        net = AutoModelForImageTextToText.from_pretrained(tiny)
        get_peft_model(net, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).save_pretrained(
            work / "tiny-adapter")
        b = make_backend(f"vllm:{tiny}", adapter=str(work / "tiny-adapter"), adapter_mode="merge",
                         max_model_len=2048, gpu_memory_utilization=0.5)
        row = {"plan": b.plan.action, **_serve(b, _requests(_images(16, work), 2, 32))}
        row["status"] = "ok" if row["errors"] == 0 else "errors"
        return row
    if name == "vllm-start-failure":
        folder = _qwen7b_folder(work / "qwen7b")
        b = make_backend(f"vllm:{folder}", load_format="dummy", max_model_len=128000, gpu_memory_utilization=0.3)
        msgs = []
        for _ in range(2):
            try:
                b.generate(_requests(_images(2, work), 1, 8))
            except EngineStartError as e:
                msgs.append(str(e))
        ok = len(msgs) == 2 and b.engine_starts == 1 and "\n" not in msgs[0]
        return {"status": "ok" if ok else "unexpected", "engine_starts": b.engine_starts,
                "message": msgs[0][:160] if msgs else "engine started"}
    if name == "hf-fallback":
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_hf_generate_gpu.py"), "--batch", "8",
                              "--new-tokens", "64", "--repeats", "2"], capture_output=True, text=True)
        last = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
        return {"status": "ok" if out.returncode == 0 else f"exit {out.returncode}", "result": last[:160],
                "stderr": out.stderr.strip().splitlines()[-1][:160] if out.returncode and out.stderr else ""}
    if name == "train":
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train_gpu.py"), "--steps", "5",
                              "--warmup", "2", "--paths", "ours"], capture_output=True, text=True)
        rows = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
        r = rows[-1] if rows else {}
        return {"status": "ok" if out.returncode == 0 and rows else f"exit {out.returncode}",
                **{k: r[k] for k in ("samples_per_s", "peak_gib", "step_s") if k in r},
                "stderr": out.stderr.strip().splitlines()[-1][:160] if out.returncode and out.stderr else ""}
    raise SystemExit(f"unknown check {name!r}; one of {', '.join(CHECKS)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=CHECKS, default=CHECKS)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per check")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args()
    if a.one:
        with tempfile.TemporaryDirectory() as d:
            try:
                row = check(a.one, Path(d))
            except Exception as e:  # noqa: BLE001 - a failing check is a row, not a crash of the table
                row = {"status": "failed", "error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]}
        print("GPUCHECK " + json.dumps(row), flush=True)
        return 0
    rows = []
    for name in a.only:
        t0 = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                 timeout=a.timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
            line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("GPUCHECK ")), None)
            row = json.loads(line[9:]) if line else {"status": f"exit {out.returncode}",
                                                     "error": (out.stderr.strip().splitlines() or [""])[-1][:300]}
        except subprocess.TimeoutExpired:
            row = {"status": f"timeout {a.timeout}s"}
        row["wall_s"] = round(time.perf_counter() - t0)
        rows.append((name, row))
        print(f"{name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    print("| check | status | wall s | details |\n|---|---|---|---|")
    for name, row in rows:
        details = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("status", "wall_s") and v != "")
        print(f"| {name} | {row['status']} | {row['wall_s']} | {details} |")
    return 0 if all(r["status"] in ("ok", "skipped") for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
