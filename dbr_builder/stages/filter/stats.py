"""Filter statistics: acceptance, rejection reasons, coverage, chain lengths, teacher accuracy.

Written by the filter stage to ``W/reports/<Dataset>/``: ``stats.json`` (everything),
``stats.md`` (tables for humans and the dataset card) and PNG charts. All numbers are
computed with polars from the evaluated candidate table (``filter.evaluate_candidates``).

The teacher's own zero-shot accuracy per domain uses each image's *first* teacher candidate
(lowest sample index of the unhinted prompt): its conclusion against the label, an
unparseable chain counting as wrong, so it is comparable with the papers' zero-shot numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbr_builder.core.chains import FIELDS
from dbr_builder.core.fsutil import atomic_path, read_json, write_json_atomic, write_text_atomic
from dbr_builder.core.workdir import reports_dir

if TYPE_CHECKING:
    import polars as pl


CHARS_PER_TOKEN = 4


def approx_tokens(text: pl.Expr) -> pl.Expr:
    """Approximate token count of a string column: ceil(characters / 4); 0 for null."""
    import polars as pl

    return ((text.str.len_chars().fill_null(0) + (CHARS_PER_TOKEN - 1)) // CHARS_PER_TOKEN).cast(pl.Int64)


def _rate(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _records(df: pl.DataFrame) -> list[dict[str, Any]]:
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in df.iter_rows(named=True)]


def _coverage_join(manifest: pl.DataFrame, kept: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Manifest rows (columns ``by``) with the ``hinted`` flag of their kept chain (null: uncovered)."""
    m = manifest.with_row_index("_row").select("_row", "image_id", "path", *by)
    k = kept.select("image_id", "path", "hinted")
    return m.join(k, on=["image_id", "path"], how="left")


def coverage_table(manifest: pl.DataFrame, kept: pl.DataFrame, by: list[str],
                   joined: pl.DataFrame | None = None) -> pl.DataFrame:
    """Images, covered images (any chain), hinted ones and coverage per group of ``by``.

    ``joined``: a precomputed ``_coverage_join`` holding the ``by`` columns (saves the join
    when several tables are made).
    """
    import polars as pl

    j = joined if joined is not None else _coverage_join(manifest, kept, by)
    grp = j.group_by(by) if by else j.group_by(pl.lit("all").alias("_all"))
    out = grp.agg(
        images=pl.len(),
        covered=pl.col("hinted").is_not_null().sum(),
        hinted=pl.col("hinted").fill_null(False).sum(),
    ).with_columns(
        coverage=(pl.col("covered") / pl.col("images")).round(4),
        coverage_unhinted=((pl.col("covered") - pl.col("hinted")) / pl.col("images")).round(4),
    )
    return out.sort(by) if by else out.drop("_all")


def compute_stats(ev: pl.DataFrame, manifest: pl.DataFrame, kept: pl.DataFrame) -> dict[str, Any]:
    """All report numbers as a JSON-able dict (see module doc)."""
    import polars as pl

    acc = pl.col("reason").is_null()
    cand = ev.with_columns(accepted=acc)
    total, accepted = cand.height, int(cand.get_column("accepted").sum())

    def acceptance(by: list[str]) -> list[dict[str, Any]]:
        t = (cand.group_by(by).agg(candidates=pl.len(), accepted=pl.col("accepted").sum())
             .with_columns(acceptance=(pl.col("accepted") / pl.col("candidates")).round(4)).sort(by, nulls_last=True))
        return _records(t)

    reasons = (cand.filter(~acc).group_by("reason").agg(count=pl.len())
               .with_columns(share=(pl.col("count") / max(total, 1)).round(4)).sort(["count", "reason"],
                                                                                     descending=[True, False]))
    reason_stage = (cand.filter(~acc & pl.col("reason_stage").is_not_null())
                    .group_by("reason", "reason_stage").agg(count=pl.len()).sort("reason", "reason_stage"))
    reason_by_domain = (cand.filter(~acc).group_by("domain", "reason").agg(count=pl.len())
                        .sort("domain", "reason", nulls_last=True))

    # Teacher zero-shot accuracy: the first unhinted candidate of each manifest row.
    first = (ev.filter((pl.col("prompt_name") != "rationalize") & pl.col("_row").is_not_null())
             .select("_row", "sample_index", "request_key", "domain", "pred", "class_name")
             .sort("_row", "sample_index", "request_key").unique(subset="_row", keep="first", maintain_order=True))
    zs = (first.group_by("domain").agg(images=pl.len(), correct=(pl.col("pred") == pl.col("class_name"))
                                       .fill_null(False).sum())
          .with_columns(accuracy=(pl.col("correct") / pl.col("images")).round(4)).sort("domain"))
    zs_all = _rate(int(zs.get_column("correct").sum()), int(zs.get_column("images").sum()))

    lengths: dict[str, Any] = {}

    words = kept.select([approx_tokens(pl.col(f)).alias(f) for f in FIELDS]) \
        .with_columns(total=pl.sum_horizontal(FIELDS))
    for f in [*FIELDS, "total"]:
        s = words.get_column(f)
        lengths[f] = {
            "mean": round(float(s.mean()), 2) if s.len() else None,
            "median": float(s.median()) if s.len() else None,
            "p5": float(s.quantile(0.05, "nearest")) if s.len() else None,
            "p95": float(s.quantile(0.95, "nearest")) if s.len() else None,
            "max": int(s.max()) if s.len() else None,
        }

    teachers = _records(
        ev.filter(pl.col("model").is_not_null())
        .group_by("model", "prompt_name", "prompt_id", "params").agg(candidates=pl.len())
        .sort("model", "prompt_name", "prompt_id", "params")
    )
    by_cols = [c for c in ("domain", "class_name", "split") if c in manifest.columns]
    joined = _coverage_join(manifest, kept, by_cols)
    overall = coverage_table(manifest, kept, [], joined).row(0, named=True) if manifest.height else {
        "images": 0, "covered": 0, "hinted": 0, "coverage": None, "coverage_unhinted": None}
    return {
        "candidates": {"total": total, "accepted": accepted, "acceptance": _rate(accepted, total),
                       "by_prompt": acceptance(["prompt_name"])},
        "acceptance_by_domain": acceptance(["domain"]),
        "acceptance_by_class": acceptance(["class_name"]),
        "reasons": _records(reasons),
        "reasons_by_stage": _records(reason_stage),
        "reasons_by_domain": _records(reason_by_domain),
        "coverage": {
            "overall": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in overall.items()},
            "by_domain": _records(coverage_table(manifest, kept, ["domain"], joined)),
            "by_class": _records(coverage_table(manifest, kept, ["class_name"], joined)),
            "by_split": _records(coverage_table(manifest, kept, ["split"], joined)),
        },
        "teacher_zero_shot": {"overall": zs_all, "by_domain": _records(zs)},
        "chain_tokens": lengths,
        "teachers": teachers,
    }


def _md_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    if not rows:
        return "_none_\n"
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if v < 1.0001 else f"{v:.1f}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def summary_table(stats: dict[str, Any]) -> str:
    """The short per-domain table (coverage, acceptance, teacher accuracy) in Markdown."""
    acc = {r["domain"]: r for r in stats["acceptance_by_domain"]}
    zs = {r["domain"]: r for r in stats["teacher_zero_shot"]["by_domain"]}
    rows = []
    for r in stats["coverage"]["by_domain"]:
        d = r["domain"]
        rows.append({"domain": d, "images": r["images"], "kept": r["covered"], "hinted": r["hinted"],
                     "coverage": r["coverage"], "acceptance": acc.get(d, {}).get("acceptance"),
                     "teacher_zero_shot": zs.get(d, {}).get("accuracy")})
    o = stats["coverage"]["overall"]
    rows.append({"domain": "**all**", "images": o["images"], "kept": o["covered"], "hinted": o["hinted"],
                 "coverage": o["coverage"], "acceptance": stats["candidates"]["acceptance"],
                 "teacher_zero_shot": stats["teacher_zero_shot"]["overall"]})
    return _md_table(rows, ["domain", "images", "kept", "hinted", "coverage", "acceptance", "teacher_zero_shot"])


def render_markdown(dataset: str, stats: dict[str, Any]) -> str:
    """The whole ``stats.md`` report."""
    c = stats["candidates"]
    parts = [
        f"# {dataset}: filter report\n",
        f"{c['total']} candidates, {c['accepted']} accepted ({c['acceptance']}).\n",
        "## Per domain\n", summary_table(stats),
        "\n## Rejection reasons\n", _md_table(stats["reasons"], ["reason", "count", "share"]),
        "\n## Coverage by class\n",
        _md_table(stats["coverage"]["by_class"], ["class_name", "images", "covered", "hinted", "coverage"]),
        "\n## Coverage by DomainBed split\n",
        _md_table(stats["coverage"]["by_split"], ["split", "images", "covered", "hinted", "coverage"]),
        "\n## Acceptance by prompt\n",
        _md_table(c["by_prompt"], ["prompt_name", "candidates", "accepted", "acceptance"]),
        "\n## Chain length (approximate tokens = characters / 4, kept chains)\n",
        _md_table([{"stage": k, **v} for k, v in stats["chain_tokens"].items()],
                  ["stage", "mean", "median", "p5", "p95", "max"]),
    ]
    return "".join(parts)


def write_charts(out_dir: Path, stats: dict[str, Any]) -> list[Path]:
    """PNG charts: coverage/acceptance by domain, rejection reasons, coverage by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    written = []

    def save(fig, name: str) -> None:
        dest = out_dir / name
        with atomic_path(dest, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        written.append(dest)

    dom = stats["coverage"]["by_domain"]
    acc = {r["domain"]: r["acceptance"] for r in stats["acceptance_by_domain"]}
    zs = {r["domain"]: r["accuracy"] for r in stats["teacher_zero_shot"]["by_domain"]}
    names = [str(r["domain"]) for r in dom]
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(names)), 3))
    x = range(len(names))
    for off, (label, vals) in zip((-0.27, 0, 0.27), (
            ("coverage", [r["coverage"] or 0 for r in dom]),
            ("candidate acceptance", [acc.get(n) or 0 for n in names]),
            ("teacher zero-shot acc.", [zs.get(n) or 0 for n in names])), strict=True):
        ax.bar([i + off for i in x], vals, width=0.27, label=label)
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # never over a bar
    ax.set_title("per domain")
    save(fig, "domains.png")

    reasons = stats["reasons"]
    fig, ax = plt.subplots(figsize=(5, 0.3 * max(3, len(reasons)) + 1))
    ax.barh([r["reason"] for r in reasons][::-1], [r["count"] for r in reasons][::-1])
    ax.set_title("rejected candidates by reason")
    save(fig, "reasons.png")

    save(class_figure(stats["coverage"]["by_class"]), "classes.png")
    return written


def class_figure(cls: list[dict[str, Any]]) -> Any:
    """Coverage by class as horizontal bars, one row per class, so 65 (OfficeHome) or 345 (DomainNet)
    class names stay readable (the figure grows with the class count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(r["class_name"]).replace("_", " ") for r in cls][::-1]
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.17 * len(cls) + 0.9)))
    ax.barh(range(len(cls)), [r["coverage"] or 0 for r in cls][::-1], height=0.75)
    ax.set_yticks(range(len(cls)), names, fontsize=7 if len(cls) <= 100 else 5)
    ax.set_ylim(-0.6, len(cls) - 0.4)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("coverage (images with a kept chain)")
    ax.set_title("coverage by class")
    return fig


def report_dir(workdir: str | Path, dataset: str) -> Path:
    """``W/reports/<Dataset>``."""
    return reports_dir(workdir, dataset)


def write_report(workdir: str | Path, dataset: str, ev: pl.DataFrame, manifest: pl.DataFrame,
                 kept: pl.DataFrame, rationalized: int = 0, charts: bool = True,
                 rules: dict[str, Any] | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    """Compute the stats and write ``stats.json``, ``stats.md`` and the charts; return the stats.

    ``rules``: the effective filter rules, kept in ``stats.json`` for the dataset card's provenance.
    ``out_dir``: where to write them (default ``W/reports/<Dataset>``; the filter stage writes
    a temporary folder that it commits together with the chains).
    """
    stats = compute_stats(ev, manifest, kept)
    stats["dataset"] = dataset
    stats["rationalized_images"] = rationalized
    if rules is not None:
        stats["rules"] = rules
    out = Path(out_dir) if out_dir is not None else report_dir(workdir, dataset)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "stats.json", stats)
    write_text_atomic(out / "stats.md", render_markdown(dataset, stats))
    if charts:
        write_charts(out, stats)
    return stats


def load_stats(workdir: str | Path, dataset: str) -> dict[str, Any]:
    """Read ``W/reports/<Dataset>/stats.json`` (written by the filter stage)."""
    p = report_dir(workdir, dataset) / "stats.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no filter report for {dataset}; run `dbr filter {dataset}` first")
    return read_json(p, f"rerun `dbr filter {dataset} --workdir {workdir}` to rewrite it")


def markdown_table(workdir: str | Path, dataset: str) -> str:
    """The per-domain summary table of a dataset's report (printed by the CLI and the demo)."""
    return summary_table(load_stats(workdir, dataset))
