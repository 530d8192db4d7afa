"""Oracle teacher: true chains from scene attributes, deterministic, faults at the configured rates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dbr_builder.backends import BackendError, Request, make_backend
from dbr_builder.stages.synth import load_scenes

TAGS = ("SUMMARY", "CAPTION", "REASONING", "REFLECTION", "CONCLUSION")


def _requests(synth_root: Path, n: int, text: str = "prompt") -> tuple[list[Request], list[str]]:
    ds = synth_root / "SynthShapes"
    scenes = load_scenes(ds)
    reqs, truth = [], []
    for rel, sc in sorted(scenes.items()):
        reqs.append(Request(f"k-{rel}", [{"type": "text", "text": text}, {"type": "image", "path": str(ds / rel)}], n=n))
        truth.append(sc["class_name"])
    return reqs, truth


def _classify(text: str) -> str:
    tags = re.findall(r"<(/?)([A-Z]+)>", text)
    opens = [t for c, t in tags if not c]
    closes = [t for c, t in tags if c]
    if opens == list(TAGS) and closes == list(TAGS):
        return "ok"
    if not tags or opens != closes:
        return "malformed"
    if len(opens) == 4:
        return "missing"
    return "reorder" if sorted(opens) == sorted(TAGS) else "malformed"


def test_clean_oracle_writes_true_complete_chains(synth_root: Path) -> None:
    be = make_backend("oracle", p_wrong=0, p_missing=0, p_reorder=0, p_malformed=0)
    reqs, truth = _requests(synth_root, 1)
    for res, cls, req in zip(be.generate(reqs), truth, reqs, strict=True):
        [t] = res.texts
        assert _classify(t) == "ok" and t.endswith(f"<CONCLUSION>{cls}</CONCLUSION>")
        scene = load_scenes(synth_root / "SynthShapes")[req.key[2:]]
        assert scene["fill_color"] in t and scene["position"] in t  # caption from the attributes
        corners = scene["corners"]
        assert (f"count {corners} corners" in t) if corners else ("no corners" in t)


def test_deterministic_per_seed(synth_root: Path) -> None:
    reqs, _ = _requests(synth_root, 3)
    a = [r.texts for r in make_backend("oracle,seed=1").generate(reqs)]
    b = [r.texts for r in make_backend("oracle", seed=1).generate(reqs)]
    c = [r.texts for r in make_backend("oracle", seed=2).generate(reqs)]
    assert a == b and a != c
    assert make_backend("oracle", seed=1).model != make_backend("oracle", seed=2).model


def test_fault_rates_match_configuration(synth_root: Path) -> None:
    rates = {"p_wrong": 0.3, "p_missing": 0.1, "p_reorder": 0.1, "p_malformed": 0.1}
    be = make_backend("oracle", seed=0, **rates)
    reqs, truth = _requests(synth_root, 25)  # 96 images x 25 = 2400 samples
    kinds: dict[str, int] = {}
    wrong = total = with_concl = 0
    for res, cls in zip(be.generate(reqs), truth, strict=True):
        for t in res.texts:
            total += 1
            k = _classify(t)
            kinds[k] = kinds.get(k, 0) + 1
            m = re.search(r"<CONCLUSION>(\w+)</CONCLUSION>", t)
            if m and k in ("ok", "reorder"):
                with_concl += 1
                wrong += m.group(1) != cls
    for k in ("missing", "reorder", "malformed"):
        assert abs(kinds.get(k, 0) / total - rates[f"p_{k}"]) < 0.03, (k, kinds)
    assert abs(wrong / with_concl - rates["p_wrong"]) < 0.04


def test_hinted_prompt_is_never_wrong_and_bad_inputs(synth_root: Path, tmp_path: Path) -> None:
    be = make_backend("oracle", p_wrong=1.0)
    reqs, truth = _requests(synth_root, 2, text='Hint: the correct class is "x".')
    for res, cls in zip(be.generate(reqs[:10]), truth[:10], strict=True):
        assert all(cls in t.split("<CONCLUSION>")[-1] for t in res.texts if "<CONCLUSION>" in t)
    [res] = be.generate([Request("k", [{"type": "image", "path": str(tmp_path / "a.png")}])])
    assert res.error.startswith("scene:") and res.texts == []
    with pytest.raises(BackendError, match="p_wrong"):
        make_backend("oracle", p_wrong=1.5)
    with pytest.raises(BackendError, match="unknown option"):
        make_backend("oracle", p_worng=0.1)


def test_shortcut_variant_chains_describe_shape_only(tmp_path: Path) -> None:
    """Chains of the shortcut variant never name a colour or the background (the spurious attribute);
    wrong conclusions stay inside the variant's class set."""
    from dbr_builder.core.scenes import BACKGROUNDS, COLORS, SHORTCUT_CLASSES
    from dbr_builder.stages.synth import write_synthshapes

    write_synthshapes(tmp_path, per_class=3, image_size=32, variant="shortcut",
                      spurious={"attribute": "background", "agreement": {"photo": 0.9}})
    reqs, truth = _requests(tmp_path, 4)
    colour_words = {w for name in list(COLORS) + list(BACKGROUNDS) for w in name.split()}
    clean = make_backend("oracle", p_wrong=0, p_missing=0, p_reorder=0, p_malformed=0)
    for res, cls in zip(clean.generate(reqs), truth, strict=True):
        for t in res.texts:
            assert _classify(t) == "ok" and t.endswith(f"<CONCLUSION>{cls}</CONCLUSION>")
            assert not colour_words & set(re.findall(r"[a-z]+", t.lower())), t
            assert "corner" in t and "outline" in t  # the shape evidence
    wrong = make_backend("oracle", p_wrong=1.0, p_missing=0, p_reorder=0, p_malformed=0)
    for res, cls in zip(wrong.generate(reqs), truth, strict=True):
        for t in res.texts:
            concl = re.search(r"<CONCLUSION>(.*)</CONCLUSION>", t).group(1)
            assert concl != cls and concl in SHORTCUT_CLASSES
