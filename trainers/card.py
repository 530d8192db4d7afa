"""Model cards for trained students, and ``dbr train --push`` (adapters + cards to the Hub).

Every ``final/`` folder gets a ``README.md`` (replacing PEFT's blank template) and a
``training.png``: base model, the data it was trained on (source and revision), the recipe
(every setting of ``settings.json``), the stages with their validation accuracy and SARR
rejection rates, and the leave-one-domain-out results when ``dbr eval`` has run for the run.

``push_run`` uploads the finished units of a run to one model repo in one commit (the same
``create_commit`` path as the dataset release, ``dbr_builder.stages.publish.push``): each unit in
``<Dataset>/<heldout>/seed<k>/`` with a card re-rendered with the newest eval results, plus a
top-level card with the LODO table. Local absolute paths never leave the machine.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dbr_builder.core import workdir as wdl
from dbr_builder.core.fsutil import sha256_file, write_text_atomic
from dbr_builder.errors import UserError
from dbr_builder.stages.publish.push import push_folder
from trainers.tracking import plot_run, read_log

TAGS = ["domain-generalization", "domainbed", "rd-mldg", "mtct", "sarr", "dbr-builder"]
NOT_PUSHED = {"self_chains.jsonl"}  # training-data derivatives; they stay in the work directory


def _is_hub_id(spec: str | None) -> bool:
    return bool(spec) and not Path(str(spec)).expanduser().exists() and str(spec).count("/") == 1 \
        and not str(spec).startswith((".", "/", "~"))


def data_revision(source: str | Path) -> dict[str, Any]:
    """Which data a student saw: a Hub dataset id, or a local folder and a sha256 over its card and shards."""
    p = Path(source)
    if not p.is_dir():
        return {"source": str(source), "kind": "hub"}
    files = sorted(f for f in p.rglob("*") if f.is_file() and (f.name == "README.md" or f.suffix == ".parquet")
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\n".encode())
    return {"source": p.name if p.name != "hub" else "W/hub (local)", "kind": "local", "sha256": h.hexdigest(),
            "files": len(files)}


def eval_cells(workdir: Path, run: str, dataset: str | None = None, heldout: str | None = None,
               seed: int | None = None) -> list[dict[str, Any]]:
    """Held-out accuracy cells of ``W/runs/<run>/eval/results.json`` (``dbr eval``), filtered."""
    p = wdl.eval_dir(workdir, run) / "results.json"
    if not p.exists():
        return []
    try:
        cells = json.loads(p.read_text(encoding="utf-8")).get("cells", [])
    except ValueError:
        return []
    return [c for c in cells if (dataset is None or c["dataset"] == dataset)
            and (heldout is None or c["heldout_domain"] == heldout) and (seed is None or int(c["trial_seed"]) == seed)]


def _stage_rows(seed_folder: Path, stages: list[str], selected: str | None) -> list[str]:
    rows = ["| stage | steps | first loss | final loss | val accuracy | SARR rejection rate |", "|---|---|---|---|---|---|"]

    def f(v: Any, pct: bool = False) -> str:
        return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.4g}" if isinstance(v, float) else str(v))

    for name in stages:
        sj = seed_folder / name / "stage.json"
        if not sj.exists():
            continue
        info = json.loads(sj.read_text(encoding="utf-8"))
        tr, val = info.get("train", {}), info.get("val", {})
        rej = (info.get("sarr") or {}).get("rejection_rate")
        label = name + (" (selected)" if name == selected else "")
        rows.append(f"| {label} | {f(tr.get('steps'))} | {f(tr.get('first_loss'))} | {f(tr.get('final_loss'))} | "
                    f"{f(val.get('accuracy'), True)} | {f(rej, True)} |")
    return rows


def public_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with local paths (student, data) cut to their folder name: nothing local leaves the machine."""
    out = dict(settings)
    for k in ("student", "data"):
        v = out.get(k)
        if isinstance(v, str) and (v.startswith(("/", "./", "../", "~")) or Path(v).expanduser().exists()):
            out[k] = f"{Path(v).name} (local)"
    return out


def render_model_card(student: dict[str, Any], settings: dict[str, Any], data: dict[str, Any],
                      cells: list[dict[str, Any]], seed_folder: Path | None = None, subfolder: str | None = None,
                      repo_id: str | None = None, plot: bool = True) -> str:
    """README.md of one trained unit."""
    base = str(settings.get("student") or student.get("base_model"))
    full = student.get("finetune") == "full"
    ds, held, seed = student["dataset"], student["heldout_domain"], student["trial_seed"]
    header: dict[str, Any] = {}
    if _is_hub_id(base):
        header["base_model"] = base
    header["library_name"] = "transformers" if full else "peft"
    header["pipeline_tag"] = "image-text-to-text"
    header["tags"] = TAGS + (["full-finetune"] if full else ["lora"])
    if data.get("kind") == "hub":
        header["datasets"] = [data["source"]]
    lines = [f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n",
             f"# {student.get('run', 'run')}: {ds}, held-out domain `{held}`, trial seed {seed}\n",
             f"A student multimodal LLM fine-tuned with RD-MLDG's recipe, **MTCT** (multi-task cross-training: direct "
             f"classification + teacher reasoning chains) then **SARR** (self-aligned reasoning regularization), on "
             f"every domain of {ds} but `{held}`, which it never saw (leave-one-domain-out). Trained with dbr-builder.\n",
             "## Model\n",
             f"- base model: `{base if _is_hub_id(base) or base == 'tiny' else Path(base).name + ' (local)'}`",
             f"- fine-tuning: {'all weights (full)' if full else 'LoRA adapter'}"
             + ("" if full else f" (r={settings.get('lora', {}).get('r')}, alpha={settings.get('lora', {}).get('alpha')}, "
                                f"targets `{settings.get('lora', {}).get('target_modules')}`, vision tower "
                                f"{'adapted' if settings.get('lora', {}).get('vision') else 'frozen'})"),
             f"- selected stage: `{student.get('selected_stage')}` (best accuracy on the training domains' "
             "DomainBed `out` split)",
             f"- classes ({len(student.get('classes', []))}): {', '.join(student.get('classes', []))}\n",
             "## Data\n",
             f"- dataset: {data['source']}, config `{ds}`"
             + (f", revision sha256 `{data['sha256'][:16]}` over its card and {data['files']} shards"
                if data.get("sha256") else ""),
             f"- training domains: {', '.join(student.get('train_domains', []))}; held out: `{held}`\n",
             "## Recipe\n",
             *(_stage_rows(seed_folder, list(student.get("val_accuracy", {})), student.get("selected_stage"))
               if seed_folder else []),
             "",
             "<details><summary>every setting (settings.json)</summary>\n",
             "```yaml\n" + yaml.safe_dump(public_settings(settings), sort_keys=True, default_flow_style=None, width=100) + "```\n",
             "</details>\n"]
    if plot:
        lines += ["![training loss and validation accuracy](training.png)\n"]
    lines += ["## Results (leave-one-domain-out)\n"]
    if cells:
        lines += [f"Accuracy on the held-out domain `{held}` (all its images), from `dbr eval`:\n",
                  "| method | accuracy | images | unparseable |", "|---|---|---|---|"]
        lines += [f"| {c['method']} | {c['acc']:.1f}% | {c['n']} | {c.get('unparseable_rate', 0):.1f}% |"
                  for c in sorted(cells, key=lambda c: c["method"])]
        lines.append("")
    else:
        lines.append("`dbr eval` has not been run for this student yet: only the training-domain validation "
                     "accuracy above is known.\n")
    where = repo_id or "path/to/repo"
    sub = f", subfolder={subfolder!r}" if subfolder else ""
    lines += ["## Use\n", "```python\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"]
    if full:
        lines[-1] += (f"model = AutoModelForImageTextToText.from_pretrained({where!r}{sub})\n"
                      f"processor = AutoProcessor.from_pretrained({where!r}{sub})\n```\n")
    else:
        lines[-1] += ("from peft import PeftModel\n"
                      f"base = AutoModelForImageTextToText.from_pretrained({base!r})\n"
                      f"model = PeftModel.from_pretrained(base, {where!r}{sub})\n"
                      f"processor = AutoProcessor.from_pretrained({base!r})\n```\n")
    lines.append("Prompts: `prompts/q_cls.txt` (direct answer) and `prompts/q_reason.txt` (a five-stage chain ending "
                 "in `<CONCLUSION>class</CONCLUSION>`) of dbr-builder, with the student's chat template.\n")
    return "\n".join(lines)


def _settings(seed_folder: Path) -> dict[str, Any]:
    p = seed_folder / "settings.json"
    return json.loads(p.read_text(encoding="utf-8")).get("settings", {}) if p.exists() else {}


def write_unit_card(final_dir: Path, seed_folder: Path, student: dict[str, Any], data_source: str | Path,
                    workdir: Path) -> Path:
    """Write ``final_dir/README.md`` and ``final_dir/training.png`` (``final_dir`` may be a temporary folder)."""
    stages = []
    for name in student.get("val_accuracy", {}):
        stages.append((name, read_log(seed_folder / "_work" / name / "log.jsonl"),
                       student["val_accuracy"].get(name)))
    title = f"{student.get('run')}: {student['dataset']}, held-out {student['heldout_domain']}, seed {student['trial_seed']}"
    plot_run(stages, final_dir / "training.png", title)
    cells = eval_cells(workdir, student.get("run", ""), student["dataset"], student["heldout_domain"],
                       int(student["trial_seed"]))
    card = render_model_card(student, _settings(seed_folder), data_revision(data_source), cells, seed_folder)
    return write_text_atomic(final_dir / "README.md", card)


# ---------------------------------------------------------------------------------------------
# push


def finished_units(workdir: Path, run: str, datasets: list[str] | None = None, heldout: list[str] | None = None,
                   seeds: list[int] | None = None) -> list[Path]:
    """Seed folders of ``W/runs/<run>`` with a ``final/student.json``, optionally filtered."""
    safe = {wdl.safe_split_name(h) for h in heldout} if heldout else None
    out = []
    for sj in sorted(wdl.runs_dir(workdir, run).glob("*/*/seed*/final/student.json")):
        seed_folder = sj.parent.parent
        ds, held, seed = seed_folder.parent.parent.name, seed_folder.parent.name, int(seed_folder.name[4:])
        if (datasets and ds not in datasets) or (safe and held not in safe) or (seeds and seed not in seeds):
            continue
        out.append(seed_folder)
    return out


def _top_card(run: str, units: list[tuple[str, dict[str, Any]]], workdir: Path, repo_id: str) -> str:
    header = {"library_name": "peft" if all(s.get("finetune") != "full" for _, s in units) else "transformers",
              "pipeline_tag": "image-text-to-text", "tags": TAGS}
    lines = [f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n", f"# {run}: RD-MLDG students (MTCT + SARR)\n",
             "One student per dataset, held-out domain and trial seed (leave-one-domain-out), each in its own "
             "subfolder with its own card. Trained with dbr-builder.\n",
             "| subfolder | dataset | held-out domain | seed | selected stage | held-out accuracy |",
             "|---|---|---|---|---|---|"]
    for sub, s in units:
        cells = eval_cells(workdir, run, s["dataset"], s["heldout_domain"], int(s["trial_seed"]))
        acc = ", ".join(f"{c['method']}: {c['acc']:.1f}%" for c in cells) or "not evaluated"
        lines.append(f"| `{sub}` | {s['dataset']} | {s['heldout_domain']} | {s['trial_seed']} | "
                     f"{s.get('selected_stage')} | {acc} |")
    lines += ["", "```python\nfrom peft import PeftModel\n"
              f"model = PeftModel.from_pretrained(base, {repo_id!r}, subfolder={units[0][0]!r})\n```\n"]
    return "\n".join(lines) + "\n"


def stage_push_folder(workdir: Path, run: str, units: list[Path], dest: Path, repo_id: str,
                      data_source: str | Path) -> list[str]:
    """Lay out what ``push_run`` uploads in ``dest``: links to each unit's files, fresh cards, clean student.json."""
    subs = []
    pairs = []
    data = data_revision(data_source)
    for seed_folder in units:
        ds, held, seed = seed_folder.parent.parent.name, seed_folder.parent.name, seed_folder.name
        sub = f"{ds}/{held}/{seed}"
        out = dest / sub
        out.mkdir(parents=True)
        final = seed_folder / "final"
        student = json.loads((final / "student.json").read_text(encoding="utf-8"))
        for f in sorted(final.iterdir()):
            if f.is_file() and f.name not in NOT_PUSHED | {"README.md", "student.json"}:
                os.symlink(f.resolve(), out / f.name)
        clean = {**student, "adapter": None if student.get("finetune") == "full" else ".",
                 "base_model": "." if student.get("finetune") == "full" else _public_base(student, seed_folder)}
        (out / "student.json").write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        cells = eval_cells(workdir, run, student["dataset"], student["heldout_domain"], int(student["trial_seed"]))
        (out / "README.md").write_text(render_model_card(student, _settings(seed_folder), data, cells, seed_folder,
                                                         subfolder=sub, repo_id=repo_id,
                                                         plot=(out / "training.png").exists()), encoding="utf-8")
        subs.append(sub)
        pairs.append((sub, student))
    (dest / "README.md").write_text(_top_card(run, pairs, workdir, repo_id), encoding="utf-8")
    return subs


def _public_base(student: dict[str, Any], seed_folder: Path) -> str:
    base = str(_settings(seed_folder).get("student") or student.get("base_model"))
    return base if _is_hub_id(base) or base == "tiny" else Path(base).name


def push_run(workdir: Path, run: str, repo_id: str, data_source: str | Path, datasets: list[str] | None = None,
             heldout: list[str] | None = None, seeds: list[int] | None = None, private: bool = False,
             dry_run: bool = False, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Upload the finished students of ``W/runs/<run>`` (with their cards) to the model repo ``repo_id``."""
    units = finished_units(workdir, run, datasets, heldout, seeds)
    if not units:
        raise UserError(f"{wdl.runs_dir(workdir, run)}: no finished student to push (no final/student.json); "
                        "run `dbr train` first")
    with tempfile.TemporaryDirectory(prefix="dbr-push-") as tmp:
        subs = stage_push_folder(workdir, run, units, Path(tmp), repo_id, data_source)
        owned = tuple(f"{s}/" for s in subs)  # stale files of these units go; other units stay
        res = push_folder(tmp, repo_id, private=private, dry_run=dry_run, repo_type="model", owned=owned,
                          commit_message=f"Students of run {run} (dbr-builder)", log=log)
    res["units"] = subs
    return res
