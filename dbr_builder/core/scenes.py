"""SynthShapes vocabulary: domains, classes and scene attributes.

Shared by the ``synth`` stage that draws the benchmark, the oracle teacher that describes
it and the trainer's scene-based extras, so none of them imports another stage.
"""

from __future__ import annotations

import json
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
META_FILE = "synth.json"
SCENES_FILE = "scenes.jsonl"


def load_scenes(dataset_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Read ``scenes.jsonl`` of a SynthShapes tree: relative image path -> scene attributes."""
    path = Path(dataset_dir) / SCENES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no scene attributes; is this a SynthShapes tree? Run `dbr synth` first")
    with open(path, encoding="utf-8") as f:
        return {s["path"]: s for s in map(json.loads, f)}
