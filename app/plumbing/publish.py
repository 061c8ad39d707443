"""Handing events to the broker: the webhook's enqueue, re-sends from the pending set, replays.

On the Redis broker an event is held in the pending set (``app.plumbing.pending``) with its task message,
in one round trip: one script writes both (``app.plumbing.transport.push``). The message is the one
Celery builds and kombu's Redis channel writes, put together here from a template Celery builds
once per process (``TaskMessages``): kombu's producer, its pool and its channel cost more CPU than
the round trip itself (``python -m bench.ack_parts``). tests/test_seams.py checks that the message
is the one kombu would write (seam ``kombu_redis_message_layout``). On RabbitMQ the publish alone
is the guarantee (publisher confirms, persistent messages, durable queues), and Redis is not on the
webhook's path at all; the message, from the same template, is published on a connection of the
server thread's own, again without kombu's producer (``AmqpPublisher``; seam ``kombu_amqp_message``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from base64 import b64encode
from datetime import datetime
from typing import Any

import redis
import structlog
from amqp.exceptions import MessageNacked
from celery import Celery
from flask import Flask, current_app
from kombu import Connection, Queue
from kombu.common import maybe_declare
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.utils.json import dumps
from kombu.utils.uuid import uuid

from app.base.errors import QueueUnavailable
from app.base.logs import mask_phone
from app.payload.envelope import Envelope
from app.payload.events import Event
from app.plumbing import pending
from app.plumbing.queues import APPLY_EVENT_TASK, WEBHOOK_QUEUE
from app.plumbing.transport import push

log = structlog.get_logger(__name__)

PERSISTENT = 2  # kombu's delivery mode for messages that outlive a broker restart (Celery's default)
# What a broker or Redis outage raises on the publishing side.
QUEUE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, KombuOperationalError, OSError)


def enqueue(event: Event, received_at: datetime, request_id: str | None, app: Flask | None = None) -> None:
    """Give the event's task to the broker (held in the pending set on Redis); ``app``, or the
    current app when none is given (the webhook passes its own: it runs without Flask's contexts).

    Raises QueueUnavailable (503) when the broker did not take it, so no 200 goes out for an
    unqueued task.
    """
    envelope = Envelope(event.to_message(), received_at.isoformat(), request_id)
    try:
        send(envelope, WEBHOOK_QUEUE, hold=True, app=app)
    except QUEUE_ERRORS as exc:
        log.warning("enqueue_failed", error_type=type(exc).__name__)
        raise QueueUnavailable("the queue is unavailable; try again", session_id=event.session_id) from None


def send(envelope: Envelope, queue: str, hold: bool = False, app: Flask | None = None) -> None:
    """Publish the event's task; with ``hold``, also hold it in the pending set (Redis broker)."""
    extensions = (app or current_app).extensions
    settings = extensions["settings"]
    held = None
    if hold and settings.broker_is_redis:
        key = envelope.key
        due = time.time() + settings.pending_redelivery_seconds
        if settings.broker_transport_holds_pending:
            held = pending.entry(key, envelope, due)
        else:  # rediss://, unix://, or a Redis other than REDIS_URL's: the entry in a round trip of its own
            pending.add(extensions["redis"], key, envelope, due)
    message = envelope.message
    args = (message, envelope.received_at, envelope.request_id)
    # What Flower and the worker show of the arguments: short, and with the phone masked
    # (Celery's default repr of the whole payload cost a tenth of the ack time).
    argsrepr = (f"session_id={message['session_id']} status={message['status']} "
                f"phone={mask_phone(message.get('phone_number'))}")
    celery = extensions["celery"]
    if settings.broker_transport_holds_pending:
        # The broker is REDIS_URL's Redis (broker_transport_holds_pending): the service's own client
        # writes to it, with no client-side retry, as kombu's publish with retry=False did.
        push(extensions["redis"], queue, dumps(TASK_MESSAGES.build(celery, queue, args, argsrepr)), held,
             settings.redis_min_replicas, settings.redis_replica_timeout_ms)
    elif not settings.broker_is_redis:
        AMQP_PUBLISHER.publish(celery, queue, args, argsrepr)
    else:  # a Redis broker the project's transport does not carry
        celery.send_task(APPLY_EVENT_TASK, args=args, queue=queue, retry=False, argsrepr=argsrepr, kwargsrepr="")


class TaskMessages:
    """The apply task's message as Celery's ``send_task`` builds it (``task``), and as kombu's Redis
    channel writes it (``build``).

    Celery builds the headers once per process (``create_task_message``: protocol 2, this process's
    node name as the origin); each message takes a copy with its own task id and argsrepr, its
    body serialized and encoded as kombu's producer and channel do (JSON, then base64), and the
    properties the channel adds (delivery mode, priority 0, the routing, a delivery tag). A list
    name is the queue's own at priority 0 (seam ``kombu_redis_channel_q_for_pri``).
    """

    def __init__(self) -> None:
        self._pid = 0
        self._headers: dict[str, Any] = {}
        self._embed: dict[str, Any] = {}

    def task(self, celery: Celery, args: tuple[Any, ...], argsrepr: str,
             task_id: str) -> tuple[dict[str, Any], dict[str, Any], str]:
        """(headers, properties, JSON body) of ``create_task_message`` for this task id, from the template."""
        if self._pid != os.getpid():  # built again in a forked child: its origin names its own pid
            headers, _properties, body, _sent_event = celery.amqp.create_task_message(
                "", APPLY_EVENT_TASK, (), {}, ignore_result=True, argsrepr="", kwargsrepr="")
            self._headers, self._embed, self._pid = headers, body[2], os.getpid()
        return ({**self._headers, "id": task_id, "root_id": task_id, "argsrepr": argsrepr},
                {"correlation_id": task_id, "reply_to": ""}, dumps((args, {}, self._embed)))

    def build(self, celery: Celery, queue: str, args: tuple[Any, ...], argsrepr: str,
              task_id: str | None = None, delivery_tag: str | None = None) -> dict[str, Any]:
        """The message as kombu's Redis channel writes it."""
        headers, properties, body = self.task(celery, args, argsrepr, task_id or uuid())
        return {
            "body": b64encode(body.encode()).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {**properties, "delivery_mode": PERSISTENT,
                           "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                           "body_encoding": "base64", "delivery_tag": delivery_tag or uuid()},
        }


TASK_MESSAGES = TaskMessages()


class AmqpPublisher:
    """The apply task's publish on RabbitMQ, as Celery's ``send_task`` publishes it, without kombu's
    producer: its pool, a producer revived and the exchange and queue copied for every publish,
    the declare check, the serializer registry (``python -m bench.ack_parts``: the publish beyond a
    bare confirmed publish).

    Each server thread keeps a connection of its own, made as Celery makes its publishing
    connections (``connection_for_write``: the broker URL with its alternates, publisher confirms,
    the connect timeout), and declares each queue once on it. The message is Celery's, from the
    template Celery built once per process (``TaskMessages.task``: Celery building it whole for
    every publish cost about a tenth of the webhook's CPU, ``python -m bench.profile_ack
    --breakdown``); it is routed as ``send_task`` routes it (a direct exchange by the
    anonymous exchange and the queue's name, any other by the queue's exchange and routing key) and
    published persistent on the connection's channel, which waits for the broker's confirm. Any
    error drops the thread's connection (the next publish connects again, to another node of a
    cluster URL if this one is gone) and is raised as kombu's OperationalError, a nack included.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def publish(self, celery: Celery, queue_name: str, args: tuple[Any, ...], argsrepr: str,
                task_id: str | None = None) -> None:
        headers, properties, body = TASK_MESSAGES.task(celery, args, argsrepr, task_id or uuid())
        queue: Queue = celery.amqp.queues[queue_name]
        exchange, routing_key = route(queue)
        if getattr(self._local, "celery", None) is not celery:  # another app (and broker) in this thread
            self.drop()
        connection: Connection | None = getattr(self._local, "connection", None)
        try:
            if connection is None:
                connection = self._local.connection = celery.connection_for_write()
                self._local.celery, self._local.declared = celery, set()
            channel = connection.default_channel
            if queue_name not in self._local.declared:  # once per connection and queue
                maybe_declare(queue, channel)
                self._local.declared.add(queue_name)
            message = channel.prepare_message(body, priority=0, content_type="application/json",
                                              content_encoding="utf-8", headers=headers,
                                              properties={**properties, "delivery_mode": PERSISTENT})
            channel.basic_publish(message, exchange=exchange, routing_key=routing_key)
        except Exception as exc:
            self.drop()
            errors = (*(connection.connection_errors if connection else ()),
                      *(connection.channel_errors if connection else ()), MessageNacked)
            if isinstance(exc, errors) and not isinstance(exc, KombuOperationalError):
                raise KombuOperationalError(f"{type(exc).__name__}: {exc}") from exc
            raise

    def drop(self) -> None:
        """Forget this thread's connection (closed quietly): the next publish makes a new one."""
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.collect()


def route(queue: Queue) -> tuple[str, str]:
    """(exchange, routing key) as Celery's ``send_task(queue=name)`` publishes to ``queue``."""
    if queue.exchange is None or queue.exchange.type == "direct" or not queue.exchange.name:
        return "", queue.name
    return queue.exchange.name, queue.routing_key or queue.name


AMQP_PUBLISHER = AmqpPublisher()


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
