"""The dataset card (``W/hub/README.md``) of a published DomainBed-Reasoning folder.

The YAML header carries what the Hub and ``datasets`` read: ``configs`` (one per dataset,
one split per domain, pointing at the parquet shards), ``dataset_info`` (features, split
sizes), licence, tags and, for a ``gated`` release, the terms users must accept. The body
documents how to load it, the fields, each source dataset's licence, terms and citation
(``pipelines/licences.yaml``), the filter statistics, and a provenance block: the teacher
specs, the prompt texts with their sha256, the pipeline YAML, the effective filter rules, the
dbr-builder version and the build date. Everything is derived from the work directory's files
(the date is that of the filtered chains), so an unchanged dataset gives a byte-identical card.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from dbr_builder import __version__
from dbr_builder.core.prompts import PromptError, template
from dbr_builder.core.workdir import chains_path, generations_dir, pipeline_copy_path
from dbr_builder.resources import resource_path
from dbr_builder.stages.filter.stats import _md_table, load_stats, summary_table

LICENCES_FILE = "licences.yaml"
UNKNOWN_SOURCE = {"title": "", "homepage": "unknown", "licence": "other", "terms": "see the source dataset",
                  "redistribution": "unclear", "download": "from the source dataset", "citation": ""}


def load_sources() -> dict[str, dict[str, str]]:
    """``pipelines/licences.yaml``: per source dataset, its terms, homepage, download path and citation."""
    data = yaml.safe_load(resource_path("pipelines", LICENCES_FILE).read_text(encoding="utf-8"))
    return {name: {**UNKNOWN_SOURCE, **entry} for name, entry in (data.get("sources") or {}).items()}


def source_info(dataset: str) -> dict[str, str]:
    return load_sources().get(dataset, UNKNOWN_SOURCE)


CITATIONS = """\
@article{xu2026rdmldg,
  title   = {Reasoning-Driven Multimodal LLM for Domain Generalization},
  author  = {Xu, Zhipeng and Wang, Zilong and Jiang, Xinyang and Li, Dongsheng and Cheng, De and Wang, Nannan and others},
  journal = {arXiv preprint arXiv:2602.23777},
  year    = {2026}
}

@article{zhang2024ood,
  title   = {On the Out-Of-Distribution Generalization of Multimodal Large Language Models},
  author  = {Zhang, Xingxuan and Li, Jiansheng and Chu, Wenjing and Hai, Junjia and Xu, Renzhe and Yang, Yuqing
             and Guan, Shikai and Xu, Jiazheng and Cui, Peng},
  journal = {arXiv preprint arXiv:2402.06599},
  year    = {2024}
}

@inproceedings{gulrajani2021domainbed,
  title     = {In Search of Lost Domain Generalization},
  author    = {Gulrajani, Ishaan and Lopez-Paz, David},
  booktitle = {International Conference on Learning Representations},
  year      = {2021}
}
"""

RULES_TEXT = """\
Every teacher candidate is parsed and checked; the first rule it breaks is its rejection reason:
backend error; truncated output (`finish_reason == "length"` or text ending inside a stage);
missing / duplicate / malformed / out-of-order / empty stage; a conclusion that names no class
or several classes of the dataset (after normalising case, punctuation, underscores vs spaces,
simple plurals and known synonyms); a conclusion that differs from the label; a stage outside its
word-count bounds; degenerate repetition; a hinted chain that mentions its hint; and the same chain
body accepted for many different images (template collapse). Among an image's accepted candidates
the unhinted ones win, then the configured selection policy (default: the first sample, i.e. plain
rejection sampling). Images without any accepted candidate may get a rationalization round in which
the teacher sees the label as a hint; such chains are flagged `hinted = true`.
"""


def features_for(classes: list[str], pixels: bool = True):
    """The ``datasets.Features`` of a published config (``pixels=False``: chains only, ``source_path``)."""
    from datasets import ClassLabel, Features, Image, Value

    s = Value("string")
    first = {"image": Image(), "image_id": s} if pixels else {"image_id": s, "source_path": s}
    return Features({
        **first, "dataset": s, "domain": s, "class_name": s,
        "label": ClassLabel(names=list(classes)), "dg_split": s, "chain": s, "summary": s, "caption": s,
        "reasoning": s, "reflection": s, "conclusion": s, "hinted": Value("bool"), "teacher": s,
    })


def _size_category(n: int) -> str:
    for lim, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < lim:
            return name
    return "1M<n<10M"


def _licence_header(datasets: list[str]) -> dict[str, Any]:
    lic = {source_info(ds)["licence"] for ds in datasets}
    if len(lic) == 1 and "other" not in lic:
        return {"license": lic.pop()}
    return {
        "license": "other",
        "license_name": "mixed-source-dataset-licences",
        "license_details": "Images keep the licences of their source datasets (see 'Licences'); "
                           "chains are teacher-model outputs, subject to that model's terms.",
    }


def gated_terms(datasets: list[str]) -> str:
    """The text users accept before a gated release downloads."""
    terms = " ".join(f"{ds}: {source_info(ds)['terms']}" for ds in datasets)
    return ("The images of this dataset come from other datasets and keep their terms. By requesting access you "
            f"agree to use them under those terms. {terms}")


def card_yaml(infos: dict[str, Any], pretty_name: str, mode: str = "full") -> dict[str, Any]:
    """The card's YAML metadata for ``{dataset: {"classes", "splits", ...}}``."""
    total = sum(s["num_examples"] for info in infos.values() for s in info["splits"])
    pixels = mode != "chains_only"
    configs, dataset_info = [], []
    for i, (ds, info) in enumerate(infos.items()):
        configs.append({
            "config_name": ds,
            **({"default": True} if i == 0 else {}),
            "data_files": [{"split": s["split"], "path": f"data/{ds}/{s['split']}-*.parquet"} for s in info["splits"]],
        })
        dataset_info.append({
            "config_name": ds,
            "features": features_for(info["classes"], pixels=pixels)._to_yaml_list(),
            "splits": [{"name": s["split"], "num_bytes": s["num_bytes"], "num_examples": s["num_examples"]}
                       for s in info["splits"]],
        })
    out: dict[str, Any] = {
        "pretty_name": pretty_name,
        **_licence_header(list(infos)),
        "language": ["en"],
        "task_categories": ["image-classification", "visual-question-answering"],
        "tags": ["domain-generalization", "domainbed", "reasoning", "chain-of-thought", "multimodal"],
        "size_categories": [_size_category(total)],
    }
    if mode == "gated":
        out["extra_gated_heading"] = "Accept the source datasets' terms to access the images"
        out["extra_gated_prompt"] = gated_terms(list(infos))
        out["extra_gated_fields"] = {"Affiliation": "text",
                                     "I accept the terms of the source datasets listed above": "checkbox"}
    out["configs"] = configs
    out["dataset_info"] = dataset_info
    out["dbr_builder"] = {"mode": mode}
    return out


def _teacher_lines(infos: dict[str, Any]) -> list[str]:
    lines = ["| dataset | model | prompt | prompt id | sampling params | candidates |", "|---|---|---|---|---|---|"]
    for ds, info in infos.items():
        for t in info["stats"].get("teachers", []):
            try:
                params = json.dumps(json.loads(t["params"]), sort_keys=True)
            except (TypeError, ValueError):
                params = str(t["params"])
            lines.append(f"| {ds} | `{t['model']}` | {t['prompt_name']} | `{t['prompt_id']}` | `{params}` | "
                         f"{t['candidates']} |")
    return lines


# --- provenance -------------------------------------------------------------------------------


def build_date(workdir: Path, datasets: list[str]) -> str:
    """UTC date of the newest filtered chains (``SOURCE_DATE_EPOCH`` wins): stable across re-publishes."""
    import datetime as dt

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.strip().isdigit():
        ts = int(epoch)
    else:
        times = [chains_path(workdir, ds).stat().st_mtime for ds in datasets if chains_path(workdir, ds).exists()]
        ts = int(max(times)) if times else 0
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).date().isoformat()


def _teacher_specs(workdir: Path, dataset: str) -> list[str]:
    """The teacher specs ``dbr generate`` ran with (its summary files), without secrets or local paths."""
    specs = set()
    for f in sorted(generations_dir(workdir, dataset).glob("summary*.json")):
        try:
            t = json.loads(f.read_text(encoding="utf-8")).get("teacher")
        except (OSError, ValueError):
            continue
        if t:
            specs.add(str(t))
    return sorted(specs)


def _prompt(name: str, recorded_ids: set[str]) -> dict[str, Any]:
    try:
        text = template(name)
    except PromptError:
        return {"name": name, "sha256": None, "text": None, "ids": sorted(recorded_ids), "current": False}
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return {"name": name, "sha256": sha, "text": text, "ids": sorted(recorded_ids),
            "current": all(i == sha[:16] for i in recorded_ids)}


def provenance(workdir: str | Path, datasets: list[str]) -> dict[str, Any]:
    """What the card's provenance block shows: teachers, prompts, pipeline, filter rules, version, date."""
    workdir = Path(workdir)
    prompts: dict[str, set[str]] = {}
    rules: dict[str, Any] = {}
    teachers: dict[str, list[str]] = {}
    for ds in datasets:
        try:
            st = load_stats(workdir, ds)
        except FileNotFoundError:
            st = {}
        for t in st.get("teachers", []):
            prompts.setdefault(t["prompt_name"], set()).add(t["prompt_id"])
        if st.get("rules") is not None:
            rules[ds] = st["rules"]
        teachers[ds] = _teacher_specs(workdir, ds)
    pipe = pipeline_copy_path(workdir)
    return {
        "tool": f"dbr-builder {__version__}",
        "date": build_date(workdir, datasets),
        "teachers": teachers,
        "prompts": [_prompt(n, ids) for n, ids in sorted(prompts.items())],
        "pipeline": pipe.read_text(encoding="utf-8") if pipe.exists() else None,
        "rules": rules,
    }


def _details(summary: str, body: str, lang: str = "") -> list[str]:
    fence = "````" if "```" in body else "```"
    return [f"<details><summary>{summary}</summary>\n", f"{fence}{lang}\n{body.rstrip()}\n{fence}\n", "</details>\n"]


def _provenance_lines(prov: dict[str, Any]) -> list[str]:
    out = ["## Provenance\n",
           f"- built with **{prov['tool']}** on {prov['date']} (date of the filtered chains)"]
    for ds, specs in prov["teachers"].items():
        out.append(f"- {ds} teacher spec(s): " + (", ".join(f"`{s}`" for s in specs) or "not recorded"))
    out.append("")
    for p in prov["prompts"]:
        if p["text"] is None:
            out.append(f"- prompt `{p['name']}` (ids {', '.join(p['ids'])}): template not found in this dbr-builder\n")
            continue
        note = "" if p["current"] else (" **The template has changed since these chains were generated** "
                                        f"(recorded ids {', '.join(p['ids'])}); the text below is the current one.")
        out += [f"Prompt `{p['name']}`: sha256 `{p['sha256']}` (prompt id `{p['sha256'][:16]}`).{note}\n",
                *_details(f"prompts/{p['name']}.txt", p["text"], "text")]
    if prov["pipeline"]:
        out += ["The pipeline that built it (`dbr run`), as written:\n", *_details("pipeline YAML", prov["pipeline"], "yaml")]
    if prov["rules"]:
        body = yaml.safe_dump(prov["rules"], sort_keys=True, allow_unicode=True, width=100, default_flow_style=None)
        out += ["The effective filter rules, per dataset:\n", *_details("filter rules", body, "yaml")]
    return out


def _stats_lines(ds: str, st: dict[str, Any]) -> list[str]:
    reasons = ", ".join(f"`{r['reason']}` {r['count']}" for r in st.get("reasons", [])) or "none"
    c = st.get("candidates", {})
    out = [f"### {ds}\n", f"{c.get('total', '?')} teacher candidates, {c.get('accepted', '?')} accepted "
           f"({c.get('acceptance')}); {st.get('rationalized_images', 0)} images sent to the rationalization round.\n",
           summary_table(st), f"\nRejected candidates by reason: {reasons}.\n"]
    if st.get("coverage", {}).get("by_split"):
        out += ["Coverage by DomainBed split:\n",
                _md_table(st["coverage"]["by_split"], ["split", "images", "covered", "hinted", "coverage"])]
    if st.get("chain_tokens"):
        out += ["Chain length (approximate tokens = characters / 4, kept chains):\n",
                _md_table([{"stage": k, **v} for k, v in st["chain_tokens"].items()],
                          ["stage", "mean", "median", "p5", "p95", "max"])]
    return out


def render_card(infos: dict[str, Any], pretty_name: str | None = None, repo_id: str | None = None,
                mode: str = "full", provenance: dict[str, Any] | None = None) -> str:
    """The whole README.md (YAML header + body)."""
    pretty_name = pretty_name or "DomainBed-Reasoning"
    header = yaml.safe_dump(card_yaml(infos, pretty_name, mode), sort_keys=False, allow_unicode=True, width=1000)
    first = next(iter(infos))
    first_split = infos[first]["splits"][0]["split"] if infos[first]["splits"] else "train"
    where = repo_id or "path/to/hub"
    pixels = mode != "chains_only"
    sources = {ds: source_info(ds) for ds in infos}
    out = [
        f"---\n{header}---\n",
        f"# {pretty_name}\n",
        "DomainBed images paired with class-relevant reasoning chains written by a teacher multimodal LLM, "
        "in the five-stage format `<SUMMARY>…</SUMMARY><CAPTION>…</CAPTION><REASONING>…</REASONING>"
        "<REFLECTION>…</REFLECTION><CONCLUSION>…</CONCLUSION>` (the conclusion names the class), as used by "
        "RD-MLDG for multi-task cross-training (MTCT) and self-aligned reasoning regularization (SARR). "
        "Built with dbr-builder.\n",
    ]
    if mode == "gated":
        out.append("**Gated release**: the images keep their source datasets' terms; the Hub asks you to accept "
                   "them (see 'Licences') before downloading.\n")
    elif mode == "chains_only":
        out.append("**Chains-only release**: no image pixels are redistributed. Each row names its image by "
                   "`image_id` (sha256 of the image file) and `source_path` (its path in the source dataset's "
                   "own layout); get the images from their source (see 'Getting the images').\n")
    else:
        restricted = [ds for ds, s in sources.items() if s["redistribution"] != "allowed"]
        if restricted:
            out.append(f"**Note**: the terms of {', '.join(restricted)} do not clearly allow redistributing their "
                       "images (see 'Licences'); consider publishing with `--mode gated` or `--mode chains_only`.\n")
    out += [
        "## Loading\n",
        "```python\nfrom datasets import load_dataset\n"
        f"ds = load_dataset({where!r}, {first!r}, split={first_split!r})  # streaming=True works too\n"
        + ('ds[0]["image"], ds[0]["chain"], ds[0]["label"]\n```\n' if pixels else
           'ds[0]["source_path"], ds[0]["image_id"], ds[0]["chain"], ds[0]["label"]\n```\n'),
        "One configuration per source dataset, one split per domain (leave-one-domain-out: train on all splits "
        "but one). `dg_split` is DomainBed's own in/out (train/validation) split of each domain.\n",
        "## Configurations\n",
        "| config | splits (examples) | classes |", "|---|---|---|",
    ]
    for ds, info in infos.items():
        sp = ", ".join(f"`{s['split']}` ({s['num_examples']})" for s in info["splits"])
        out.append(f"| {ds} | {sp} | {len(info['classes'])} |")
    out += ["\n## Fields\n", "| field | meaning |", "|---|---|"]
    if pixels:
        out.append("| `image` | the source image file, embedded unchanged (the bytes as read, never re-encoded) |")
        out.append("| `image_id` | sha256 of the image file bytes |")
    else:
        out.append("| `image_id` | sha256 of the source image file's bytes (checks the file you download) |")
        out.append("| `source_path` | the image's path in the source dataset's layout (`<folder>/<domain>/<class>/"
                   "<file>`, relative to the `dbr download` root) |")
    out += [
        "| `dataset`, `domain`, `class_name` | source dataset, domain folder, class folder |",
        "| `label` | class index (ClassLabel, sorted class folder order as in DomainBed) |",
        "| `dg_split` | DomainBed holdout split of the image: `in` (train) or `out` (validation) |",
        "| `chain` | the full teacher output |",
        "| `summary`, `caption`, `reasoning`, `reflection`, `conclusion` | its five stages |",
        "| `hinted` | true when written in the rationalization round (label given as a hint) |",
        "| `teacher` | the teacher model |",
    ]
    if not pixels:
        out += ["\n## Getting the images\n",
                "Download each source dataset from its own source into one root folder, then join on "
                "`source_path` (and check `image_id`):\n"]
        for ds, src in sources.items():
            out.append(f"- **{ds}**: {src['download']}")
        out += ["", "```python\nimport hashlib, pathlib\nrow = ds[0]\np = pathlib.Path(ROOT) / row['source_path']\n"
                "assert hashlib.sha256(p.read_bytes()).hexdigest() == row['image_id']\n```\n"]
    out += [
        "\n## How it was built\n",
        "Teacher models, prompts (ids are sha256 prefixes of the prompt templates in dbr-builder's `prompts/`) "
        "and sampling parameters:\n",
        *_teacher_lines(infos),
        "\n### Filtering and selection\n",
        RULES_TEXT,
    ]
    if provenance:
        out += _provenance_lines(provenance)
    out += ["## Statistics\n",
            "Per domain: images, kept chains, hinted chains, coverage (images with a chain), acceptance rate of "
            "candidates, and the teacher's own zero-shot accuracy (first candidate's conclusion vs label).\n"]
    for ds, info in infos.items():
        out += _stats_lines(ds, info["stats"])
    out += ["## Licences\n",
            "The chains are outputs of the teacher models listed above and are subject to their terms. "
            "The images keep the terms of their source datasets (summaries; each homepage is authoritative):\n",
            "| source | licence | terms | redistribution | homepage |", "|---|---|---|---|---|"]
    for ds, src in sources.items():
        out.append(f"| {ds} | {src['licence']} | {src['terms']} | {src['redistribution']} | {src['homepage']} |")
    out += ["\n## Citation\n", "```bibtex\n" + CITATIONS]
    for src in sources.values():
        if src.get("citation"):
            out.append(src["citation"].rstrip() + "\n")
    out[-1] = out[-1] + "```\n"
    return "\n".join(out) + "\n"
