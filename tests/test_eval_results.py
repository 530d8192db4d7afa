"""Accuracy tables: per-domain accuracy, mean +- error over trial seeds (DomainBed), report files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dbr_builder.stages.evaluate.results import (
    cell_metrics,
    load_paper_table,
    mean_err,
    summarize,
    write_reports,
)


def recs(method: str, ds: str, dom: str, seed: int, outcomes: str) -> list[dict]:
    """outcomes: one char per image: c = correct, w = wrong class, u = unparseable."""
    out = []
    for i, o in enumerate(outcomes):
        out.append({"method": method, "dataset": ds, "heldout_domain": dom, "trial_seed": seed,
                    "image_id": f"{dom}{seed}{i}", "label": "dog",
                    "pred": {"c": "dog", "w": "cat", "u": None}[o],
                    "status": "no_answer" if o == "u" else "ok"})
    return out


def known_records() -> list[dict]:
    r = []
    r += recs("M", "D", "A", 0, "ccuw")  # 2/4 = 50
    r += recs("M", "D", "B", 0, "cw")  # 1/2 = 50
    r += recs("M", "D", "A", 1, "cccw")  # 3/4 = 75
    r += recs("M", "D", "B", 1, "cc")  # 2/2 = 100
    r += recs("N", "D", "A", 0, "wwww")  # N never evaluated on B
    return r


def domainbed_format_mean(data: list[float]) -> tuple[float, float]:
    """DomainBed's reporting.format_mean, reimplemented with numpy as the independent reference."""
    mean = np.mean(data)
    err = np.std(np.array(data) / np.sqrt(len(data)))
    return float(mean), float(err)


def test_cells_by_hand() -> None:
    cells = {(c["method"], c["heldout_domain"], c["trial_seed"]): c for c in cell_metrics(known_records())}
    a0 = cells[("M", "A", 0)]
    assert (a0["n"], a0["correct"], a0["unparseable"]) == (4, 2, 1)
    assert a0["acc"] == pytest.approx(50.0) and a0["unparseable_rate"] == pytest.approx(25.0)
    assert a0["status_counts"] == {"no_answer": 1, "ok": 3}
    assert cells[("M", "B", 1)]["acc"] == pytest.approx(100.0)
    assert cells[("N", "A", 0)]["acc"] == 0.0


def test_summary_matches_domainbed() -> None:
    s = summarize(cell_metrics(known_records()), {"D": ["A", "B"]})
    m = s["datasets"]["D"]["methods"]["M"]
    for dom, accs in (("A", [50.0, 75.0]), ("B", [50.0, 100.0])):
        mean, err = domainbed_format_mean(accs)
        assert m["per_domain"][dom]["mean"] == pytest.approx(mean)
        assert m["per_domain"][dom]["err"] == pytest.approx(err)
        assert m["per_domain"][dom]["std"] == pytest.approx(float(np.std(accs)))
    # by hand: A mean 62.5 (se 12.5/sqrt 2), B mean 75 (se 25/sqrt 2), Avg 68.75
    assert m["per_domain"]["A"]["err"] == pytest.approx(12.5 / math.sqrt(2))
    assert m["avg"] == pytest.approx(68.75)
    assert m["per_domain"]["A"]["unparseable_rate"] == pytest.approx(12.5)  # (25 + 0) / 2
    # averages table: per seed mean over domains (50, 87.5), then mean +- se over seeds
    assert m["trial_averages"] == {0: pytest.approx(50.0), 1: pytest.approx(87.5)}
    mean, err = domainbed_format_mean([50.0, 87.5])
    assert s["averages"]["M"]["datasets"]["D"]["mean"] == pytest.approx(mean)
    assert s["averages"]["M"]["datasets"]["D"]["err"] == pytest.approx(err)
    # N lacks domain B: no Avg (DomainBed prints X)
    n = s["datasets"]["D"]["methods"]["N"]
    assert n["avg"] is None and s["averages"]["N"]["avg"] is None
    # std instead of se on request
    s2 = summarize(cell_metrics(known_records()), {"D": ["A", "B"]}, error="std")
    assert s2["datasets"]["D"]["methods"]["M"]["per_domain"]["A"]["err"] == pytest.approx(12.5)


def test_mean_err_edge_cases() -> None:
    assert mean_err([]) == {"mean": None, "err": None, "std": None, "n": 0}
    assert mean_err([80.0]) == {"mean": 80.0, "err": 0.0, "std": 0.0, "n": 1}
    with pytest.raises(ValueError):
        mean_err([1.0], error="iqr")


def test_reports_written(tmp_path) -> None:
    paper = load_paper_table()
    rd = next(r for r in paper["rows"] if r["method"].startswith("RD-MLDG"))
    assert rd["PACS"] == 98.13 and rd["TerraIncognita"] == 70.65 and rd["Avg"] == 86.89
    paths = write_reports(known_records(), tmp_path, {"D": ["A", "B"]}, paper)
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["datasets"]["D"]["methods"]["M"]["avg"] == pytest.approx(68.75)
    md = paths["md"].read_text()
    assert "| M [" not in md and "| M | 62.5 ± 8.8 | 75.0 ± 17.7 | 68.8 |" in md
    assert "| N | 0.0 ± 0.0 | X | X |" in md
    assert "RD-MLDG (InternVL3-8B, MTCT + SARR) (paper) |" in md and "98.13" in md
    tex = paths["tex"].read_text()
    assert "62.5 $\\pm$ 8.8" in tex and "\\toprule" in tex and "MTCT + SARR" in tex
    png = paths["png:D"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries
