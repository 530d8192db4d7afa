"""In-context learning: pick labelled example images and build the interleaved prompt.

The OOD-generalization paper's ICL baseline puts k labelled example images (k in
{0, 2, 4, 8}) before the query image. Examples here come only from the *training*
domains of the leave-one-domain-out split (never from the held-out domain), are
class-balanced (per-class counts differ by at most one; which classes get the extra
example is random) and seeded: the same (seed, query) always gets the same examples,
while different queries get different ones.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dbr_builder.core.prompts import render

SPLITS = ("in", "out", "all")


def icl_pool(rows: Iterable[dict[str, Any]], heldout_domain: str, split: str = "in") -> list[dict[str, Any]]:
    """The candidate examples for a held-out domain: manifest rows of the training domains.

    ``split`` picks the DomainBed split of those domains (``in`` = the training part,
    ``out`` = the validation part, ``all`` = both).
    """
    if split not in SPLITS:
        raise ValueError(f"icl split must be one of {', '.join(SPLITS)}, got {split!r}")
    pool = [r for r in rows if r["domain"] != heldout_domain and (split == "all" or r["split"] == split)]
    if not pool:
        raise ValueError(f"no in-context examples: no rows outside held-out domain {heldout_domain!r} "
                         f"with split {split!r}")
    return pool


def _rng(seed: int, query_key: str) -> random.Random:
    # Python's hash() is salted per process; derive a stable seed from sha256 instead.
    digest = hashlib.sha256(f"{seed}\x00{query_key}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


@dataclass(frozen=True)
class ExamplePool:
    """A candidate pool grouped by class (each class's rows sorted by image_id), built once per job."""

    by_class: dict[str, list[dict[str, Any]]]
    domains: frozenset[str]
    size: int


def group_pool(pool: Sequence[dict[str, Any]]) -> ExamplePool:
    """Group pool rows by class, in an order independent of the input order."""
    by_class: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(pool, key=lambda r: (r["class_name"], r["image_id"])):
        by_class.setdefault(r["class_name"], []).append(r)
    return ExamplePool(by_class, frozenset(r["domain"] for r in pool), len(pool))


def select_examples(
    pool: Sequence[dict[str, Any]] | ExamplePool,
    k: int,
    seed: int,
    query_key: str,
    heldout_domain: str | None = None,
) -> list[dict[str, Any]]:
    """``k`` class-balanced examples from ``pool`` for the query ``query_key``, seeded.

    Classes are visited round-robin in a seeded random order, each class contributing a
    seeded random sample of its images, so per-class counts differ by at most one whenever
    every class has enough images (a class that runs out is skipped). The returned order is
    shuffled too, so the position of an example says nothing about its class. ``pool`` may be
    pre-grouped with :func:`group_pool` (much faster for many queries). Raises ValueError if
    the pool contains the held-out domain (it must never leak into the prompt) or holds
    fewer than ``k`` images.
    """
    if k < 0:
        raise ValueError(f"number of in-context examples must be >= 0, got {k}")
    if k == 0:
        return []
    grouped = pool if isinstance(pool, ExamplePool) else group_pool(pool)
    if heldout_domain is not None and heldout_domain in grouped.domains:
        raise ValueError(f"in-context pool contains images of the held-out domain {heldout_domain!r}")
    if grouped.size < k:
        raise ValueError(f"in-context pool has {grouped.size} images, fewer than k={k}")
    rng = _rng(seed, query_key)
    order = sorted(grouped.by_class)
    rng.shuffle(order)
    drawn: dict[str, list[dict[str, Any]]] = {}

    def draw(c: str) -> list[dict[str, Any]]:
        # a class's sample is drawn on first visit: O(k) per query, not O(pool)
        if c not in drawn:
            rows = grouped.by_class[c]
            got = rng.sample(rows, min(k + 1, len(rows)))
            drawn[c] = [r for r in got if r["image_id"] != query_key][:k]
        return drawn[c]

    picked: list[dict[str, Any]] = []
    depth = 0
    while len(picked) < k:
        progressed = False
        for c in order:
            sample = draw(c)
            if depth < len(sample):
                picked.append(sample[depth])
                progressed = True
                if len(picked) == k:
                    break
        if not progressed:
            break  # only reachable when the query itself was the pool's k-th image
        depth += 1
    rng.shuffle(picked)
    return picked


def display_name(class_name: str) -> str:
    """A class folder name as shown to a model (``Alarm_Clock`` -> ``Alarm Clock``)."""
    return class_name.replace("_", " ")


def choices_text(classes: Sequence[str]) -> str:
    """The choice list of the choice / ICL prompts."""
    return ", ".join(display_name(c) for c in classes)


def choice_content(image: str, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Zero-shot ``Answer Choice`` prompt (``prompts/zeroshot_choice.txt``) for one image."""
    return [{"type": "image", "path": image},
            {"type": "text", "text": render("zeroshot_choice", choices=choices_text(classes))}]


def icl_content(
    examples: Sequence[tuple[str, str]], query_image: str, classes: Sequence[str]
) -> list[dict[str, Any]]:
    """The interleaved user turn: (example image, its answer) pairs, then the query image.

    ``examples`` are ``(image path, class name)``. With no examples this is exactly the
    zero-shot choice prompt, so k = 0 is the zero-shot baseline.
    """
    if not examples:
        return choice_content(query_image, classes)
    content: list[dict[str, Any]] = []
    n = len(examples)
    for i, (path, cls) in enumerate(examples, start=1):
        content.append({"type": "image", "path": path})
        content.append({"type": "text", "text": render("icl_example", index=i, num_examples=n,
                                                       answer=display_name(cls), choices=choices_text(classes))})
    content.append({"type": "image", "path": query_image})
    content.append({"type": "text", "text": render("icl_query", num_examples=n,
                                                   choices=choices_text(classes))})
    return content
