"""The oracle teacher (SynthShapes only): true chains written from each image's scene attributes.

It reads ``scenes.jsonl`` (``dbr_builder.stages.synth.load_scenes``) of the tree an image belongs to,
and writes the five-stage chain a careful teacher would: corner count, straight or curved
edges, what the style does and does not change. To give the filter real work it injects, at
configurable rates, wrong conclusions (with reasoning that supports them, as a confused
teacher would), missing stages, reordered stages and malformed text (unclosed tags, no tags,
truncation). Every candidate is a pure function of (seed, image, request key, sample index).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from dbr_builder.backends.base import BackendError, Request, Result
from dbr_builder.core.scenes import CLASSES, SCENES_FILE, load_scenes

STAGES = ("SUMMARY", "CAPTION", "REASONING", "REFLECTION", "CONCLUSION")
HINT_MARK = "the correct class is \""


def _rng(*key: Any) -> random.Random:
    return random.Random(int(hashlib.sha256(repr(key).encode()).hexdigest()[:16], 16))


def _corner_phrase(k: int) -> str:
    return "no corners at all" if k == 0 else f"{k} corners"


class OracleBackend:
    """Deterministic synthetic teacher for SynthShapes (see module doc)."""

    wants_images = False  # reads scene attributes, never pixels

    def __init__(self, seed: int = 0, p_wrong: float = 0.15, p_missing: float = 0.05,
                 p_reorder: float = 0.05, p_malformed: float = 0.05):
        rates = {"p_wrong": p_wrong, "p_missing": p_missing, "p_reorder": p_reorder, "p_malformed": p_malformed}
        for k, v in rates.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise BackendError(f"oracle: {k}={v!r} must be a number between 0 and 1")
            if not 0.0 <= float(v) <= 1.0:
                raise BackendError(f"oracle: {k}={v} must be between 0 and 1")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BackendError(f"oracle: seed={seed!r} must be an integer")
        if p_missing + p_reorder + p_malformed > 1.0:
            raise BackendError("oracle: p_missing + p_reorder + p_malformed must not exceed 1")
        self.seed = int(seed)
        self.rates = {k: float(v) for k, v in rates.items()}
        args = ",".join(f"{k}={v:g}" for k, v in self.rates.items())
        self.model = f"oracle(seed={self.seed},{args})"
        self._scenes: dict[Path, dict[str, dict[str, Any]]] = {}

    # -- scene lookup -------------------------------------------------------------------------
    def _scene(self, image: str) -> dict[str, Any]:
        path = Path(image).resolve()
        for d in path.parents:
            if (d / SCENES_FILE).exists():
                if d not in self._scenes:
                    self._scenes[d] = load_scenes(d)
                rel = path.relative_to(d).as_posix()
                if rel not in self._scenes[d]:
                    raise KeyError(f"{image}: not listed in {d / SCENES_FILE}")
                return self._scenes[d][rel]
        raise FileNotFoundError(f"{image}: no scenes.jsonl above it; the oracle teacher only knows SynthShapes")

    # -- chain writing ------------------------------------------------------------------------
    def chain_parts(self, scene: dict[str, Any], claimed: str) -> dict[str, str]:
        """The five stages for ``scene`` concluding ``claimed`` (the true class or a wrong one)."""
        corners, structure = CLASSES[claimed]
        true_cls = scene["class_name"]
        edges = "one continuous curved edge" if corners == 0 else "straight edges meeting at sharp corners"
        others = [c for c in CLASSES if c != claimed]
        ruled = "; ".join(
            f"a {c} would show {_corner_phrase(CLASSES[c][0])}" for c in others
        )
        style = scene.get("style", "this rendering style")
        parts = {
            "SUMMARY": "I will trace the outline of the main object, count its corners and check whether its "
                       "edges are straight or curved, ignoring colours and the drawing style.",
            "CAPTION": f"A {scene['size']} {scene['fill_color']} shape sits near the {scene['position']} of the "
                       f"picture on a {scene['background']} background; it is rotated by about "
                       f"{round(float(scene.get('rotation_deg', 0)))} degrees.",
            "REASONING": f"Following the outline I count {_corner_phrase(corners)} and see {edges}. "
                         f"The shape has {structure}. Ruling out the alternatives: {ruled}. "
                         f"Only a {claimed} matches the evidence.",
            "REFLECTION": f"The picture is {style}; that changes colours and strokes but not the outline, "
                          f"so the count of {_corner_phrase(corners)} is still reliable. "
                          + ("The rotation does not change the number of corners." if corners else
                             "A circle looks the same at any rotation."),
            "CONCLUSION": claimed,
        }
        if claimed != true_cls:
            # A confused teacher: the reasoning supports the wrong class (the filter must catch it
            # by the conclusion, not by spotting a contradiction).
            parts["REFLECTION"] += " I double-checked the corners and I am confident."
        return parts

    @staticmethod
    def join(parts: dict[str, str], order: tuple[str, ...] = STAGES) -> str:
        return "\n".join(f"<{s}>{parts[s]}</{s}>" for s in order if s in parts)

    def candidate(self, scene: dict[str, Any], key: str, j: int, hinted: bool) -> tuple[str, str, dict[str, Any]]:
        """(text, finish_reason, injected faults) of sample ``j`` of request ``key``."""
        rng = _rng("oracle", self.seed, scene["path"], key, j)
        r = self.rates
        true_cls = scene["class_name"]
        wrong = (not hinted) and rng.random() < r["p_wrong"]
        claimed = rng.choice(sorted(c for c in CLASSES if c != true_cls)) if wrong else true_cls
        parts = self.chain_parts(scene, claimed)
        u = rng.random()
        fault = None
        finish = "stop"
        if u < r["p_missing"]:
            fault = "missing"
            del parts[rng.choice(STAGES)]
            text = self.join(parts)
        elif u < r["p_missing"] + r["p_reorder"]:
            fault = "reorder"
            i = rng.randrange(len(STAGES) - 1)
            order = list(STAGES)
            order[i], order[i + 1] = order[i + 1], order[i]
            text = self.join(parts, tuple(order))
        elif u < r["p_missing"] + r["p_reorder"] + r["p_malformed"]:
            fault = "malformed"
            text = self.join(parts)
            kind = rng.choice(("unclosed", "no_tags", "truncated"))
            if kind == "unclosed":
                text = text.replace(f"</{rng.choice(STAGES)}>", "", 1)
            elif kind == "no_tags":
                text = " ".join(parts.values())
            else:
                text = text[: rng.randrange(10, max(11, len(text) // 2))]
                finish = "length"
            fault = f"malformed:{kind}"
        else:
            text = self.join(parts)
        return text, finish, {"wrong": wrong, "fault": fault}

    def generate(self, requests: list[Request]) -> list[Result]:
        """Write ``n`` chains per request; a request without a known SynthShapes image fails alone."""
        out = []
        for req in requests:
            images = [p["path"] for p in req.content if p.get("type") == "image"]
            prompt = " ".join(p.get("text", "") for p in req.content if p.get("type") == "text")
            if len(images) != 1:
                out.append(Result(req.key, [], 0, [], error=f"request: oracle needs exactly one image, got {len(images)}"))
                continue
            try:
                scene = self._scene(images[0])
            except (FileNotFoundError, KeyError) as e:
                out.append(Result(req.key, [], 0, [], error=f"scene: {e}"))
                continue
            hinted = HINT_MARK in prompt
            texts, finishes = [], []
            for j in range(req.n):
                text, fin, _ = self.candidate(scene, req.key, j, hinted)
                texts.append(text)
                finishes.append(fin)
            out.append(Result(req.key, texts, sum(len(t.split()) for t in texts), finishes))
        return out

    def close(self) -> None:
        """Nothing to give back (no engine); part of the backend protocol."""
