"""Image preparation ahead of the engine: decode, convert to RGB, resize to a pixel budget.

Work runs in a thread pool: Pillow releases the GIL while decoding and resizing, so
threads scale over cores without pickling images between processes. ``prefetch`` keeps a
few batches prepared ahead of the consumer so the GPU never waits for the CPU.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")


def fit_size(width: int, height: int, max_pixels: int | None, min_pixels: int | None = None) -> tuple[int, int]:
    """Size with the same aspect ratio whose area is within [min_pixels, max_pixels]."""
    area = width * height
    scale = 1.0
    if max_pixels and area > max_pixels:
        scale = math.sqrt(max_pixels / area)
    elif min_pixels and area < min_pixels:
        scale = math.sqrt(min_pixels / area)
    if scale == 1.0:
        return width, height
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    # int() rounding can leave the area 1 row over budget; trim the longer side
    while max_pixels and w * h > max_pixels:
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


def load_image(path: str | os.PathLike[str], max_pixels: int | None = None, min_pixels: int | None = None):
    """Decode ``path`` to an RGB ``PIL.Image`` no larger than ``max_pixels`` (aspect kept)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        if max_pixels and im.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller.
            w, h = fit_size(im.width, im.height, max_pixels)
            im.draft("RGB", (w, h))
        if im.getexif().get(0x0112, 1) != 1:  # only rotated photos: exif_transpose always copies
            im = ImageOps.exif_transpose(im)
        if im.mode != "RGB":
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # Composite transparency onto white, not black (sketch domains are line art).
                rgba = im.convert("RGBA")
                bg = Image.new("RGB", rgba.size, (255, 255, 255))
                bg.paste(rgba, mask=rgba.getchannel("A"))
                im = bg
            else:
                im = im.convert("RGB")
        size = fit_size(im.width, im.height, max_pixels, min_pixels)
        if size != im.size:
            im = im.resize(size, Image.Resampling.BICUBIC)
        else:
            im.load()
        return im


def to_data_url(img, fmt: str = "JPEG", quality: int = 90) -> str:
    """Encode a PIL image as a ``data:`` URL (for OpenAI-compatible chat APIs)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=quality)
    mime = "jpeg" if fmt.upper() == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def default_workers() -> int:
    """Worker threads for image preparation: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def prepare_content(content: list[dict], max_pixels: int | None, min_pixels: int | None = None) -> list[dict]:
    """Copy of a request's content with every image part carrying a prepared ``"image"``.

    A file that cannot be decoded raises ``OSError`` naming the path.
    """
    out = []
    for part in content:
        if part.get("type") == "image" and "image" not in part:
            try:
                img = load_image(part["path"], max_pixels, min_pixels)
            except Exception as e:  # noqa: BLE001 - PIL raises many kinds; report them uniformly
                raise OSError(f"{part['path']}: cannot decode image ({type(e).__name__}: {e})") from e
            part = {**part, "image": img}
        out.append(part)
    return out


def parallel_map(fn: Callable[[T], U], items: Iterable[T], workers: int | None = None) -> list[U]:
    """``[fn(x) for x in items]`` on a thread pool, order kept."""
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        return list(pool.map(fn, items))


def prefetch(batches: Iterable[T], fn: Callable[[T], U], workers: int | None = None, depth: int = 2) -> Iterator[U]:
    """Yield ``fn(batch)`` for each batch, computing up to ``depth`` batches ahead on a thread pool.

    ``fn`` typically prepares the images of a batch of requests with :func:`parallel_map`
    over its own pool; here each batch is one task so batches stay in order.
    """
    it = iter(batches)
    pending: list[Future[U]] = []
    with ThreadPoolExecutor(max_workers=max(1, depth)) as pool:
        for b in it:
            pending.append(pool.submit(fn, b))
            if len(pending) > depth:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) without decoding the pixels."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size
