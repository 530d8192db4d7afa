"""Download stage end to end against a real HTTP server on loopback (no internet needed).

The archives are built here with the internal structure of the real ones: PACS zip (``kfold/``),
OfficeHome zip (``OfficeHomeDataset_10072016/``), VLCS tar.gz (``VLCS/``), TerraIncognita images
tarball + annotation-JSON tarball (``eccv_18_all_images_sm/``, ``eccv_18_annotation_files/``).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from download_server import FileServer

from dbr_builder.cli import main as cli_main
from dbr_builder.errors import UserError
from dbr_builder.stages.download import dataset_folder, load_registry, outputs, run
from dbr_builder.stages.download.verify import LOCK_NAME

PACS_DOMAINS = {"art_painting": 3, "cartoon": 2, "photo": 2, "sketch": 3}
PACS_CLASSES = ["dog", "horse"]


def img_bytes(tag: str) -> bytes:
    """Distinct small 'JPEG' payloads (the stage never decodes images)."""
    return b"\xff\xd8\xff\xe0" + tag.encode() * 40


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def tree_files(prefix: str, domains: dict[str, int], classes: list[str]) -> dict[str, bytes]:
    out = {}
    for dom, n in domains.items():
        for i in range(n):
            cls = classes[i % len(classes)]
            out[f"{prefix}/{dom}/{cls}/pic_{i:03d}.jpg"] = img_bytes(f"{dom}-{i}")
    return out


def pacs_zip(pad: int = 0) -> bytes:
    files = tree_files("kfold", PACS_DOMAINS, PACS_CLASSES)
    if pad:  # a big stored member so that a dropped connection lands mid-file
        files["kfold/README.bin"] = random.Random(pad).randbytes(pad)  # incompressible
    return zip_bytes(files)


def write_registry(path: Path, datasets: dict) -> Path:
    path.write_text(yaml.safe_dump({"version": 1, "datasets": datasets}, sort_keys=False))
    return path


def pacs_entry(srv: FileServer, url: str | None = None) -> dict:
    return {
        "folder": "PACS", "domains": dict(PACS_DOMAINS), "classes": PACS_CLASSES,
        "sources": [
            {"name": "domainbed", "kind": "archives",
             "artifacts": [{"name": "PACS.zip", "url": url or srv.drive_url("pacs-id")}],
             "layout": {"type": "rename", "from": "kfold"}},
            {"name": "hf-flwrlabs", "kind": "hub", "repo_id": "flwrlabs/pacs", "patterns": ["data/train-*.parquet"],
             "columns": {"image": "image", "domain": "domain", "label": "label"}},
        ],
    }


@pytest.fixture
def server():
    srv = FileServer()
    srv.start()
    yield srv
    srv.stop()


def cfg_for(tmp_path: Path, registry: Path, dataset: str, **kw) -> dict:
    return {"dataset": dataset, "root": str(tmp_path / "raw"), "registry": str(registry), "retries": 2,
            "timeout": 5, **kw}


def test_full_pacs_download_through_drive_confirmation(server, tmp_path, capsys):
    server.files["/PACS.zip"] = pacs_zip()
    server.drive["pacs-id"] = "/PACS.zip"
    reg = write_registry(tmp_path / "reg.yaml", {"PACS": pacs_entry(server)})
    cfg = cfg_for(tmp_path, reg, "PACS")
    out = run(cfg, tmp_path)
    root = tmp_path / "raw"
    assert out["status"] == "built" and out["source"] == "domainbed"
    assert outputs(cfg, tmp_path) == [root / "PACS"]
    # DomainBed layout: kfold renamed to PACS, <domain>/<class>/<file>
    assert sorted(p.name for p in (root / "PACS").iterdir()) == sorted(PACS_DOMAINS)
    assert (root / "PACS" / "sketch" / "horse" / "pic_001.jpg").read_bytes() == img_bytes("sketch-1")
    assert out["counts"] == PACS_DOMAINS and out["problems"] == []
    # the confirmation page was followed (the file came from /download?confirm=t)
    assert [s.path for s in server.log] == ["/uc", "/PACS.zip"]
    lock = json.loads((root / LOCK_NAME).read_text())
    rec = lock["artifacts"]["PACS/PACS.zip"]
    assert rec["size"] == len(server.files["/PACS.zip"]) and len(rec["sha256"]) == 64
    assert lock["datasets"]["PACS"]["complete"] is True
    assert not (root / ".staging").exists()
    assert "art_painting" in capsys.readouterr().out  # the count table


def test_second_run_does_no_network_work(server, tmp_path):
    server.files["/PACS.zip"] = pacs_zip()
    server.drive["pacs-id"] = "/PACS.zip"
    reg = write_registry(tmp_path / "reg.yaml", {"PACS": pacs_entry(server)})
    cfg = cfg_for(tmp_path, reg, "PACS")
    run(cfg, tmp_path)
    n = len(server.log)
    server.stop()  # even a dead server must not matter now
    out = run(cfg, tmp_path)
    assert out["status"] == "up to date" and out["bytes_downloaded"] == 0
    assert len(server.log) == n


def test_interrupted_download_resumes_without_refetching(server, tmp_path):
    data = pacs_zip(pad=300_000)
    server.files["/PACS.zip"] = data
    server.drop_after["/PACS.zip"] = (100_000, 1)  # first response dies after 100 kB
    reg = write_registry(tmp_path / "reg.yaml", {"PACS": pacs_entry(server, server.url("PACS.zip"))})
    out = run(cfg_for(tmp_path, reg, "PACS"), tmp_path)
    assert out["status"] == "built"
    reqs = [s for s in server.log if s.path == "/PACS.zip"]
    assert reqs[0].range is None and reqs[0].sent == 100_000
    assert reqs[1].range == "bytes=100000-" and reqs[1].status == 206
    assert server.bytes_sent("/PACS.zip") == len(data)  # not one byte fetched twice
    assert out["bytes_downloaded"] == len(data)


def test_resume_across_runs_after_failure(server, tmp_path):
    data = pacs_zip(pad=200_000)
    server.files["/PACS.zip"] = data
    server.drop_after["/PACS.zip"] = (50_000, 1)
    reg = write_registry(tmp_path / "reg.yaml", {"PACS": pacs_entry(server, server.url("PACS.zip"))})
    entry = load_registry(reg)["PACS"]
    cfg = cfg_for(tmp_path, reg, "PACS", retries=0, source="domainbed")
    with pytest.raises(UserError, match="domainbed"):
        run(cfg, tmp_path)
    part = tmp_path / "raw" / ".downloads" / "PACS" / "PACS.zip.part"
    assert part.stat().st_size == 50_000
    assert entry.source("domainbed").artifacts[0].name == "PACS.zip"
    out = run(cfg, tmp_path)
    assert out["status"] == "built"
    assert server.bytes_sent("/PACS.zip") == len(data)


def test_officehome_zip_and_vlcs_targz_layouts(server, tmp_path):
    oh_domains = {"Art": 2, "Clipart": 2, "Product": 1, "Real World": 2}
    oh_files = tree_files("OfficeHomeDataset_10072016", oh_domains, ["Alarm_Clock", "TV"])
    oh_files["OfficeHomeDataset_10072016/ImageInfo.csv"] = b"image,source\n"
    server.files["/office_home.zip"] = zip_bytes(oh_files)
    vl_domains = {"Caltech101": 2, "LabelMe": 1, "SUN09": 2, "VOC2007": 1}
    server.files["/VLCS.tar.gz"] = tar_bytes(tree_files("VLCS", vl_domains, ["bird", "car"]))
    reg = write_registry(tmp_path / "reg.yaml", {
        "OfficeHome": {"folder": "office_home", "domains": oh_domains, "classes": ["Alarm_Clock", "TV"],
                       "sources": [{"name": "domainbed", "kind": "archives",
                                    "artifacts": [{"name": "office_home.zip", "url": server.url("office_home.zip")}],
                                    "layout": {"type": "rename", "from": "OfficeHomeDataset_10072016"}}]},
        "VLCS": {"folder": "VLCS", "domains": vl_domains, "classes": ["bird", "car"],
                 "sources": [{"name": "domainbed", "kind": "archives",
                              "artifacts": [{"name": "VLCS.tar.gz", "url": server.url("VLCS.tar.gz")}],
                              "layout": {"type": "rename", "from": "VLCS"}}]},
    })
    oh = run(cfg_for(tmp_path, reg, "OfficeHome"), tmp_path)
    vl = run(cfg_for(tmp_path, reg, "VLCS"), tmp_path)
    raw = tmp_path / "raw"
    assert oh["counts"] == oh_domains and vl["counts"] == vl_domains
    assert (raw / "office_home" / "Real World" / "TV" / "pic_001.jpg").is_file()
    assert (raw / "VLCS" / "SUN09" / "car" / "pic_001.jpg").is_file()
    assert dataset_folder("OfficeHome", reg) == "office_home"


# -- TerraIncognita -------------------------------------------------------------------------------

CATS = [(1, "bobcat"), (2, "empty"), (3, "car"), (4, "coyote"), (5, "opossum")]
KEEP = ["bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel"]


def terra_sources() -> tuple[dict[str, bytes], dict[str, dict]]:
    """Images at kept and other locations, several annotations per image, split over 3 JSONs."""
    images, files = [], {}
    for i in range(24):
        loc = [38, 43, 46, 100, 99][i % 5]
        fn = f"img-{i:04d}.jpg"
        # the real files mix int and string locations; DomainBed compares str(location)
        images.append({"id": f"id{i}", "file_name": fn, "location": loc if i % 2 else str(loc)})
        files[f"eccv_18_all_images_sm/{fn}"] = img_bytes(fn)
    anns = []
    for i in range(24):
        anns.append({"id": f"a{i}", "image_id": f"id{i}", "category_id": CATS[i % 5][0]})
        if i % 4 == 0:  # a second annotation: the image lands in two class folders
            anns.append({"id": f"b{i}", "image_id": f"id{i}", "category_id": 2})
    jsons = {}
    for k, name in enumerate(["train_annotations.json", "cis_val_annotations.json", "trans_test_annotations.json"]):
        jsons[name] = {"images": images[k::3], "annotations": [a for a in anns if int(a["image_id"][2:]) % 3 == k],
                       "categories": [{"id": c, "name": n} for c, n in CATS]}
    return files, jsons


def domainbed_terra_reference(jsons: dict[str, dict]) -> set[tuple[str, str, str]]:
    """DomainBed's own (quadratic) selection loop, as the expected answer."""
    data = {"images": [], "annotations": [], "categories": []}
    for d in jsons.values():
        for k in data:
            data[k].extend(d[k])
    cat = {c["id"]: c["name"] for c in data["categories"]}
    out = set()
    for image in data["images"]:
        loc = str(image["location"])
        if loc not in ["38", "46", "100", "43"]:
            continue
        for a in data["annotations"]:
            if a["image_id"] == image["id"] and cat[a["category_id"]] in KEEP:
                out.add((f"location_{loc}", cat[a["category_id"]], image["file_name"]))
    return out


def test_terra_incognita_rebuilt_like_domainbed(server, tmp_path):
    img_files, jsons = terra_sources()
    server.files["/eccv_18_all_images_sm.tar.gz"] = tar_bytes(img_files)
    server.files["/eccv_18_annotations.tar.gz"] = tar_bytes(
        {f"eccv_18_annotation_files/{k}": json.dumps(v).encode() for k, v in jsons.items()})
    layout = {"type": "terra", "images_dir": "eccv_18_all_images_sm", "annotations_dir": "eccv_18_annotation_files",
              "locations": [38, 43, 46, 100], "categories": KEEP}
    expected = domainbed_terra_reference(jsons)
    exp_counts = {f"location_{n}": sum(1 for d, _, _ in expected if d == f"location_{n}") for n in (100, 38, 43, 46)}
    reg = write_registry(tmp_path / "reg.yaml", {"TerraIncognita": {
        "folder": "terra_incognita", "domains": exp_counts, "classes": KEEP,
        "sources": [{"name": "lila", "kind": "archives", "layout": layout, "artifacts": [
            {"name": "eccv_18_all_images_sm.tar.gz", "url": server.url("eccv_18_all_images_sm.tar.gz")},
            {"name": "eccv_18_annotations.tar.gz", "url": server.url("eccv_18_annotations.tar.gz")}]}]}})
    out = run(cfg_for(tmp_path, reg, "TerraIncognita"), tmp_path)
    dest = tmp_path / "raw" / "terra_incognita"
    got = {(p.parts[-3], p.parts[-2], p.name) for p in dest.rglob("*.jpg")}
    assert got == expected and len(expected) > 10
    assert not any(d == "location_99" for d, _, _ in got) and not any(c == "car" for _, c, _ in got)
    assert out["counts"] == exp_counts
    # class-folder problems are reported (this toy tree lacks most categories) but are only warnings
    assert out["status"] == "built"


# -- failures ---------------------------------------------------------------------------------------

def test_corrupt_archive_falls_back_then_fails_cleanly(server, tmp_path):
    data = pacs_zip()
    server.files["/PACS.zip"] = data[: len(data) // 2] + b"\0" * 100  # truncated zip
    reg = write_registry(tmp_path / "reg.yaml", {"PACS": pacs_entry(server, server.url("PACS.zip"))})
    with pytest.raises(UserError) as ei:
        run(cfg_for(tmp_path, reg, "PACS", source="domainbed"), tmp_path)
    msg = str(ei.value)
    assert "PACS.zip" in msg and "corrupt" in msg and "--from" in msg
    raw = tmp_path / "raw"
    assert not (raw / "PACS").exists() and not (raw / ".staging").exists()


def test_checksum_mismatch_on_reuse_names_the_file(server, tmp_path):
    server.files["/PACS.zip"] = pacs_zip()
    reg = write_registry(tmp_path / "reg.yaml", {"PACS": pacs_entry(server, server.url("PACS.zip"))})
    cfg = cfg_for(tmp_path, reg, "PACS", source="domainbed")
    run(cfg, tmp_path)
    archive = tmp_path / "raw" / ".downloads" / "PACS" / "PACS.zip"
    archive.write_bytes(pacs_zip(pad=1024))  # a different (valid) archive in its place
    with pytest.raises(UserError, match=r"PACS\.zip.*does not match .*lock"):
        run({**cfg, "force": True}, tmp_path)
    assert (tmp_path / "raw" / "PACS" / "photo").is_dir()  # the good tree was left alone


def test_pinned_sha256_mismatch(server, tmp_path):
    server.files["/PACS.zip"] = pacs_zip()
    entry = pacs_entry(server, server.url("PACS.zip"))
    entry["sources"][0]["artifacts"][0]["sha256"] = "0" * 64
    reg = write_registry(tmp_path / "reg.yaml", {"PACS": entry})
    with pytest.raises(UserError, match=r"PACS\.zip: sha256 .* differs from the registry"):
        run(cfg_for(tmp_path, reg, "PACS"), tmp_path)


def test_dead_link_falls_back_and_reports(server, tmp_path):
    server.status["/PACS.zip"] = 404
    server.files["/mirror/PACS.zip"] = pacs_zip()
    entry = pacs_entry(server, server.url("PACS.zip"))
    entry["sources"].insert(1, {"name": "mirror", "kind": "archives",
                                "artifacts": [{"name": "PACS.zip", "url": server.url("mirror/PACS.zip")}],
                                "layout": {"type": "rename", "from": "kfold"}})
    reg = write_registry(tmp_path / "reg.yaml", {"PACS": entry})
    out = run(cfg_for(tmp_path, reg, "PACS"), tmp_path)
    assert out["source"] == "mirror"
    assert any("domainbed" in f and "HTTP 404" in f for f in out["failed_sources"])


def test_drive_quota_page_is_a_clear_error(server, tmp_path):
    server.quota.add("pacs-id")
    reg = write_registry(tmp_path / "reg.yaml", {"PACS": pacs_entry(server)})
    with pytest.raises(UserError, match="quota"):
        run(cfg_for(tmp_path, reg, "PACS", source="domainbed"), tmp_path)
    assert not (tmp_path / "raw" / ".downloads" / "PACS" / "PACS.zip").exists()


def test_no_network_fails_fast_naming_source_and_error(tmp_path, capsys):
    entry = {"folder": "PACS", "domains": dict(PACS_DOMAINS), "classes": PACS_CLASSES, "sources": [
        {"name": "domainbed", "kind": "archives",
         "artifacts": [{"name": "PACS.zip", "url": "https://no-such-host.invalid/uc?id=1"}],
         "layout": {"type": "rename", "from": "kfold"}}]}
    reg = write_registry(tmp_path / "reg.yaml", {"PACS": entry})
    t0 = time.perf_counter()
    rc = cli_main(["download", "PACS", "--root", str(tmp_path / "raw"), "--registry", str(reg)])
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert rc == 1
    assert "source 'domainbed'" in err and "DNS lookup failed" in err and "--from" in err and "--source" in err


def test_count_check_warns_and_strict_errors(server, tmp_path, caplog):
    files = tree_files("kfold", PACS_DOMAINS, PACS_CLASSES)
    files["kfold/photo/dog/copy.jpg"] = files["kfold/sketch/dog/pic_000.jpg"]  # one extra, a duplicate
    server.files["/PACS.zip"] = zip_bytes(files)
    reg = write_registry(tmp_path / "reg.yaml", {"PACS": pacs_entry(server, server.url("PACS.zip"))})
    with pytest.raises(UserError, match=r"photo: \+1"):
        run(cfg_for(tmp_path, reg, "PACS", strict=True), tmp_path)
    assert not (tmp_path / "raw" / "PACS").exists()
    n_before = len(server.log)
    out = run(cfg_for(tmp_path, reg, "PACS"), tmp_path)  # archive reused from .downloads
    assert len(server.log) == n_before
    assert out["counts"]["photo"] == 3 and out["problems"] == ["photo: +1 (found 3, expected 2)"]
    assert ["photo/dog/copy.jpg", "sketch/dog/pic_000.jpg"] in out["duplicates"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "PACS photo: +1 (found 3, expected 2)" in warnings  # logged as a warning (stderr under `dbr`)
    assert any("byte-identical" in w for w in warnings)


def test_existing_tree_is_used_without_network(tmp_path):
    reg = write_registry(tmp_path / "reg.yaml", {"PACS": {
        "folder": "PACS", "domains": dict(PACS_DOMAINS), "classes": PACS_CLASSES, "sources": [
            {"name": "domainbed", "kind": "archives", "layout": {"type": "rename", "from": "kfold"},
             "artifacts": [{"name": "PACS.zip", "url": "https://no-such-host.invalid/x"}]}]}})
    for rel, data in tree_files("PACS", PACS_DOMAINS, PACS_CLASSES).items():
        p = tmp_path / "raw" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    out = run(cfg_for(tmp_path, reg, "PACS"), tmp_path)
    assert out["status"] == "present" and out["counts"] == PACS_DOMAINS
    assert run(cfg_for(tmp_path, reg, "PACS"), tmp_path)["status"] == "up to date"


def test_from_local_archive_and_folder(tmp_path):
    reg = write_registry(tmp_path / "reg.yaml", {"PACS": {
        "folder": "PACS", "domains": dict(PACS_DOMAINS), "classes": PACS_CLASSES, "sources": [
            {"name": "domainbed", "kind": "archives", "layout": {"type": "rename", "from": "kfold"},
             "artifacts": [{"name": "PACS.zip", "url": "https://no-such-host.invalid/x"}]}]}})
    archive = tmp_path / "my-pacs.zip"
    archive.write_bytes(pacs_zip())
    out = run(cfg_for(tmp_path, reg, "PACS", **{"from": str(archive)}), tmp_path)
    assert out["status"] == "built" and out["counts"] == PACS_DOMAINS
    lock = json.loads((tmp_path / "raw" / LOCK_NAME).read_text())
    assert lock["artifacts"]["PACS/from:my-pacs.zip"]["size"] == archive.stat().st_size
    # a folder holding a DomainBed tree, into another root
    out2 = run({**cfg_for(tmp_path, reg, "PACS", **{"from": str(tmp_path / "raw")}), "root": str(tmp_path / "r2")},
               tmp_path)
    assert out2["counts"] == PACS_DOMAINS and (tmp_path / "r2" / "PACS" / "cartoon" / "horse").is_dir()
