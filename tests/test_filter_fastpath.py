"""The vectorised filter equals a plain per-row reference (parse_chain / ClassMatcher.find per row).

The reference below is written for clarity, not speed: one Python loop over (candidate,
manifest row) pairs, the rules in their documented order, sentence splitting with the
original one-pass regex, template collapse grouped by the exact case-folded body. The fast
path (``evaluate_candidates``: canonical-tag parse, per-distinct-conclusion matching, late
rules on survivors only, streaming engine) must give the same evaluated, kept and rejects
frames on a varied seeded sample that includes the tricky texts.
"""

from __future__ import annotations

import hashlib
import math
import random
import re

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from dbr_builder.core.answers import matcher
from dbr_builder.core.chains import FIELDS, STAGES, format_chain, parse_chain
from dbr_builder.stages.filter import (
    SENTENCE_SPLIT_REFERENCE,
    Rules,
    evaluate_candidates,
    filter_candidates,
    kept_table,
    rejects_table,
    sentences_expr,
)

CLASSES = ["Alarm_Clock", "dog", "star", "Knives", "Real World", "TV"]
SYNONYMS = {"dog": ["puppy"], "TV": ["television"]}
_HINT = re.compile(r"(?i)\bhint\b|correct class is")
_SENT = re.compile(SENTENCE_SPLIT_REFERENCE)


# --- the scalar reference ---------------------------------------------------------------------

def ref_sentences(body: str) -> list[str]:
    """The documented repetition split: the one-pass regex, strip '.', split on '.'."""
    return _SENT.sub(".", body.lower()).strip(".").split(".")


def reference_evaluate(cands: pl.DataFrame, man: pl.DataFrame, rules: Rules) -> pl.DataFrame:
    """``evaluate_candidates`` written as a per-row Python loop."""
    cm = matcher(CLASSES, rules.synonyms)
    rows_by_image: dict[str, list[int]] = {}
    for i, iid in enumerate(man.get_column("image_id").to_list()):
        rows_by_image.setdefault(iid, []).append(i)
    mrows = man.to_dicts()
    out = []
    for c in cands.to_dicts():
        if rules.models is not None and c["model"] not in rules.models:
            continue
        if not rules.use_hinted and c["prompt_name"] == "rationalize":
            continue
        p = parse_chain(c["text"])
        found = cm.find(p.conclusion) if p.conclusion is not None else []
        pred = found[0] if len(found) == 1 else None
        toks = {f: math.ceil(len(getattr(p, f) or "") / 4) for f in FIELDS}
        hinted = c["prompt_name"] == "rationalize"
        for r in rows_by_image.get(c["image_id"], [None]):
            m = mrows[r] if r is not None else {"domain": None, "class_name": None, "label": None}
            reason, stage = None, None
            if c["error"] is not None:
                reason = "generation_error"
            elif r is None:
                reason = "unknown_image"
            elif rules.truncate_on_length and c["finish_reason"] == "length":
                reason = "truncated"
            elif p.reason is not None:
                reason, stage = p.reason, p.stage
            elif not found:
                reason = "no_class"
            elif len(found) > 1:
                reason = "ambiguous_class"
            elif pred != m["class_name"]:
                reason = "wrong_label"
            else:
                for f in FIELDS:
                    lo, hi = rules.length[f]
                    if toks[f] < lo or toks[f] > hi:
                        reason, stage = ("too_short" if toks[f] < lo else "too_long"), f.upper()
                        break
            body = "\n".join(getattr(p, f) for f in FIELDS[:4]) if p.ok else None
            if reason is None and rules.max_repeat_fraction is not None:
                s = ref_sentences(body)
                n = len(s)
                if n >= rules.min_sentences_for_repeat and n - len(set(s)) > rules.max_repeat_fraction * n:
                    reason = "repetition"
            if reason is None and hinted and _HINT.search(body):
                reason = "hint_leak"
            out.append({
                **c, "_row": r, "domain": m["domain"], "class_name": m["class_name"], "label": m["label"],
                **{f: getattr(p, f) for f in FIELDS}, "truncated": p.truncated, "reason_stage": stage,
                "pred": pred, **{f"tokens_{f}": toks[f] for f in FIELDS}, "tokens": sum(toks.values()),
                "hinted": hinted, "reason": reason, "_lower": body.lower() if body is not None else None,
            })
    if rules.template_max_images is not None:
        images: dict[str, set[str]] = {}
        for o in out:
            if o["reason"] is None:
                images.setdefault(o["_lower"], set()).add(o["image_id"])
        for o in out:
            if o["reason"] is None and len(images[o["_lower"]]) > rules.template_max_images:
                o["reason"] = "template_collapse"
    for o in out:
        del o["_lower"]
    schema = {**cands.schema, "_row": pl.UInt32, "domain": pl.String, "class_name": pl.String, "label": pl.Int64,
              **dict.fromkeys(FIELDS, pl.String), "truncated": pl.Boolean, "reason_stage": pl.String,
              "pred": pl.String, **{f"tokens_{f}": pl.Int64 for f in FIELDS}, "tokens": pl.Int64,
              "hinted": pl.Boolean, "reason": pl.String}
    return pl.DataFrame(out, schema=schema, orient="row") if out else pl.DataFrame(schema=schema)


# --- a varied sample --------------------------------------------------------------------------

def _iid(i: int) -> str:
    return hashlib.sha256(f"img{i}".encode()).hexdigest()


WORDS = ["the", "outline", "fits", "a", "four", "legs", "Tail", "ÉCLAIR", "straße", "hint", "correct class is",
         "points", "<b>", "a < b", "x\x00y", "\t", "  ", "!", "?", "...", ". .", "\n", "DOG", "dogs"]
CONCLUSIONS = ["dog", "Dogs.", "a puppy", "star", "cat", "dog or star", "an alarm-clock", "ALARM_CLOCKS", "knife",
               "Real-World", "television", "TVs", "", "  ", "**Star**", "tv and dog", "é"]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))


def _stage_text(rng: random.Random, min_words: int) -> str:
    parts = [_sentence(rng) for _ in range(rng.randint(1, 4))]
    text = rng.choice([". ", ".", "! ", " . ", "\n", "?  "]).join(parts)
    while len(text) < min_words * 4:
        text += " " + _sentence(rng)
    return text


def _tricky_chain(rng: random.Random, cls: str) -> str:
    summary, caption = _stage_text(rng, 4), _stage_text(rng, 6)
    reasoning, reflection = _stage_text(rng, 16), _stage_text(rng, 4)
    concl = rng.choice([cls, cls.lower() + "s"]) if rng.random() < 0.6 else rng.choice(CONCLUSIONS)
    kind = rng.random()
    if kind < 0.08:  # degenerate repetition, with case and blank variants of one sentence
        rep = "It is a dog"
        reasoning = " . ".join(rng.choice([rep, rep.upper(), rep.lower(), "it is a dog "]) for _ in range(6))
    text = format_chain(summary, caption, reasoning, reflection, concl)
    mutate = rng.random()
    if mutate < 0.08:
        text = text.replace("<SUMMARY>", "< summary >").replace("</CAPTION>", "</ Caption>")
    elif mutate < 0.14:
        text = text[: rng.randint(0, len(text))]
    elif mutate < 0.18:
        text = text.replace("<REFLECTION>", "").replace("</REFLECTION>", "")
    elif mutate < 0.21:
        text = text + "<SUMMARY>again</SUMMARY>"
    elif mutate < 0.24:
        text = text.replace("</SUMMARY>", "")
    elif mutate < 0.27:
        text = format_chain(summary, " \n ", reasoning, reflection, concl)
    elif mutate < 0.30:
        text = "Sure!\n" + text.replace("><", ">\n\n<") + "\nBye <"
    elif mutate < 0.32:
        text = text.replace("<CAPTION>", "<CAPTION>\x00")
    elif mutate < 0.34:
        text = rng.choice(["", "   ", "no tags at all", "<SUMMARY>open"])
    return text


def make_sample(seed: int, n_images: int = 60, per_image: int = 4) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A manifest (with one image in two rows) and candidates with every failure mode."""
    rng = random.Random(seed)
    labels = [rng.choice(CLASSES) for _ in range(n_images)]
    ids = [_iid(i) for i in range(n_images)]
    ids[1] = ids[0]  # identical file in two manifest rows
    man = pl.DataFrame({
        "image_id": ids, "dataset": "Toy", "domain": [rng.choice(["art", "photo"]) for _ in ids],
        "class_name": labels, "label": [CLASSES.index(c) for c in labels],
        "path": [f"d/{c}/{i}.png" for i, c in enumerate(labels)],
    })
    template = format_chain("I look at the image.", "An object with distinct parts.",
                            "Four legs, a tail, fur and a snout: all of that says dog, so dog it is.",
                            "This holds up well.", "dog")
    rows = []
    for i in range(n_images + 3):  # the last three images are not in the manifest
        cls = labels[i] if i < n_images else "dog"
        for s in range(per_image):
            r = rng.random()
            if r < 0.1:
                text = template.replace("This", rng.choice(["This", "THIS", "this"]))
            else:
                text = _tricky_chain(rng, cls)
            prompt = "rationalize" if rng.random() < 0.15 else "teacher"
            rows.append({
                "request_key": f"k{i}-{s}-{prompt}", "image_id": _iid(i), "prompt_name": prompt,
                "prompt_id": "p" * 16, "model": rng.choice(["teach", "other"]), "params": "{}", "sample_index": s,
                "text": None if r > 0.98 else text, "finish_reason": "length" if rng.random() < 0.05 else "stop",
                "out_tokens": 10, "error": "HTTP 500" if r > 0.98 else None,
            })
    cands = pl.DataFrame(rows, schema_overrides={"error": pl.String, "text": pl.String})
    return cands, man


RULE_SETS = [
    Rules(synonyms=SYNONYMS),
    Rules(synonyms=SYNONYMS, use_hinted=True, template_max_images=2, min_sentences_for_repeat=1,
          max_repeat_fraction=0.0, truncate_on_length=False),
    Rules(use_hinted=True, max_repeat_fraction=None, template_max_images=None, models=["teach"], select="median",
          length={f: (0, 10_000) for f in FIELDS}),
    Rules(synonyms=SYNONYMS, use_hinted=True, template_max_images=1, select="longest",
          length={f: (1, 25) for f in FIELDS}),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rules", RULE_SETS, ids=["default", "strict", "loose", "short"])
def test_fast_path_equals_scalar_reference(seed, rules):
    cands, man = make_sample(seed)
    want = reference_evaluate(cands, man, rules)
    got = evaluate_candidates(cands, man, CLASSES, rules)
    assert got.columns == want.columns
    assert_frame_equal(got, want)
    # the sample exercises what it is meant to
    reasons = set(got.get_column("reason").drop_nulls().to_list())
    assert {"truncated", "wrong_label", "no_class", "unknown_image"} <= reasons
    assert got.get_column("reason").null_count() > 0
    # and the published tables built from either are the same
    kept, rejects = filter_candidates(cands, man, CLASSES, rules)
    assert_frame_equal(kept, kept_table(want, man, rules.select))
    assert_frame_equal(rejects, rejects_table(want, man))


def test_sample_covers_the_rare_rules():
    """Across the seeds the sample hits repetition, hint leak, template collapse and parser codes."""
    seen: set[str] = set()
    for seed in range(3):
        cands, man = make_sample(seed)
        for rules in RULE_SETS:
            seen |= set(reference_evaluate(cands, man, rules).get_column("reason").drop_nulls().to_list())
    assert {"repetition", "hint_leak", "template_collapse", "malformed_tag", "missing_stage", "duplicate_stage",
            "empty_stage", "empty", "ambiguous_class", "too_long", "too_short", "generation_error"} <= seen


def test_empty_candidates():
    cands, man = make_sample(0)
    got = evaluate_candidates(cands.head(0), man, CLASSES, Rules())
    assert got.height == 0
    assert got.columns == reference_evaluate(cands.head(0), man, Rules()).columns


_blanky = st.text(alphabet=st.sampled_from(list("ab. \t\n!?xY")), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_blanky)
def test_two_pass_sentence_split_equals_one_pass_regex(body):
    got = pl.DataFrame({"b": [body]}).select(sentences_expr(pl.col("b").str.to_lowercase())).item().to_list()
    assert got == ref_sentences(body)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(STAGES), st.booleans(), st.text(alphabet="ab <>/\x00", max_size=4)),
                max_size=12))
def test_canonical_detection_never_misparses(parts):
    """Texts built from canonical tags and junk: the fast parse agrees with parse_chain per row."""
    from dbr_builder.core.chains import parse_chains_frame

    texts = ["".join(f"<{'/' if close else ''}{s}>{junk}" for s, close, junk in parts),
             format_chain(*(j or "z" for _, _, j in (parts + [("", False, "")] * 5)[:5]))]
    frame = parse_chains_frame(texts)
    assert frame.to_dicts() == [parse_chain(t).to_dict() for t in texts]
