"""Handing events to the broker: the webhook's enqueue, re-sends from the pending set, replays.

On the Redis broker an event is held in the pending set (``app.plumbing.pending``) with its task message,
in one round trip: the project's transport writes both in one script (``app.plumbing.transport``). On
RabbitMQ the publish alone is the guarantee (publisher confirms, persistent messages, durable
queues), and Redis is not on the webhook's path at all.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import redis
import structlog
from celery import Celery
from flask import current_app
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.utils.uuid import uuid

from app.base.errors import QueueUnavailable
from app.base.logs import mask_phone
from app.payload.envelope import Envelope
from app.payload.events import Event
from app.plumbing import pending
from app.plumbing.queues import APPLY_EVENT_TASK, WEBHOOK_QUEUE
from app.plumbing.transport import HOLD_HEADER

log = structlog.get_logger(__name__)

PERSISTENT = 2  # kombu's delivery mode for messages that outlive a broker restart (Celery's default)
# What a broker or Redis outage raises on the publishing side.
QUEUE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, KombuOperationalError, OSError)


def enqueue(event: Event, received_at: datetime, request_id: str | None) -> None:
    """Give the event's task to the broker (held in the pending set on Redis).

    Raises QueueUnavailable (503) when the broker did not take it, so no 200 goes out for an
    unqueued task.
    """
    envelope = Envelope(event.to_message(), received_at.isoformat(), request_id)
    try:
        send(envelope, WEBHOOK_QUEUE, hold=True)
    except QUEUE_ERRORS as exc:
        log.warning("enqueue_failed", error_type=type(exc).__name__)
        raise QueueUnavailable("the queue is unavailable; try again", session_id=event.session_id) from None


def send(envelope: Envelope, queue: str, hold: bool = False) -> None:
    """Publish the event's task; with ``hold``, also hold it in the pending set (Redis broker)."""
    settings = current_app.extensions["settings"]
    headers = None
    if hold and settings.broker_is_redis:
        key = envelope.key
        due = time.time() + settings.pending_redelivery_seconds
        if settings.broker_transport_holds_pending:
            headers = {HOLD_HEADER: pending.entry(key, envelope, due)}
        else:  # rediss://, unix://, or a Redis other than REDIS_URL's: the entry in a round trip of its own
            pending.add(pending.redis_client(), key, envelope, due)
    message = envelope.message
    args = (message, envelope.received_at, envelope.request_id)
    # What Flower and the worker show of the arguments: short, and with the phone masked
    # (Celery's default repr of the whole payload cost a tenth of the ack time).
    argsrepr = (f"session_id={message['session_id']} status={message['status']} "
                f"phone={mask_phone(message.get('phone_number'))}")
    celery = current_app.extensions["celery"]
    if settings.broker_transport_holds_pending:
        _publish_on_redis(celery, queue, args, headers or {}, argsrepr)
    else:
        celery.send_task(APPLY_EVENT_TASK, args=args, queue=queue, retry=False, headers=headers,
                         argsrepr=argsrepr, kwargsrepr="")


def _publish_on_redis(celery: Celery, queue: str, args: tuple[Any, ...], headers: dict[str, Any],
                      argsrepr: str) -> None:
    """Celery builds the task message and kombu writes it, as ``send_task`` would, without the
    layers around them that cost most of the publish's CPU (``bench/profile_ack.py``): routing
    by name, option merging, declaring the queue (a list on Redis needs none: the push makes
    it), and a result object nobody reads."""
    task_headers, properties, body, _sent_event = celery.amqp.create_task_message(
        uuid(), APPLY_EVENT_TASK, args, {}, ignore_result=True, argsrepr=argsrepr, kwargsrepr="")
    task_headers.update(headers)
    with celery.producer_or_acquire() as producer:
        producer.publish(body, routing_key=queue, exchange="", serializer="json", headers=task_headers,
                         delivery_mode=PERSISTENT, declare=[], retry=False, **properties)


def resend_due(now: float | None = None) -> int:
    """Send again every accepted event that no worker has applied or touched in time."""
    if not pending.in_use():
        return 0
    due = pending.take_due(time.time() if now is None else now)
    for envelope in due:
        send(envelope, WEBHOOK_QUEUE)
    if due:
        log.warning("pending_redelivered", count=len(due))
    return len(due)
