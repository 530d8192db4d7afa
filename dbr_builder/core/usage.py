"""Token usage and cost of a teacher: the price table, image-token rules, cost sums.

Prices live in ``pipelines/prices.yaml`` (USD per 1M tokens, dated, with the Batch API
discount); a user file given with ``--prices`` / ``prices:`` replaces entries per model.
Image tokens follow OpenAI's tile rule for GPT-4o-class models (``image_tokens``); text
tokens are counted with ``tiktoken`` when it is installed, else estimated as characters / 4
(the estimate says which).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from dbr_builder.errors import ConfigError
from dbr_builder.resources import resource_path

PRICES_FILE = "prices.yaml"
# Chat formatting overhead per request (OpenAI's documented count: 3 per message + 3 to prime the reply).
CHAT_OVERHEAD_TOKENS = 3 + 3


def load_prices(override: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The shipped price table, with the entries of ``override`` (a YAML file) replacing its own."""
    table = _read_prices(resource_path("pipelines", PRICES_FILE))
    if override:
        user = _read_prices(Path(override))
        table = {**table, **{k: v for k, v in user.items() if k != "models"},
                 "models": {**table["models"], **user.get("models", {})}}
    return table


def _read_prices(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: price table not found (give a YAML file like pipelines/{PRICES_FILE})")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("models", {}), dict):
        raise ConfigError(f"{path}: expected a mapping with `models: {{<model>: {{input: .., output: ..}}}}`")
    for name, entry in obj.get("models", {}).items():
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), int | float) for k in ("input", "output")):
            raise ConfigError(f"{path}: models.{name} needs numeric `input` and `output` (USD per 1M tokens)")
    disc = obj.get("batch_discount", 0.5)
    if not isinstance(disc, int | float) or not 0 < disc <= 1:
        raise ConfigError(f"{path}: batch_discount must be a number in (0, 1] (the share of the list price billed)")
    return obj


def price_for(prices: dict[str, Any], model: str) -> tuple[str, dict[str, Any]] | None:
    """``(matched key, entry)`` for ``model``: exact name, else the longest key prefixing it."""
    models = prices.get("models", {})
    if model in models:
        return model, models[model]
    hits = [k for k in models if model.startswith(k)]
    if not hits:
        return None
    key = max(hits, key=len)
    return key, models[key]


def cost_usd(prices: dict[str, Any], model: str, in_tokens: int, out_tokens: int, batch: bool = False) -> float | None:
    """Estimated cost of ``in_tokens`` / ``out_tokens`` on ``model`` (None when it has no price)."""
    hit = price_for(prices, model)
    if hit is None:
        return None
    entry = hit[1]
    usd = (in_tokens * float(entry["input"]) + out_tokens * float(entry["output"])) / 1e6
    if batch:
        usd *= float(entry.get("batch_discount", prices.get("batch_discount", 0.5)))
    return usd


def image_tokens(width: int, height: int, rule: dict[str, Any] | None, detail: str | None = None) -> int | None:
    """Prompt tokens of one image under OpenAI's tile rule (None without a rule for the model).

    ``detail="low"``: ``base``. Otherwise (``high``, and ``auto``, which the API resolves to
    high for images this size): scale to fit 2048 x 2048, then so that the shortest side is at
    most 768 px, and count 512 px tiles: ``base + tile * tiles``.
    """
    if not rule:
        return None
    base, tile = int(rule["base"]), int(rule["tile"])
    if (detail or "auto") == "low":
        return base
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    tiles = math.ceil(int(w) / 512) * math.ceil(int(h) / 512)
    return base + tile * tiles


def text_counter() -> tuple[Any, str]:
    """``(count(text) -> int, method)``: tiktoken's o200k_base when available, else chars / 4."""
    try:
        import tiktoken

        enc = tiktoken.get_encoding("o200k_base")
        return (lambda t: len(enc.encode(t))), "tiktoken o200k_base"
    except Exception:  # noqa: BLE001 - not installed or its BPE file cannot be fetched offline
        return (lambda t: math.ceil(len(t) / 4)), "approx (characters / 4; install tiktoken for exact counts)"


def usage_line(u: dict[str, Any]) -> str:
    """One summary line for a usage dict (``requests``, ``in_tokens``, ``out_tokens``, ``cost_usd``)."""
    cost = u.get("cost_usd")
    if cost is None:
        money = "cost unknown (no price for the model)"
    else:
        money = f"est. cost ${cost:,.2f}" if cost >= 1 else f"est. cost ${cost:.4f}"
    return (f"usage: {u['requests']} requests, {u['in_tokens']:,} tokens in, {u['out_tokens']:,} tokens out, "
            f"{money}" + (f" (prices of {u['prices_as_of']})" if u.get("prices_as_of") else ""))


def store_usage(groups: list[dict[str, Any]], prices: dict[str, Any]) -> dict[str, Any]:
    """Usage and cost of a store from its per-(model, route) sums (``store.usage_groups``).

    ``cost_usd`` is at list price, with the Batch API discount for ``route == "batch"``; None
    for a model without a price (and then for the total).
    """
    by_model = []
    for g in groups:
        g = dict(g)
        g["cost_usd"] = cost_usd(prices, g["model"], g["in_tokens"], g["out_tokens"], batch=g["route"] == "batch")
        hit = price_for(prices, g["model"])
        g["price_key"] = hit[0] if hit else None
        by_model.append(g)
    total: dict[str, Any] = {k: sum(g[k] for g in by_model) for k in
                             ("requests", "candidates", "in_tokens", "out_tokens", "rows_without_usage")}
    costs = [g["cost_usd"] for g in by_model]
    total["cost_usd"] = None if any(c is None for c in costs) else sum(costs)
    return {"total": total, "by_model": by_model}
