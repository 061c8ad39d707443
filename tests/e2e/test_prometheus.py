"""A real Prometheus scraping a running stack: counters counted once, the backlog alert firing and
resolving, every dashboard query answering, and state gauges that stay while their source is down."""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.e2e.prometheus import Prometheus, dashboard_queries, has_number
from tests.e2e.stack import Stack
from tests.support import PostgresServer, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


class Stream:
    """Webhooks posted at a steady rate from a thread until stopped; counts what was answered 200."""

    def __init__(self, port: int, per_second: float) -> None:
        self.port, self.interval = port, 1 / per_second
        self.accepted = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.prefix = f"stream_{uuid.uuid4().hex[:6]}"

    def _run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            body = urlencode({"sessionId": f"{self.prefix}_{n}", "status": "busy"}).encode()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("POST", "/api/v1/voice/webhook", body,
                             {"Content-Type": "application/x-www-form-urlencoded"})
                if conn.getresponse().status == 200:
                    self.accepted += 1
            except (OSError, http.client.HTTPException):
                pass  # a refused or dropped request is not counted; the stream goes on
            finally:
                conn.close()
            n += 1
            self.stopped.wait(self.interval)

    def __enter__(self) -> Stream:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Prometheus, PostgresServer]]:
    """A stack on a PostgreSQL of its own (the last test stops it) and a Prometheus scraping it."""
    workdir = Path(tmp_path_factory.mktemp("prometheus"))
    postgres = PostgresServer().init().start()
    stack = Stack(workdir, postgres.url)
    prometheus = Prometheus(workdir / "prometheus", {
        "voice-web": [f"127.0.0.1:{stack.port}"], "voice-worker": [f"127.0.0.1:{stack.metrics_port}"]})
    try:
        stack.start()
        prometheus.start()
        yield stack, prometheus, postgres
    finally:
        prometheus.stop()
        stack.stop()
        postgres.remove()


def both_targets_up(prometheus: Prometheus) -> bool:
    return prometheus.value('sum(up{job=~"voice-web|voice-worker"})') == 2


def test_a_counter_is_counted_once_across_the_web_and_worker_jobs(observed: tuple) -> None:
    stack, prometheus, _ = observed
    wait_for(lambda: both_targets_up(prometheus), timeout=30, interval=0.5)
    stack.wait_until_idle()
    accepted = 'sum(voice_webhooks_total{outcome="accepted"})'
    applied = 'sum(voice_events_total{outcome="applied"})'
    before_accepted = wait_for(lambda: _settled(prometheus, accepted), timeout=20, interval=0.5)[0]
    before_applied = wait_for(lambda: _settled(prometheus, applied), timeout=20, interval=0.5)[0]
    sessions = [f"once_{uuid.uuid4().hex[:8]}_{n}" for n in range(20)]
    for session in sessions:
        assert stack.post_form({"sessionId": session, "status": "busy"})[0] == 200
    for session in sessions:
        stack.wait_for_events(session, 1)
    # 20 webhooks sent, 20 distinct events: a Prometheus summing both jobs sees 20 of each, not 40.
    wait_for(lambda: prometheus.value(accepted) == before_accepted + 20, timeout=20, interval=0.5)
    wait_for(lambda: prometheus.value(applied) == before_applied + 20, timeout=20, interval=0.5)
    print(f"\n{accepted} = {prometheus.value(accepted)} (before {before_accepted}); "
          f"{applied} = {prometheus.value(applied)} (before {before_applied})")
    jobs = {r["metric"]["job"] for r in prometheus.query('sum by (job) (voice_events_total{outcome="applied"})')}
    assert jobs == {"voice-worker"}
    assert prometheus.query('voice_webhooks_total{job="voice-worker"}') == []


def _settled(prometheus: Prometheus, expr: str) -> tuple[float] | None:
    """The value of ``expr`` once two scrapes apart agree (the last events' samples are in)."""
    first = prometheus.value(expr) or 0.0
    time.sleep(1.1)  # one scrape interval: the condition is agreement across scrapes
    return (first,) if (prometheus.value(expr) or 0.0) == first else None


def test_the_backlog_alert_fires_with_the_worker_stopped_and_resolves_when_it_is_back(observed: tuple) -> None:
    stack, prometheus, _ = observed
    assert prometheus.firing("VoiceQueueBacklogGrowing") == []
    with Stream(stack.port, per_second=30) as stream:
        stack.stop_process("worker")
        stopped_at = time.time()
        try:
            firing = wait_for(lambda: prometheus.firing("VoiceQueueBacklogGrowing"), timeout=60, interval=0.5)
            assert firing[0]["labels"]["queue"] == "voice-webhooks"
            assert float(firing[0]["value"]) > 100
            # No worker answers its metrics port either: that alert fires too.
            wait_for(lambda: prometheus.firing("VoiceWorkerMetricsAbsent"), timeout=30, interval=0.5)
        finally:
            stack.start_worker()
        wait_for(lambda: not prometheus.alerts("VoiceQueueBacklogGrowing"), timeout=60, interval=0.5)
        resolved_at = time.time()
    assert stream.accepted > 100
    # Prometheus's own record of it: the ALERTS series, firing between the stop and the resolution.
    series = prometheus.query_range('ALERTS{alertname="VoiceQueueBacklogGrowing", alertstate="firing"}',
                                    stopped_at - 5, resolved_at + 1)
    assert series, "no ALERTS samples"
    times = [float(t) for t, _ in series[0]["values"]]
    print(f"\nVoiceQueueBacklogGrowing activeAt={firing[0]['activeAt']} firing from {min(times):.0f} "
          f"to {max(times):.0f} (worker stopped at {stopped_at:.0f}, resolution seen at {resolved_at:.0f})")
    assert stopped_at < min(times) <= max(times) < resolved_at + 1
    stack.wait_until_idle()


def test_every_dashboard_query_returns_data(observed: tuple) -> None:
    stack, prometheus, _ = observed
    with Stream(stack.port, per_second=20):
        wait_for(lambda: both_targets_up(prometheus), timeout=30, interval=0.5)
        for title, expr in dashboard_queries("1m"):
            result = wait_for(lambda expr=expr: has_number(result := prometheus.query(expr)) and result,
                              timeout=20, interval=0.5)
            print(f"{title}: {expr} -> {len(result)} series")


def test_state_gauges_stay_with_their_source_down_and_the_companion_alert_fires(observed: tuple) -> None:
    _, prometheus, postgres = observed
    # Both jobs have read the gauge at least once (a process that never could has no last value).
    both_read = 'count(voice_gauge_source_up{gauge="voice_dead_letters"} == 1)'
    wait_for(lambda: prometheus.value(both_read) == 2, timeout=30, interval=0.5)
    postgres.stop("immediate")
    try:
        _gauge_stays(prometheus)
    finally:
        postgres.start()
    wait_for(lambda: prometheus.value(both_read) == 2, timeout=30, interval=0.5)


def _gauge_stays(prometheus: Prometheus) -> None:
    down = 'max by (job) (voice_gauge_source_up{gauge="voice_dead_letters"})'
    wait_for(lambda: [r["value"][1] for r in prometheus.query(down)] == ["0", "0"], timeout=30, interval=0.5)
    # The series is still there on both jobs, at the last value read (no dead letters: 0)...
    values = {r["metric"]["job"]: r["value"][1] for r in prometheus.query("voice_dead_letters")}
    print(f"\ndatabase stopped: {down} = {[(r['metric']['job'], r['value'][1]) for r in prometheus.query(down)]}; "
          f"voice_dead_letters = {values}")
    assert values == {"voice-web": "0", "voice-worker": "0"}
    # ...and the companion alert says the value is stale.
    firing = wait_for(lambda: prometheus.firing("VoiceGaugeSourceDown"), timeout=30, interval=0.5)
    assert {alert["labels"]["gauge"] for alert in firing} == {"voice_dead_letters"}
    print(f"VoiceGaugeSourceDown firing: {[(a['labels']['gauge'], a['activeAt']) for a in firing]}")
    assert prometheus.alerts("VoiceDeadLettersGaugeAbsent") == []
