"""The benchmark command runs end to end on a tiny load (no timing is asserted: figures vary)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT


@pytest.mark.skipif(shutil.which("wrk") is None and not Path("/usr/bin/apt-get").exists(),
                    reason="the benchmark needs Debian's wrk, and apt-get is not here to install it")
def test_bench_runs_on_a_tiny_load(tmp_path: Path) -> None:
    done = subprocess.run(["bash", "bench/run.sh", "--tiny", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [result] = tmp_path.glob("*.json")
    report = json.loads(result.read_text())
    assert report["ack"]["webhook_rps"] > 0 and report["ack"]["bare_rps"] > 0
    for database in ("sqlite", "postgresql"):
        assert report["processing"][database]["worker_eps"] > 0
        assert report["processing"][database]["duplicate_eps"] > 0
    assert (tmp_path / result.name.replace(".json", ".png")).stat().st_size > 1000
    assert report["acks"]["rabbitmq"]["webhook_rps"] > 0
    assert {run["rtt_ms"] for run in report["network"]["redis"].values()} == {0.0, 0.5}
    assert "| redis: ack throughput ratio" in (tmp_path / result.name.replace(".json", ".md")).read_text()
    assert "] processing: scaling with 4 worker process(es)" in done.stderr  # progress while it runs
