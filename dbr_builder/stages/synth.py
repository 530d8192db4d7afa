"""SynthShapes: the embedded, deterministic synthetic DG benchmark (``dbr synth``).

Six classes told apart only by structure (corner count, straight vs curved edges,
convex vs star-shaped) are drawn in four visually distinct domains, with random
colour, size, position and rotation. The layout is DomainBed's
(``ROOT/SynthShapes/<domain>/<class>/<image>.png``) and every image's scene
attributes go to ``ROOT/SynthShapes/scenes.jsonl`` so that the oracle teacher can
write true reasoning chains from them.

Two variants:

- ``classic``: the six classes, random size and position (the original benchmark);
- ``shortcut``: built for a tiny student to learn on CPU (docs/RESULTS.md): a smaller class set
  (default circle, square, star, triangle) drawn large near the centre, and a *spurious
  attribute* (the background colour, or the fill colour) that agrees with the class with a
  probability set per domain: e.g. 0.9 in the training domains and chance in the held-out one,
  as in ColoredMNIST or Waterbirds. In the sketch domain the paper takes the background colour
  and the hatching the fill colour, so the attribute is visible in every domain.
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
    SHORTCUT_CLASSES,
    SPURIOUS_ATTRIBUTES,
    SPURIOUS_VALUES,
    STYLES,
    VARIANTS,
    load_scenes,
    shape_vertices,
    spurious_value,
)
from dbr_builder.errors import ConfigError, UserError
from dbr_builder.log import show_progress


def _rng(*key: Any) -> random.Random:
    return random.Random(int(hashlib.sha256(repr(key).encode()).hexdigest()[:16], 16))


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
    pts = [(x * size, y * size) for x, y in shape_vertices(
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
        # shortcut variant: coloured paper and coloured-pencil hatching carry the spurious attribute
        shortcut = scene.get("variant") == "shortcut"
        paper = bg if shortcut else (250, 250, 246)
        img = Image.new("RGB", (size, size), paper)
        hatch = Image.new("RGB", (size, size), paper)
        hd = ImageDraw.Draw(hatch)
        step = max(4, size // 20)
        for k in range(-size, size, step):
            hd.line([(k, size), (k + size, 0)], fill=fill if shortcut else (150, 150, 150), width=1)
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


# shortcut variant: shapes stand nearly upright (degrees either way), so that a tiny vision tower
# trained from scratch need not also learn rotation invariance within CPU minutes
ROTATION_JITTER = 15.0
SHORTCUT_FILLS = ("blue", "brown", "green", "purple", "red", "teal")


def _spurious(rng: random.Random, spurious: dict[str, Any], classes: list[str], domain: str,
              class_name: str) -> tuple[str, str, float]:
    """(value, class it points to, agreement) of the spurious attribute of one image.

    With probability ``agreement`` the class's own value, else one of the other classes' values
    uniformly; a domain without an agreement gets chance (1 / number of classes), i.e. the value
    is uniform over all classes' values.
    """
    p = spurious.get("agreement", {}).get(domain)
    p = 1.0 / len(classes) if p is None else float(p)
    target = class_name if rng.random() < p else rng.choice([c for c in classes if c != class_name])
    return spurious_value(spurious["attribute"], classes, target), target, p


def make_scene(seed: int, domain: str, class_name: str, index: int, variant: str = "classic",
               classes: list[str] | None = None, spurious: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sample the attributes of one image (deterministic in its arguments)."""
    rng = _rng("scene", seed, domain, class_name, index)
    color = rng.choice(sorted(COLORS))
    background = rng.choice(sorted(BACKGROUNDS))
    extra: dict[str, Any] = {}
    if variant == "shortcut":
        # dark fills on light backgrounds: the outline is a luminance edge in every domain
        color = rng.choice(SHORTCUT_FILLS)
        # large and near the centre: the outline covers many patches of the tiny student's tower
        size_frac = round(rng.uniform(0.28, 0.38), 4)
        cx, cy = round(rng.uniform(0.44, 0.56), 4), round(rng.uniform(0.44, 0.56), 4)
        sp = spurious or {"attribute": "background", "agreement": {}}
        value, points_to, p = _spurious(rng, sp, sorted(classes or SHORTCUT_CLASSES), domain, class_name)
        if sp["attribute"] == "background":
            background = value
        else:
            color = value
        extra = {"variant": variant, "classes": sorted(classes or SHORTCUT_CLASSES), "spurious_attribute": sp["attribute"], "spurious_value": value,
                 "spurious_class": points_to, "spurious_agreement": p}
    else:
        size_frac = round(rng.uniform(0.17, 0.36), 4)
        margin = size_frac + 0.04
        cx, cy = round(rng.uniform(margin, 1 - margin), 4), round(rng.uniform(margin, 1 - margin), 4)
    if class_name == "circle":
        rotation = 0.0
    elif variant == "shortcut":
        rotation = round(rng.uniform(-ROTATION_JITTER, ROTATION_JITTER), 2)
    else:
        rotation = round(rng.uniform(0, 360), 2)
    corners, structure = CLASSES[class_name]
    return {
        "domain": domain, "class_name": class_name, "shape": class_name, "corners": corners,
        "structure": structure, "fill_color": color, "fill_rgb": list(COLORS[color]),
        "outline_color": "black" if domain == "cartoon" else "grey" if domain == "sketch" else "none",
        "background": background, "size_frac": size_frac,
        "size": "small" if size_frac < 0.23 else "medium" if size_frac < 0.30 else "large",
        "cx": cx, "cy": cy, "position": _position_name(cx, cy), "rotation_deg": rotation,
        "style": STYLES[domain], "seed": seed, **extra,
    }


def check_variant(variant: str, classes: list[str] | None, spurious: dict[str, Any] | None) -> None:
    """Refuse an unknown variant, class, domain, attribute or agreement with a one-line error."""
    if variant not in VARIANTS:
        raise ConfigError(f"synth.variant={variant!r}; expected one of {', '.join(VARIANTS)}")
    if variant == "classic":
        if classes is not None or spurious is not None:
            raise ConfigError("synth: `classes` and `spurious` need `variant: shortcut`")
        return
    if classes is not None:
        bad = [c for c in classes if c not in CLASSES]
        if bad or len(set(classes)) < 2 or len(set(classes)) != len(classes):
            raise ConfigError(f"synth.classes={classes!r}: two or more distinct names from {', '.join(CLASSES)}")
    if spurious is not None:
        attr = spurious.get("attribute", "background")
        if attr not in SPURIOUS_ATTRIBUTES:
            raise ConfigError(f"synth.spurious.attribute={attr!r}; expected one of {', '.join(SPURIOUS_ATTRIBUTES)}")
        for dom, p in (spurious.get("agreement") or {}).items():
            if dom not in DOMAINS:
                raise ConfigError(f"synth.spurious.agreement: {dom!r} is not a domain ({', '.join(DOMAINS)})")
            if p is not None and (isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1):
                raise ConfigError(f"synth.spurious.agreement.{dom}={p!r}; expected a number in [0, 1] or null (chance)")


_D = schema_defaults("synth")  # the option defaults, defined once in schemas/stages/synth.schema.json


def write_synthshapes(root: str | Path, seed: int = _D["seed"], per_class: int = _D["per_class"],
                      image_size: int = _D["image_size"], force: bool = False, progress: bool = False, variant: str = "classic",
                      classes: list[str] | None = None, spurious: dict[str, Any] | None = None) -> Path:
    """Write ``ROOT/SynthShapes`` (idempotent: an identical existing tree is kept as is).

    The tree is built in a temporary folder beside the target and renamed into place,
    so an interrupted run never leaves a partial dataset. ``variant``, ``classes`` and
    ``spurious`` (``{"attribute": "background"|"color", "agreement": {domain: p or None}}``)
    select the shortcut variant (module doc).
    """
    if per_class < 1 or not 32 <= image_size <= 2048 or seed < 0:
        raise ValueError("per_class must be >= 1, image_size in [32, 2048] and seed >= 0")
    check_variant(variant, classes, spurious)
    root = Path(root)
    dest = root / DATASET
    params: dict[str, Any] = {"seed": seed, "per_class": per_class, "image_size": image_size, "version": 1}
    class_names = list(CLASSES)
    if variant != "classic":
        class_names = sorted(classes or SHORTCUT_CLASSES)
        spurious = {"attribute": (spurious or {}).get("attribute", "background"),
                    "agreement": dict((spurious or {}).get("agreement") or {})}
        params.update(variant=variant, classes=class_names, spurious=spurious)
    meta_path = dest / META_FILE
    if not force and meta_path.exists() and _read_meta(meta_path) == params:
        return dest
    with _locked_dir(root, dest) as tmp:
        scenes = []
        jobs = [(d, c, i) for d in DOMAINS for c in class_names for i in range(per_class)]
        from tqdm import tqdm

        for domain, cls, i in tqdm(jobs, desc="synth", unit="img", disable=not show_progress(progress)):
            scene = make_scene(seed, domain, cls, i, variant, class_names, spurious)
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
    out = {"seed": o.seed, "per_class": o.per_class, "image_size": o.image_size, "variant": o.variant}
    if o.variant == "shortcut":
        out.update(classes=list(o.classes), spurious=dict(o.spurious))
    elif cfg.get("classes") is not None or cfg.get("spurious") is not None:
        raise ConfigError("synth: `classes` and `spurious` need `variant: shortcut`")
    return out


def _num_classes(p: dict[str, Any]) -> int:
    if p["variant"] == "classic":
        return len(CLASSES)
    return len(p.get("classes") or SHORTCUT_CLASSES)


def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Pipeline stage: write SynthShapes under ``cfg['root']``."""
    p = _params(cfg)
    dest = write_synthshapes(cfg["root"], **p, progress=True)
    return {"path": str(dest), "images": p["per_class"] * _num_classes(p) * len(DOMAINS)}


def outputs(cfg: dict[str, Any], workdir: Path) -> list[Path]:
    return [Path(cfg["root"]) / DATASET]


def _agreement(text: str) -> tuple[str, float | None]:
    dom, sep, p = text.partition("=")
    if not sep:
        raise UserError(f"--agreement {text!r}: expected DOMAIN=P (P in [0, 1], or `chance`)")
    try:
        return dom, None if p == "chance" else float(p)
    except ValueError:
        raise UserError(f"--agreement {text!r}: {p!r} is not a number or `chance`") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="data root; writes ROOT/SynthShapes/<domain>/<class>/<image>")
    for key in ("seed", "per_class", "image_size", "variant", "classes", "spurious.attribute"):
        add_option(p, "synth", key)
    add_option(p, "synth", "spurious.agreement", "--agreement", nargs="+", metavar="DOMAIN=P", type=str)
    p.add_argument("--force", action="store_true", help="rewrite even if an identical tree exists")


def main(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    given = opts.get("spurious", {}).get("agreement")
    if given is not None:  # DOMAIN=P words -> the schema's {domain: p} mapping
        opts["spurious"]["agreement"] = dict(_agreement(a) for a in given)
    validate_options(opts, "synth", "command line", flags_of(args))
    p = _params(opts)
    dest = write_synthshapes(args.root, **p, force=args.force, progress=True)
    k = _num_classes(p)
    n = p["per_class"] * k * len(DOMAINS)
    print(f"SynthShapes ({p['variant']}): {n} images ({len(DOMAINS)} domains x {k} classes x {p['per_class']}) in {dest}")
    return 0
