"""Hub-mirror path: parquet rows (image, domain, label) materialised into the DomainBed layout.

The Hugging Face Hub is not reachable here, so the parquet file is built locally with the
mirror's schema (flwrlabs/pacs: ``image`` Image, ``domain`` string, ``label`` ClassLabel) and
loaded through ``datasets``. In the hub-source test only ``huggingface_hub.snapshot_download``
(the public Hub boundary) is replaced by a function that places that file where the real one
would put it; everything after it is the real code path.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from download_server import FileServer
from PIL import Image

from dbr_builder.errors import UserError
from dbr_builder.stages.download import run
from dbr_builder.stages.download.verify import LOCK_NAME

CLASSES = ["dog", "elephant", "horse"]
DOMAINS = {"art_painting": 3, "cartoon": 4, "photo": 3, "sketch": 3}


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4 + i, 3), (i * 20 % 256, 10, 200)).save(buf, format="PNG")
    return buf.getvalue()


def mirror_parquet(path: Path, domains: dict[str, int], domain_values: dict[str, str] | None = None) -> list[dict]:
    """Write a parquet with the mirror's features; return the rows (with their image bytes)."""
    import datasets

    rows = []
    i = 0
    for dom, n in domains.items():
        for k in range(n):
            rows.append({"image": {"bytes": png(i), "path": f"{dom}_{k}.png"},
                         "domain": (domain_values or {}).get(dom, dom), "label": k % len(CLASSES)})
            i += 1
    feats = datasets.Features({"image": datasets.Image(), "domain": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=CLASSES)})
    datasets.Dataset.from_list(rows, features=feats).to_parquet(str(path))
    return rows


def registry(tmp_path: Path, domains=None, domain_map=None) -> Path:
    hub = {"name": "hf-flwrlabs", "kind": "hub", "repo_id": "flwrlabs/pacs", "revision": "main",
           "patterns": ["data/train-*.parquet"], "columns": {"image": "image", "domain": "domain", "label": "label"}}
    if domain_map:
        hub["domain_map"] = domain_map
    p = tmp_path / "reg.yaml"
    p.write_text(yaml.safe_dump({"version": 1, "datasets": {"PACS": {
        "folder": "PACS", "domains": domains or dict(DOMAINS), "classes": CLASSES, "sources": [hub]}}}))
    return p


def check_tree(dest: Path, rows: list[dict], domains: dict[str, int]) -> None:
    for r in rows:
        dom = r["image"]["path"].rsplit("_", 1)[0]
        f = dest / dom / CLASSES[r["label"]] / r["image"]["path"]
        assert f.read_bytes() == r["image"]["bytes"]  # byte for byte, not re-encoded
    assert {d.name: sum(1 for _ in d.rglob("*.png")) for d in dest.iterdir()} == domains


def test_from_local_parquet_materialises_domainbed_layout(tmp_path):
    pq = tmp_path / "train-00000-of-00001.parquet"
    rows = mirror_parquet(pq, DOMAINS)
    out = run({"dataset": "PACS", "root": str(tmp_path / "raw"), "registry": str(registry(tmp_path)),
               "from": str(pq)}, tmp_path)
    assert out["status"] == "built" and out["counts"] == DOMAINS and out["problems"] == []
    check_tree(tmp_path / "raw" / "PACS", rows, DOMAINS)
    lock = json.loads((tmp_path / "raw" / LOCK_NAME).read_text())
    assert lock["artifacts"][f"PACS/from:{pq.name}"]["size"] == pq.stat().st_size


def test_hub_source_with_snapshot_at_the_boundary(tmp_path, monkeypatch):
    import huggingface_hub

    pq = tmp_path / "mirror.parquet"
    rows = mirror_parquet(pq, DOMAINS)
    calls = []

    def fake_snapshot_download(repo_id, repo_type, revision, allow_patterns, local_dir):
        # Stand-in for the Hub: the real function would place data/train-*.parquet under local_dir.
        calls.append((repo_id, repo_type, revision, allow_patterns))
        dst = Path(local_dir) / "data" / "train-00000-of-00001.parquet"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(pq.read_bytes())
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    endpoint = FileServer()  # a reachable endpoint for the fast connectivity probe
    monkeypatch.setenv("HF_ENDPOINT", endpoint.start().rstrip("/"))
    try:
        out = run({"dataset": "PACS", "root": str(tmp_path / "raw"), "registry": str(registry(tmp_path))},
                  tmp_path)
    finally:
        endpoint.stop()
    assert calls == [("flwrlabs/pacs", "dataset", "main", ["data/train-*.parquet"])]
    assert out["source"] == "hub:flwrlabs/pacs" and out["counts"] == DOMAINS
    check_tree(tmp_path / "raw" / "PACS", rows, DOMAINS)


def test_domain_values_matched_loosely_or_by_map(tmp_path):
    pq = tmp_path / "m.parquet"
    doms = {"Art": 1, "Real World": 2}
    mirror_parquet(pq, doms, {"Art": "art", "Real World": "real_world"})
    out = run({"dataset": "PACS", "root": str(tmp_path / "raw"), "registry": str(registry(tmp_path, doms)),
               "from": str(pq)}, tmp_path)
    assert out["counts"] == doms and (tmp_path / "raw" / "PACS" / "Real World").is_dir()


def test_unknown_domain_value_is_a_clear_error(tmp_path):
    pq = tmp_path / "m.parquet"
    mirror_parquet(pq, {"art_painting": 1, "watercolor": 1})
    with pytest.raises(UserError, match=r"m\.parquet: domain value 'watercolor'"):
        run({"dataset": "PACS", "root": str(tmp_path / "raw"), "registry": str(registry(tmp_path)),
             "from": str(pq)}, tmp_path)
    assert not (tmp_path / "raw" / "PACS").exists()
