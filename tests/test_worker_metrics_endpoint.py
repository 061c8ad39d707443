"""app.operating.scrape.WorkerMetricsEndpoint within one process: the election's rules, quickly (the same
with real worker processes: tests/e2e/test_worker_metrics.py)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from app.operating.scrape import WORKER_METRICS_LOCK, WorkerMetricsEndpoint, serve_worker_metrics
from tests.support import free_port, sqlite_only, wait_for

RETRY = 0.2


@pytest.fixture
def endpoints(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[WorkerMetricsEndpoint]]:
    """Endpoints a test starts, stopped at its end; a multiprocess folder of the test's own."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    started: list[WorkerMetricsEndpoint] = []
    yield started
    for endpoint in started:
        endpoint.stop()


def answers(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.status == 200 and b"voice_gauge_source_up" in response.read()


@sqlite_only
def test_one_endpoint_per_port_and_the_next_takes_over(app: Flask, endpoints: list[WorkerMetricsEndpoint],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a multiprocess folder (no lock to take), the port alone decides."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    port = free_port()
    first = WorkerMetricsEndpoint(app, port, RETRY).start()
    endpoints.append(first)
    second = WorkerMetricsEndpoint(app, port, RETRY).start()
    endpoints.append(second)
    assert first.serving and not second.serving
    assert answers(port)
    first.stop()
    wait_for(lambda: second.serving, timeout=RETRY * 20)
    assert answers(port)


@sqlite_only
def test_one_endpoint_per_folder_even_on_another_port(app: Flask, endpoints: list[WorkerMetricsEndpoint],
                                                      tmp_path: Path) -> None:
    """Two ports serving one folder would count every sample twice: the folder's lock prevents it."""
    first = WorkerMetricsEndpoint(app, free_port(), RETRY).start()
    endpoints.append(first)
    other_port = free_port()
    second = WorkerMetricsEndpoint(app, other_port, RETRY).start()
    endpoints.append(second)
    assert (tmp_path / WORKER_METRICS_LOCK).exists()
    assert first.serving and not second.serving
    first.stop()
    wait_for(lambda: second.serving, timeout=RETRY * 20)
    assert answers(other_port)


@sqlite_only
def test_port_zero_serves_nothing(app: Flask, endpoints: list[WorkerMetricsEndpoint]) -> None:
    assert serve_worker_metrics(app, 0) is None
