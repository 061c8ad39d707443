"""What a metrics scrape returns: every process's samples, the shared-state gauges, and the worker
role's one endpoint per host.

Gauges of shared state (queue depth, pending events, dead letters) are read from Redis, the broker
and the database at scrape time, so any process reports the same numbers (aggregate them with
``max``). When a source cannot be read, the gauge keeps the last value this process read and
``voice_gauge_source_up{gauge}`` says 0, so the series never vanishes during the outage that
matters most. Of a host's worker processes, one at a time serves the port
(``WorkerMetricsEndpoint``): the others stand by and take it over when that one dies.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from io import BufferedRandom
from pathlib import Path
from typing import Any

import structlog
from flask import Flask
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import REGISTRY as PROCESS_REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from app.operating.gauges import queue_depths, state_counts

log = structlog.get_logger(__name__)


Samples = list[tuple[tuple[str, ...], float]]
_LAST_READ: dict[str, Samples] = {}

SOURCE_UP = "voice_gauge_source_up"


def _queue_depth() -> Samples:
    return [((queue,), float(count)) for queue, count in queue_depths().items()]


def _state(name: str) -> Callable[[], Samples]:
    def read() -> Samples:
        return [((), float(state_counts(name)))]

    return read


# name, help, label names, reader (which source it asks: the broker, Redis, the database and Redis)
STATE_GAUGES = (
    ("voice_queue_depth", "Messages waiting in each queue.", ["queue"], _queue_depth),
    ("voice_pending_events", "Events accepted and not yet applied.", [], _state("pending")),
    ("voice_dead_letters", "Dead letters not yet replayed (database and Redis).", [], _state("dead_letters")),
    ("voice_hook_backlog", "Ready-hook sends committed and not yet accepted by the broker (the outbox).", [],
     _state("hook_backlog")),
)


class StateCollector(Collector):
    """Gauges read from shared state at scrape time; a source that fails keeps its last value."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            SOURCE_UP, "1 when the gauge was read at this scrape; 0 when its source failed and the gauge shows "
            "the last value this process read.", labels=["gauge"])
        with self.app.app_context():
            for name, help_text, labels, reader in STATE_GAUGES:
                try:
                    samples = reader()
                except Exception as exc:  # the source is down: show the last value read, flagged
                    log.warning("metrics_gauge_failed", metric=name, error_type=type(exc).__name__)
                    up.add_metric([name], 0)
                    samples = _LAST_READ.get(name)
                else:
                    up.add_metric([name], 1)
                    _LAST_READ[name] = samples
                if samples is None:
                    continue  # never read in this process: absent, which the absent() alert catches
                family = GaugeMetricFamily(name, help_text, labels=labels)
                for values, value in samples:
                    family.add_metric(list(values), value)
                yield family
        yield up


def registry_for(app: Flask) -> CollectorRegistry:
    """What a scrape returns: every process's samples (or this one's) and the shared-state gauges."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        for collector in list(PROCESS_REGISTRY._collector_to_names):
            registry.register(collector)
    registry.register(StateCollector(app))
    return registry


def render(app: Flask) -> tuple[bytes, str]:
    return generate_latest(registry_for(app)), CONTENT_TYPE_LATEST


WORKER_METRICS_RETRY_SECONDS = 3.0
WORKER_METRICS_LOCK = "worker-metrics.lock"


class WorkerMetricsEndpoint:
    """The worker role's one scrape endpoint on a host, served by whichever worker process holds it.

    Every worker process of a host writes its samples to the same multiprocess folder, and any one
    of them can serve all of it (MultiProcessCollector adds the files up); exactly one must, or
    every sum would be counted twice. Each process tries to take the port; the one that gets it
    serves, the others try again every ``retry_seconds``, so that when the serving process dies
    (even by SIGKILL: the kernel closes its socket) another takes over. A lock on a file in the
    folder (flock, which the kernel also drops with its process) keeps a second process from
    serving the same folder on another port or in another network namespace.
    """

    def __init__(self, app: Flask, port: int, retry_seconds: float = WORKER_METRICS_RETRY_SECONDS) -> None:
        self.port, self.retry_seconds = port, retry_seconds
        self.registry = registry_for(app)
        self.server: Any = None
        self._lock: BufferedRandom | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._standby_logged = self._lock_warned = False

    @property
    def serving(self) -> bool:
        return self.server is not None

    def start(self) -> WorkerMetricsEndpoint:
        """Serve now if this process can, else keep trying from a daemon thread."""
        if not self._try_to_serve():
            self._thread = threading.Thread(target=self._keep_trying, name="voice-worker-metrics", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (or trying) and let another process take over; a process's exit does as much."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=self.retry_seconds + 5)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _keep_trying(self) -> None:
        while not self._stopped.wait(self.retry_seconds):
            if self._try_to_serve():
                return

    def _try_to_serve(self) -> bool:
        from prometheus_client import start_http_server

        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        try:
            lock = self._lock_folder(Path(folder) / WORKER_METRICS_LOCK) if folder else None
        except BlockingIOError:
            self._standby("another worker process serves this metrics folder")
            return False
        try:
            server, _thread = start_http_server(self.port, addr="0.0.0.0", registry=self.registry)  # noqa: S104
        except OSError as exc:
            if lock is not None:
                lock.close()
            self._standby(f"port {self.port}: {exc.strerror or exc}")
            return False
        if self._stopped.is_set():  # stopped while binding: do not serve after all
            server.shutdown()
            server.server_close()
            if lock is not None:
                lock.close()
            return False
        self.server, self._lock = server, lock
        log.info("worker_metrics_listening", port=self.port, took_over=self._standby_logged)
        return True

    def _lock_folder(self, path: Path) -> BufferedRandom | None:
        """The folder's serving lock, taken without waiting: the open file that holds it, or None
        when it cannot be had (the port alone decides then). BlockingIOError: another process has it."""
        try:
            handle = open(path, "a+b")  # noqa: SIM115 - held open while this process serves
        except OSError as exc:
            self._lock_unavailable(path, exc)
            return None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise
        except OSError as exc:  # a filesystem without locks
            handle.close()
            self._lock_unavailable(path, exc)
            return None
        return handle

    def _lock_unavailable(self, path: Path, error: OSError) -> None:
        if not self._lock_warned:
            self._lock_warned = True
            log.warning("worker_metrics_lock_unavailable", path=str(path), error=str(error))

    def _standby(self, reason: str) -> None:
        if not self._standby_logged:  # once: the retries every few seconds say nothing new
            self._standby_logged = True
            log.info("worker_metrics_standby", port=self.port, reason=reason, retry_s=self.retry_seconds)


def serve_worker_metrics(app: Flask, port: int,
                         retry_seconds: float = WORKER_METRICS_RETRY_SECONDS) -> WorkerMetricsEndpoint | None:
    """The worker's scrape endpoint on ``port`` (0 turns it off), served by one worker process of
    the host at a time (``WorkerMetricsEndpoint``); never stops the worker."""
    global _worker_endpoint
    if not port:
        return None
    _worker_endpoint = WorkerMetricsEndpoint(app, port, retry_seconds).start()
    return _worker_endpoint


# Held for the process's life: collected, the endpoint would close its lock file, and the lock with it.
_worker_endpoint: WorkerMetricsEndpoint | None = None
