"""Prometheus instruments, correct across several gunicorn and Celery processes.

With PROMETHEUS_MULTIPROC_DIR set, every process writes its counters and histograms to files there,
and a scrape adds them up; without it, a process serves its own. The web and the worker each get a
folder of their own (the Procfile appends ``/web`` and ``/worker``), so the web's ``/metrics``
serves the web processes' samples and the worker's port the worker processes': a Prometheus that
scrapes both counts every event once.

This module only records; what a scrape returns (the shared-state gauges, the worker's one endpoint
per host) is ``app.operating.scrape``, which reads the rest of the service.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import structlog
from prometheus_client import Counter, Gauge, Histogram

log = structlog.get_logger(__name__)

WEBHOOKS = Counter("voice_webhooks_total", "Webhook requests by outcome and reason.", ["outcome", "reason"])
ACK_SECONDS = Histogram(
    "voice_webhook_ack_seconds",
    "Time from the webhook request's start to its answer.",
    buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
EVENTS = Counter(
    "voice_events_total", "Events processed by workers, by outcome (applied, no_effect, duplicate, retried, "
    "dead_lettered).", ["outcome"]
)
EVENT_LAG = Histogram(
    "voice_event_lag_seconds",
    "Time from the webhook's arrival to the commit of its event.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


# One series per live process (the scrape adds a pid label in multiprocess mode): a process that
# grows shows as itself, not hidden in a sum.
PROCESS_MEMORY = Gauge("voice_process_resident_memory_bytes", "Resident memory of each web and worker process.",
                       ["role"], multiprocess_mode="liveall")
PROCESS_MEMORY_INTERVAL_SECONDS = 5.0
_memory_tracked_in: int | None = None  # the pid whose thread runs: a forked child starts its own


def track_process_memory(role: str) -> None:
    """Report this process's resident memory every few seconds, from a daemon thread."""
    global _memory_tracked_in
    if _memory_tracked_in == os.getpid():
        return
    _memory_tracked_in = os.getpid()
    gauge = PROCESS_MEMORY.labels(role=role)

    def report() -> None:
        while True:
            gauge.set(_resident_bytes())
            time.sleep(PROCESS_MEMORY_INTERVAL_SECONDS)

    threading.Thread(target=report, name="voice-process-memory", daemon=True).start()


def _resident_bytes() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):  # not Linux: report nothing rather than a wrong figure
        return 0.0
    return float(pages * os.sysconf("SC_PAGE_SIZE"))


def forget_process(pid: int) -> None:
    """Drop a process's live gauge files when it exits, so its memory series ends with it."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def observe_webhook(outcome: str, reason: str, seconds: float) -> None:
    WEBHOOKS.labels(outcome=outcome, reason=reason).inc()
    ACK_SECONDS.observe(seconds)


UNKNOWN_AT_VALUES = Counter(
    "voice_unknown_at_values_total", "Values in AT callbacks that the mapping tables do not know, by field.", ["field"]
)
_UNKNOWN_LOGGED: set[tuple[str, str]] = set()
_UNKNOWN_LOG_LIMIT = 1000  # distinct values logged per process; a flood of new ones is only counted


def note_unknown_at_values(values: tuple[tuple[str, str], ...]) -> None:
    """Count every unknown AT value; log each distinct one once per process."""
    for field, value in values:
        UNKNOWN_AT_VALUES.labels(field=field).inc()
        if (field, value) not in _UNKNOWN_LOGGED and len(_UNKNOWN_LOGGED) < _UNKNOWN_LOG_LIMIT:
            _UNKNOWN_LOGGED.add((field, value))
            log.warning("unknown_at_value", field=field, value=value[:100])


# The sweeper's clock (beat) is watched: every sweep records when it ran and how often it should.
# "max" over the processes: the latest sweep any worker ran, kept after that process exits.
SWEEP_LAST_RUN = Gauge("voice_sweep_last_run_timestamp_seconds", "When a worker last ran the sweeper (Unix time).",
                       multiprocess_mode="max")
SWEEP_INTERVAL = Gauge("voice_sweep_interval_seconds", "How often beat is set to send the sweeper.",
                       multiprocess_mode="max")


def note_sweep(interval_seconds: float) -> None:
    SWEEP_LAST_RUN.set(time.time())
    SWEEP_INTERVAL.set(interval_seconds)


def observe_event(outcome: str, lag_seconds: float | None = None, count: int = 1) -> None:
    """``count`` events with this outcome; the lag (seconds since arrival) of one of them."""
    EVENTS.labels(outcome=outcome).inc(count)
    if lag_seconds is not None:
        EVENT_LAG.observe(max(lag_seconds, 0.0))


# The last samples each state gauge was read as, in this process: what a scrape shows while the
# gauge's source is down.
_PID_IN_NAME = re.compile(r"_(\d+)\.db$")


def prune_dead_process_files() -> int:
    """Drop the sample files of processes that no longer run (a restart reads as a counter reset).

    Called as web and worker start, so a host's metrics folder does not grow with every restart.
    """
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return 0
    removed = 0
    for path in Path(folder).glob("*.db"):
        match = _PID_IN_NAME.search(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


