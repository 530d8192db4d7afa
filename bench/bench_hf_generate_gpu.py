"""GPU benchmark: transformers-backend output tokens/s on a randomly initialised 7B VLM.

    .venv/bin/python bench/bench_hf_generate_gpu.py [--batch 16] [--new-tokens 256] [--repeats 3]

The model is Qwen2.5-VL-7B-Instruct's architecture built from its config (no weights are
downloaded; the config values are written below), in bfloat16 on one CUDA GPU. Prompts use the
tiny student's processor (same Qwen2-VL image processor and chat template; its token ids are
valid in the 152k vocabulary). Output length is fixed (``fixed_length``: EOS ignored) so every
run produces batch x n x new_tokens tokens. Skips with a message when no GPU is present.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Qwen2.5-VL-7B-Instruct config.json (architecture only).
QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "vocab_size": 152064, "tie_word_embeddings": False, "hidden_act": "silu",
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "bos_token_id": 151643, "eos_token_id": 151645, "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}


def main() -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16, help="requests per generate call")
    ap.add_argument("--n", type=int, default=1, help="candidates per request")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default="sdpa")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: skipped (run this on a GPU machine)")
        return 0
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from dbr_builder.backends import Request
    from dbr_builder.backends.hf_backend import HFBackend
    from dbr_builder.core.prompts import teacher_prompt
    from trainers.tiny_model import build_tiny_model

    tiny = build_tiny_model()
    processor = AutoProcessor.from_pretrained(tiny, local_files_only=True)
    cfg = AutoConfig.for_model(QWEN25_VL_7B["model_type"], **{k: v for k, v in QWEN25_VL_7B.items() if k != "model_type"})
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        net = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16, attn_implementation=a.attn)
    net.eval()
    print(f"built {sum(p.numel() for p in net.parameters()) / 1e9:.2f}B params in {time.perf_counter() - t0:.0f}s "
          f"on {torch.cuda.get_device_name()}")
    be = HFBackend.from_loaded(net, processor, "qwen2.5-vl-7b-random", batch_size=a.batch * a.n, fixed_length=True)
    classes = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(a.batch):
            p = Path(d) / f"{i}.jpg"
            Image.new("RGB", (227, 227), (i * 13 % 255, 90, 160)).save(p)
            paths.append(str(p))
        text = teacher_prompt("teacher", classes)
        reqs = [Request(str(i), [{"type": "text", "text": text}, {"type": "image", "path": p}], n=a.n,
                        max_new_tokens=a.new_tokens, temperature=0.7, seed=i) for i, p in enumerate(paths)]
        be.generate(reqs[:2])  # warm-up
        rates = []
        for _ in range(a.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = be.generate(reqs)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            toks = sum(r.out_tokens for r in res)
            assert all(r.error is None for r in res), [r.error for r in res if r.error]
            rates.append(toks / dt)
    print(f"batch {a.batch} x n {a.n}, {a.new_tokens} new tokens: median {statistics.median(rates):,.0f} output tok/s "
          f"(runs: {', '.join(f'{r:,.0f}' for r in rates)}); peak memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
