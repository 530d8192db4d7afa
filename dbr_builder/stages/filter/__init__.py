"""Filter stage: parse, validate and select one reasoning chain per image.

Reads the manifest (``W/manifest/<Dataset>.parquet``) and every teacher candidate in the
generation store, applies the rules below (the first rule a candidate breaks is its reason
code), keeps one accepted candidate per manifest row, and writes

- ``W/chains/<Dataset>.parquet``          one chain per covered image (manifest order)
- ``W/chains/<Dataset>.rejects.parquet``  every rejected candidate with its reason
- ``W/reports/<Dataset>/stats.{json,md}`` + ``*.png`` (``dbr_builder.stages.filter.stats``)

Rules, in order (reason codes):

``generation_error``  the backend failed for this request
``unknown_image``     the candidate's image is not in the manifest (e.g. quarantined since)
``truncated``         ``finish_reason == "length"`` or the text ends inside a stage
parser codes          ``empty``, ``duplicate_stage``, ``malformed_tag``, ``missing_stage``,
                      ``out_of_order``, ``empty_stage`` (``dbr_builder.core.chains``)
``no_class``          the conclusion names no class of the dataset
``ambiguous_class``   the conclusion names several classes
``wrong_label``       the conclusion names another class than the image's label
``too_short`` / ``too_long``  a stage's length in approximate tokens (characters / 4, rounded
                      up: the usual BPE ratio for English, no tokenizer needed) is outside
                      ``length.<stage>`` = [min, max]
``repetition``        degenerate repetition: too large a share of repeated sentences
``hint_leak``         a hinted (rationalization) chain mentions the hint
``template_collapse`` the same chain body (normalised) was accepted for more than
                      ``template_collapse.max_images`` different images

Selection (``select``): among a row's accepted candidates, teacher (unhinted) ones always
win over hinted ones; then ``first`` (default: the lowest sample index, i.e. plain rejection
sampling, which does not bias the dataset towards long or short chains), ``shortest``,
``longest`` or ``median`` (closest to the median length of that image's accepted chains).
Ties break on sample index then request key, so the result is deterministic.

Rationalization (``rationalize: {enabled: true, teacher: SPEC, n: 2}``): rows with no
accepted candidate are sent once more to the teacher with the hinted ``rationalize`` prompt
(``dbr_builder.stages.generate.generate_for_images``); those chains pass the same rules and are
flagged ``hinted``. The work is stored in the same append-only store, so a rerun costs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbr_builder.backends import BackendError, parse_spec
from dbr_builder.config import (
    add_option,
    load_schema,
    load_stage_config,
    options_from_args,
    resolve,
    schema_defaults,
    stage_schema,
    validate,
)
from dbr_builder.core.answers import matcher, synonyms_for
from dbr_builder.core.chains import FIELDS, parse_chains_frame
from dbr_builder.core.fsutil import (
    atomic_path,
    commit_moves,
    make_temp_dir,
    naming,
    recover_dir,
    recover_moves,
    remove_temps,
    temp_beside,
)
from dbr_builder.core.locks import stage_lock
from dbr_builder.core.manifest import load_manifest
from dbr_builder.core.store import read_results
from dbr_builder.core.workdir import chains_path, check_name, rejects_path, reports_dir
from dbr_builder.errors import ConfigError
from dbr_builder.log import get_logger
from dbr_builder.stages.filter.stats import approx_tokens, markdown_table, summary_table, write_report
from dbr_builder.stages.generate import generate_for_images

if TYPE_CHECKING:
    import polars as pl

PER_DATASET = True

SELECT_POLICIES = ("first", "shortest", "longest", "median")
RULE_REASONS = (
    "generation_error", "unknown_image", "truncated", "empty", "duplicate_stage", "malformed_tag",
    "missing_stage", "out_of_order", "empty_stage", "no_class", "ambiguous_class", "wrong_label",
    "too_short", "too_long", "repetition", "hint_leak", "template_collapse",
)
_D = schema_defaults("filter")  # every rule's default, defined once in schemas/stages/filter.schema.json
DEFAULT_LENGTH: dict[str, tuple[int, int]] = {k: (int(v[0]), int(v[1])) for k, v in _D["length"].items()}
_NORM = r"[^0-9a-z]+"
_HINT_PATTERN = r"(?i)\bhint\b|correct class is"

log = get_logger(__name__)


@dataclass
class Rules:
    """Configurable filter rules (the ``filter`` stage's YAML options)."""

    length: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(DEFAULT_LENGTH))
    max_repeat_fraction: float | None = _D["repetition"]["max_repeat_fraction"]  # None: off
    min_sentences_for_repeat: int = _D["repetition"]["min_sentences"]
    template_max_images: int | None = _D["template_collapse"]["max_images"]  # None: off
    truncate_on_length: bool = _D["truncate_on_length"]
    synonyms: dict[str, list[str]] = field(default_factory=dict)
    select: str = _D["select"]
    models: list[str] | None = _D["models"]  # only candidates of these teacher models (None: all)
    use_hinted: bool = _D["rationalize"]["enabled"]  # consider rationalization candidates

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any], dataset: str | None = None,
                 classes: list[str] | None = None) -> Rules:
        """Build rules from a filter stage config (see ``schemas/stages/filter.schema.json``)."""
        o = resolve("filter", cfg)
        length = dict(DEFAULT_LENGTH)
        for k, v in (cfg.get("length") or {}).items():  # only the stages the config names
            if k not in DEFAULT_LENGTH:
                raise ConfigError(f"filter.length.{k}: unknown stage; use one of {', '.join(DEFAULT_LENGTH)}")
            lo, hi = int(v[0]), int(v[1])
            if lo > hi:
                raise ConfigError(f"filter.length.{k}: min {lo} is larger than max {hi}")
            length[k] = (lo, hi)
        rep, tc = o.repetition, o.template_collapse
        if o.select not in SELECT_POLICIES:
            raise ConfigError(f"filter.select: {o.select!r} is not one of {', '.join(SELECT_POLICIES)}")
        return cls(
            length=length,
            max_repeat_fraction=rep["max_repeat_fraction"] if rep["enabled"] else None,
            min_sentences_for_repeat=int(rep["min_sentences"]),
            template_max_images=tc["max_images"] if tc["enabled"] else None,
            truncate_on_length=bool(o.truncate_on_length),
            synonyms=synonyms_for(dataset, o.synonyms, classes),
            select=o.select,
            models=o.models,
            use_hinted=bool(o.rationalize["enabled"]),
        )


def _first_reason(checks: list[tuple[pl.Expr, str]], existing: pl.Expr) -> pl.Expr:
    """``existing`` if set, else the code of the first check that is true, else null."""
    import polars as pl

    out = pl.lit(None, pl.String)
    for cond, code in reversed(checks):
        out = pl.when(cond).then(pl.lit(code)).otherwise(out)
    return pl.coalesce(existing, out)


# Sentence splitting for the repetition rule, on the lower-cased body. The reference rule is
# ``replace_all(r"[ \t]*[.!?\n]+[ \t]*", ".")``; a leading ``[ \t]*`` lets a match start at
# every space, which is slow. Two passes give the same string: punctuation runs plus the
# blanks after them become ".", then the blanks left before a "." go (the only "." left are
# separators). Tested against the one-pass form in tests/test_filter_fastpath.py.
SENTENCE_SPLIT_REFERENCE = r"[ \t]*[.!?\n]+[ \t]*"
_SENTENCE_PASS_1 = r"[.!?\n]+[ \t]*"
_SENTENCE_PASS_2 = r"[ \t]+\."


def sentences_expr(lower_body: pl.Expr) -> pl.Expr:
    """The sentences of a lower-cased chain body (pieces between ``[.!?\\n]`` runs, blanks trimmed)."""
    return (lower_body.str.replace_all(_SENTENCE_PASS_1, ".").str.replace_all(_SENTENCE_PASS_2, ".")
            .str.strip_chars(".").str.split("."))


def class_table(conclusions: pl.Series, classes: list[str], synonyms: dict[str, list[str]]) -> pl.DataFrame:
    """``conclusion, _ncls, pred`` for each distinct non-null conclusion (one regex pass each).

    ``_ncls`` is the number of distinct classes named, ``pred`` the class when exactly one.
    Same rule as :func:`dbr_builder.core.answers.match_class`.
    """
    import polars as pl


    cm = matcher(classes, synonyms)
    keys, vals = list(cm.surface_to_class), list(cm.surface_to_class.values())
    uniq = conclusions.drop_nulls().unique().rename("conclusion")
    found = (pl.col("conclusion").str.to_lowercase().str.replace_all(_NORM, " ").str.extract_all(cm.pattern)
             .list.eval(pl.element().replace_strict(keys, vals, default=None, return_dtype=pl.String))
             .list.unique(maintain_order=True))
    return pl.DataFrame({"conclusion": uniq}).with_columns(_found=found).select(
        "conclusion",
        _ncls=pl.col("_found").list.len().cast(pl.UInt32),
        pred=pl.when(pl.col("_found").list.len() == 1).then(pl.col("_found").list.first()).otherwise(None),
    )


def _code_parts(codes: list[str]) -> tuple[list[str], list[str | None]]:
    """Split rule codes such as ``too_short:summary`` into (reason, reason stage)."""
    reasons = [c.split(":")[0] for c in codes]
    stages = [c.split(":")[-1].upper() if ":" in c else None for c in codes]
    return reasons, stages


def evaluate_candidates(candidates: pl.DataFrame, manifest: pl.DataFrame, classes: list[str],
                        rules: Rules) -> pl.DataFrame:
    """Every candidate joined to its manifest row(s) with a ``reason`` (null = accepted).

    Adds the parsed stages, ``pred`` (the class the conclusion names), ``tokens_<stage>`` and
    ``tokens`` (lengths in approximate tokens, see :func:`approx_tokens`), ``hinted`` and
    ``_row`` (the manifest row index). A candidate whose image sits in
    two manifest rows (identical files) is judged once per row; unknown images keep ``_row`` null.

    Work is done once where it can be: each candidate text is parsed once (before the manifest
    join), each distinct conclusion is matched once, and the costly text rules (repetition,
    hint leak, template collapse) only look at candidates that passed every earlier rule, which
    gives the same first-failing reason.
    """
    import polars as pl

    cand = candidates
    if rules.models is not None:
        cand = cand.filter(pl.col("model").is_in(rules.models))
    if not rules.use_hinted:
        cand = cand.filter(pl.col("prompt_name") != "rationalize")
    m = manifest.with_row_index("_row").select("_row", "image_id", "domain", "class_name", "label")
    out_columns = [*cand.columns, *(c for c in m.columns if c != "image_id"), *FIELDS, "truncated",
                   "reason_stage", "pred", *(f"tokens_{f}" for f in FIELDS), "tokens", "hinted", "reason"]

    parsed = parse_chains_frame(cand.get_column("text")).rename({"reason": "parse_reason", "stage": "reason_stage"})
    cand = pl.concat([cand, parsed], how="horizontal")
    table = class_table(cand.get_column("conclusion"), classes, rules.synonyms)
    cand = cand.join(table, on="conclusion", how="left", maintain_order="left")
    cand = cand.with_columns(
        [approx_tokens(pl.col(f)).alias(f"tokens_{f}") for f in FIELDS]
    ).with_columns(
        tokens=pl.sum_horizontal([f"tokens_{f}" for f in FIELDS]),
        hinted=pl.col("prompt_name") == "rationalize",
        _ncls=pl.col("_ncls").fill_null(0),
    )
    df = cand.join(m, on="image_id", how="left", maintain_order="left")

    checks: list[tuple[pl.Expr, str]] = [
        (pl.col("error").is_not_null(), "generation_error"),
        (pl.col("_row").is_null(), "unknown_image"),
        (pl.lit(rules.truncate_on_length) & (pl.col("finish_reason") == "length"), "truncated"),
        (pl.col("parse_reason").is_not_null(), "__parse__"),
        (pl.col("_ncls") == 0, "no_class"),
        (pl.col("_ncls") > 1, "ambiguous_class"),
        (pl.col("pred") != pl.col("class_name"), "wrong_label"),
    ]
    for f in FIELDS:
        lo, hi = rules.length[f]
        checks.append((pl.col(f"tokens_{f}") < lo, f"too_short:{f}"))
        checks.append((pl.col(f"tokens_{f}") > hi, f"too_long:{f}"))
    code = df.select(_first_reason(checks, pl.lit(None, pl.String)).alias("_code")).to_series()
    code = _late_rules(df, code, rules)

    all_codes = [c for c in code.drop_nulls().unique().to_list() if c != "__parse__"]
    reasons, stages = _code_parts(all_codes)
    df = df.with_columns(_code=code).with_columns(
        reason=pl.when(pl.col("_code") == "__parse__").then(pl.col("parse_reason"))
        .otherwise(pl.col("_code").replace_strict(all_codes, reasons, default=None, return_dtype=pl.String)),
        reason_stage=pl.when(pl.col("_code") == "__parse__").then(pl.col("reason_stage"))
        .otherwise(pl.col("_code").replace_strict(all_codes, stages, default=None, return_dtype=pl.String)),
    )
    return df.select(out_columns)


def _late_rules(df: pl.DataFrame, code: pl.Series, rules: Rules) -> pl.Series:
    """Apply repetition, hint leak and template collapse to the rows ``code`` still accepts."""
    import polars as pl

    alive = code.is_null()
    if not alive.any() or (rules.max_repeat_fraction is None and rules.template_max_images is None
                           and not df.get_column("hinted").any()):
        return code
    sub = df.select(*FIELDS[:4], "hinted", "image_id").filter(alive)
    body = pl.concat_str([pl.col(f) for f in FIELDS[:4]], separator="\n")
    # The text work runs on the streaming engine (all threads) and keeps only small columns.
    lf = sub.lazy().with_columns(_lower=body.str.to_lowercase())
    keep = [pl.col("image_id"), pl.col("hinted")]
    if rules.max_repeat_fraction is not None:
        lf = lf.with_columns(_sent=sentences_expr(pl.col("_lower")))
        n = pl.col("_sent").list.len()
        keep.append(((n >= rules.min_sentences_for_repeat)
                     & ((n - pl.col("_sent").list.n_unique()) > rules.max_repeat_fraction * n)).alias("_rep"))
    if rules.template_max_images is not None:
        keep.append(pl.col("_lower").hash(seed=0).alias("_body"))
    small = lf.select(keep).collect(engine="streaming")

    late: list[tuple[pl.Expr, str]] = []
    if rules.max_repeat_fraction is not None:
        late.append((pl.col("_rep"), "repetition"))
    hinted = small.get_column("hinted")
    if hinted.any():  # the hint pattern runs on the original body, only for the hinted rows
        leak = sub.filter(hinted).select(body.str.contains(_HINT_PATTERN)).to_series()
        small = small.with_columns(_leak=pl.repeat(False, small.height, eager=True).scatter(hinted.arg_true(), leak))
        late.append((pl.col("_leak"), "hint_leak"))
    small = small.with_columns(_late=_first_reason(late, pl.lit(None, pl.String)))
    if rules.template_max_images is not None:
        # Template collapse: one body (case-folded) accepted for many images is a copied template.
        ok = pl.col("_late").is_null()
        n_img = pl.col("image_id").filter(ok).n_unique().over(pl.when(ok).then(pl.col("_body")))
        small = small.with_columns(
            _late=pl.when(ok & (n_img > rules.template_max_images)).then(pl.lit("template_collapse"))
            .otherwise(pl.col("_late"))
        )
    return code.scatter(alive.arg_true(), small.get_column("_late"))


def select_chains(evaluated: pl.DataFrame, policy: str = "first") -> pl.DataFrame:
    """One accepted candidate per manifest row (``_row``), by ``policy`` (see module doc)."""
    import polars as pl

    acc = evaluated.filter(pl.col("reason").is_null())
    if policy == "first":
        key = pl.col("sample_index")
    elif policy == "shortest":
        key = pl.col("tokens")
    elif policy == "longest":
        key = -pl.col("tokens").cast(pl.Int64)
    elif policy == "median":
        key = (pl.col("tokens").cast(pl.Float64) - pl.col("tokens").median().over(["_row", "hinted"])).abs()
    else:
        raise ValueError(f"unknown selection policy {policy!r}; use one of {SELECT_POLICIES}")
    return (
        acc.with_columns(_key=key)
        .sort(["_row", "hinted", "_key", "sample_index", "request_key"])
        .unique(subset="_row", keep="first", maintain_order=True)
        .drop("_key")
    )


CHAIN_EXTRA = ["chain", *FIELDS, "hinted", "teacher", "prompt_id", "sample_index", "request_key"]
REJECT_COLUMNS = ["request_key", "image_id", "path", "domain", "class_name", "prompt_name", "model",
                  "sample_index", "finish_reason", "reason", "reason_stage", "pred", "text"]


def filter_candidates(candidates: pl.DataFrame, manifest: pl.DataFrame, classes: list[str],
                      rules: Rules | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Pure core of the stage: ``(kept, rejects)`` for one dataset.

    ``kept`` has the manifest columns plus ``chain, summary, caption, reasoning, reflection,
    conclusion, hinted, teacher, prompt_id, sample_index, request_key`` in manifest order;
    ``rejects`` one row per rejected (candidate, manifest row) with its ``reason``.
    """
    rules = rules or Rules()
    ev = evaluate_candidates(candidates, manifest, classes, rules)
    return kept_table(ev, manifest, rules.select), rejects_table(ev, manifest)


def kept_table(evaluated: pl.DataFrame, manifest: pl.DataFrame, policy: str) -> pl.DataFrame:
    """The chains table: manifest columns + chain columns, manifest row order."""
    import polars as pl

    # Only the columns the selection and the table need: the sort then moves less data.
    need = ["_row", "reason", "text", *FIELDS, "hinted", "model", "prompt_id", "sample_index", "request_key", "tokens"]
    sel = select_chains(evaluated.select(need), policy).select(
        "_row", pl.col("text").alias("chain"), *FIELDS, "hinted", pl.col("model").alias("teacher"),
        "prompt_id", "sample_index", "request_key",
    )
    m = manifest.with_row_index("_row")
    return m.join(sel, on="_row", how="inner").sort("_row").drop("_row")


def rejects_table(evaluated: pl.DataFrame, manifest: pl.DataFrame) -> pl.DataFrame:
    """Rejected candidates with their reason, sorted deterministically."""
    import polars as pl

    paths = manifest.with_row_index("_row").select("_row", "path")
    return (
        evaluated.filter(pl.col("reason").is_not_null())
        .select("_row", *(c for c in REJECT_COLUMNS if c != "path"))
        .join(paths, on="_row", how="left", maintain_order="left")
        .select(REJECT_COLUMNS)
        .sort(["image_id", "path", "prompt_name", "sample_index", "request_key"], nulls_last=True)
    )


# --- stage protocol -------------------------------------------------------------------------

def write_parquet_atomic(df: pl.DataFrame, dest: Path) -> None:
    """Write ``df`` as parquet atomically, with settings that make reruns byte-identical."""
    with atomic_path(dest, suffix=".parquet") as tmp:
        df.write_parquet(tmp, compression="zstd", statistics=False)


def journal_path(workdir: Path, dataset: str) -> Path:
    """``W/chains/.<Dataset>.commit.json``: present only while the outputs are being swapped in."""
    return chains_path(workdir, dataset).with_name(f".{dataset}.commit.json")


def recover_outputs(workdir: Path, dataset: str) -> None:
    """Finish an interrupted commit of the filter's outputs and remove a killed run's temporaries.

    Call while holding the filter lock of ``dataset`` (:func:`outputs_lock`).
    """
    workdir = Path(workdir)
    recover_moves(journal_path(workdir, dataset))
    for dest in (chains_path(workdir, dataset), rejects_path(workdir, dataset)):
        if dest.parent.is_dir():
            remove_temps(dest.parent, dest.name)
    recover_dir(reports_dir(workdir, dataset), clean_temps=True)


def outputs_lock(workdir: Path, dataset: str):
    """The filter lock of ``dataset`` (held by the filter; readers take it to see one consistent unit)."""
    return stage_lock(workdir, f"filter-{dataset}", f"filter {dataset}")


def _commit(workdir: Path, dataset: str, kept: pl.DataFrame, rejects: pl.DataFrame,
            write_report_to: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Write chains, rejects and the report as one unit (see :func:`dbr_builder.core.fsutil.commit_moves`)."""
    cp, rp, rd = chains_path(workdir, dataset), rejects_path(workdir, dataset), reports_dir(workdir, dataset)
    temps: list[Path] = []
    try:
        for df, dest in ((kept, cp), (rejects, rp)):
            with naming(dest):
                tmp = temp_beside(dest, ".parquet")
                temps.append(tmp)
                df.write_parquet(tmp, compression="zstd", statistics=False)
        with naming(rd):
            tmp_dir = make_temp_dir(rd.parent, rd.name)
            temps.append(tmp_dir)
            report = write_report_to(tmp_dir)
        with naming(cp):
            commit_moves([(temps[0], cp), (temps[1], rp), (tmp_dir, rd)], journal_path(workdir, dataset))
        return report
    finally:
        if journal_path(workdir, dataset).exists():
            temps = []  # past the commit point: the next run (or reader) finishes the moves
        for t in temps:
            if t.is_dir():
                shutil.rmtree(t, ignore_errors=True)
            elif t.exists():
                t.unlink()


def _rationalize(cfg: dict[str, Any], workdir: Path, dataset: str, image_ids: list[str]) -> int:
    """Ask the teacher for hinted chains for ``image_ids``; return how many images were sent."""
    rcfg = resolve("filter", cfg).rationalize
    teacher = rcfg["teacher"] or cfg.get("teacher")
    if not teacher:
        raise ConfigError(f"filter ({dataset}): rationalize.enabled needs rationalize.teacher (a backend SPEC)")
    if isinstance(teacher, str):  # a typo in the spec fails now, not only on a run that needs the teacher

        try:
            parse_spec(teacher)
        except BackendError as e:
            raise ConfigError(f"filter ({dataset}): rationalize.teacher: {e}") from None
    if not image_ids:
        return 0

    options = {k: v for k, v in rcfg.items() if k not in ("enabled", "teacher", "n")}
    generate_for_images(workdir, dataset, image_ids, teacher, int(rcfg["n"]),
                        prompt_name="rationalize", **options)
    return len(image_ids)


def _filter(cfg: dict[str, Any], workdir: Path, dataset: str) -> tuple[Any, Any, dict[str, Any], int, Any]:
    """Evaluate, select and write (under the filter lock); (kept, rejects, report, rationalized, manifest)."""
    import polars as pl

    manifest, meta = load_manifest(workdir, dataset)
    classes = list(meta["classes"])
    rules = Rules.from_cfg(cfg, dataset, classes)
    candidates = read_results(workdir, dataset)
    if candidates.height == 0:
        raise FileNotFoundError(
            f"{workdir / 'generations' / dataset}: no teacher candidates for {dataset}; run `dbr generate` first"
        )
    ev = evaluate_candidates(candidates, manifest, classes, rules)
    sent = 0
    if rules.use_hinted:
        covered = ev.filter(pl.col("reason").is_null()).get_column("_row").unique()
        missing = manifest.with_row_index("_row").filter(~pl.col("_row").is_in(covered.implode()))
        # Images whose hinted candidates are all stored already were tried: asking again would
        # only touch the store (and make `dbr run` think the generate stage changed).
        n_hint = int(resolve("filter", cfg).rationalize["n"])
        tried = (candidates.filter((pl.col("prompt_name") == "rationalize") & pl.col("error").is_null())
                 .group_by("image_id").len().filter(pl.col("len") >= n_hint).get_column("image_id"))
        ids = sorted(set(missing.get_column("image_id").to_list()) - set(tried.to_list()))
        sent = _rationalize(cfg, workdir, dataset, ids)
        if sent:
            ev = evaluate_candidates(read_results(workdir, dataset), manifest, classes, rules)
    kept = kept_table(ev, manifest, rules.select)
    rejects = rejects_table(ev, manifest)
    validate_kept(kept, classes)
    rules_json = json.loads(json.dumps(dataclasses.asdict(rules), default=list))
    report = _commit(workdir, dataset, kept, rejects,
                     lambda out: write_report(workdir, dataset, ev, manifest, kept, rationalized=sent, out_dir=out,
                                              rules=rules_json))
    return kept, rejects, report, sent, manifest


def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Filter one dataset's candidates; write chains, rejects and the stats report (one unit)."""
    dataset = check_name(cfg["dataset"])
    workdir = Path(workdir)
    with outputs_lock(workdir, dataset):
        recover_outputs(workdir, dataset)
        kept, rejects, report, sent, manifest = _filter(cfg, workdir, dataset)
    log.info(f"{dataset}: filter report -> {reports_dir(workdir, dataset) / 'stats.md'}")
    log.info(summary_table(report))
    return {"images": manifest.height, "kept": kept.height, "rejected": rejects.height,
            "hinted": int(kept.get_column("hinted").sum()), "rationalized": sent,
            "coverage": report["coverage"]["overall"]["coverage"]}


def validate_kept(kept: pl.DataFrame, classes: list[str], limit: int | None = None) -> None:
    """Validate kept rows against ``schemas/chain.schema.json``; raise naming the first bad row."""
    import jsonschema


    schema = load_schema("chain.schema.json")
    schema = {**schema, "properties": {**schema["properties"], "class_name": {"enum": classes}}}
    validator = jsonschema.Draft202012Validator(schema)
    rows = kept.head(limit) if limit else kept
    for row in rows.iter_rows(named=True):
        err = next(iter(validator.iter_errors(row)), None)
        if err is not None:
            where = ".".join(map(str, err.absolute_path)) or "<row>"
            raise ValueError(f"chain for image {row.get('image_id')} ({row.get('path')}) fails "
                             f"schemas/chain.schema.json at {where}: {err.message}")


def outputs(cfg: dict[str, Any], workdir: Path) -> list[Path]:
    ds = cfg["dataset"]
    return [chains_path(workdir, ds), rejects_path(workdir, ds), reports_dir(workdir, ds)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="dataset name, e.g. PACS or SynthShapes")
    p.add_argument("--workdir", "-w", required=True, help="work directory (reads manifest/ and generations/)")
    p.add_argument("--config", help="pipeline YAML (its `filter` entry) or a YAML mapping of filter options")
    add_option(p, "filter", "select")
    add_option(p, "filter", "rationalize.teacher", "--rationalize", metavar="SPEC",
               help="teacher backend for a hinted rationalization round on images with no accepted chain")
    add_option(p, "filter", "rationalize.n", "--rationalize-n")
    add_option(p, "filter", "template_collapse.max_images", "--max-template-images")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The filter cfg given by the CLI options (``--config`` first, flags override it)."""
    cfg: dict[str, Any] = load_stage_config(args.config, "filter") if args.config else {"stage": "filter"}
    cfg = {k: v for k, v in cfg.items() if k not in ("datasets", "stages", "workdir")}
    cfg["stage"] = "filter"
    cfg["dataset"] = args.dataset
    given = options_from_args(args)
    if given.get("rationalize", {}).get("teacher"):
        given["rationalize"]["enabled"] = True  # naming a rationalization teacher turns the round on
    for key, value in given.items():
        cfg[key] = {**(cfg.get(key) or {}), **value} if isinstance(value, dict) else value

    schema = stage_schema("filter")
    if schema is not None:
        validate({k: v for k, v in cfg.items() if k != "root"}, schema, "dbr filter options")
    return cfg


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    summary = run(cfg, Path(args.workdir))
    ds = args.dataset
    print(f"{ds}: kept {summary['kept']}/{summary['images']} images "
          f"({summary['hinted']} hinted), {summary['rejected']} candidates rejected")
    print(f"  chains  -> {chains_path(args.workdir, ds)}")
    print(f"  rejects -> {rejects_path(args.workdir, ds)}")
    print(f"  report  -> {Path(args.workdir) / 'reports' / ds / 'stats.md'}")
    print(markdown_table(Path(args.workdir), ds))
    return 0
