"""The benchmark command runs end to end on a tiny load (no timing is asserted: figures vary)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, spawn, stop_group

# The benchmark installs what it lacks, then runs a tiny load on both databases.
BENCH_SECONDS = 600


@pytest.mark.skipif(shutil.which("wrk") is None and not Path("/usr/bin/apt-get").exists(),
                    reason="the benchmark needs Debian's wrk, and apt-get is not here to install it")
@pytest.mark.timeout(BENCH_SECONDS + 60)
def test_bench_runs_on_a_tiny_load(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "bench.log"
    bench = spawn(["bash", "bench/run.sh", "--tiny", "--out", str(out)], log=log, cwd=ROOT)
    try:
        returncode = bench.wait(timeout=BENCH_SECONDS)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        # On a timeout or a failure too: bench.run and the servers it started in sessions of their own.
        stop_group(bench, tree=True)
    assert returncode == 0, log.read_text(errors="replace")[-6000:]
    [result] = out.glob("*.json")
    report = json.loads(result.read_text())
    assert report["ack"]["webhook_rps"] > 0 and report["ack"]["bare_rps"] > 0
    for database in ("sqlite", "postgresql"):
        assert report["processing"][database]["worker_eps"] > 0
        assert report["processing"][database]["duplicate_eps"] > 0
    assert (out / result.name.replace(".json", ".png")).stat().st_size > 1000
    assert report["acks"]["rabbitmq"]["webhook_rps"] > 0
    assert {run["rtt_ms"] for run in report["network"]["redis"].values()} == {0.0, 0.5}
    assert "| redis: ack throughput ratio" in (out / result.name.replace(".json", ".md")).read_text()
    assert "] processing: scaling with 4 worker process(es)" in log.read_text()  # progress while it runs


def _bench_json(args: list[str], tmp_path: Path, seconds: int) -> dict[str, Any]:
    """Run a bench module to the end and return the JSON it printed (stdout)."""
    log, out = tmp_path / "bench.log", tmp_path / "bench.json"
    with out.open("wb") as stdout, log.open("wb") as stderr:
        bench = subprocess.Popen([str(ROOT / ".venv" / "bin" / "python"), "-m", *args], stdout=stdout, stderr=stderr,
                                 cwd=ROOT, start_new_session=True)
        try:
            returncode = bench.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            stop_group(bench, tree=True)
    assert returncode == 0, log.read_text(errors="replace")[-6000:]
    return json.loads(out.read_text())


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is missing: scripts/test.sh installs Debian's wrk")
@pytest.mark.timeout(300)
def test_the_ack_ladder_runs_on_both_brokers(tmp_path: Path) -> None:
    """bench.ack_parts (and with it bench.ack_cpu's turns and every server of bench.ack_variants,
    the RabbitMQ floor included) runs end to end, with the open loops of ``--open-rate``; no timing is
    asserted, only that every rung was loaded and measured."""
    result = _bench_json(["bench.ack_parts", "--turns", "1", "--seconds", "1", "--open-rate", "50",
                          "--open-seconds", "1", "--open-turns", "1"], tmp_path, 240)
    for broker in ("redis", "rabbitmq"):
        rungs = result["brokers"][broker]["rungs"]
        assert "service" in rungs and "bare" in rungs and len(rungs) >= 6, rungs
        assert all(rung["rps"] > 0 and rung["cpu_us_per_request"] > 0 for rung in rungs.values()), rungs
        # every rung also loaded in the open loop, every request answered
        assert all(rung["open_fixed"]["sent"] >= 40 and rung["open_fixed"]["errors"] == 0 for rung in rungs.values())
    assert "bare + confirmed publish" in result["brokers"]["rabbitmq"]["rungs"]


@pytest.mark.timeout(120)
def test_the_duplicate_parts_are_timed(tmp_path: Path) -> None:
    """bench.duplicate_parts runs end to end (its claims find every event a duplicate, or it stops);
    no timing is asserted, only that every part was timed in every turn (Redis's CPU, read from
    INFO cpu, can be 0 over so few claims)."""
    result = _bench_json(["bench.duplicate_parts", "--turns", "2", "--rounds", "3", "--batch", "5"], tmp_path, 90)
    parts = ("claims_one_script_worker_us", "claims_pipeline_worker_us", "log_line_proxy_us",
             "log_line_bound_held_us", "event_key_us", "message_decode_us")
    assert all(len(result["all_turns"][part]) == 2 and result[part] > 0 for part in parts), result
    assert len(result["all_turns"]["claims_one_script_redis_us"]) == 2
