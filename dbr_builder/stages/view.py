"""Chain viewer: ``dbr view --workdir W`` writes a static HTML page to look at the dataset.

``W/view/index.html`` opens from disk in any browser (no server): per dataset, domain and class,
sampled images with the chain the filter kept and every candidate the teacher wrote that was
rejected, with its reason code. Filters: dataset, domain, class, reason (``kept``, ``hinted``,
``no chain`` or a rejection code). The page stays light for 10,000+ images:

- images are sampled (``per_group`` per dataset/domain/class, deterministic; ``per_group: 0``
  keeps all) and shown as small JPEG thumbnails (``thumb_px``), copied into ``W/view/img/``;
- the sample data is split into one script per dataset and domain (``W/view/data/``), loaded
  only when that domain is chosen (plain ``<script>`` tags work from ``file://``, ``fetch`` would not);
- cards are rendered a page at a time (``page_size``), and images load lazily.

The page reads its filters from the URL hash (``#ds=PACS&domain=photo&class=dog&reason=wrong_label``),
so a filtered view can be linked. Everything is derived from ``W/manifest``, ``W/chains`` (kept and
rejects); the folder is written beside the old one and swapped in.
"""

from __future__ import annotations

import argparse
import html
import json
import random
from pathlib import Path
from typing import Any

from dbr_builder.config import add_option, flags_of, options_from_args, resolve, validate_options
from dbr_builder.core import workdir as wdl
from dbr_builder.core.fsutil import atomic_dir, is_temp_name, read_parquet
from dbr_builder.core.locks import stage_lock
from dbr_builder.core.manifest import image_path, load_manifest
from dbr_builder.errors import UserError
from dbr_builder.stages.filter import outputs_lock, recover_outputs

PER_DATASET = False
OPTIONS = ("per_group", "max_rejects", "thumb_px", "page_size", "max_chars", "seed")  # schemas/stages/view.schema.json


def _options(cfg: dict[str, Any]) -> dict[str, Any]:
    o = resolve("view", {k: v for k, v in cfg.items() if k in OPTIONS and v is not None})
    return {k: int(o[k]) for k in OPTIONS}


def _datasets(cfg: dict[str, Any], workdir: Path) -> list[str]:
    ds = list(cfg.get("datasets") or [])
    if not ds:
        ds = sorted(p.name[: -len(".parquet")] for p in wdl.chains_dir(workdir).glob("*.parquet")
                    if not p.name.endswith(".rejects.parquet") and not is_temp_name(p.name))
    if not ds:
        raise UserError(f"{wdl.chains_dir(workdir)}: no chains to view; run `dbr filter DATASET` first")
    return ds


def sample_rows(manifest: Any, per_group: int, seed: int) -> Any:
    """``per_group`` manifest rows per (domain, class), drawn deterministically (0: every row)."""
    import polars as pl

    if per_group <= 0:
        return manifest
    keep: list[int] = []
    idx = manifest.with_row_index("_i")
    for (domain, cls), grp in sorted(idx.group_by(["domain", "class_name"]), key=lambda kv: kv[0]):
        rows = grp.get_column("_i").to_list()
        rng = random.Random(f"{seed}/{domain}/{cls}")
        keep += sorted(rng.sample(rows, min(per_group, len(rows))))
    return idx.filter(pl.col("_i").is_in(sorted(keep))).drop("_i")


def _thumb(src: Path, dest: Path, px: int) -> None:
    from PIL import Image

    dest.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im = im.convert("RGB")
        im.thumbnail((px, px))
        im.save(dest, format="JPEG", quality=82, optimize=True)


def _clip(text: str | None, n: int) -> str | None:
    if text is None:
        return None
    return text if len(text) <= n else text[:n] + f" … [{len(text) - n} more characters]"


def build_dataset(workdir: Path, ds: str, dest: Path, o: dict[str, Any]) -> dict[str, Any]:
    """Thumbnails and one data script per domain of ``ds`` into ``dest``; return its index entry."""
    import polars as pl

    manifest, meta = load_manifest(workdir, ds)
    cp, rp = wdl.chains_path(workdir, ds), wdl.rejects_path(workdir, ds)
    with outputs_lock(workdir, ds):  # one consistent filter output (chains and rejects of one run)
        recover_outputs(workdir, ds)
        if not cp.exists():
            raise UserError(f"{cp}: no chains for {ds}; run `dbr filter {ds} --workdir {workdir}` first")
        kept = read_parquet(cp, f"rebuild it with `dbr filter {ds} --workdir {workdir}`")
        rejects = read_parquet(rp, f"rebuild it with `dbr filter {ds} --workdir {workdir}`") if rp.exists() \
            else pl.DataFrame({"image_id": [], "path": [], "reason": []})
    rows = sample_rows(manifest, o["per_group"], o["seed"])
    kept_by = {(r["image_id"], r["path"]): r for r in kept.filter(pl.col("path").is_in(rows.get_column("path").implode()))
               .iter_rows(named=True)}
    rej_by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    rej_cols = [c for c in ("reason", "reason_stage", "pred", "prompt_name", "sample_index", "model", "finish_reason",
                            "text") if c in rejects.columns]
    for r in (rejects.filter(pl.col("path").is_in(rows.get_column("path").implode()))
              .sort([c for c in ("path", "prompt_name", "sample_index") if c in rejects.columns])
              .iter_rows(named=True)):
        rej_by.setdefault((r["image_id"], r["path"]), []).append({c: r[c] for c in rej_cols})
    reason_counts: dict[str, int] = {}
    for r in rejects.get_column("reason").to_list() if rejects.height else []:
        reason_counts[r] = reason_counts.get(r, 0) + 1
    domains_out = []
    for domain in [d for d in meta["domains"] if d in set(rows.get_column("domain").to_list())]:
        items = []
        for r in rows.filter(pl.col("domain") == domain).iter_rows(named=True):
            key = (r["image_id"], r["path"])
            thumb = f"img/{ds}/{r['image_id'][:2]}/{r['image_id']}.jpg"
            if not (dest / thumb).exists():
                _thumb(image_path(meta, r["path"]), dest / thumb, o["thumb_px"])
            k = kept_by.get(key)
            rej = rej_by.get(key, [])
            items.append({
                "id": r["image_id"], "path": r["path"], "class": r["class_name"], "split": r.get("split"),
                "thumb": thumb,
                "kept": None if k is None else {"chain": _clip(k["chain"], o["max_chars"]), "hinted": bool(k["hinted"]),
                                                "teacher": k.get("teacher"), "conclusion": k.get("conclusion")},
                "rejected": [{**x, "text": _clip(x.get("text"), o["max_chars"])} for x in rej[: o["max_rejects"]]],
                "n_rejected": len(rej),
                "reasons": sorted({x["reason"] for x in rej if x.get("reason")}),
            })
        chunk = f"data/{ds}/{wdl.safe_split_name(domain)}.js"
        (dest / chunk).parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"key": f"{ds}/{domain}", "items": items}, ensure_ascii=False, separators=(",", ":"))
        payload = payload.replace("</", "<\\/")  # never close the <script> early
        (dest / chunk).write_text(f"DBR.loaded({payload});\n", encoding="utf-8")
        domains_out.append({"name": domain, "chunk": chunk, "sampled": len(items),
                            "images": int((manifest.get_column("domain") == domain).sum())})
    return {"name": ds, "classes": list(meta["classes"]), "domains": domains_out, "images": manifest.height,
            "kept": kept.height, "rejected": rejects.height,
            "reasons": [{"reason": k, "count": v} for k, v in sorted(reason_counts.items(), key=lambda kv: -kv[1])]}


def build_view(workdir: str | Path, datasets: list[str], out: str | Path | None = None,
               **opts: Any) -> dict[str, Any]:
    """Write the viewer folder (default ``W/view``); return its index."""
    workdir = Path(workdir)
    o = _options(opts)
    dest = Path(out) if out else wdl.view_dir(workdir)
    with stage_lock(workdir, "view", "view"), atomic_dir(dest) as tmp:
        index = {"datasets": [build_dataset(workdir, ds, tmp, o) for ds in datasets], "page_size": o["page_size"],
                 "per_group": o["per_group"]}
        blob = json.dumps(index, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
        (tmp / "data").mkdir(exist_ok=True)
        (tmp / "data" / "index.js").write_text(f"DBR.index({blob});\n", encoding="utf-8")
        (tmp / "index.html").write_text(PAGE.replace("{{TITLE}}", html.escape(f"dbr-builder chains: {', '.join(datasets)}")),
                                        encoding="utf-8")
    return index


# --- stage protocol -------------------------------------------------------------------------

def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    workdir = Path(workdir)
    idx = build_view(workdir, _datasets(cfg, workdir), cfg.get("out"), **{k: cfg[k] for k in OPTIONS if k in cfg})
    return {d["name"]: sum(x["sampled"] for x in d["domains"]) for d in idx["datasets"]}


def outputs(cfg: dict[str, Any], workdir: Path) -> list[Path]:
    return [Path(cfg.get("out") or wdl.view_dir(workdir))]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", "-w", required=True, help="work directory (reads manifest/ and chains/)")
    add_option(p, "view", "datasets", metavar="DATASET")
    add_option(p, "view", "out")
    for key in OPTIONS:
        add_option(p, "view", key)


def main(args: argparse.Namespace) -> int:
    wd = Path(args.workdir)
    given = options_from_args(args)
    validate_options(given, "view", "command line", flags_of(args))  # range checks before anything is written
    idx = build_view(wd, _datasets(given, wd), given.get("out"), **{k: given[k] for k in OPTIONS if k in given})
    dest = Path(given.get("out") or wdl.view_dir(wd))
    for d in idx["datasets"]:
        print(f"{d['name']}: {sum(x['sampled'] for x in d['domains'])} of {d['images']} images sampled, "
              f"{d['rejected']} rejected candidates")
    print(f"viewer -> {(dest / 'index.html').resolve().as_uri()}  (open it in a browser; no server needed)")
    return 0


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 12px;z-index:1;
  display:flex;flex-wrap:wrap;gap:10px;align-items:center}
header h1{font-size:16px;margin:0 12px 0 0}
label{font-size:12px;color:#555}select{margin-left:4px}
#count{color:#555;font-size:12px}#pager button{margin:0 2px}
#cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px;padding:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;display:flex;gap:10px}
.card img{width:160px;height:160px;object-fit:contain;background:#eee;flex:none;border-radius:4px}
.meta{font-size:12px;color:#555;overflow-wrap:anywhere}.body{min-width:0;flex:1}
.chain,.reject pre{white-space:pre-wrap;word-break:break-word;font:12px/1.35 ui-monospace,monospace;
  background:#f3f7f3;border-left:3px solid #4a4;padding:4px 6px;margin:4px 0;max-height:14em;overflow:auto}
.none{color:#a33;font-size:12px}.hinted{background:#fff3d6;border-left-color:#d90}
.reject pre{background:#fbf1f1;border-left-color:#c44}
.code{display:inline-block;font:11px ui-monospace,monospace;background:#c44;color:#fff;border-radius:3px;padding:0 4px}
details summary{cursor:pointer;font-size:12px;color:#555}
</style></head>
<body>
<header>
<h1>{{TITLE}}</h1>
<label>dataset<select id="dataset"></select></label>
<label>domain<select id="domain"></select></label>
<label>class<select id="class"></select></label>
<label>reason<select id="reason"></select></label>
<span id="pager"></span><span id="count"></span>
</header>
<main id="cards"></main>
<script>
"use strict";
const DBR = {idx: null, chunks: {}, page: 0, pending: null,
  index(i) { this.idx = i; },
  loaded(c) { this.chunks[c.key] = c.items; if (this.pending === c.key) { this.pending = null; render(); } }};
const $ = (id) => document.getElementById(id);
const eager = new URLSearchParams(location.search).has("eager");
function opt(sel, values, keep) {
  sel.innerHTML = "";
  for (const [v, t] of values) { const o = document.createElement("option"); o.value = v; o.textContent = t; sel.appendChild(o); }
  if (keep !== undefined && values.some(([v]) => v === keep)) sel.value = keep;
}
function ds() { return DBR.idx.datasets.find((d) => d.name === $("dataset").value) || DBR.idx.datasets[0]; }
function hashState() { return Object.fromEntries(new URLSearchParams(location.hash.slice(1))); }
function setHash() {
  const p = new URLSearchParams({ds: $("dataset").value, domain: $("domain").value, class: $("class").value,
                                 reason: $("reason").value, page: String(DBR.page)});
  history.replaceState(null, "", "#" + p.toString());
}
function fillFilters(st) {
  opt($("dataset"), DBR.idx.datasets.map((d) => [d.name, `${d.name} (${d.images})`]), st.ds);
  const d = ds();
  opt($("domain"), d.domains.map((x) => [x.name, `${x.name} (${x.sampled} of ${x.images})`]), st.domain);
  opt($("class"), [["", "all classes"], ...d.classes.map((c) => [c, c])], st.class);
  opt($("reason"), [["", "all"], ["kept", "chain kept"], ["hinted", "kept, hinted"], ["none", "no chain kept"],
                    ...d.reasons.map((r) => [r.reason, `rejected: ${r.reason} (${r.count})`])], st.reason);
}
function load() {
  const d = ds(), dom = d.domains.find((x) => x.name === $("domain").value);
  if (!dom) { render(); return; }
  const key = `${d.name}/${dom.name}`;
  if (DBR.chunks[key]) { render(); return; }
  DBR.pending = key;
  const s = document.createElement("script"); s.src = dom.chunk; document.body.appendChild(s);
}
function matches(it) {
  const c = $("class").value, r = $("reason").value;
  if (c && it.class !== c) return false;
  if (!r) return true;
  if (r === "kept") return !!it.kept;
  if (r === "hinted") return !!(it.kept && it.kept.hinted);
  if (r === "none") return !it.kept;
  return it.reasons.includes(r);
}
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
function card(it) {
  const c = el("article", "card"); c.dataset.class = it.class; c.dataset.reasons = it.reasons.join(" ");
  c.dataset.kept = it.kept ? "1" : "0";
  const img = el("img", "thumb"); img.alt = `${it.class}: ${it.path}`; img.loading = eager ? "eager" : "lazy";
  img.onload = () => { img.dataset.ok = "1"; tally(); }; img.onerror = () => { img.dataset.ok = "0"; tally(); };
  img.src = it.thumb; c.appendChild(img);
  const b = el("div", "body");
  b.appendChild(el("div", "meta", `${it.class} · ${it.path} · DomainBed ${it.split} · ${it.n_rejected} rejected`));
  if (it.kept) {
    b.appendChild(el("div", "meta", `kept${it.kept.hinted ? " (hinted: rationalization round)" : ""} · ${it.kept.teacher || ""}`));
    b.appendChild(el("pre", "chain" + (it.kept.hinted ? " hinted" : ""), it.kept.chain));
  } else { b.appendChild(el("div", "none", "no chain kept for this image")); }
  for (const r of it.rejected) {
    const d = el("details", "reject"); const s = el("summary");
    s.appendChild(el("span", "code", r.reason)); s.appendChild(document.createTextNode(
      ` ${r.reason_stage ? "(" + r.reason_stage + ") " : ""}${r.prompt_name || ""} #${r.sample_index ?? ""}${r.pred ? " → " + r.pred : ""}`));
    d.appendChild(s); d.appendChild(el("pre", "", r.text || "(no text)")); b.appendChild(d);
  }
  c.appendChild(b); return c;
}
function tally() {
  const imgs = [...document.querySelectorAll("#cards img")];
  document.body.dataset.imagesOk = imgs.filter((i) => i.dataset.ok === "1").length;
  document.body.dataset.imagesFailed = imgs.filter((i) => i.dataset.ok === "0").length;
}
function render() {
  const d = ds(), key = `${d.name}/${$("domain").value}`, items = (DBR.chunks[key] || []).filter(matches);
  const size = DBR.idx.page_size, pages = Math.max(1, Math.ceil(items.length / size));
  DBR.page = Math.min(DBR.page, pages - 1);
  const main = $("cards"); main.innerHTML = "";
  for (const it of items.slice(DBR.page * size, (DBR.page + 1) * size)) main.appendChild(card(it));
  $("count").textContent = `${items.length} images match · page ${DBR.page + 1} of ${pages}`;
  const pg = $("pager"); pg.innerHTML = "";
  for (const [t, p] of [["«", 0], ["‹", DBR.page - 1], ["›", DBR.page + 1], ["»", pages - 1]]) {
    const bt = el("button", "", t); bt.disabled = p < 0 || p >= pages || p === DBR.page;
    bt.onclick = () => { DBR.page = p; render(); }; pg.appendChild(bt);
  }
  document.body.dataset.cards = String(main.children.length);
  document.body.dataset.matching = String(items.length);
  setHash(); tally();
}
function start() {
  const st = hashState(); DBR.page = parseInt(st.page || "0", 10) || 0;
  fillFilters(st);
  $("dataset").onchange = () => { DBR.page = 0; fillFilters({ds: $("dataset").value}); load(); };
  $("domain").onchange = () => { DBR.page = 0; load(); };
  $("class").onchange = $("reason").onchange = () => { DBR.page = 0; render(); };
  load();
}
</script>
<script src="data/index.js"></script>
<script>start();</script>
</body></html>
"""
