"""Prometheus metrics, correct across several gunicorn and Celery processes.

With PROMETHEUS_MULTIPROC_DIR set (the Procfile sets it), every process writes its samples to
files there and /metrics aggregates them; without it, the process's own registry is served.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import REGISTRY as PROCESS_REGISTRY
from prometheus_client.multiprocess import MultiProcessCollector

WEBHOOKS = Counter("voice_webhooks_total", "Webhook requests by outcome and reason.", ["outcome", "reason"])
ACK_SECONDS = Histogram(
    "voice_webhook_ack_seconds",
    "Time from request start to the webhook's answer.",
    buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
EVENTS = Counter("voice_events_total", "Events processed by workers, by outcome.", ["outcome"])
EVENT_LAG = Histogram(
    "voice_event_lag_seconds",
    "Time from the webhook's arrival to the event's commit.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def observe_webhook(outcome: str, reason: str, seconds: float) -> None:
    WEBHOOKS.labels(outcome=outcome, reason=reason).inc()
    ACK_SECONDS.observe(seconds)


def observe_event(outcome: str, lag_seconds: float | None = None) -> None:
    EVENTS.labels(outcome=outcome).inc()
    if lag_seconds is not None:
        EVENT_LAG.observe(max(lag_seconds, 0.0))


def render() -> tuple[bytes, str]:
    """The text exposition of every process's metrics (or this process's alone)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(PROCESS_REGISTRY), CONTENT_TYPE_LATEST
