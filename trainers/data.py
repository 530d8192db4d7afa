"""Training data for MTCT / SARR: rows -> examples -> the two tokenised samples of each image.

Every training image yields two samples, both built with the *student's own* processor and chat
template:

- the direct-classification sample: user turn = image + ``q_cls`` (with the class options),
  assistant turn = the class name;
- the reasoning sample: user turn = image + ``q_reason``, assistant turn = the chain.

The prompt is encoded by the processor exactly as at inference (chat template with the generation
prompt, image placeholder tokens expanded), and the assistant answer (everything the chat template
adds after the generation prompt, end-of-turn token included) is appended as plain tokens. Labels
are ``-100`` on every prompt and image token, so the loss only ever sees the answer.

Rows come from the published dataset (``W/hub`` or a Hub id; see docs/ARCHITECTURE.md) or any
list of dicts with the same columns (``image``, ``image_id``, ``domain``, ``class_name``,
``dg_split``, ``chain``).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dbr_builder.core import chat
from dbr_builder.core.chains import format_chain
from dbr_builder.core.fsutil import tree_fingerprint
from dbr_builder.core.manifest import holdout_keys
from dbr_builder.core.prompts import class_fields, render
from dbr_builder.core.scenes import load_scenes, shape_chain_parts
from dbr_builder.core.workdir import safe_split_name  # noqa: F401  (re-exported for the trainers)
from dbr_builder.errors import UserError

IGNORE_INDEX = -100
KIND_CLS = 0
KIND_REASON = 1
TASKS = ("cls", "reason")


@dataclass(frozen=True)
class Example:
    """One training / validation image with its label and (optional) reasoning chain."""

    image_id: str
    image: Any  # PIL image, path, bytes, or a datasets Image dict {"bytes", "path"}
    class_name: str
    domain: str = ""
    dg_split: str = "in"
    chain: str | None = None
    chain_source: str = "teacher"  # "teacher" | "self"


@dataclass
class Sample:
    """One tokenised sequence: prompt (masked) + answer (trained)."""

    input_ids: list[int]
    labels: list[int]
    seq_extra: dict[str, list[int]]  # other per-token inputs (e.g. mm_token_type_ids)
    vision: dict[str, Any]  # processor outputs without a sequence axis (pixel_values, grid sizes)
    image_index: int  # position of the image inside its batch (set by the collator)
    kind: int  # KIND_CLS or KIND_REASON
    answer_tokens: int = field(default=0)
    truncated: int = field(default=0)  # answer tokens cut off by ``max_length``


def examples_from_rows(rows: Iterable[dict[str, Any]], source: str = "rows") -> list[Example]:
    """Turn published rows (``datasets.Dataset`` or dicts) into Examples; name the bad field if any."""
    out: list[Example] = []
    for i, row in enumerate(rows):
        missing = [k for k in ("image", "class_name", "domain", "dg_split") if k not in row]
        if missing:
            raise UserError(
                f"{source}: row {i} lacks column(s) {', '.join(missing)}; expected the published "
                "DomainBed-Reasoning features (docs/ARCHITECTURE.md, Hub layout)"
            )
        if row["dg_split"] not in ("in", "out"):
            raise UserError(f"{source}: row {i} has dg_split={row['dg_split']!r}; expected 'in' or 'out'")
        chain = row.get("chain")
        out.append(
            Example(
                image_id=str(row.get("image_id") or f"{source}:{i}"),
                image=row["image"],
                class_name=str(row["class_name"]),
                domain=str(row["domain"]),
                dg_split=str(row["dg_split"]),
                chain=str(chain) if chain else None,
            )
        )
    return out


def load_published(source: str | Path, dataset: str) -> dict[str, list[Example]]:
    """Load every domain split of ``dataset`` from a hub folder or a Hub dataset id.

    Returns ``{domain name: examples}`` (the domain name from the ``domain`` column, not the
    split's safe name).
    """
    import datasets

    src = str(source)
    if Path(src).exists() and not (Path(src) / "README.md").exists():
        raise FileNotFoundError(f"{src}: not a published dataset folder (no README.md); run `dbr publish` first")
    kwargs: dict[str, Any] = {}
    if Path(src).is_dir():
        # `datasets` keys its cache of a local folder by the folder name, config and card only, not
        # by the files: a re-published (or damaged) W/hub would silently load the old cached rows.
        # A cache folder per fingerprint (names, sizes, mtimes) of the files makes changes count.

        fp = tree_fingerprint([Path(src) / "README.md", Path(src) / "data" / dataset])
        kwargs["cache_dir"] = str(Path(datasets.config.HF_DATASETS_CACHE) / "dbr-local" / fp[:16])
    try:
        dd = datasets.load_dataset(src, dataset, **kwargs)
    except datasets.exceptions.DatasetGenerationError as e:  # a truncated / corrupt parquet shard
        import pyarrow.parquet as pq


        where, cause = src, str(e.__cause__ or e).strip().splitlines()[0]
        for shard in sorted((Path(src) / "data" / dataset).glob("*.parquet")):  # name the bad shard
            try:
                pq.read_metadata(shard)
            except Exception as bad:  # noqa: BLE001 - any failure to read the footer marks the file
                where, cause = str(shard), str(bad).strip().splitlines()[0]
                break
        raise UserError(f"{where}: cannot read the published {dataset} data ({cause}); "
                        f"rebuild it with `dbr publish`") from None
    except (ValueError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"{src}: cannot load config {dataset!r} of the published dataset ({e}); "
            "check `data:` / `--dataset`, or run `dbr publish`"
        ) from None
    by_domain: dict[str, list[Example]] = {}
    for split, ds in dd.items():
        exs = examples_from_rows(ds, source=f"{src}[{dataset}/{split}]")
        for ex in exs:
            by_domain.setdefault(ex.domain, []).append(ex)
    return dict(sorted(by_domain.items()))


def lodo_split(
    by_domain: dict[str, list[Example]], heldout: str
) -> tuple[list[Example], list[Example], list[str]]:
    """Leave-one-domain-out: (train = `in` of the other domains, val = their `out`, train domains)."""
    if heldout not in by_domain:
        raise UserError(f"held-out domain {heldout!r} not in the data; domains: {', '.join(by_domain)}")
    train_domains = [d for d in by_domain if d != heldout]
    train = [ex for d in train_domains for ex in by_domain[d] if ex.dg_split == "in"]
    val = [ex for d in train_domains for ex in by_domain[d] if ex.dg_split == "out"]
    return train, val, train_domains


def load_image(image: Any) -> Any:
    """Decode any supported image value to an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict):
        if image.get("bytes"):
            return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
        if image.get("path"):
            return Image.open(image["path"]).convert("RGB")
    if isinstance(image, bytes | bytearray):
        return Image.open(io.BytesIO(image)).convert("RGB")
    if isinstance(image, str | Path):
        return Image.open(image).convert("RGB")
    raise TypeError(f"unsupported image value of type {type(image).__name__}")


# ---------------------------------------------------------------------------------------------
# examples -> tokenised samples


def cls_prompt(classes: Sequence[str]) -> str:
    """q_cls with the class options (DESIGN.md)."""
    return render("q_cls", **class_fields(classes))


def reason_prompt(classes: Sequence[str]) -> str:
    """q_reason with the class options."""
    return render("q_reason", **class_fields(classes))


class SampleEncoder:
    """Builds the masked training sequences with a student's processor and chat template."""

    def __init__(
        self,
        processor: Any,
        classes: Sequence[str],
        max_length: int | None = None,
        processor_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.classes = list(classes)
        self.max_length = max_length
        self.processor_kwargs = dict(processor_kwargs or {})
        self.q_cls = cls_prompt(self.classes)
        self.q_reason = reason_prompt(self.classes)
        self._suffix_cache: dict[str, list[int]] = {}

    # -- chat template ---------------------------------------------------------------------
    @staticmethod
    def user_turn(prompt: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]

    def prompt_text(self, prompt: str) -> str:
        """The rendered prompt, up to and including the assistant generation header."""
        return chat.render(self.processor, self.user_turn(prompt)[0]["content"])

    def answer_text(self, prompt: str, answer: str) -> str:
        """What the model generates after the generation prompt for ``answer`` (end of turn included).

        Derived per family by :func:`dbr_builder.core.chat.answer_text` (the answer located in a
        rendered conversation), so templates whose turn header differs from their generation
        prompt (LLaVA-OneVision) or that add text before the answer (Idefics3's ``: ``) work.
        """
        return chat.answer_text(self.processor, self.user_turn(prompt), answer)

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        """Token ids of the answer as trained (the part after the generation prompt)."""
        key = prompt + "\x00" + answer
        ids = self._suffix_cache.get(key)
        if ids is None:
            ids = chat.token_count_of_answer(self.processor, self.answer_text(prompt, answer))
            if len(self._suffix_cache) < 4096:  # class answers repeat; chains rarely do
                self._suffix_cache[key] = ids
        return list(ids)

    # -- encoding --------------------------------------------------------------------------
    def encode_prompt(self, image: Any, prompt: str) -> dict[str, Any]:
        """Processor outputs for image + prompt (with generation header), batch of one."""
        return chat.encode(self.processor, [self.prompt_text(prompt)], [[load_image(image)]], **self.processor_kwargs)

    def encode(self, image: Any, prompt: str, answer: str, kind: int, enc: dict[str, Any] | None = None) -> Sample:
        """One masked sample; ``enc`` reuses an already-processed prompt of the same image."""
        enc = enc if enc is not None else self.encode_prompt(image, prompt)
        prompt_ids = enc["input_ids"][0].tolist()
        ans = self.answer_ids(prompt, answer)
        if self.max_length is not None:
            room = self.max_length - len(prompt_ids)
            if room < 1:
                raise ValueError(
                    f"prompt is {len(prompt_ids)} tokens (image included), over max_length={self.max_length}; "
                    "raise `max_length` or shrink images with `processor_kwargs`"
                )
            cut = max(0, len(ans) - room)
            ans = ans[:room]  # truncate the answer's tail, never the image tokens
        else:
            cut = 0
        n = len(prompt_ids)
        seq_extra: dict[str, list[int]] = {}
        vision: dict[str, Any] = {}
        for k, v in enc.items():
            if k in ("input_ids", "attention_mask"):
                continue
            if hasattr(v, "dim") and v.dim() == 2 and v.shape[0] == 1 and v.shape[1] == n:
                seq_extra[k] = v[0].tolist() + [0] * len(ans)  # answer tokens are plain text
            else:
                vision[k] = v
        return Sample(
            input_ids=prompt_ids + ans,
            labels=[IGNORE_INDEX] * n + ans,
            seq_extra=seq_extra,
            vision=vision,
            image_index=0,
            kind=kind,
            answer_tokens=len(ans),
            truncated=cut,
        )

    def encode_example(self, ex: Example, tasks: Sequence[str] = TASKS) -> list[Sample]:
        """The samples of one image: classification and/or reasoning (no chain -> no reasoning sample)."""
        image = load_image(ex.image)
        out = []
        if "cls" in tasks:
            out.append(self.encode(image, self.q_cls, ex.class_name, KIND_CLS))
        if "reason" in tasks and ex.chain:
            out.append(self.encode(image, self.q_reason, ex.chain, KIND_REASON))
        return out


def collate(samples_per_image: Sequence[Sequence[Sample]], pad_id: int) -> dict[str, Any]:
    """Pad (right) and stack the samples of several images into one model batch.

    Adds ``image_index`` (which image each row belongs to), ``kind`` (cls / reason) and
    ``num_images``. Vision tensors are concatenated along their first axis, which is the
    per-image layout of every HF multimodal processor (Qwen2-VL patches, InternVL tiles, LLaVA images).
    """
    import torch

    rows: list[Sample] = []
    for i, samples in enumerate(samples_per_image):
        rows.extend(replace(s, image_index=i) for s in samples)
    if not rows:
        raise ValueError("empty batch")
    width = max(len(s.input_ids) for s in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    extra_keys = sorted({k for s in rows for k in s.seq_extra})
    extra = {k: torch.zeros((b, width), dtype=torch.long) for k in extra_keys}
    for r, s in enumerate(rows):
        n = len(s.input_ids)
        input_ids[r, :n] = torch.tensor(s.input_ids)
        labels[r, :n] = torch.tensor(s.labels)
        attn[r, :n] = 1
        for k in extra_keys:
            extra[k][r, :n] = torch.tensor(s.seq_extra[k])
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attn, "labels": labels, **extra}
    vision_keys = sorted({k for s in rows for k in s.vision})
    for k in vision_keys:
        batch[k] = cat_padded([s.vision[k] for s in rows])
    batch["image_index"] = torch.tensor([s.image_index for s in rows], dtype=torch.long)
    batch["kind"] = torch.tensor([s.kind for s in rows], dtype=torch.long)
    batch["num_images"] = len(samples_per_image)
    batch["truncated"] = torch.tensor([s.truncated for s in rows], dtype=torch.long)
    return batch


def cat_padded(tensors: Sequence[Any]) -> Any:
    """Concatenate along axis 0, zero-padding the other axes to the largest size.

    Processors that give every image a variable number of tiles with a fixed per-tile shape
    (Idefics3 ``(1, tiles, 3, H, W)`` and its ``pixel_attention_mask``, LLaVA-OneVision's anyres
    patches) pad a batch the same way: all-zero tiles are dropped by those models, and their
    ``image_sizes`` say how many patches are real.
    """
    import torch

    if len({tuple(t.shape[1:]) for t in tensors}) <= 1:
        return torch.cat(list(tensors), dim=0)
    dims = max(t.dim() for t in tensors)
    if any(t.dim() != dims for t in tensors):
        raise ValueError("cannot batch vision tensors of different ranks: " + ", ".join(str(tuple(t.shape)) for t in tensors))
    size = [max(t.shape[d] for t in tensors) for d in range(1, dims)]
    out = []
    for t in tensors:
        pad = t.new_zeros((t.shape[0], *size))
        pad[tuple([slice(0, t.shape[0])] + [slice(0, n) for n in t.shape[1:]])] = t
        out.append(pad)
    return torch.cat(out, dim=0)


def pad_token_id(processor: Any) -> int:
    """The tokenizer's pad id (falls back to eos)."""
    tok = getattr(processor, "tokenizer", processor)
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if isinstance(pid, list):
        pid = pid[0]
    return int(pid if pid is not None else 0)


def rows_from_synth(dataset_dir: str | Path, trial_seed: int = 0) -> list[dict[str, Any]]:
    """Published-format rows for a SynthShapes tree, with true chains written from scene attributes.

    For tests, the demo ablation and trying the trainer without a teacher: the same columns as
    the published dataset (``dg_split`` from DomainBed's holdout rule), ``image`` as a file path.
    """
    dataset_dir = Path(dataset_dir)
    scenes = load_scenes(dataset_dir)
    by_domain: dict[str, list[dict[str, Any]]] = {}
    for rel in sorted(scenes):  # ImageFolder order: domain, class, file
        by_domain.setdefault(scenes[rel]["domain"], []).append(scenes[rel])
    rows: list[dict[str, Any]] = []
    for env, domain in enumerate(sorted(by_domain)):
        items = by_domain[domain]
        out = holdout_keys(len(items), trial_seed, env)
        for k, s in enumerate(items):
            if s.get("variant") == "shortcut":  # shape evidence only: never the spurious attribute
                chain = format_chain(*shape_chain_parts(s, s["class_name"]).values())
            else:
                chain = format_chain(
                    f"I count the corners of the {s['size']} shape.",
                    f"A {s['fill_color']} shape at the {s['position']}, {s['style']}.",
                    f"It has {s['structure']}.",
                    f"The {domain} style does not change the shape.",
                    s["class_name"],
                )
            rows.append({
                "image": str(dataset_dir / s["path"]), "image_id": s["path"], "dataset": "SynthShapes",
                "domain": domain, "class_name": s["class_name"], "dg_split": "out" if k in out else "in",
                "chain": chain, "teacher": "scene",
            })
    return rows


def group_by_domain(examples: Iterable[Example]) -> dict[str, list[Example]]:
    """``{domain: examples}`` in sorted domain order (what ``load_published`` returns)."""
    out: dict[str, list[Example]] = {}
    for ex in examples:
        out.setdefault(ex.domain, []).append(ex)
    return dict(sorted(out.items()))
