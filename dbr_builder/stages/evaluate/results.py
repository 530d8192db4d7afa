"""Held-out-domain accuracy tables, the way DomainBed's ``collect_results`` reports them.

Input: one *prediction record* per evaluated image with the fields ``method`` (e.g.
``mtct_sarr / reasoning``), ``dataset``, ``heldout_domain``, ``trial_seed``, ``label`` (the
true class), ``pred`` (the parsed class or None) and ``status`` (parse status; everything
but ``ok`` is unparseable and counts as wrong).

Aggregation (DomainBed's ``reporting`` / ``collect_results``):

- one *cell* per (method, dataset, held-out domain, trial seed): accuracy on every image
  of the held-out domain, and the unparseable rate;
- per domain: mean over trial seeds +- DomainBed's error bar ``np.std(accs / sqrt(n))``,
  i.e. the standard error of the mean (population std / sqrt(n)); the plain std is kept
  in the JSON as well;
- ``Avg`` of a dataset: mean of the per-domain means (DomainBed's per-dataset table);
- the averages table: per trial seed the mean over that dataset's domains, then mean +-
  error over trial seeds; its ``Avg`` is the mean of the dataset means. The paper's Table 1
  rows (``pipelines/paper_table1.yaml``) are shown beside it.

Outputs: JSON (everything), Markdown, LaTeX (booktabs) and one PNG bar chart per dataset.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dbr_builder.core.fsutil import atomic_path, write_json_atomic, write_text_atomic
from dbr_builder.errors import ConfigError
from dbr_builder.resources import resource_path

ERROR_KINDS = ("se", "std")


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: Sequence[float]) -> float:
    """Population std (ddof=0), as ``np.std``."""
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def mean_err(values: Sequence[float], error: str = "se") -> dict[str, Any]:
    """Mean of ``values`` with DomainBed's error bar (``se``: std/sqrt(n)) or the plain ``std``."""
    if error not in ERROR_KINDS:
        raise ValueError(f"error must be one of {ERROR_KINDS}, got {error!r}")
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": None, "err": None, "std": None, "n": 0}
    std = _std(vals)
    se = std / math.sqrt(len(vals))
    return {"mean": _mean(vals), "err": se if error == "se" else std, "std": std, "n": len(vals)}


def cell_metrics(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy and unparseable rate per (method, dataset, held-out domain, trial seed), in %."""
    groups: dict[tuple, dict[str, Any]] = {}
    for r in records:
        key = (r["method"], r["dataset"], r["heldout_domain"], int(r["trial_seed"]))
        g = groups.setdefault(key, {"n": 0, "correct": 0, "unparseable": 0, "status": defaultdict(int)})
        g["n"] += 1
        ok = r.get("status", "ok") == "ok" and r.get("pred") is not None
        g["correct"] += int(ok and r["pred"] == r["label"])
        g["unparseable"] += int(not ok)
        g["status"][r.get("status") or "ok"] += 1
    out = []
    for (method, dataset, domain, seed), g in sorted(groups.items()):
        out.append({
            "method": method, "dataset": dataset, "heldout_domain": domain, "trial_seed": seed,
            "n": g["n"], "correct": g["correct"], "acc": 100.0 * g["correct"] / g["n"],
            "unparseable": g["unparseable"], "unparseable_rate": 100.0 * g["unparseable"] / g["n"],
            "status_counts": dict(sorted(g["status"].items())),
        })
    return out


def summarize(cells: Sequence[dict[str, Any]], domains: dict[str, list[str]] | None = None,
              error: str = "se", all_domains: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """DomainBed-style summary of :func:`cell_metrics` output.

    ``domains`` gives each dataset's full domain list (sorted); a method missing a domain
    gets no ``Avg`` (DomainBed prints ``X``). ``all_domains`` (the dataset's every domain) is
    recorded beside it when only some domains were evaluated as held-out, so the report can
    say that ``Avg`` covers a subset. Returns ``{"datasets": {ds: {"domains": [...],
    "methods": {m: {"per_domain": {d: {...}}, "avg": float|None}}}}, "averages": {...}}``.
    """
    by: dict[tuple[str, str], dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for c in cells:
        by[(c["dataset"], c["method"])][c["heldout_domain"]][c["trial_seed"]] = c
    datasets: dict[str, Any] = {}
    methods_order: list[str] = list(dict.fromkeys(c["method"] for c in cells))
    for ds in sorted({c["dataset"] for c in cells}):
        ds_domains = list((domains or {}).get(ds) or sorted({c["heldout_domain"] for c in cells if c["dataset"] == ds}))
        entry: dict[str, Any] = {"domains": ds_domains, "methods": {},
                                 "all_domains": list((all_domains or {}).get(ds) or ds_domains)}
        for m in methods_order:
            if (ds, m) not in by:
                continue
            per = by[(ds, m)]
            per_domain = {}
            for d in ds_domains:
                if d not in per:
                    continue
                seeds = sorted(per[d])
                accs = [per[d][s]["acc"] for s in seeds]
                unp = [per[d][s]["unparseable_rate"] for s in seeds]
                per_domain[d] = {**mean_err(accs, error), "trial_seeds": seeds, "accs": accs,
                                 "unparseable_rate": _mean(unp),
                                 "n_images": [per[d][s]["n"] for s in seeds]}
            complete = all(d in per_domain for d in ds_domains)
            avg = _mean([per_domain[d]["mean"] for d in ds_domains]) if complete else None
            # Averages table: per trial seed, mean over the domains (only seeds that cover them all).
            seed_sets = [set(per[d]) for d in ds_domains if d in per]
            common = sorted(set.intersection(*seed_sets)) if complete and seed_sets else []
            trial_avgs = [_mean([per[d][s]["acc"] for d in ds_domains]) for s in common]
            entry["methods"][m] = {
                "per_domain": per_domain, "avg": avg,
                "trial_averages": dict(zip(common, trial_avgs, strict=True)),
                "dataset_mean": mean_err(trial_avgs, error) if trial_avgs else mean_err([], error),
                "unparseable_rate": (_mean([v["unparseable_rate"] for v in per_domain.values()])
                                     if per_domain else None),
            }
        datasets[ds] = entry
    averages: dict[str, Any] = {}
    for m in methods_order:
        row = {ds: datasets[ds]["methods"][m]["dataset_mean"] for ds in datasets if m in datasets[ds]["methods"]}
        means = [v["mean"] for v in row.values()]
        full = len(row) == len(datasets) and all(x is not None for x in means)
        averages[m] = {"datasets": row, "avg": _mean(means) if full and means else None}
    return {"error": error, "datasets": datasets, "averages": averages, "methods": methods_order}


# ---------------------------------------------------------------- paper table


def load_paper_table(path: str | Path | None = None) -> dict[str, Any]:
    """The paper's Table 1 rows from ``pipelines/paper_table1.yaml`` (or ``path``)."""
    import yaml


    p = Path(path) if path else resource_path("pipelines", "paper_table1.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: cannot read the paper table: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ConfigError(f"{p}: expected `rows:` - a list of {{method: NAME, <Dataset>: accuracy, ...}}")
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict) or "method" not in row:
            raise ConfigError(f"{p}: rows[{i}] needs a `method:` name")
        for k, v in row.items():
            if k != "method" and not isinstance(v, int | float):
                raise ConfigError(f"{p}: rows[{i}].{k} must be a number (accuracy in %), got {v!r}")
    return data


# ---------------------------------------------------------------- rendering


def _fmt(mean: float | None, err: float | None, latex: bool = False) -> str:
    if mean is None:
        return "X"
    if err is None:
        return f"{mean:.1f}"
    pm = " $\\pm$ " if latex else " ± "
    return f"{mean:.1f}{pm}{err:.1f}"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(s: str) -> str:
    """Escape LaTeX special characters in plain text."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(s))


def _md(s: str) -> str:
    return str(s).replace("|", "\\|")


def dataset_rows(summary: dict[str, Any], ds: str, latex: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one dataset's table: method, one column per domain, Avg."""
    entry = summary["datasets"][ds]
    header = ["Method", *entry["domains"], "Avg"]
    rows = []
    for m, v in entry["methods"].items():
        cells = [_fmt(v["per_domain"][d]["mean"], v["per_domain"][d]["err"], latex)
                 if d in v["per_domain"] else "X" for d in entry["domains"]]
        rows.append([m, *cells, _fmt(v["avg"], None)])
    return header, rows


def unparseable_rows(summary: dict[str, Any], ds: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one dataset's unparseable-rate table (%, mean over trial seeds)."""
    entry = summary["datasets"][ds]
    header = ["Method", *entry["domains"], "Avg"]
    rows = []
    for m, v in entry["methods"].items():
        cells = [f"{v['per_domain'][d]['unparseable_rate']:.1f}" if d in v["per_domain"] else "X"
                 for d in entry["domains"]]
        rows.append([m, *cells, "X" if v["unparseable_rate"] is None else f"{v['unparseable_rate']:.1f}"])
    return header, rows


def averages_rows(summary: dict[str, Any], paper: dict[str, Any] | None,
                  latex: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the averages table (one column per dataset), paper rows appended."""
    dsets = list(summary["datasets"])
    if paper:
        for row in paper["rows"]:
            dsets += [k for k in row if k not in ("method", "Avg") and k not in dsets]
    header = ["Method", *dsets, "Avg"]
    rows = []
    for m, v in summary["averages"].items():
        cells = [_fmt(v["datasets"][d]["mean"], v["datasets"][d]["err"], latex)
                 if d in v["datasets"] else "-" for d in dsets]
        rows.append([m, *cells, _fmt(v["avg"], None)])
    for row in (paper or {}).get("rows", []):
        vals = [row.get(d) for d in dsets]
        ds_vals = [row[d] for d in row if d not in ("method", "Avg")]
        avg = row.get("Avg", _mean(ds_vals) if ds_vals else None)
        rows.append([f"{row['method']} (paper)", *[f"{x:.2f}" if x is not None else "-" for x in vals],
                     f"{avg:.2f}" if avg is not None else "-"])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(_md(h) for h in header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def latex_table(header: list[str], rows: list[list[str]], caption: str) -> str:
    """A booktabs LaTeX table."""
    cols = "l" + "c" * (len(header) - 1)
    out = ["\\begin{table}[t]", "\\centering", f"\\caption{{{_tex(caption)}}}", "\\small",
           f"\\begin{{tabular}}{{{cols}}}", "\\toprule", " & ".join(_tex(h) for h in header) + " \\\\",
           "\\midrule"]
    # cells may already hold LaTeX ($\pm$), so only the method column is escaped
    out += [" & ".join([_tex(r[0]), *r[1:]]) + " \\\\" for r in rows]
    out += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(out)


def render_markdown(summary: dict[str, Any], paper: dict[str, Any] | None = None, title: str = "") -> str:
    """The whole report: one table per dataset, unparseable rates, then averages vs the paper."""
    err = "standard error" if summary["error"] == "se" else "std"
    parts = [f"# {title or 'Held-out-domain accuracy'}", "",
             f"Accuracy (%) on each held-out domain (leave-one-domain-out), mean ± {err} over trial seeds "
             "(DomainBed's collect_results); Avg = mean over domains. Unparseable answers count as wrong."]
    for ds in summary["datasets"]:
        entry = summary["datasets"][ds]
        parts += ["", f"## {ds}", ""]
        if entry["all_domains"] != entry["domains"]:
            parts += [f"Only {len(entry['domains'])} of the {len(entry['all_domains'])} domains were evaluated "
                      f"as held-out ({', '.join(entry['domains'])}); Avg is over those.", ""]
        parts += [markdown_table(*dataset_rows(summary, ds)), "",
                  f"Unparseable answers (%) on {ds}:", "", markdown_table(*unparseable_rows(summary, ds))]
    parts += ["", "## Averages", ""]
    if paper:
        parts += [f"Paper rows: {paper.get('source', 'paper')}; {paper.get('metric', '')}.", ""]
    parts += [markdown_table(*averages_rows(summary, paper)), ""]
    return "\n".join(parts)


def render_latex(summary: dict[str, Any], paper: dict[str, Any] | None = None) -> str:
    """All tables as LaTeX (needs ``\\usepackage{booktabs}``)."""
    err = "standard error" if summary["error"] == "se" else "std"
    parts = ["% generated by `dbr eval`; needs \\usepackage{booktabs}"]
    for ds in summary["datasets"]:
        parts += ["", latex_table(*dataset_rows(summary, ds, latex=True),
                                  caption=f"{ds}: held-out-domain accuracy (%), mean and {err} over trial seeds")]
    parts += ["", latex_table(*averages_rows(summary, paper, latex=True),
                              caption="Average held-out-domain accuracy (%) per dataset, with the paper's Table 1"), ""]
    return "\n".join(parts)


def bar_chart(summary: dict[str, Any], ds: str, dest: str | Path, paper: dict[str, Any] | None = None,
              num_classes: int | None = None) -> Path:
    """Write :func:`bar_figure` to ``dest`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = bar_figure(summary, ds, paper, num_classes)
    dest = Path(dest)
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")
    plt.close(fig)
    return dest


def bar_figure(summary: dict[str, Any], ds: str, paper: dict[str, Any] | None = None,
               num_classes: int | None = None) -> Any:
    """PNG bar chart of one dataset: per held-out domain and Avg, one bar per method with error bars.

    The paper's Table 1 numbers for the dataset (if any) are drawn as dashed lines, chance level
    (100 / ``num_classes``) as a dotted grey line; the legend sits outside the axes, so it never
    covers a bar, and long domain names are wrapped.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")  # no display; never pick an interactive backend
    import matplotlib.pyplot as plt

    entry = summary["datasets"][ds]
    groups = [*entry["domains"], "Avg"]
    methods = list(entry["methods"])
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 0.35 * len(methods)) + 2.6, 4.4))
    for i, m in enumerate(methods):
        v = entry["methods"][m]
        means = [v["per_domain"][d]["mean"] if d in v["per_domain"] else 0.0 for d in entry["domains"]]
        errs = [v["per_domain"][d]["err"] if d in v["per_domain"] else 0.0 for d in entry["domains"]]
        means.append(v["avg"] or 0.0)
        errs.append(0.0)
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=m)
    for j, row in enumerate((paper or {}).get("rows", [])):
        if ds in row:
            ax.axhline(row[ds], linestyle="--", linewidth=1, color=f"C{(len(methods) + j) % 10}",
                       label=f"{row['method']} (paper avg)")
    if num_classes and num_classes > 1:
        ax.axhline(100.0 / num_classes, linestyle=":", linewidth=1.2, color="0.35",
                   label=f"chance ({100.0 / num_classes:.1f}%, {num_classes} classes)")
    ax.set_xticks(range(len(groups)), ["\n".join(textwrap.wrap(g.replace("_", " "), 12)) or g for g in groups])
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{ds}: leave-one-domain-out accuracy")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    return fig


def write_reports(records: Iterable[dict[str, Any]], out_dir: str | Path,
                  domains: dict[str, list[str]] | None = None, paper: dict[str, Any] | None = None,
                  error: str = "se", title: str = "",
                  all_domains: dict[str, list[str]] | None = None,
                  num_classes: dict[str, int] | None = None) -> dict[str, Path]:
    """Compute the tables from prediction records and write ``results.{json,md,tex}`` and ``<Dataset>.png``.

    ``num_classes`` (per dataset) draws the chance level on the charts.
    """
    out_dir = Path(out_dir)
    cells = cell_metrics(records)
    summary = summarize(cells, domains, error, all_domains)
    paths = {
        "json": write_json_atomic(out_dir / "results.json", {"summary": summary, "cells": cells,
                                                            "paper": paper}),
        "md": write_text_atomic(out_dir / "results.md", render_markdown(summary, paper, title)),
        "tex": write_text_atomic(out_dir / "results.tex", render_latex(summary, paper)),
    }
    for ds in summary["datasets"]:
        paths[f"png:{ds}"] = bar_chart(summary, ds, out_dir / f"{ds}.png", paper, (num_classes or {}).get(ds))
    return paths
