"""Getting an event from the web process to the database exactly once in effect.

- ``enqueue`` (web): record the event in the Redis pending set, then hand the task to the broker.
- ``deliver`` (worker): claim the event's dedup key, apply it, mark it done, drop it from pending.
- ``sweep_pending`` (worker, periodic): send again what was accepted but never applied.
- ``dead_letter``: keep what gave up, in the database or, when that is down, in a Redis list.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

import redis
import structlog
from flask import current_app
from kombu.exceptions import ChannelError as KombuChannelError
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import func, select

from app.domain import DUPLICATE, apply_event
from app.errors import QueueUnavailable
from app.events import Event
from app.extensions import db
from app.logs import mask_phone
from app.models import DeadLetter
from app.queues import ALL_QUEUES, WEBHOOK_QUEUE
from app.timeutil import parse_rfc3339, stamp, utcnow

log = structlog.get_logger(__name__)

DEDUP_PREFIX = "voice:dedup:"
PENDING_DATA = "voice:pending:data"  # hash: event key -> envelope JSON
PENDING_DUE = "voice:pending:due"  # sorted set: event key -> when the sweeper may send it again
PENDING_SENDS = "voice:pending:sends"  # hash: event key -> how often the sweeper sent it again
# Each re-send of one event waits twice as long as the one before (up to 2**6 times
# PENDING_REDELIVERY_SECONDS), so a backlog that outlasts the redelivery age costs a few cheap
# duplicates per event, not one per sweep.
MAX_RESEND_DOUBLINGS = 6
DEAD_LETTER_LIST = "voice:dead-letters"
DONE = "done"  # stored as done:<stamp of the arrival time of the copy applied>
# A claim outlives the task's hard time limit, so a live task never loses its claim; a worker
# that died holding one frees it when it expires.
CLAIM_TTL_SECONDS = 120
SWEEP_BATCH = 500
# What a broker or Redis outage raises on the publishing side.
QUEUE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, KombuOperationalError, OSError)


class ClaimBusy(Exception):
    """Another task holds this event's claim right now; try again shortly."""


@dataclass(frozen=True)
class Envelope:
    """What a task carries: plain values only."""

    message: dict[str, Any]
    received_at: str
    request_id: str | None = None

    @cached_property
    def event(self) -> Event:
        return Event.from_message(self.message)

    @cached_property
    def key(self) -> str:
        return self.event.key

    def to_json(self) -> str:
        return json.dumps({"message": self.message, "received_at": self.received_at, "request_id": self.request_id})

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        data = json.loads(text)
        return cls(message=data["message"], received_at=data["received_at"], request_id=data.get("request_id"))


def redis_client() -> redis.Redis:
    """This process's Redis client (one connection pool per process)."""
    return current_app.extensions["redis"]


def settings() -> Any:
    return current_app.extensions["settings"]


# --- dedup -----------------------------------------------------------------------------------

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# One round trip: take the claim if nobody holds the key; if the event was applied from a copy
# that arrived no later than this one, drop it from the pending set and say so; else tell who
# holds the key. Times are stamps in one fixed format, so they compare as strings.
_CLAIM = """
local current = redis.call('get', KEYS[1])
if not current then
  redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 'claimed'
end
if string.sub(current, 1, 5) == 'done:' and ARGV[4] >= string.sub(current, 6) then
  redis.call('hdel', KEYS[2], ARGV[3])
  redis.call('zrem', KEYS[3], ARGV[3])
  redis.call('hdel', KEYS[4], ARGV[3])
  return 'duplicate'
end
return current
"""


def claim(key: str, owner: str, received_at: datetime) -> str:
    """'claimed' (ours to apply), 'duplicate' (applied from a copy no later than this one; dropped
    from pending), 'earlier' (applied, but this copy arrived first) or 'busy' (another task holds it)."""
    token = f"claim:{owner}"
    state = redis_client().eval(
        _CLAIM, 4, DEDUP_PREFIX + key, PENDING_DATA, PENDING_DUE, PENDING_SENDS,
        token, CLAIM_TTL_SECONDS, key, stamp(received_at),
    ).decode()
    if state in {"claimed", "duplicate"}:
        return state
    if state.startswith(DONE):
        return "earlier"
    # A redelivered message keeps its task id: its own stale claim is still its own.
    return "claimed" if state == token else "busy"


def finish(key: str, received_at: datetime) -> None:
    """Applied: remember it for DEDUP_TTL_SECONDS with the arrival time it was applied at, and
    drop it from the pending set, in one round trip."""
    pipe = redis_client().pipeline(transaction=True)
    pipe.set(DEDUP_PREFIX + key, f"{DONE}:{stamp(received_at)}", ex=settings().dedup_ttl_seconds)
    _drop_pending(pipe, key)
    pipe.execute()


def release(key: str, owner: str) -> None:
    """Give up a claim after a failed transaction, so a retry need not wait for it to expire."""
    try:
        redis_client().eval(_RELEASE, 1, DEDUP_PREFIX + key, f"claim:{owner}")
    except redis.RedisError:
        log.warning("claim_release_failed", event_key=key)  # it expires on its own


# --- pending set -----------------------------------------------------------------------------


def add_pending(client: redis.Redis, key: str, envelope: Envelope, due: float) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.hsetnx(PENDING_DATA, key, envelope.to_json())
    pipe.zadd(PENDING_DUE, {key: due}, nx=True)
    pipe.execute()


def postpone_pending(key: str, seconds: float) -> None:
    """A worker holds this event (or will retry it): the sweeper leaves it alone till then."""
    try:
        due = time.time() + seconds + settings().pending_redelivery_seconds
        redis_client().zadd(PENDING_DUE, {key: due}, xx=True)
    except redis.RedisError:
        log.warning("pending_postpone_failed", event_key=key)


def remove_pending(key: str) -> None:
    pipe = redis_client().pipeline(transaction=True)
    _drop_pending(pipe, key)
    pipe.execute()


def _drop_pending(pipe: redis.client.Pipeline, key: str) -> None:
    pipe.hdel(PENDING_DATA, key)
    pipe.zrem(PENDING_DUE, key)
    pipe.hdel(PENDING_SENDS, key)


def pending_count() -> int:
    return int(redis_client().zcard(PENDING_DUE))


def queue_depths() -> dict[str, int]:
    """Messages waiting in each of the service's queues, on whichever broker is configured."""
    depths = {}
    with current_app.extensions["celery"].connection_for_read() as connection:
        channel = connection.default_channel
        for queue in ALL_QUEUES:
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except KombuChannelError:  # not declared yet: nothing was ever sent to it
                depths[queue] = 0
                channel = connection.channel()  # AMQP closes a channel after a failed passive declare
    return depths


def state_counts(name: str) -> int:
    """``pending``: events accepted and not applied; ``dead_letters``: not replayed yet."""
    if name == "pending":
        return pending_count()
    unreplayed = db.session.scalar(select(func.count()).select_from(DeadLetter).where(DeadLetter.replayed_at.is_(None)))
    db.session.rollback()
    return int(unreplayed or 0) + int(redis_client().llen(DEAD_LETTER_LIST))


# --- web side --------------------------------------------------------------------------------


def enqueue(event: Event, received_at: datetime, request_id: str | None) -> None:
    """Hold the event in the pending set, then give the task to the broker.

    Raises QueueUnavailable (503) when either step fails, so no 200 goes out for an unqueued task.
    """
    envelope = Envelope(event.to_message(), received_at.isoformat(), request_id)
    try:
        add_pending(redis_client(), event.key, envelope, time.time() + settings().pending_redelivery_seconds)
        send(envelope, WEBHOOK_QUEUE)
    except QUEUE_ERRORS as exc:
        log.warning("enqueue_failed", error_type=type(exc).__name__)
        raise QueueUnavailable("the queue is unavailable; try again", session_id=event.session_id) from None


def send(envelope: Envelope, queue: str) -> None:
    from app.tasks import apply_webhook_event

    message = envelope.message
    apply_webhook_event.apply_async(
        args=(message, envelope.received_at, envelope.request_id),
        queue=queue,
        retry=False,
        # What Flower and the worker show of the arguments: short, and with the phone masked
        # (Celery's default repr of the whole payload cost a tenth of the ack time).
        argsrepr=f"session_id={message['session_id']} status={message['status']} "
        f"phone={mask_phone(message.get('phone_number'))}",
        kwargsrepr="",
    )


# --- worker side -----------------------------------------------------------------------------


def deliver(envelope: Envelope, owner: str) -> str:
    """Apply one event exactly once in effect; returns the domain outcome or DUPLICATE.

    Raises ClaimBusy, or the database's or Redis's own error, for the task to retry.
    """
    event = envelope.event
    key = event.key
    received_at = parse_rfc3339(envelope.received_at)
    state = claim(key, owner, received_at)
    if state == "duplicate":
        return DUPLICATE
    if state == "busy":
        raise ClaimBusy(key)
    if state == "earlier":
        # This copy arrived before the one applied: the database re-times the event under its lock.
        outcome = apply_event(db.session, event, received_at)
    else:
        try:
            outcome = apply_event(db.session, event, received_at)
        except BaseException:
            release(key, owner)
            raise
    finish(key, received_at)
    return outcome


def sweep_pending(now: float | None = None) -> int:
    """Send again every accepted event that no worker has applied or touched in time."""
    client = redis_client()
    now = time.time() if now is None else now
    keys = [k.decode() for k in client.zrangebyscore(PENDING_DUE, 0, now, start=0, num=SWEEP_BATCH)]
    sent = 0
    for key in keys:
        raw = client.hget(PENDING_DATA, key)
        if raw is None:
            client.zrem(PENDING_DUE, key)
            continue
        sends = int(client.hincrby(PENDING_SENDS, key, 1))
        wait = settings().pending_redelivery_seconds * 2 ** min(sends, MAX_RESEND_DOUBLINGS)
        client.zadd(PENDING_DUE, {key: now + wait}, xx=True)
        send(Envelope.from_json(raw), WEBHOOK_QUEUE)
        sent += 1
    if sent:
        log.warning("pending_redelivered", count=sent)
    return sent


# --- dead letters ----------------------------------------------------------------------------


def dead_letter(envelope: Envelope, error: str, attempts: int) -> None:
    """Keep an event that gave up; in Redis when the database cannot take it."""
    key = envelope.key
    record = {"envelope": json.loads(envelope.to_json()), "error": error[:2000], "attempts": attempts,
              "failed_at": utcnow().isoformat()}
    try:
        _store_dead_letter(record)
    except Exception as exc:  # the database is down or broken: Redis holds it until it is back
        db.session.rollback()
        log.warning("dead_letter_to_redis", event_key=key, error_type=type(exc).__name__)
        redis_client().rpush(DEAD_LETTER_LIST, json.dumps(record))
    remove_pending(key)
    log.error("event_dead_lettered", event_key=key, session_id=envelope.message.get("session_id"),
              attempts=attempts, error=error[:200])


def _store_dead_letter(record: dict[str, Any]) -> DeadLetter:
    envelope = record["envelope"]
    row = DeadLetter(
        fingerprint=Event.from_message(envelope["message"]).fingerprint,
        session_id=envelope["message"]["session_id"],
        message=envelope,
        error=record["error"],
        attempts=record["attempts"],
        failed_at=parse_rfc3339(record["failed_at"]),
    )
    db.session.add(row)
    db.session.commit()
    return row


def drain_redis_dead_letters() -> int:
    """Move dead letters Redis held while the database was down into the table."""
    client = redis_client()
    moved = 0
    while (raw := client.lindex(DEAD_LETTER_LIST, 0)) is not None:
        _store_dead_letter(json.loads(raw))
        client.lpop(DEAD_LETTER_LIST)
        moved += 1
    return moved


def replay(letter_ids: list[int] | None, queue: str) -> list[int]:
    """Send dead letters again (all unreplayed ones when ``letter_ids`` is None)."""
    query = select(DeadLetter).order_by(DeadLetter.id)
    query = query.where(DeadLetter.id.in_(letter_ids)) if letter_ids is not None else query.where(
        DeadLetter.replayed_at.is_(None)
    )
    replayed = []
    for letter in db.session.scalars(query):
        envelope = Envelope(letter.message["message"], letter.message["received_at"], letter.message.get("request_id"))
        add_pending(redis_client(), envelope.key, envelope, time.time() + settings().pending_redelivery_seconds)
        send(envelope, queue)
        letter.replayed_at = utcnow()
        db.session.commit()
        replayed.append(letter.id)
    return replayed
