"""Filter rules, selection policy, coverage (with and without rationalization), stats report."""

from __future__ import annotations

import hashlib
import json

import polars as pl
import pytest

from dbr_builder.core.chains import format_chain
from dbr_builder.stages.filter import (
    Rules,
    evaluate_candidates,
    filter_candidates,
    select_chains,
    validate_kept,
)

CLASSES = ["Alarm_Clock", "dog", "star"]


def _iid(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def make_manifest(labels: list[str], domains: list[str] | None = None) -> pl.DataFrame:
    domains = domains or ["photo"] * len(labels)
    return pl.DataFrame({
        "image_id": [_iid(i) for i in range(len(labels))], "dataset": "Toy", "domain": domains,
        "domain_index": [sorted(set(domains)).index(d) for d in domains], "class_name": labels,
        "label": [CLASSES.index(c) for c in labels], "path": [f"{d}/{c}/{i}.png" for i, (d, c) in
                                                            enumerate(zip(domains, labels, strict=True))],
        "width": 32, "height": 32, "split": ["out" if i % 5 == 0 else "in" for i in range(len(labels))],
    })


def chain(cls: str, i: int = 0, reasoning: str | None = None) -> str:
    return format_chain(f"I examine image {i} closely.", f"An object number {i} with distinct parts.",
                        reasoning or f"Step one for image {i}: its outline fits a {cls} and rules out the rest.",
                        f"The evidence for image {i} is consistent.", cls)


def make_cands(rows: list[tuple[int, int, str | None]], prompt: str = "teacher", finish: str = "stop",
               error: str | None = None) -> pl.DataFrame:
    """rows: (image index, sample index, text)."""
    return pl.DataFrame({
        "request_key": [f"{prompt}-{i}-{s}" for i, s, _ in rows], "image_id": [_iid(i) for i, _, _ in rows],
        "prompt_name": prompt, "prompt_id": "p" * 16, "model": "teach", "params": '{"temperature":0.7}',
        "sample_index": [s for _, s, _ in rows], "text": [t for _, _, t in rows], "finish_reason": finish,
        "out_tokens": 50, "error": error,
    }, schema_overrides={"error": pl.String, "text": pl.String})


def reasons_of(cands: pl.DataFrame, man: pl.DataFrame, rules: Rules | None = None) -> list[str | None]:
    ev = evaluate_candidates(cands, man, CLASSES, rules or Rules())
    return ev.sort("request_key").get_column("reason").to_list()


@pytest.mark.parametrize(
    "text,reason",
    [
        (chain("dog"), None),
        (chain("Dogs."), None),
        (chain("star"), "wrong_label"),
        (chain("cat"), "no_class"),
        (chain("dog or star"), "ambiguous_class"),
        (chain("dog")[:-20], "truncated"),
        (chain("dog").replace("</CAPTION>", ""), "malformed_tag"),
        ("", "empty"),
        (format_chain("Look.", "A dog.", "x " * 20, "ok fine good", "dog"), "too_short"),
        (format_chain("I look at it.", "A dog with two floppy ears.", "word " * 900, "ok fine good", "dog"), "too_long"),
        (format_chain("I look at it.", "A dog with two floppy ears.",
                      "It is a dog. It is a dog. It is a dog. It is a dog. It has four legs.", "Fine, it holds.",
                      "dog"), "repetition"),
    ],
)
def test_single_rules(text, reason):
    man = make_manifest(["dog"])
    assert reasons_of(make_cands([(0, 0, text)]), man) == [reason]


def test_stage_of_length_reason_and_error_and_unknown_image():
    man = make_manifest(["dog"])
    short = format_chain("Look.", "A dog with two ears.", "x " * 20, "ok fine good", "dog")
    ev = evaluate_candidates(make_cands([(0, 0, short)]), man, CLASSES, Rules())
    assert ev.row(0, named=True)["reason_stage"] == "SUMMARY"
    assert reasons_of(make_cands([(0, 0, None)], error="HTTP 500"), man) == ["generation_error"]
    assert reasons_of(make_cands([(0, 0, chain("dog"))], finish="length"), man) == ["truncated"]
    assert reasons_of(make_cands([(0, 0, chain("dog"))], finish="length"), man,
                      Rules(truncate_on_length=False)) == [None]
    assert reasons_of(make_cands([(7, 0, chain("dog"))]), man) == ["unknown_image"]


def test_template_collapse_rejects_bodies_copied_across_images():
    man = make_manifest(["dog"] * 8)
    same = format_chain("I look at it.", "A dog with two floppy ears.", "Four legs, a tail, fur and a snout: all of that says dog.", "This holds up well.", "dog")
    cands = make_cands([(i, 0, same) for i in range(6)] + [(6, 0, chain("dog", 6)), (7, 0, chain("dog", 7))])
    r = reasons_of(cands, man, Rules(template_max_images=5))
    assert r.count("template_collapse") == 6 and r.count(None) == 2
    assert reasons_of(cands, man, Rules(template_max_images=6)).count(None) == 8
    assert reasons_of(cands, man, Rules(template_max_images=None)).count(None) == 8


def test_multiword_class_and_synonyms():
    man = make_manifest(["Alarm_Clock"])
    cands = make_cands([(0, 0, chain("an alarm clock")), (0, 1, chain("a wake-up device"))])
    assert reasons_of(cands, man) == [None, "no_class"]
    assert reasons_of(cands, man, Rules(synonyms={"Alarm_Clock": ["wake up device"]})) == [None, None]


@pytest.mark.parametrize("policy,want", [("first", 1), ("shortest", 2), ("longest", 3), ("median", 1)])
def test_selection_policy(policy, want):
    man = make_manifest(["dog"])
    texts = {0: chain("star"), 1: chain("dog", reasoning="Outline fits a dog " + "and more " * 10),
             2: chain("dog", reasoning="Outline fits a dog " + "and more " * 5),
             3: chain("dog", reasoning="Outline fits a dog " + "and more " * 40)}
    cands = make_cands([(0, s, t) for s, t in texts.items()])
    ev = evaluate_candidates(cands, man, CLASSES, Rules())
    sel = select_chains(ev, policy)
    assert sel.height == 1 and sel.row(0, named=True)["sample_index"] == want


def test_kept_and_rejects_tables_and_schema():
    man = make_manifest(["dog", "star", "dog"], ["art", "photo", "photo"])
    cands = make_cands([(0, 1, chain("dog", 0)), (0, 0, chain("star", 0)), (1, 0, chain("star", 1)),
                        (2, 0, "garbage")])
    kept, rejects = filter_candidates(cands, man, CLASSES, Rules())
    assert kept.get_column("image_id").to_list() == [_iid(0), _iid(1)]  # manifest order, image 2 uncovered
    assert kept.columns[:10] == man.columns
    row = kept.row(0, named=True)
    assert row["sample_index"] == 1 and row["conclusion"] == "dog" and row["hinted"] is False
    assert row["teacher"] == "teach" and row["chain"].startswith("<SUMMARY>")
    assert sorted(rejects.get_column("reason").to_list()) == ["missing_stage", "wrong_label"]
    validate_kept(kept, CLASSES)
    bad = kept.with_columns(pl.lit("cat").alias("class_name"))
    with pytest.raises(ValueError, match="chain.schema.json"):
        validate_kept(bad, CLASSES)


def test_hinted_candidates_only_with_rationalization_and_lose_to_teacher():
    man = make_manifest(["dog", "dog"])
    teacher = make_cands([(0, 0, chain("dog", 0)), (1, 0, chain("star", 1))])
    hinted = make_cands([(0, 0, chain("dog", 10)), (1, 0, chain("dog", 11)), (1, 1, chain("dog", 12) +
                                                                            " (as the hint says)")],
                        prompt="rationalize")
    cands = pl.concat([teacher, hinted])
    kept, _ = filter_candidates(cands, man, CLASSES, Rules())
    assert kept.height == 1  # hinted ignored without rationalization
    kept, rej = filter_candidates(cands, man, CLASSES, Rules(use_hinted=True))
    assert kept.get_column("hinted").to_list() == [False, True]
    assert "hint_leak" not in rej.get_column("reason").to_list()  # the leak is outside the tags
    leak = make_cands([(1, 0, chain("dog", 13, reasoning="The hint says dog, and the outline with four legs fits a dog."))],
                      prompt="rationalize")
    ev = evaluate_candidates(pl.concat([teacher, leak]), man, CLASSES, Rules(use_hinted=True))
    assert "hint_leak" in ev.get_column("reason").to_list()


def test_duplicate_image_in_two_rows_is_judged_per_row():
    man = make_manifest(["dog", "star"]).with_columns(pl.lit(_iid(0)).alias("image_id"))
    kept, rejects = filter_candidates(make_cands([(0, 0, chain("dog"))]), man, CLASSES, Rules())
    assert kept.get_column("class_name").to_list() == ["dog"]
    assert rejects.get_column("reason").to_list() == ["wrong_label"]


def test_stats_report(tmp_path):
    from dbr_builder.stages.filter.stats import write_report

    man = make_manifest(["dog", "star", "dog", "star"], ["art", "art", "photo", "photo"])
    cands = pl.concat([
        make_cands([(0, 0, chain("dog", 0)), (1, 0, chain("dog", 1)), (1, 1, chain("star", 1)),
                    (2, 0, "nope"), (3, 0, chain("star", 3))]),
        make_cands([(2, 0, chain("dog", 20))], prompt="rationalize"),
    ])
    rules = Rules(use_hinted=True)
    ev = evaluate_candidates(cands, man, CLASSES, rules)
    kept, _ = filter_candidates(cands, man, CLASSES, rules)
    stats = write_report(tmp_path, "Toy", ev, man, kept, rationalized=1)
    out = tmp_path / "reports" / "Toy"
    assert json.loads((out / "stats.json").read_text())["coverage"]["overall"] == {
        "images": 4, "covered": 4, "hinted": 1, "coverage": 1.0, "coverage_unhinted": 0.75}
    assert {r["domain"]: r["accuracy"] for r in stats["teacher_zero_shot"]["by_domain"]} == {"art": 0.5, "photo": 0.5}
    assert {r["reason"]: r["count"] for r in stats["reasons"]} == {"wrong_label": 1, "missing_stage": 1}
    assert stats["candidates"]["total"] == 6 and stats["candidates"]["accepted"] == 4
    md = (out / "stats.md").read_text()
    assert "| photo | 2 | 2 | 1 | 1.0000 |" in md
    assert {p.name for p in out.glob("*.png")} == {"domains.png", "reasons.png", "classes.png"}
