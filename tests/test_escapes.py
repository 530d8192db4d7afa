"""Escapes: crafted archives, mirrors and trees must never read or write outside their root.

Archives are built in the tests (tar and zip, with symlink chains, hard links to links and
members that reuse a link's name); every test watches the folder around the target for
strays. Index walks trees with links out, link loops, FIFOs and undecodable names. Dataset
names are names, never paths. Publish re-checks every image's bytes against its id.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
import yaml
from test_download_safety import make_tar, make_zip

from dbr_builder.cli import main
from dbr_builder.core.workdir import check_name
from dbr_builder.errors import UserError
from dbr_builder.stages.download import run as download_run
from dbr_builder.stages.download.extract import UnsafeArchive, extract_archive
from dbr_builder.stages.index import index_dataset

# --- archives -------------------------------------------------------------------------------


def _sym(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.SYMTYPE, target
    return ti


def _hard(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.LNKTYPE, target
    return ti


def _dir(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    return ti


LINK = stat.S_IFLNK | 0o777


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(archives folder, target) inside a watched parent that holds a secret file next door."""
    (tmp_path / "arch").mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    return tmp_path / "arch", tmp_path / "box" / "target"


def _strays(parent: Path) -> set[str]:
    """Files under ``parent`` outside the archive and target folders (there must be none)."""
    out = set()
    for p in parent.rglob("*"):
        rel = p.relative_to(parent).as_posix()
        if not rel.startswith(("arch", "box")) and rel != "secret.txt":
            out.add(rel)
    return out


def _no_escape(parent: Path, target: Path) -> None:
    assert _strays(parent) == set()
    assert (parent / "secret.txt").read_text() == "secret"
    real = os.path.realpath(target)
    for p in target.rglob("*") if target.exists() else []:
        if p.is_symlink():  # every link left behind resolves inside the target
            r = os.path.realpath(p)
            assert r == real or r.startswith(real + os.sep), (p, r)


@pytest.mark.parametrize("members,why", [
    # a link that resolves inside (a -> .), then a second link under it that climbs out
    ([_sym("a", "."), _sym("a/b", ".."), ("a/b/evil.txt", b"evil")], "outside"),
    # a link into a sub-folder, then a link below it that climbs two levels
    ([_dir("sub"), _sym("d", "sub"), _sym("d/x", "../.."), ("d/x/evil.txt", b"evil")], "outside"),
    # '..' after a folder name: a later link could change where it points
    ([_sym("x", "y/.."), _sym("y", "."), ("x/evil.txt", b"evil")], "'..' after a folder name"),
    # long chains of inside links, the last one leaving
    ([_sym("x", "."), _sym("x/y", "."), _sym("x/y/up", "../.."), ("x/y/up/evil.txt", b"e")], "outside"),
    # a link whose name is an earlier link: never written through
    ([_sym("a", "."), _sym("a/a", ".")], "earlier member made a link there"),
])
def test_tar_symlink_chains_refused(box, members, why):
    arch, target = box
    t = make_tar(arch / "chain.tar", [("ok/a.jpg", b"ok"), *members])
    with pytest.raises(UnsafeArchive, match=why):
        extract_archive(t, target)
    _no_escape(arch.parent, target)


def test_zip_symlink_chain_refused(box):
    arch, target = box
    z = make_zip(arch / "chain.zip", [("a", b".", LINK), ("a/b", b"..", LINK), ("a/b/evil.txt", b"evil", None)])
    with pytest.raises(UnsafeArchive, match="outside"):
        extract_archive(z, target)
    _no_escape(arch.parent, target)


def test_tar_hard_link_to_a_link_refused(box):
    arch, target = box
    # the link itself resolves inside; a hard link to it would copy what the link names
    t = make_tar(arch / "hl.tar", [("real.jpg", b"img"), _sym("s", "real.jpg"), _hard("h", "s")])
    with pytest.raises(UnsafeArchive, match="'h'.*link or folder"):
        extract_archive(t, target)
    # a hard link through a folder link to the outside, or with '..', never gets anywhere
    t2 = make_tar(arch / "hl2.tar", [_sym("d", "."), _hard("h", "d/../secret.txt")])
    with pytest.raises(UnsafeArchive, match="'..'"):
        extract_archive(t2, target / "2")
    t3 = make_tar(arch / "hl3.tar", [_hard("h", "nothing.jpg")])
    with pytest.raises(UnsafeArchive, match="not an earlier file"):
        extract_archive(t3, target / "3")
    _no_escape(arch.parent, target)


def test_tar_hard_link_to_an_earlier_file_is_copied(box):
    arch, target = box
    t = make_tar(arch / "ok.tar", [("a/real.jpg", b"img"), _sym("d", "a"), _hard("b/copy.jpg", "d/real.jpg")])
    extract_archive(t, target)
    assert (target / "b" / "copy.jpg").read_bytes() == b"img" and not (target / "b" / "copy.jpg").is_symlink()


@pytest.mark.parametrize("kind", ["tar", "zip"])
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_file_member_never_writes_through_an_earlier_link(box, kind):
    arch, target = box
    if kind == "tar":
        a = make_tar(arch / "over.tar", [("real.jpg", b"img"), _sym("f.jpg", "real.jpg"), ("f.jpg", b"evil")])
    else:
        a = make_zip(arch / "over.zip", [("real.jpg", b"img", None), ("f.jpg", b"real.jpg", LINK),
                                        ("f.jpg", b"evil", None)])
    with pytest.raises(UnsafeArchive, match="'f.jpg'.*link"):
        extract_archive(a, target)
    assert (target / "real.jpg").read_bytes() == b"img"  # the link's target was not overwritten
    _no_escape(arch.parent, target)


def test_link_never_replaces_an_earlier_member(box):
    arch, target = box
    t = make_tar(arch / "swap.tar", [("a/x.jpg", b"img"), _sym("a/x.jpg", "../y.jpg")])
    with pytest.raises(UnsafeArchive, match="replaces an earlier member"):
        extract_archive(t, target)


def test_members_under_an_inside_link_land_inside(box):
    arch, target = box
    t = make_tar(arch / "in.tar", [_dir("real"), _sym("alias", "real"), ("alias/img.jpg", b"img")])
    extract_archive(t, target)
    assert (target / "real" / "img.jpg").read_bytes() == b"img"
    _no_escape(arch.parent, target)


def _archive_registry(tmp_path: Path, archive: Path) -> Path:
    reg = tmp_path / "reg.yaml"
    reg.write_text(yaml.safe_dump({"version": 1, "datasets": {"PACS": {
        "folder": "PACS", "domains": {"photo": 1}, "classes": ["dog"], "sources": [
            {"name": "local", "kind": "archives", "layout": {"type": "rename", "from": "kfold"},
             "artifacts": [{"name": archive.name, "url": archive.as_uri()}]}]}}}))
    return reg


def test_unsafe_archive_through_the_download_stage_leaves_nothing(tmp_path):
    t = make_tar(tmp_path / "PACS.tar", [("kfold/photo/dog/a.jpg", b"a"), _sym("kfold/a", ".."),
                                          _sym("kfold/a/b", ".."), ("kfold/a/b/escape.jpg", b"e")])
    with pytest.raises(UserError, match="kfold/a/b"):
        download_run({"dataset": "PACS", "root": str(tmp_path / "raw"),
                      "registry": str(_archive_registry(tmp_path, t))}, tmp_path)
    assert not list(tmp_path.rglob("escape.jpg"))
    assert not (tmp_path / "raw" / "PACS").exists() and not (tmp_path / "raw" / ".staging").exists()


@pytest.mark.timeout(120)
def test_links_that_leave_the_dataset_after_the_layout_are_dropped(tmp_path):
    # `kfold/up -> ..` stays inside the extraction folder, but once kfold becomes the dataset
    # folder it points above it (and `up/kfold/up/...` would loop forever)
    t = make_tar(tmp_path / "PACS.tar", [("kfold/photo/dog/a.jpg", b"a"), _sym("kfold/up", ".."),
                                          _sym("kfold/photo/dog/b.jpg", "a.jpg")])
    out = download_run({"dataset": "PACS", "root": str(tmp_path / "raw"),
                        "registry": str(_archive_registry(tmp_path, t))}, tmp_path)
    dest = tmp_path / "raw" / "PACS"
    assert not os.path.lexists(dest / "up") and (dest / "photo" / "dog" / "b.jpg").is_symlink()
    assert out["counts"] == {"photo": 2}


# --- parquet mirrors ------------------------------------------------------------------------


def _mirror(path: Path, image_values: list[dict]) -> None:
    """A mirror parquet (``datasets`` Image feature) written as is: ``bytes`` may be null."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    feats = datasets.Features({"image": datasets.Image(), "domain": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["dog"])})
    schema = feats.arrow_schema
    table = pa.Table.from_pydict({"image": image_values, "domain": ["photo"] * len(image_values),
                                  "label": [0] * len(image_values)}, schema=schema)
    pq.write_table(table, path)


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (5, 4), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _reg(tmp_path: Path) -> Path:
    p = tmp_path / "reg.yaml"
    p.write_text(yaml.safe_dump({"version": 1, "datasets": {"PACS": {
        "folder": "PACS", "domains": {"photo": 1}, "classes": ["dog"], "sources": [
            {"name": "hub", "kind": "hub", "repo_id": "x/pacs", "revision": "main", "patterns": ["*.parquet"],
             "columns": {"image": "image", "domain": "domain", "label": "label"}}]}}}))
    return p


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_mirror_image_path_outside_the_source_folder_refused(tmp_path, where):
    outside = tmp_path / "private" / "secret.png"
    outside.parent.mkdir()
    outside.write_bytes(_png())
    src = tmp_path / "src"
    src.mkdir()
    path = str(outside) if where == "absolute" else "../private/secret.png"
    _mirror(src / "train.parquet", [{"bytes": None, "path": path}])
    with pytest.raises(UserError, match="outside the source folder"):
        download_run({"dataset": "PACS", "root": str(tmp_path / "raw"), "registry": str(_reg(tmp_path)),
                      "from": str(src / "train.parquet")}, tmp_path)
    assert not any((tmp_path / "raw").rglob("*.png"))


def test_mirror_image_path_inside_the_source_folder_is_read(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "images" / "a.png").write_bytes(_png())
    _mirror(src / "train.parquet", [{"bytes": None, "path": "images/a.png"}])
    out = download_run({"dataset": "PACS", "root": str(tmp_path / "raw"), "registry": str(_reg(tmp_path)),
                        "from": str(src)}, tmp_path)
    assert out["counts"] == {"photo": 1}
    assert (tmp_path / "raw" / "PACS" / "photo" / "dog" / "a.png").read_bytes() == _png()


def test_from_folder_copy_leaves_out_links_that_leave_it(tmp_path):
    tree = tmp_path / "tree"
    (tree / "photo" / "dog").mkdir(parents=True)
    (tree / "photo" / "dog" / "a.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", tree / "photo" / "dog" / "b.png")
    os.symlink("..", tree / "photo" / "dog" / "loop")
    download_run({"dataset": "PACS", "root": str(tmp_path / "raw"), "registry": str(_reg(tmp_path)),
                  "from": str(tree)}, tmp_path)
    got = sorted(p.name for p in (tmp_path / "raw" / "PACS").rglob("*"))
    assert "b.png" not in got and "loop" not in got and "a.png" in got


# --- index ----------------------------------------------------------------------------------


def _tree(tmp_path: Path) -> Path:
    """ROOT/DS/<2 domains>/<2 classes>/<3 images> copied from SynthShapes-like PNGs."""
    from PIL import Image

    root = tmp_path / "raw"
    for d in ("d1", "d2"):
        for c in ("c1", "c2"):
            folder = root / "DS" / d / c
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, len(d) * 30, len(c) * 50)).save(folder / f"{c}_{i}.png")
    return root


def _index(root: Path, w: Path) -> tuple[dict, list[dict]]:
    import json

    meta = index_dataset(root, "DS", w, workers=1, progress=False)
    q = [json.loads(x) for x in (w / "manifest" / "DS.quarantine.jsonl").read_text().splitlines()]
    return meta, q


def test_index_never_follows_links_out_of_the_dataset(tmp_path):
    root = _tree(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(root / "DS" / "d1" / "c1" / "c1_0.png", elsewhere / "x.png")
    os.symlink(elsewhere / "x.png", root / "DS" / "d1" / "c1" / "out.png")  # file link out
    os.symlink(elsewhere, root / "DS" / "d1" / "c2" / "outdir")  # folder link out
    os.symlink("../c2/c2_0.png", root / "DS" / "d2" / "c1" / "in.png")  # inside: followed
    meta, q = _index(root, tmp_path / "w")
    assert meta["images"] == 12 + 1
    reasons = {r["path"]: r["reason"] for r in q}
    assert "out of the dataset folder" in reasons["d1/c1/out.png"]
    assert "out of the dataset folder" in reasons["d1/c2/outdir"]
    import polars as pl

    paths = pl.read_parquet(tmp_path / "w" / "manifest" / "DS.parquet")["path"].to_list()
    assert "d2/c1/in.png" in paths and not any("out" in p for p in paths)


@pytest.mark.timeout(120)
def test_index_link_loop_is_walked_once(tmp_path):
    root = _tree(tmp_path)
    os.symlink("..", root / "DS" / "d1" / "c1" / "loop")  # c1/loop -> c1's parent (the domain)
    os.symlink(".", root / "DS" / "d1" / "c2" / "self")
    meta, q = _index(root, tmp_path / "w")
    # c1/loop leads to the domain folder: c1 (already walked) is skipped, c2 is walked once more
    # (as ImageFolder would, below class c1); c2/self is a loop
    assert meta["images"] <= 12 + 3
    assert any("loop" in r["reason"] for r in q)


@pytest.mark.timeout(120)
def test_index_skips_fifos_and_undecodable_names(tmp_path):
    root = _tree(tmp_path)
    os.mkfifo(root / "DS" / "d1" / "c1" / "pipe.jpg")
    bad = os.path.join(os.fsencode(root / "DS" / "d2" / "c2"), b"caf\xe9.png")
    shutil.copy(root / "DS" / "d2" / "c2" / "c2_0.png", bad)
    meta, q = _index(root, tmp_path / "w")
    assert meta["images"] == 12 and meta["quarantined"] == 2
    reasons = {r["path"]: r["reason"] for r in q}
    assert "not a regular file" in reasons["d1/c1/pipe.jpg"]
    assert "not valid UTF-8" in reasons["d2/c2/caf\\xe9.png"]


def test_index_domain_folder_linked_out_is_an_error(tmp_path):
    root = _tree(tmp_path)
    shutil.move(root / "DS" / "d2", tmp_path / "d2")
    os.symlink(tmp_path / "d2", root / "DS" / "d2")
    with pytest.raises(ValueError, match="link out of the dataset folder"):
        index_dataset(root, "DS", tmp_path / "w", workers=1, progress=False)


# --- dataset names --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "/abs/evil", "a/b", ".hidden", "", "..", "a\x00b"])
def test_dataset_names_are_names_not_paths(name):
    with pytest.raises(UserError, match="not a valid name"):
        check_name(name)


@pytest.mark.parametrize("name", ["PACS", "OfficeHome", "Synth-Shapes_2", "v1.2"])
def test_good_dataset_names(name):
    assert check_name(name) == name


def test_bad_dataset_name_writes_nothing_anywhere(tmp_path, capsys, synth_root):
    w = tmp_path / "deep" / "w"
    w.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")}
    for argv in (["index", str(tmp_path / "abs"), "--root", str(synth_root), "-w", str(w)],
                 ["index", "../name", "--root", str(synth_root), "-w", str(w)],
                 ["generate", "../x", "-w", str(w), "--teacher", "oracle"],
                 ["filter", "../x", "-w", str(w)],
                 ["publish", "-w", str(w), "--datasets", "../x"],
                 ["train", "-w", str(w), "--dataset", "../x", "--student", "tiny"],
                 ["eval", "-w", str(w), "--model", "oracle", "--dataset", "../x"]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "not a valid name" in err and "Traceback" not in err, (argv, err)
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(w in p.parents or p == w / ".locks" for p in new), new  # only W/.locks, never outside W


# --- publish checks bytes -------------------------------------------------------------------


def test_publish_refuses_an_image_changed_after_indexing(tmp_path, capsys):
    w = tmp_path / "w"
    for argv in (["synth", "--root", str(w / "raw"), "--per-class", "2", "--image-size", "32"],
                 ["index", "SynthShapes", "--root", str(w / "raw"), "-w", str(w), "--workers", "1"],
                 ["generate", "SynthShapes", "-w", str(w), "--teacher", "oracle", "--n", "1", "--no-progress"],
                 ["filter", "SynthShapes", "-w", str(w)]):
        assert main(argv) == 0, argv
    import polars as pl

    rel = pl.read_parquet(w / "chains" / "SynthShapes.parquet")["path"][0]
    victim = w / "raw" / "SynthShapes" / rel
    victim.write_bytes(victim.read_bytes() + b"\0")  # still a valid PNG, other bytes
    capsys.readouterr()
    assert main(["publish", "-w", str(w)]) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert len(err) == 1 and str(victim) in err[0] and "changed since `dbr index`" in err[0]
    assert not (w / "hub" / "data" / "SynthShapes").exists()
