"""Figures in the docs that a command computes: the page and the command must agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import ack_cpu, capacity, worker_floor
from tests.support import ROOT


def test_the_capacity_plan_is_what_bench_capacity_prints() -> None:
    """docs/scaling.md's tables are `python -m bench.capacity`'s output from the newest result
    files; a new result file or a changed assumption without `--write` fails here."""
    done = subprocess.run([sys.executable, "-m", "bench.capacity", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_check_fails_on_a_page_with_one_figure_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = capacity.DOC.read_text()
    changed = page.replace("| web cores", "| web cores (edited)", 1)
    assert changed != page
    monkeypatch.setattr(capacity, "DOC", tmp_path / "docs" / "scaling.md")
    capacity.DOC.parent.mkdir()
    capacity.DOC.write_text(changed)
    monkeypatch.setattr(sys, "argv", ["capacity", "--check"])
    assert capacity.main() == 1
    monkeypatch.setattr(sys, "argv", ["capacity", "--write"])
    assert capacity.main() == 0  # --write puts the computed tables back
    assert capacity.DOC.read_text() == page


def test_the_worker_floor_table_is_what_bench_worker_floor_prints() -> None:
    """docs/performance.md's before-and-after table of the worker against its database is
    `python -m bench.worker_floor --doc print`'s, from the newest worker-floor result file."""
    done = subprocess.run([sys.executable, "-m", "bench.worker_floor", "--doc", "check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    page = worker_floor.DOC.read_text()
    assert page.count("<!-- worker-floor -->") == 1


def test_the_worker_floor_check_fails_on_an_edited_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = worker_floor.DOC.read_text()
    changed = page.replace("| PostgreSQL: new events/s", "| PostgreSQL: new events/s (edited)", 1)
    assert changed != page
    monkeypatch.setattr(worker_floor, "DOC", tmp_path / "performance.md")
    worker_floor.DOC.write_text(changed)
    assert worker_floor.doc("check") == 1
    assert worker_floor.doc("write") == 0
    assert worker_floor.DOC.read_text() == page


def test_the_ack_tables_are_what_bench_ack_cpu_prints() -> None:
    """docs/performance.md's tables of the acknowledgement's CPU (before and after, and where it goes)
    are `python -m bench.ack_cpu --doc print`'s, from the newest ack-cpu and ack-parts result files."""
    done = subprocess.run([sys.executable, "-m", "bench.ack_cpu", "--doc", "check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert ack_cpu.DOC.read_text().count("<!-- ack-cpu -->") == 1


def test_the_ack_check_fails_on_an_edited_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = ack_cpu.DOC.read_text()
    changed = page.replace("| redis | bare ÷ webhook, CPU per request |", "| redis | bare ÷ webhook (edited) |", 1)
    assert changed != page
    monkeypatch.setattr(ack_cpu, "DOC", tmp_path / "performance.md")
    ack_cpu.DOC.write_text(changed)
    assert ack_cpu.doc("check") == 1
    assert ack_cpu.doc("write") == 0
    assert ack_cpu.DOC.read_text() == page
