"""SynthShapes vocabulary: domains, classes and scene attributes.

Shared by the ``synth`` stage that draws the benchmark, the oracle teacher that describes
it and the trainer's scene-based extras, so none of them imports another stage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

DATASET = "SynthShapes"
DOMAINS = ("cartoon", "painting", "photo", "sketch")
# class -> (number of outer corners, description of its structure)
CLASSES: dict[str, tuple[int, str]] = {
    "circle": (0, "a single smooth curved edge and no corners"),
    "hexagon": (6, "six straight sides of equal length and six corners"),
    "pentagon": (5, "five straight sides of equal length and five corners"),
    "square": (4, "four straight sides of equal length and four right-angle corners"),
    "star": (10, "five pointed tips and five inner notches, ten straight edges in all"),
    "triangle": (3, "three straight sides and three corners"),
}
STYLES = {
    "cartoon": "a cartoon drawing with flat colours and a thick black outline",
    "painting": "a painting with visible brush strokes and blended colour dabs",
    "photo": "a photo-like rendering with shading, a soft shadow and a textured background",
    "sketch": "a pencil sketch in grey strokes with hatching on white paper",
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40), "orange": (240, 140, 30), "yellow": (235, 205, 40), "green": (50, 160, 60),
    "blue": (40, 90, 210), "purple": (130, 60, 170), "pink": (235, 120, 170), "brown": (130, 80, 40),
    "teal": (30, 150, 150), "gray": (120, 120, 120),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "cream": (245, 235, 210), "sky blue": (180, 215, 240), "mint": (200, 235, 210), "lavender": (220, 210, 240),
    "sand": (225, 205, 170), "light gray": (215, 215, 215), "peach": (250, 215, 190),
}
# The "shortcut" variant (docs/RESULTS.md): a benchmark a tiny student can learn on CPU, with a
# spurious attribute whose agreement with the class is set per domain (ColoredMNIST / Waterbirds
# style). Fewer, more distinct shapes, drawn large near the centre; one value of the spurious
# attribute per class (class i of the sorted class set <-> value i).
VARIANTS = ("classic", "shortcut")
SHORTCUT_CLASSES = ("circle", "square", "star", "triangle")
SPURIOUS_ATTRIBUTES = ("background", "color")
SPURIOUS_VALUES: dict[str, tuple[str, ...]] = {
    # six well-separated values: enough for any class subset of CLASSES
    "background": ("sky blue", "peach", "mint", "lavender", "sand", "light gray"),
    "color": ("red", "blue", "green", "yellow", "purple", "teal"),
}
def shape_vertices(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Outline of ``shape`` centred at (cx, cy) with radius ``r`` and rotation ``rot`` (radians), unit coordinates."""
    if shape == "circle":
        n, radii = 64, [r]
    elif shape == "star":
        n, radii = 10, [r, r * 0.45]
    else:
        n, radii = CLASSES[shape][0], [r]
    return [
        (cx + radii[i % len(radii)] * math.cos(rot + 2 * math.pi * i / n - math.pi / 2),
         cy + radii[i % len(radii)] * math.sin(rot + 2 * math.pi * i / n - math.pi / 2))
        for i in range(n)
    ]


META_FILE = "synth.json"
SCENES_FILE = "scenes.jsonl"


def load_scenes(dataset_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Read ``scenes.jsonl`` of a SynthShapes tree: relative image path -> scene attributes."""
    path = Path(dataset_dir) / SCENES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no scene attributes; is this a SynthShapes tree? Run `dbr synth` first")
    with open(path, encoding="utf-8") as f:
        return {s["path"]: s for s in map(json.loads, f)}


def spurious_value(attribute: str, classes: list[str] | tuple[str, ...], class_name: str) -> str:
    """The value of the spurious attribute that goes with ``class_name`` (its index in sorted ``classes``)."""
    return SPURIOUS_VALUES[attribute][sorted(classes).index(class_name)]


def _corner_phrase(k: int) -> str:
    return "no corners at all" if k == 0 else f"{k} corners"


def shape_chain_parts(scene: dict[str, Any], claimed: str) -> dict[str, str]:
    """The five chain stages for ``scene`` concluding ``claimed``, from shape evidence only.

    Used for the shortcut variant: no word about colours or the background (the spurious
    attribute), only the outline: its size, place, width and tilt, corner count, straight or
    curved edges and its structure, and that the domain's style does not change it. Short (about
    90 tokens with the tiny student's tokenizer), so that training on chains and generating them
    fits CPU minutes; the width and tilt make chains of one class differ from image to image (the
    filter rejects a chain body shared by many images as template collapse).
    """
    corners, structure = CLASSES[claimed]
    edges = "one curved edge" if corners == 0 else "straight edges meeting at sharp corners"
    rot = float(scene.get("rotation_deg", 0))
    rot = rot - 360 if rot > 180 else rot
    tilt = round(abs(rot))
    turn = ("the same at any rotation" if not corners else "standing upright" if tilt < 3
            else f"tilted about {tilt} degrees to the {'left' if rot > 0 else 'right'}")
    # the outline's extent: image-specific geometry, so chains of one class are not all alike
    wide = round(200 * float(scene.get("size_frac", 0.3)))
    parts = {
        "SUMMARY": "I count the corners of the outline and check its edges.",
        "CAPTION": f"A {scene['size']} shape near the {scene['position']}, about {wide} % of the picture wide, {turn}.",
        "REASONING": f"The outline has {_corner_phrase(corners)} and {edges}: {structure}.",
        "REFLECTION": f"The {scene['domain']} style does not change the outline, so the count holds.",
        "CONCLUSION": claimed,
    }
    if claimed != scene["class_name"]:
        parts["REFLECTION"] += " I double-checked the corners."
    return parts
