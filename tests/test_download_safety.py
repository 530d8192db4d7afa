"""Safe extraction: zip-slip / tar-slip, links out of the target, device files, decompression bombs.

Every malicious archive must be refused with an error naming the member, and nothing may be
written outside the target folder (the tests watch the parent folder for strays).
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from dbr_builder.errors import UserError
from dbr_builder.stages.download import run
from dbr_builder.stages.download.extract import (
    Budget,
    CorruptArchive,
    ExtractLimit,
    UnsafeArchive,
    extract_archive,
    parse_size,
)
from dbr_builder.stages.download.http import confirmation_url


def make_zip(path: Path, members: list[tuple[str, bytes, int | None]]) -> Path:
    """members: (name, data, unix mode or None)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in members:
            zi = zipfile.ZipInfo(name)
            if mode is not None:
                zi.external_attr = mode << 16
            zf.writestr(zi, data)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    """members: TarInfo (links, dirs, devices) or (name, data); gzip when ``path`` ends in .gz."""
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                ti = tarfile.TarInfo(m[0])
                ti.size = len(m[1])
                tf.addfile(ti, io.BytesIO(m[1]))
    return path


def snapshot(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@pytest.fixture
def area(tmp_path: Path) -> tuple[Path, Path]:
    """(archives folder, target folder) under a watched parent."""
    (tmp_path / "arch").mkdir()
    return tmp_path / "arch", tmp_path / "box" / "target"


def _sym(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.SYMTYPE, target
    return ti


@pytest.mark.parametrize("member,why", [
    ("../evil.txt", "'..'"),
    ("kfold/../../evil.txt", "'..'"),
    ("/tmp/evil-abs.txt", "absolute"),
    ("C:/evil.txt", "absolute"),
])
def test_zip_slip_refused(area, member, why):
    arch, target = area
    z = make_zip(arch / "slip.zip", [("kfold/ok.jpg", b"ok", None), (member, b"evil", None)])
    before = snapshot(arch.parent)
    with pytest.raises(UnsafeArchive, match=why) as ei:
        extract_archive(z, target)
    assert repr(member) in str(ei.value) and "slip.zip" in str(ei.value)
    # names are checked before any write: a bad zip writes nothing at all
    assert snapshot(arch.parent) - before <= {"box", "box/target"}


@pytest.mark.parametrize("member", [("../evil.txt", b"x"), ("/abs-evil.txt", b"x"), _sym("a/link", "../../outside"),
                                    _sym("a/abs", "/etc/passwd")])
def test_tar_slip_and_links_out_refused(area, member):
    arch, target = area
    t = make_tar(arch / "slip.tar.gz", [("VLCS/a/ok.jpg", b"ok"), member])
    with pytest.raises(UnsafeArchive) as ei:
        extract_archive(t, target)
    name = member.name if isinstance(member, tarfile.TarInfo) else member[0]
    assert repr(name) in str(ei.value)
    outside = {p for p in snapshot(arch.parent) if not p.startswith(("box", "arch"))}
    assert outside == set() and not (arch.parent / "evil.txt").exists() and not Path("/abs-evil.txt").exists()


def test_zip_symlink_out_and_device_refused(area):
    arch, target = area
    z = make_zip(arch / "link.zip", [("d/l", b"../../../etc", stat.S_IFLNK | 0o777)])
    with pytest.raises(UnsafeArchive, match="points outside"):
        extract_archive(z, target)
    dev = tarfile.TarInfo("d/null")
    dev.type = tarfile.CHRTYPE
    t = make_tar(arch / "dev.tar.gz", [dev])
    with pytest.raises(UnsafeArchive, match="'d/null'.*device"):
        extract_archive(t, target)
    fifo = tarfile.TarInfo("d/fifo")
    fifo.type = tarfile.FIFOTYPE
    with pytest.raises(UnsafeArchive, match="'d/fifo'"):
        extract_archive(make_tar(arch / "fifo.tar.gz", [fifo]), target)


def test_links_inside_target_are_kept(area):
    arch, target = area
    t = make_tar(arch / "ok.tar.gz", [("a/real.jpg", b"img"), _sym("a/alias.jpg", "real.jpg")])
    extract_archive(t, target)
    assert (target / "a" / "alias.jpg").read_bytes() == b"img"


def test_decompression_bomb_stops_at_limit(area):
    arch, target = area
    bomb = arch / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("kfold/zeros.jpg", b"\0" * 5_000_000)  # ~5 kB compressed
    assert bomb.stat().st_size < 50_000
    with pytest.raises(ExtractLimit, match="kfold/zeros.jpg.*--max-extract-bytes"):
        extract_archive(bomb, target, Budget(1_000_000))
    extract_archive(bomb, target / "again", Budget(parse_size("10M")))  # a genuine big file passes a bigger cap


def test_corrupt_and_non_archives(area):
    arch, target = area
    bad = arch / "bad.tar.gz"
    good = make_tar(arch / "g.tar.gz", [("x/a.jpg", b"a" * 10000)]).read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptArchive, match="bad.tar.gz"):
        extract_archive(bad, target)
    html = arch / "page.zip"
    html.write_bytes(b"<html>quota</html>")
    with pytest.raises(CorruptArchive, match="not a zip or tar"):
        extract_archive(html, target)


def test_zip_slip_through_the_stage_writes_nothing_outside(tmp_path):
    z = make_zip(tmp_path / "PACS.zip", [("kfold/photo/dog/a.jpg", b"a", None), ("../../../escape.jpg", b"e", None)])
    reg = tmp_path / "reg.yaml"
    reg.write_text(yaml.safe_dump({"version": 1, "datasets": {"PACS": {
        "folder": "PACS", "domains": {"photo": 1}, "classes": ["dog"], "sources": [
            {"name": "local", "kind": "archives", "layout": {"type": "rename", "from": "kfold"},
             "artifacts": [{"name": "PACS.zip", "url": z.as_uri()}]}]}}}))
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="escape.jpg"):
        run({"dataset": "PACS", "root": str(tmp_path / "raw"), "registry": str(reg)}, tmp_path)
    new = snapshot(tmp_path) - before
    assert all(p.startswith("raw") for p in new)
    assert not (tmp_path / "raw" / "PACS").exists() and not (tmp_path / "raw" / ".staging").exists()


def test_parse_size_and_drive_confirmation_variants():
    assert parse_size("200G") == 200 * 1024**3 and parse_size("512m") == 512 * 1024**2 and parse_size(7) == 7
    with pytest.raises(UserError):
        parse_size("lots")
    old = '<a id="uc-download-link" href="/uc?export=download&amp;confirm=AbC_1&amp;id=XYZ">Download anyway</a>'
    assert confirmation_url("https://drive.google.com/uc?export=download&id=XYZ", old) == \
        "https://drive.google.com/uc?export=download&confirm=AbC_1&id=XYZ"
    new = ('<form id="download-form" action="https://drive.usercontent.google.com/download" method="get">'
           '<input type="hidden" name="id" value="XYZ"><input type="hidden" name="confirm" value="t">'
           '<input type="hidden" name="uuid" value="u-1"></form>')
    assert confirmation_url("https://drive.google.com/uc?id=XYZ", new) == \
        "https://drive.usercontent.google.com/download?id=XYZ&confirm=t&uuid=u-1"
    assert confirmation_url("https://example.org/", "<html><title>hi</title></html>") is None
