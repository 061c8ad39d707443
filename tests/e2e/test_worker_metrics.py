"""The worker's metrics endpoint when several worker processes of a host share one multiprocess
folder and one WORKER_METRICS_PORT (a formation: honcho's ``-c worker=N``, systemd's template
instances): exactly one process serves the whole folder, and when it dies another takes over."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.operating.scrape import WORKER_METRICS_RETRY_SECONDS
from app.payload.events import Event
from tests.e2e.test_worker_line import queue, service, start_line  # noqa: F401 - service is a fixture
from tests.support import free_port, stop_group, wait_for

pytestmark = pytest.mark.e2e

# The standby processes try every WORKER_METRICS_RETRY_SECONDS; the rest is a loaded machine's slack.
TAKEOVER_WITHIN = WORKER_METRICS_RETRY_SECONDS + 7


def listening_pids(port: int, pids: set[int]) -> set[int]:
    """Which of ``pids`` hold a socket listening on TCP ``port`` (read from /proc, as ``ss -ltnp``)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    found = set()
    for pid in pids:
        try:
            links = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        except OSError:  # gone
            continue
        if links & inodes:
            found.add(pid)
    return found


def scrape(port: int) -> float:
    """voice_events_total over every outcome, as the endpoint serves it."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) if family.name == "voice_events"
               for sample in family.samples if sample.name == "voice_events_total")


def applied(log: Path) -> int:
    return log.read_text(errors="replace").count('"event": "event_applied"')


@pytest.fixture
def two_workers(service: dict[str, str], tmp_path: Path) -> Iterator[tuple[int, dict[int, Path]]]:  # noqa: F811
    """Two processes of the Procfile's worker line, started together on one folder and one port, as
    a formation's are; yields the port and each process's log by pid."""
    port = free_port()
    env = {**service, "WORKER_METRICS_PORT": str(port)}
    logs = {name: tmp_path / f"{name}.log" for name in ("worker.1", "worker.2")}
    processes = [start_line({**env, "HONCHO_PROCESS_NAME": name}, log) for name, log in logs.items()]
    try:
        wait_for(lambda: all(" ready." in log.read_text(errors="replace") for log in logs.values()), timeout=60,
                 interval=0.2)
        yield port, {process.pid: log for process, log in zip(processes, logs.values(), strict=True)}
    finally:
        for process in processes:
            stop_group(process)


def test_one_worker_process_serves_the_folder_and_another_takes_over_when_it_dies(
        service: dict[str, str], two_workers: tuple[int, dict[int, Path]]) -> None:  # noqa: F811
    port, logs = two_workers
    pids = set(logs)
    serving = wait_for(lambda: listening_pids(port, pids), timeout=10)
    assert len(serving) == 1, serving  # never two servers for one folder
    (server,) = serving
    (other,) = pids - serving
    wait_for(lambda: '"worker_metrics_listening"' in logs[server].read_text(), timeout=10, interval=0.1)
    assert logs[server].read_text().count('"worker_metrics_listening"') == 1
    assert '"worker_metrics_listening"' not in logs[other].read_text()
    wait_for(lambda: '"worker_metrics_standby"' in logs[other].read_text(), timeout=10, interval=0.1)

    # Counters written by both processes, served once: the endpoint's total is what both applied.
    total = 0
    for batch in range(6):
        events = [Event(f"served_{batch}_{i}", "busy", f"+2547{i:08d}", None, None, {}) for i in range(10)]
        queue(service, events)
        total += len(events)
        wait_for(lambda expected=total: sum(applied(log) for log in logs.values()) == expected, timeout=60,
                 interval=0.1)
        if all(applied(log) for log in logs.values()):
            break
    assert all(applied(log) for log in logs.values()), {pid: applied(log) for pid, log in logs.items()}
    wait_for(lambda: scrape(port) == total, timeout=10, interval=0.2)
    time.sleep(WORKER_METRICS_RETRY_SECONDS + 1)  # the standby's retries, which must not double anything
    assert scrape(port) == total
    assert listening_pids(port, pids) == {server}

    # The serving process dies without a word: the other takes the port over and serves the same
    # folder, the dead process's counters included, still once.
    os.kill(server, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: listening_pids(port, pids) == {other}, timeout=TAKEOVER_WITHIN, interval=0.1)
    assert time.monotonic() - killed_at < TAKEOVER_WITHIN
    # The port is bound before the line saying so is written: on a loaded machine the test can see
    # the one before the other.
    wait_for(lambda: '"took_over": true' in logs[other].read_text(), timeout=10, interval=0.1)
    assert scrape(port) == total
    queue(service, [Event("after_takeover", "busy", "+254700000099", None, None, {})])
    wait_for(lambda: scrape(port) == total + 1, timeout=30, interval=0.2)
