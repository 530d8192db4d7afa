"""Time the tiny student: build (fresh and cached), LoRA forward+backward, batched generation.

Usage: .venv/bin/python bench/bench_tiny_model.py [--repeats N]
Prints medians in seconds (CPU, torch threads as configured by the environment).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark and print one line per measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    t0 = time.perf_counter()
    from trainers.tiny_model import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
    path = build_tiny_model(tmp / "first")
    print(f"first build incl. imports: {time.perf_counter() - t0:.2f} s")
    print(f"rebuild (force):  {_median_time(lambda: build_tiny_model(path, force=True), args.repeats):.3f} s")
    print(f"cached call:      {_median_time(lambda: build_tiny_model(path), args.repeats) * 1000:.2f} ms")

    import torch
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    sizes = [(64, 64), (128, 128), (227, 227), (96, 128)]
    convs = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": Image.new("RGB", s, "red")},
                    {"type": "text", "text": "Which class is shown? Answer with one word."},
                ],
            }
        ]
        for s in sizes
    ]
    batch = processor.apply_chat_template(
        convs,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    print(
        f"params: {n_params:,}; vocab: {len(processor.tokenizer)}; batch shape: {tuple(batch['input_ids'].shape)}"
    )

    def generate() -> None:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=32, min_new_tokens=32, do_sample=False)

    print(f"generate 4 x 32 tokens: {_median_time(generate, args.repeats):.3f} s")

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def step() -> None:
        peft_model.zero_grad()
        peft_model(**batch, labels=labels).loss.backward()

    print(f"LoRA forward+backward, batch 4: {_median_time(step, args.repeats) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
