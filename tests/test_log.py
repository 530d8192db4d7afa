"""Logging: plain messages on stdout, warnings on stderr, INFO on rank 0 only under DDP."""

from __future__ import annotations

import logging

import pytest

from dbr_builder.log import get_logger, setup_logging, show_progress


@pytest.fixture(autouse=True)
def _restore():
    yield
    setup_logging(logging.INFO)


def test_rank0_logs_info_and_other_ranks_only_warnings(monkeypatch, capsys) -> None:
    setup_logging(logging.INFO)
    log = get_logger("dbr_builder.stages.generate")
    assert log.name == "dbr.stages.generate"
    monkeypatch.delenv("RANK", raising=False)
    log.info("hello from rank 0")
    log.warning("careful")
    out = capsys.readouterr()
    assert out.out == "hello from rank 0\n" and out.err == "WARNING: careful\n"
    assert show_progress(True) and not show_progress(False)

    monkeypatch.setenv("RANK", "3")
    log.info("hello from rank 3")
    log.warning("rank 3 is in trouble")
    out = capsys.readouterr()
    assert out.out == "" and "[rank 3] rank 3 is in trouble" in out.err
    assert not show_progress(True)  # progress bars on rank 0 only


def test_quiet_hides_info(monkeypatch, capsys) -> None:
    monkeypatch.delenv("RANK", raising=False)
    setup_logging(logging.WARNING)
    get_logger("x").info("noise")
    assert capsys.readouterr().out == ""
