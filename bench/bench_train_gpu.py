"""Training throughput of the MTCT step on GPU: our loop's step vs the standard HF/TRL loss path.

A randomly initialised student from a config only (nothing downloaded, so it runs on an offline
GPU box): Qwen2.5-VL-7B (default) or, with ``--arch tiny``, the tiny test student (CPU smoke run).
Batches are synthetic but shaped like MTCT batches: per image one classification sequence
(prompt + image tokens + a short class answer) and one reasoning sequence (same prompt shape +
a ``--chain-tokens`` answer), LoRA r=8 on all linear layers, bf16 autocast, gradient
checkpointing, AdamW.

Paths compared (same model, LoRA, batch and sequence lengths):
- ``ours``: ``trainers.loss.AnswerNLL`` (LM head only on answer positions) + the per-image MTCT loss;
- ``hf``: ``model(**batch, labels=labels)`` (full-vocabulary logits on every position) - the loss
  path that TRL's ``SFTTrainer`` runs for each step;
- ``trl``: TRL's ``SFTTrainer`` itself on the same pre-tokenised batches, when ``trl`` is installed.

Reports samples/s (sequences), tokens/s and MFU counting 4N FLOPs per token (frozen base + LoRA:
forward 2N + input-gradient backward 2N; N = all parameters, every token counted through the LM).

    python bench/bench_train_gpu.py --arch qwen2.5-vl-7b --images 4 --steps 10
    python bench/bench_train_gpu.py --arch tiny --images 2 --steps 2 --device cpu   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def qwen25_vl_7b_config():
    """Qwen2.5-VL-7B-Instruct's architecture, written out (its config.json values)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            bos_token_id=151643, eos_token_id=151645,
        ),
        vision_config=dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
            out_hidden_size=3584, hidden_act="silu",
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


def build_model(arch: str, device, dtype):
    import torch
    from transformers import AutoModelForImageTextToText

    if arch == "tiny":
        from trainers.tiny_model import build_tiny_model

        model = AutoModelForImageTextToText.from_pretrained(build_tiny_model(), dtype=dtype)
    else:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(qwen25_vl_7b_config(), dtype=dtype)
    return model.to(device)


def make_batch(cfg, images: int, grid: int, prompt_tokens: int, cls_tokens: int, chain_tokens: int, device):
    """A synthetic MTCT batch: 2 sequences per image, right-padded, Qwen2-VL image layout."""
    import torch

    from trainers.data import KIND_CLS, KIND_REASON

    text_vocab = 1000  # plain token ids well below the special ones
    n_img_tokens = (grid // 2) ** 2
    rows, labels, kinds, owners = [], [], [], []
    for i in range(images):
        for kind, ans in ((KIND_CLS, cls_tokens), (KIND_REASON, chain_tokens)):
            prompt = ([cfg.vision_start_token_id] + [cfg.image_token_id] * n_img_tokens + [cfg.vision_end_token_id]
                      + torch.randint(10, text_vocab, (prompt_tokens,)).tolist())
            answer = torch.randint(10, text_vocab, (ans,)).tolist()
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
            kinds.append(kind)
            owners.append(i)
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (x, y) in enumerate(zip(rows, labels, strict=True)):
        ids[r, : len(x)] = torch.tensor(x)
        lab[r, : len(y)] = torch.tensor(y)
        attn[r, : len(x)] = 1
    patch_dim = 3 * 2 * 14 * 14
    return {
        "input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": lab.to(device),
        "pixel_values": torch.randn(len(rows) * grid * grid, patch_dim, device=device),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * len(rows), device=device),
        "kind": torch.tensor(kinds, device=device), "image_index": torch.tensor(owners, device=device),
        "num_images": images,
    }


def add_lora(model, r: int):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def time_steps(step, steps: int, warmup: int, sync) -> list[float]:
    out = []
    for i in range(warmup + steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            out.append(time.perf_counter() - t)
    return out


def bench_path(path: str, model, batch, args, device) -> dict:
    import torch

    from trainers.loss import AnswerNLL, per_image_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    wrapped = AnswerNLL(model)
    model_inputs = {k: v for k, v in batch.items() if k not in ("kind", "image_index", "num_images")}

    def step():
        with amp:
            if path == "ours":
                sums, toks = wrapped(batch)
                loss = per_image_loss(sums, toks, batch["kind"], batch["image_index"], batch["num_images"]).mean()
            else:
                loss = model(**model_inputs, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, args.steps, args.warmup, sync)
    return _report(path, times, batch, model, args, device)


def bench_trl(model, batch, args, device) -> dict:
    """TRL SFTTrainer on the same pre-tokenised batch (skip its dataset preparation)."""
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    single = {k: v.cpu() for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    rows = [{"idx": i} for i in range(args.steps + args.warmup)]

    def collate(_):
        return {**{k: v.to(device) for k, v in single.items()},
                "pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}

    conf = SFTConfig(output_dir="/tmp/bench-trl", per_device_train_batch_size=1, max_steps=args.steps + args.warmup,
                     bf16=device.type == "cuda", gradient_checkpointing=args.gradient_checkpointing,
                     learning_rate=5e-4, report_to=[], logging_steps=1000, save_strategy="no",
                     remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})
    times: list[float] = []
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    trainer = SFTTrainer(model=model, args=conf, train_dataset=datasets.Dataset.from_list(rows),
                         data_collator=collate, callbacks=[Timer()])
    trainer.train()
    return _report("trl", times[args.warmup:], batch, model, args, device)


def _report(path, times, batch, model, args, device) -> dict:
    import torch

    med = statistics.median(times)
    seqs = batch["input_ids"].shape[0]
    tokens = int(batch["attention_mask"].sum())
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    flops = 4 * n_params * tokens / med
    return {
        "path": path, "device": name, "step_s_median": round(med, 4), "samples_per_s": round(seqs / med, 2),
        "images_per_s": round(batch["num_images"] / med, 2), "tokens_per_s": round(tokens / med, 1),
        "mfu": round(flops / peak, 4) if peak else None, "params": n_params,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["qwen2.5-vl-7b", "tiny"], default="qwen2.5-vl-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=4, help="images per step (2 sequences each)")
    p.add_argument("--grid", type=int, default=32, help="patch grid side (32 -> 448 px, 256 image tokens)")
    p.add_argument("--prompt-tokens", type=int, default=40)
    p.add_argument("--cls-tokens", type=int, default=4)
    p.add_argument("--chain-tokens", type=int, default=300)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--paths", nargs="+", default=["ours", "hf", "trl"])
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()

    import torch

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_model(args.arch, device, dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = add_lora(model, args.lora_r)
    batch = make_batch(model.get_base_model().config, args.images, args.grid, args.prompt_tokens,
                       args.cls_tokens, args.chain_tokens, device)
    results = []
    for path in args.paths:
        if path == "trl":
            try:
                import trl  # noqa: F401
            except ImportError:
                print(json.dumps({"path": "trl", "skipped": "trl is not installed (pip install trl)"}))
                continue
            try:
                r = bench_trl(model, batch, args, device)
            except Exception as e:  # report, do not hide: TRL's APIs move between releases
                r = {"path": "trl", "error": f"{type(e).__name__}: {e}"}
        else:
            r = bench_path(path, model, batch, args, device)
        r.update(images=args.images, grid=args.grid, chain_tokens=args.chain_tokens, arch=args.arch)
        print(json.dumps(r), flush=True)
        results.append(r)
    ours = next((r for r in results if r["path"] == "ours"), None)
    for r in results:
        if ours and r is not ours and r.get("samples_per_s"):
            print(f"ours / {r['path']}: {ours['samples_per_s'] / r['samples_per_s']:.2f}x samples/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
