"""Celery bound to the Flask app: every task runs inside an app context.

Each reliability setting carries its reason; together they give at-least-once delivery, and the
dedup claim plus the database fingerprint make it exactly once in effect.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import structlog
from celery import Celery, Task, signals
from flask import Flask

from app.base import metrics
from app.base.heap import freeze_startup_heap
from app.base.logs import configure_logging
from app.operating import scrape
from app.plumbing.queues import (
    MAINTENANCE_QUEUE,
    PRUNE_TASK,
    SWEEP_TASK,
    WEBHOOK_QUEUE,
    dead_letter_queue,
    queue_config,
)
from config import Settings

# A task runs in milliseconds; the limits only stop one stuck on a hung connection. They sit above
# the database's own lock and statement timeouts (app.engine_options), which fail first as
# transient errors, and below the dedup claim's TTL, so a live task never loses its claim.
# Celery enforces them in prefork pools only: the Procfile's solo processes rely on the timeouts
# of every call a task makes instead (PostgreSQL: statement, lock, connect and TCP user timeouts;
# Redis: the socket timeout, Settings.redis_socket_timeout), which bound a stuck call the same way.
TASK_SOFT_TIME_LIMIT = 12
TASK_TIME_LIMIT = 15
# Redis transport: a message taken but not acknowledged goes back to its queue after this long.
# Trade-off: shorter brings a killed worker's messages back sooner; but it must stay well above
# the longest a live worker holds a message (a task's hard limit, and a retry's countdown, which
# waits in the worker unacknowledged: tasks.BACKOFF_MAX_SECONDS), or live work is delivered twice
# (harmless in effect thanks to dedup, but wasted). 45 s is three hard limits and 1.5 countdowns.
VISIBILITY_TIMEOUT = 45
# How often a worker looks for messages past their visibility timeout. kombu's default looks every
# 10 s but scans only every 10th look (100 s); scanning every 5 s bounds a killed worker's
# redelivery by 50 s, for one cheap sorted-set range query per worker every 5 s.
UNACKED_RESTORE_INTERVAL = 5


def celery_config(settings: Settings) -> dict[str, Any]:
    broker_is_redis = settings.broker_is_redis
    # kombu's own reconnect on first use waits 2 s between tries by default; a publisher gives up
    # at once instead, so the webhook answers 503 within a second (the worker's consumer
    # reconnects patiently by the broker_connection_* settings).
    transport_options: dict[str, Any] = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1,
                                         "interval_max": 0.1}
    if broker_is_redis:
        transport_options |= {
            "visibility_timeout": VISIBILITY_TIMEOUT,
            "unacked_restore_interval": UNACKED_RESTORE_INTERVAL,
            "unacked_restore_throttle": 1,
            # The restore holds a Redis mutex for milliseconds; a worker killed while holding it
            # would block every restore until it expires (kombu's default: 300 s).
            "unacked_mutex_expire": 30,
            # Publishing on the webhook's path must fail fast when Redis is down or hung; a
            # held write may also wait REDIS_REPLICA_TIMEOUT_MS for its replicas.
            "socket_timeout": settings.redis_socket_timeout * 2
            + (settings.redis_replica_timeout_ms / 1000 if settings.redis_min_replicas else 0),
            "socket_connect_timeout": settings.redis_socket_timeout,
            "min_replicas": settings.redis_min_replicas,
            "replica_timeout_ms": settings.redis_replica_timeout_ms,
            # A worker takes the apply messages waiting behind the one BRPOP gave it, up to its
            # batch, in one round trip (app.plumbing.transport).
            "take_ahead_queues": (WEBHOOK_QUEUE,) if settings.worker_batch_size > 1 else (),
        }
        if settings.broker_is_sentinel:
            # kombu asks the sentinels for this master on every new connection, so publishers
            # and consumers follow a failover; the sentinels themselves must answer fast too.
            transport_options |= {
                "master_name": settings.redis_sentinel_master,
                "sentinel_kwargs": {"socket_timeout": settings.redis_socket_timeout,
                                    "socket_connect_timeout": settings.redis_socket_timeout},
            }
    else:
        # A webhook is answered 200 only once RabbitMQ confirmed the publish (messages are
        # persistent and queues durable by Celery's defaults).
        transport_options |= {"connect_timeout": 1, "confirm_publish": True}
    return {
        "broker_url": settings.broker_url,
        "broker_transport": broker_transport(settings),
        **queue_config(settings),
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 1,
        # Results are never read; the database holds the outcome.
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Acknowledge only after the task returned, i.e. after its transaction committed.
        "task_acks_late": True,
        # A worker process killed mid-task sends its message back instead of acknowledging it.
        "task_reject_on_worker_lost": True,
        # On the Redis broker a worker process takes as many messages as it applies in one
        # transaction (WORKER_BATCH_SIZE, app.applying.fastpath); elsewhere it applies one at a
        # time, and takes one: none sits reserved behind a slow task or dies with it.
        "worker_prefetch_multiplier": settings.worker_batch_size if settings.broker_is_redis else 1,
        "task_soft_time_limit": TASK_SOFT_TIME_LIMIT,
        "task_time_limit": TASK_TIME_LIMIT,
        "task_default_queue": WEBHOOK_QUEUE,
        "task_routes": {SWEEP_TASK: {"queue": MAINTENANCE_QUEUE}, PRUNE_TASK: {"queue": MAINTENANCE_QUEUE}},
        # No task events unless someone watches: they cost three Redis PUBLISHes per task. Flower
        # turns them on in every worker when it starts (and every few seconds after: its
        # enable_events option), so it still sees every task; `celery worker -E` turns them on too.
        "worker_send_task_events": False,
        # No task-sent event from the web: it cost one more Redis publish on every webhook (a
        # fifth of the ack time), and Flower learns of each task from the worker's events anyway.
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        # On a lost broker connection a running task's ack cannot be sent: cancel it, and its
        # message comes back (dedup makes the second run harmless).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "beat_schedule": {
            "sweep-pending": {
                "task": SWEEP_TASK,
                "schedule": settings.sweep_interval_seconds,
                "options": {"queue": MAINTENANCE_QUEUE, "expires": 60},
            },
            **_retention_schedule(settings),
        },
    }


def broker_transport(settings: Settings) -> str | None:
    """The project's transport wherever it serves the broker URL (else kombu's own by scheme)."""
    if not settings.broker_transport_holds_pending:
        return None
    if settings.broker_is_sentinel:
        return "app.plumbing.transport:SentinelTransport"
    return "app.plumbing.transport:Transport"


def _retention_schedule(settings: Settings) -> dict[str, Any]:
    """Hourly prune when EVENT_RETENTION_DAYS is set: once caught up, each run deletes the events that
    crossed the window in the last hour; a first run on a large table is better done by hand
    (``flask voice prune``), since each run stops after a few seconds."""
    if not settings.event_retention_days:
        return {}
    return {"prune-events": {"task": PRUNE_TASK, "schedule": 3600.0,
                             "options": {"queue": MAINTENANCE_QUEUE, "expires": 3000}}}


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with app.app_context():
                return self.run(*args, **kwargs)

    settings = app.extensions["settings"]

    @signals.setup_logging.connect(weak=False)
    def _logging(**_kwargs: Any) -> None:
        """The service's structured logs in the worker too, instead of Celery's own setup."""
        configure_logging(settings.log_level, settings.log_format)

    @signals.task_postrun.connect(weak=False)
    def _forget_task_log_context(**_kwargs: Any) -> None:
        """The apply task binds its event_key, task_id... to the log context; left there, they would
        label every line the process logs after the task (Celery's, the next message's)."""
        structlog.contextvars.clear_contextvars()

    @signals.worker_init.connect(weak=False)
    def _prune_metrics(**_kwargs: Any) -> None:
        metrics.prune_dead_process_files()

    @signals.worker_ready.connect(weak=False)
    def _declare_dead_letter_queue(**_kwargs: Any) -> None:
        if settings.celery_queue_type == "quorum":  # before any message can reach the delivery limit
            with celery_app.connection_for_write() as connection:
                dead_letter_queue().bind(connection.default_channel).declare()

    @signals.worker_ready.connect(weak=False)
    def _metrics_port(**_kwargs: Any) -> None:
        scrape.serve_worker_metrics(app, settings.worker_metrics_port)
        metrics.track_process_memory("worker")  # the main process: it fetches and acknowledges

    @signals.worker_process_init.connect(weak=False)
    def _pool_process_memory(**_kwargs: Any) -> None:
        metrics.track_process_memory("worker")

    @signals.worker_ready.connect(weak=False)
    @signals.worker_process_init.connect(weak=False)
    def _freeze_startup_heap(**_kwargs: Any) -> None:
        """The worker (or a pool process) is ready: what start-up made, out of the garbage
        collector's walks (app.base.heap)."""
        freeze_startup_heap()

    @signals.worker_process_shutdown.connect(weak=False)
    def _pool_process_gone(pid: int | None = None, **_kwargs: Any) -> None:
        metrics.forget_process(pid or os.getpid())

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.flask_app = app  # type: ignore[attr-defined]  # for code that runs outside a task (app.applying.fastpath)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    importlib.import_module("app.applying.tasks")  # registers the shared tasks with this Celery app

    return celery_app
