"""SARR self-labeling: exactly the correct self chains are kept; the rejection rate is logged."""

from __future__ import annotations

import pytest

CLASSES = ["circle", "hexagon", "pentagon", "square", "star", "triangle"]


def _chain(conclusion: str) -> str:
    from dbr_builder.core.chains import format_chain

    return format_chain("Count corners.", "A shape.", "It has corners.", "Style does not matter.", conclusion)


@pytest.fixture(scope="module")
def examples(synth_root):
    from trainers.data import examples_from_rows, rows_from_synth

    exs = examples_from_rows(rows_from_synth(synth_root / "SynthShapes"))
    return exs[::16][:6]


def _scripted(examples):
    """Candidate chains per image (what a student might write), by position:
    0 right; 1 wrong class; 2 malformed then right (second candidate kept); 3 truncated;
    4 conclusion naming no class; 5 right in plural form ("circles" -> circle)."""
    out = []
    for i, ex in enumerate(examples):
        wrong = next(c for c in CLASSES if c != ex.class_name)
        out.append({
            0: [_chain(ex.class_name), _chain(wrong)],
            1: [_chain(wrong), _chain(wrong)],
            2: ["<SUMMARY>no tags closed", _chain(ex.class_name)],
            3: [_chain(ex.class_name)[:-20], ""],
            4: [_chain("a banana"), _chain("blue")],
            5: [_chain(ex.class_name + "s"), _chain(wrong)],
        }[i])
    return out


@pytest.mark.parametrize("policy", ["keep_teacher", "drop"])
def test_keeps_exactly_the_correct_chains(examples, policy):
    from trainers.sarr import SarrConfig, self_label

    scripted = _scripted(examples)
    # `generate` is the round's chain source (a parameter of self_label, like a Backend): the
    # scripted texts stand in for the student so that every verdict is known in advance.
    kept, stats, records = self_label(examples, CLASSES, lambda exs: scripted, SarrConfig(n=2, no_correct=policy))
    self_ids = {e.image_id for e in kept if e.chain_source == "self"}
    assert self_ids == {examples[i].image_id for i in (0, 2, 5)}
    by_id = {e.image_id: e for e in kept}
    assert by_id[examples[0].image_id].chain == scripted[0][0]
    assert by_id[examples[2].image_id].chain == scripted[2][1]  # the first *correct* candidate
    assert stats["rejected"] == 3 and stats["rejection_rate"] == pytest.approx(0.5)
    if policy == "keep_teacher":
        assert len(kept) == 6
        for i in (1, 3, 4):
            assert by_id[examples[i].image_id].chain == examples[i].chain  # teacher chain kept
    else:
        assert len(kept) == 3 and stats["train_images"] == 3
    assert [r["kept"] for r in records] == [True, False, True, False, False, True]
    assert records[1]["verdicts"] == ["wrong_class", "wrong_class"]
    assert records[3]["verdicts"][0] == "truncated"
    assert records[4]["verdicts"] == ["no_class", "no_class"]


def test_records_round_trip_rebuilds_the_round(examples, tmp_path):
    from trainers.sarr import SarrConfig, examples_from_records, load_records, save_records, self_label

    kept, _, records = self_label(examples, CLASSES, lambda exs: _scripted(exs), SarrConfig(n=2, no_correct="drop"))
    save_records(tmp_path / "r.jsonl", records)
    again = examples_from_records(examples, load_records(tmp_path / "r.jsonl"), "drop")
    assert [(e.image_id, e.chain) for e in again] == [(e.image_id, e.chain) for e in kept]


def test_unknown_policy_is_refused(examples):
    from trainers.sarr import SarrConfig, self_label

    with pytest.raises(ValueError, match="no_correct"):
        self_label(examples, CLASSES, lambda exs: [[] for _ in exs], SarrConfig(no_correct="maybe"))


def test_generate_with_the_live_model(tiny_model_path, examples):
    """The real in-process path: batched, left-padded generate with the student's chat template."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from trainers.data import SampleEncoder
    from trainers.sarr import SarrConfig, generate_with_model, self_label

    processor = AutoProcessor.from_pretrained(tiny_model_path)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path)
    enc = SampleEncoder(processor, CLASSES)
    sc = SarrConfig(n=2, max_new_tokens=6, temperature=1.0, batch_size=4)
    texts = generate_with_model(model, enc, examples[:3], sc, seed=0)
    assert len(texts) == 3 and all(len(t) == 2 and all(isinstance(s, str) for s in t) for t in texts)
    assert processor.tokenizer.padding_side == "left"  # restored
    torch.manual_seed(0)
    # A random model writes no valid chain: everything is rejected, and the rate says so.
    _, stats, _ = self_label(examples[:3], CLASSES, lambda exs: generate_with_model(model, enc, exs, sc, 0), sc)
    assert stats["rejection_rate"] == 1.0 and stats["images"] == 3
