"""The dataset registry (pipelines/datasets.yaml) and the stage's config schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dbr_builder.config import ConfigError, load_pipeline
from dbr_builder.stages.download import dataset_folder, get_dataset, load_registry


def test_shipped_registry_matches_domainbed_and_design():
    reg = load_registry()
    assert {n: s.folder for n, s in reg.items() if n != "SynthShapes"} == {
        "PACS": "PACS", "VLCS": "VLCS", "OfficeHome": "office_home",
        "TerraIncognita": "terra_incognita", "DomainNet": "domain_net"}
    assert reg["PACS"].domains == {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}
    assert sum(reg["OfficeHome"].domains.values()) == 15588 and len(reg["OfficeHome"].classes) == 65
    assert reg["TerraIncognita"].domains["location_38"] == 9767 and len(reg["TerraIncognita"].classes) == 10
    assert list(reg["OfficeHome"].classes) == sorted(reg["OfficeHome"].classes)
    # original DomainBed sources first, then Hub mirrors
    assert [s.kind for s in reg["PACS"].sources] == ["archives", "hub"]
    assert reg["PACS"].sources[0].layout == {"type": "rename", "from": "kfold"}


def test_dataset_folder_mapping():
    assert dataset_folder("OfficeHome") == "office_home"
    assert dataset_folder("TerraIncognita") == "terra_incognita"
    assert dataset_folder("SynthShapes") == "SynthShapes"
    assert dataset_folder("MyOwnSet") == "MyOwnSet"
    assert get_dataset("office_home").name == "OfficeHome"


def test_bad_registry_names_the_field(tmp_path: Path):
    p = tmp_path / "reg.yaml"
    p.write_text(yaml.safe_dump({"version": 1, "datasets": {"PACS": {
        "folder": "PACS", "domains": {"photo": 1}, "sources": [
            {"name": "x", "kind": "archives", "artifacts": [{"name": "a.zip", "url": "ftp://nope"}]}]}}}))
    with pytest.raises(ConfigError) as ei:
        load_registry(p)
    msg = str(ei.value)
    assert "reg.yaml" in msg and "datasets.PACS.sources[0]" in msg


def test_pipeline_download_entry_validates(tmp_path: Path):
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump({"datasets": ["PACS"], "stages": [
        {"stage": "download", "source": "domainbed", "strict": True, "max_extract_bytes": "300G"}]}))
    assert load_pipeline(p)["stages"][0]["source"] == "domainbed"
    p.write_text(yaml.safe_dump({"stages": [{"stage": "download", "retries": "many"}]}))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.retries"):
        load_pipeline(p)
