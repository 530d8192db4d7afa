"""Paper-scale teacher cost: GPT-4o over the four DomainBed datasets, from the price table.

The same arithmetic as ``dbr generate --estimate`` (prompt text per dataset from
prompts/teacher.txt with the dataset's class list, chat overhead, OpenAI's tile rule per image,
an expected output length per candidate), for image counts from the download registry and an
assumed size at which images are sent (no manifest needed). Prints a Markdown table.

    python bench/paper_cost.py --n 4 --expected-output-tokens 400 --sent-size 512x384
"""

from __future__ import annotations

import argparse

from dbr_builder.config import load_yaml
from dbr_builder.core.prompts import teacher_prompt
from dbr_builder.core.usage import (
    CHAT_OVERHEAD_TOKENS,
    cost_usd,
    image_tokens,
    load_prices,
    price_for,
    text_counter,
)
from dbr_builder.resources import resource_path

DATASETS = ("PACS", "VLCS", "OfficeHome", "TerraIncognita")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt-4o")
    ap.add_argument("--n", type=int, default=4, help="candidates per image (one request with n choices)")
    ap.add_argument("--expected-output-tokens", type=int, default=400)
    ap.add_argument("--sent-size", default="512x384",
                    help="WxH at which every image is sent (e.g. after --max-pixels 196608 for 4:3 images)")
    ap.add_argument("--detail", default="auto", choices=["auto", "high", "low"])
    ap.add_argument("--prices", help="price table overriding pipelines/prices.yaml")
    a = ap.parse_args()
    reg = load_yaml(resource_path("pipelines", "datasets.yaml"))["datasets"]
    prices = load_prices(a.prices)
    key, entry = price_for(prices, a.model)
    w, h = (int(x) for x in a.sent_size.lower().split("x"))
    per_image = image_tokens(w, h, entry.get("images"), a.detail) or 0
    count, method = text_counter()
    rows, tot = [], {"images": 0, "in": 0, "out": 0}
    for ds in DATASETS:
        images = sum(reg[ds]["domains"].values())
        text = count(teacher_prompt("teacher", list(reg[ds]["classes"]))) + CHAT_OVERHEAD_TOKENS
        tin = images * (text + per_image)
        tout = images * a.n * a.expected_output_tokens
        rows.append((ds, images, text, tin, tout, cost_usd(prices, a.model, tin, tout),
                     cost_usd(prices, a.model, tin, tout, batch=True)))
        tot["images"] += images
        tot["in"] += tin
        tot["out"] += tout
    print(f"{a.model} ({key} prices of {prices['as_of']}), n={a.n}, {a.expected_output_tokens} output tokens per "
          f"candidate, images sent at {w}x{h} = {per_image} tokens each (detail {a.detail}); text tokens: {method}\n")
    print("| dataset | images | prompt text tokens / request | input tokens | output tokens | live USD | Batch API USD |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for ds, images, text, tin, tout, live, batch in rows:
        print(f"| {ds} | {images:,} | {text} | {tin:,} | {tout:,} | {live:,.2f} | {batch:,.2f} |")
    live = cost_usd(prices, a.model, tot["in"], tot["out"])
    batch = cost_usd(prices, a.model, tot["in"], tot["out"], batch=True)
    print(f"| **total** | {tot['images']:,} | | {tot['in']:,} | {tot['out']:,} | {live:,.2f} | {batch:,.2f} |")


if __name__ == "__main__":
    main()
