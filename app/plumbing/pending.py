"""The Redis pending set: every event accepted on the Redis broker, held until it is applied.

Celery's Redis transport loses a message taken by a worker that dies before recording it as
unacknowledged; the pending set closes that window. Its entry is written with the task message
in one round trip (``app.plumbing.transport``), dropped when the event's transaction commits
(``app.plumbing.dedup.finish``), and re-sent by the sweeper (``app.plumbing.publish.resend_due``) when no worker
applied it in time. On RabbitMQ the broker's acknowledgements close the window: no pending set.
"""

from __future__ import annotations

import time
from typing import Any

import redis
import structlog
from flask import current_app

from app.payload.envelope import Envelope

log = structlog.get_logger(__name__)

PENDING_DATA = "voice:pending:data"  # hash: event key -> envelope JSON
PENDING_DUE = "voice:pending:due"  # sorted set: event key -> when the sweeper may send it again
PENDING_SENDS = "voice:pending:sends"  # hash: event key -> how often the sweeper sent it again
# Each re-send of one event waits twice as long as the one before (up to 2**6 times
# PENDING_REDELIVERY_SECONDS), so a backlog that outlasts the redelivery age costs a few cheap
# duplicates per event, not one per sweep.
MAX_RESEND_DOUBLINGS = 6
SWEEP_BATCH = 500


def in_use() -> bool:
    """Whether accepted events are held here: only when Redis is the broker."""
    return bool(current_app.extensions["settings"].broker_is_redis)


def redis_client() -> redis.Redis:
    return current_app.extensions["redis"]


def entry(key: str, envelope: Envelope, due: float) -> dict[str, Any]:
    """The pending entry in the form the project's transport writes along with the message."""
    return {"hash": PENDING_DATA, "zset": PENDING_DUE, "field": key, "value": envelope.to_json(), "score": due}


def add(client: redis.Redis, key: str, envelope: Envelope, due: float) -> None:
    """Hold an event on its own (a replay, or a broker the project's transport does not carry)."""
    pipe = client.pipeline(transaction=True)
    pipe.hsetnx(PENDING_DATA, key, envelope.to_json())
    pipe.zadd(PENDING_DUE, {key: due}, nx=True)
    pipe.execute()


def due_at(seconds_from_now: float = 0.0) -> float:
    return time.time() + seconds_from_now + current_app.extensions["settings"].pending_redelivery_seconds


def postpone(key: str, seconds: float) -> None:
    """A worker holds this event (or will retry it): the sweeper leaves it alone till then."""
    if not in_use():
        return
    try:
        redis_client().zadd(PENDING_DUE, {key: due_at(seconds)}, xx=True)
    except redis.RedisError:
        log.warning("pending_postpone_failed", event_key=key)


def remove(key: str) -> None:
    if not in_use():
        return
    pipe = redis_client().pipeline(transaction=True)
    drop(pipe, key)
    pipe.execute()


def drop(pipe: redis.client.Pipeline, key: str) -> None:
    pipe.hdel(PENDING_DATA, key)
    pipe.zrem(PENDING_DUE, key)
    pipe.hdel(PENDING_SENDS, key)


def count() -> int:
    return int(redis_client().zcard(PENDING_DUE)) if in_use() else 0


def take_due(now: float) -> list[Envelope]:
    """The events due for a re-send, each pushed back by its own doubling wait."""
    client = redis_client()
    keys = [k.decode() for k in client.zrangebyscore(PENDING_DUE, 0, now, start=0, num=SWEEP_BATCH)]
    due = []
    for key in keys:
        raw = client.hget(PENDING_DATA, key)
        if raw is None:
            client.zrem(PENDING_DUE, key)
            continue
        sends = int(client.hincrby(PENDING_SENDS, key, 1))
        wait = current_app.extensions["settings"].pending_redelivery_seconds * 2 ** min(sends, MAX_RESEND_DOUBLINGS)
        client.zadd(PENDING_DUE, {key: now + wait}, xx=True)
        due.append(Envelope.from_json(raw))
    return due
