"""Rebuild TerraIncognita from the Caltech Camera Traps ECCV'18 images and annotation JSONs.

Same selection as DomainBed's ``download_terra_incognita`` (all ``*.json`` annotation files
merged; images at locations 38, 43, 46, 100; an image is copied into
``location_<loc>/<category>/`` for each of its annotations whose category is kept), but in
linear time: annotations are grouped by image id once instead of being scanned for every image.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dbr_builder.errors import UserError


def merge_annotations(files: Iterable[Path]) -> dict[str, list[Any]]:
    """Concatenate the ``images``, ``annotations`` and ``categories`` lists of COCO-style files."""
    merged: dict[str, list[Any]] = {"images": [], "annotations": [], "categories": []}
    for f in files:
        try:
            data = json.loads(Path(f).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{f}: not a readable annotation JSON ({e})") from None
        for key in merged:
            merged[key].extend(data.get(key, []))
    return merged


def plan_terra(data: dict[str, list[Any]], locations: Iterable[int | str],
               categories: Iterable[str]) -> list[tuple[str, str, str]]:
    """``(domain, category, file_name)`` for every image DomainBed would copy, sorted, no repeats.

    O(images + annotations): one pass to group annotation categories by image id, one over images.
    """
    keep_loc = {str(x) for x in locations}
    keep_cat = set(categories)
    cat_name = {c["id"]: c["name"] for c in data["categories"]}
    cats_of: dict[Any, list[Any]] = defaultdict(list)
    for a in data["annotations"]:
        cats_of[a["image_id"]].append(a["category_id"])
    out: set[tuple[str, str, str]] = set()
    for img in data["images"]:
        loc = str(img.get("location"))
        if loc not in keep_loc:
            continue
        for cid in cats_of.get(img["id"], ()):
            name = cat_name.get(cid)
            if name in keep_cat:
                out.add((f"location_{loc}", name, img["file_name"]))
    return sorted(out)


def build_terra(work: Path, dest: Path, layout: dict[str, Any]) -> dict[str, int]:
    """Build ``dest/<location_N>/<category>/<file>`` from the extracted archives under ``work``.

    Images are hard-linked when possible (same file system), copied otherwise. Returns
    ``{domain: images}``. A referenced image missing from the images folder is an error.
    """
    images_dir = _find_dir(work, layout["images_dir"])
    ann_dir = _find_dir(work, layout["annotations_dir"])
    files = sorted(ann_dir.glob("*.json"))
    if not files:
        raise UserError(f"{ann_dir}: no annotation *.json files found")
    plan = plan_terra(merge_annotations(files), layout["locations"], layout["categories"])
    missing = [fn for _, _, fn in plan if not (images_dir / fn).is_file()]
    if missing:
        raise UserError(
            f"{images_dir}: {len(missing)} annotated images are missing (e.g. {missing[:3]}); "
            "the images archive is incomplete or not the ECCV'18 one"
        )
    counts: dict[str, int] = defaultdict(int)
    made: set[Path] = set()
    for domain, cat, fn in plan:
        rel = Path(fn)
        if rel.is_absolute() or ".." in rel.parts:
            raise UserError(f"{ann_dir}: refusing image file_name {fn!r} (absolute or '..')")
        out = dest / domain / cat / rel
        if out.parent not in made:
            out.parent.mkdir(parents=True, exist_ok=True)
            made.add(out.parent)
        try:
            os.link(images_dir / rel, out)
        except OSError:
            shutil.copyfile(images_dir / rel, out)
        counts[domain] += 1
    return dict(counts)


def _find_dir(work: Path, name: str) -> Path:
    """``work/name`` or, when an archive nests it one level deeper, ``work/*/name``."""
    direct = work / name
    if direct.is_dir():
        return direct
    hits = [p for p in work.glob(f"*/{name}") if p.is_dir()]
    if len(hits) == 1:
        return hits[0]
    raise UserError(f"{work}: folder {name!r} not found in the extracted archives")
