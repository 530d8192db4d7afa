"""SynthShapes: the embedded, deterministic synthetic DG benchmark (``dbr synth``).

Six classes told apart only by structure (corner count, straight vs curved edges,
convex vs star-shaped) are drawn in four visually distinct domains, with random
colour, size, position and rotation. The layout is DomainBed's
(``ROOT/SynthShapes/<domain>/<class>/<image>.png``) and every image's scene
attributes go to ``ROOT/SynthShapes/scenes.jsonl`` so that the oracle teacher can
write true reasoning chains from them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

from dbr_builder.config import (
    add_option,
    flags_of,
    options_from_args,
    resolve,
    schema_defaults,
    validate_options,
)
from dbr_builder.core.fsutil import atomic_dir, recover_dir, write_json_atomic
from dbr_builder.core.locks import stage_lock
from dbr_builder.core.scenes import (  # noqa: F401  (re-exported: the stage's vocabulary)
    BACKGROUNDS,
    CLASSES,
    COLORS,
    DATASET,
    DOMAINS,
    META_FILE,
    SCENES_FILE,
    STYLES,
    load_scenes,
)
from dbr_builder.log import show_progress


def _rng(*key: Any) -> random.Random:
    return random.Random(int(hashlib.sha256(repr(key).encode()).hexdigest()[:16], 16))


def _vertices(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
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


def _position_name(cx: float, cy: float) -> str:
    col = "left" if cx < 0.42 else "right" if cx > 0.58 else ""
    row = "upper" if cy < 0.42 else "lower" if cy > 0.58 else ""
    if not row and not col:
        return "center"
    return f"{row} {col}".strip() if row and col else (row or col).replace("upper", "top").replace("lower", "bottom")


def _jitter(c: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in c)  # type: ignore[return-value]


def _mask(size: int, pts: list[tuple[float, float]]) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).polygon(pts, fill=255)
    return m


def render(scene: dict[str, Any], size: int, rng: random.Random) -> Image.Image:
    """Draw one scene in its domain's style."""
    pts = [(x * size, y * size) for x, y in _vertices(
        scene["shape"], scene["cx"], scene["cy"], scene["size_frac"], math.radians(scene["rotation_deg"]))]
    fill = tuple(scene["fill_rgb"])
    bg = BACKGROUNDS[scene["background"]]
    dom = scene["domain"]
    if dom == "cartoon":
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        d.polygon(pts, fill=fill)
        d.line(pts + [pts[0]], fill=(0, 0, 0), width=max(3, size // 32), joint="curve")
        return img
    if dom == "sketch":
        img = Image.new("RGB", (size, size), (250, 250, 246))
        hatch = Image.new("RGB", (size, size), (250, 250, 246))
        hd = ImageDraw.Draw(hatch)
        step = max(4, size // 20)
        for k in range(-size, size, step):
            hd.line([(k, size), (k + size, 0)], fill=(150, 150, 150), width=1)
        img = Image.composite(hatch, img, _mask(size, pts))
        d = ImageDraw.Draw(img)
        for _ in range(3):  # several jittered passes look like a pencil outline
            jp = [(x + rng.uniform(-1.5, 1.5), y + rng.uniform(-1.5, 1.5)) for x, y in pts]
            d.line(jp + [jp[0]], fill=_jitter((70, 70, 70), rng, 20), width=1)
        return img
    if dom == "painting":
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        for _ in range(size // 2):
            x, y = rng.uniform(0, size), rng.uniform(0, size)
            w, h = rng.uniform(size / 12, size / 5), rng.uniform(size / 40, size / 16)
            d.ellipse([x, y, x + w, y + h], fill=_jitter(bg, rng, 25))
        dabs = Image.new("RGB", (size, size), fill)
        dd = ImageDraw.Draw(dabs)
        for _ in range(size):
            x, y = rng.uniform(0, size), rng.uniform(0, size)
            rr = rng.uniform(size / 50, size / 20)
            dd.ellipse([x - rr, y - rr, x + rr, y + rr], fill=_jitter(fill, rng, 45))
        img = Image.composite(dabs, img, _mask(size, pts))
        return img.filter(ImageFilter.SMOOTH_MORE)
    # photo: vertical gradient + noise background, shaded fill, soft shadow
    img = Image.new("RGB", (size, size))
    top, bottom = _jitter(bg, rng, 20), tuple(int(v * 0.7) for v in bg)
    d = ImageDraw.Draw(img)
    for y in range(size):
        t = y / max(1, size - 1)
        d.line([(0, y), (size, y)], fill=tuple(int(a * (1 - t) + b * t) for a, b in zip(top, bottom, strict=True)))
    # seeded noise (PIL's effect_noise uses the C library's unseeded rand())
    noise = Image.frombytes("L", (size, size), rng.randbytes(size * size)).convert("RGB")
    img = Image.blend(img, noise, 0.08)
    off = max(2, size // 25)
    shadow = _mask(size, [(x + off, y + off) for x, y in pts]).filter(ImageFilter.GaussianBlur(size / 40))
    img = Image.composite(Image.new("RGB", (size, size), (40, 40, 40)), img, shadow.point(lambda v: v * 6 // 10))
    shade = Image.new("RGB", (size, size))
    sd = ImageDraw.Draw(shade)
    light, dark = tuple(min(255, int(v * 1.35) + 30) for v in fill), tuple(int(v * 0.55) for v in fill)
    for k in range(2 * size):
        t = k / (2 * size - 1)
        sd.line([(k, 0), (0, k)], fill=tuple(int(a * (1 - t) + b * t) for a, b in zip(light, dark, strict=True)))
    return Image.composite(shade, img, _mask(size, pts))


def make_scene(seed: int, domain: str, class_name: str, index: int) -> dict[str, Any]:
    """Sample the attributes of one image (deterministic in its arguments)."""
    rng = _rng("scene", seed, domain, class_name, index)
    color = rng.choice(sorted(COLORS))
    background = rng.choice(sorted(BACKGROUNDS))
    size_frac = round(rng.uniform(0.17, 0.36), 4)
    margin = size_frac + 0.04
    cx, cy = round(rng.uniform(margin, 1 - margin), 4), round(rng.uniform(margin, 1 - margin), 4)
    rotation = round(rng.uniform(0, 360), 2) if class_name != "circle" else 0.0
    corners, structure = CLASSES[class_name]
    return {
        "domain": domain, "class_name": class_name, "shape": class_name, "corners": corners,
        "structure": structure, "fill_color": color, "fill_rgb": list(COLORS[color]),
        "outline_color": "black" if domain == "cartoon" else "grey" if domain == "sketch" else "none",
        "background": background, "size_frac": size_frac,
        "size": "small" if size_frac < 0.23 else "medium" if size_frac < 0.30 else "large",
        "cx": cx, "cy": cy, "position": _position_name(cx, cy), "rotation_deg": rotation,
        "style": STYLES[domain], "seed": seed,
    }


_D = schema_defaults("synth")  # the option defaults, defined once in schemas/stages/synth.schema.json


def write_synthshapes(root: str | Path, seed: int = _D["seed"], per_class: int = _D["per_class"],
                      image_size: int = _D["image_size"],
                      force: bool = False, progress: bool = False) -> Path:
    """Write ``ROOT/SynthShapes`` (idempotent: an identical existing tree is kept as is).

    The tree is built in a temporary folder beside the target and renamed into place,
    so an interrupted run never leaves a partial dataset.
    """
    if per_class < 1 or not 32 <= image_size <= 2048 or seed < 0:
        raise ValueError("per_class must be >= 1, image_size in [32, 2048] and seed >= 0")
    root = Path(root)
    dest = root / DATASET
    params = {"seed": seed, "per_class": per_class, "image_size": image_size, "version": 1}
    meta_path = dest / META_FILE
    if not force and meta_path.exists() and _read_meta(meta_path) == params:
        return dest
    with _locked_dir(root, dest) as tmp:
        scenes = []
        jobs = [(d, c, i) for d in DOMAINS for c in CLASSES for i in range(per_class)]
        from tqdm import tqdm

        for domain, cls, i in tqdm(jobs, desc="synth", unit="img", disable=not show_progress(progress)):
            scene = make_scene(seed, domain, cls, i)
            rel = f"{domain}/{cls}/{cls}_{i:05d}.png"
            scene = {"path": rel, **scene}
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            render(scene, image_size, _rng("render", seed, domain, cls, i)).save(out, format="PNG")
            scenes.append(scene)
        with open(tmp / SCENES_FILE, "w", encoding="utf-8") as f:
            for s in scenes:
                f.write(json.dumps(s, sort_keys=True) + "\n")
        write_json_atomic(tmp / META_FILE, params)
    return dest


@contextlib.contextmanager
def _locked_dir(root: Path, dest: Path) -> Iterator[Path]:
    """``atomic_dir(dest)`` under the synth lock, after removing a killed run's leftovers."""
    with stage_lock(root, "synth", "synth"):
        recover_dir(dest, clean_temps=True)
        with atomic_dir(dest) as tmp:
            yield tmp


def _read_meta(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None  # corrupt: the tree is rebuilt


# --- stage protocol -------------------------------------------------------------------------

PER_DATASET = False


def _params(cfg: dict[str, Any]) -> dict[str, Any]:
    o = resolve("synth", cfg)
    return {"seed": o.seed, "per_class": o.per_class, "image_size": o.image_size}


def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Pipeline stage: write SynthShapes under ``cfg['root']``."""
    dest = write_synthshapes(cfg["root"], **_params(cfg), progress=True)
    p = _params(cfg)
    return {"path": str(dest), "images": p["per_class"] * len(CLASSES) * len(DOMAINS)}


def outputs(cfg: dict[str, Any], workdir: Path) -> list[Path]:
    return [Path(cfg["root"]) / DATASET]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="data root; writes ROOT/SynthShapes/<domain>/<class>/<image>")
    for key in ("seed", "per_class", "image_size"):
        add_option(p, "synth", key)
    p.add_argument("--force", action="store_true", help="rewrite even if an identical tree exists")


def main(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    validate_options(opts, "synth", "command line", flags_of(args))
    p = _params(opts)
    dest = write_synthshapes(args.root, **p, force=args.force, progress=True)
    n = p["per_class"] * len(CLASSES) * len(DOMAINS)
    print(f"SynthShapes: {n} images ({len(DOMAINS)} domains x {len(CLASSES)} classes x {p['per_class']}) in {dest}")
    return 0
