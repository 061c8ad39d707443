"""Dead letters: events that gave up after their last retry, kept, listed and replayed.

Where a dead letter is kept:
- in the database, whenever it can take it;
- on the Redis broker, while the database cannot, in the broker's own Redis (a list), as durably
  as Redis keeps the messages themselves; the sweeper files them once the database is back;
- on RabbitMQ never in Redis (only a cache there): while the database cannot take it, the task
  keeps the message itself in RabbitMQ (``NotKept``: the task retries it later). Quorum queues
  dead-letter a message delivered more often than their delivery limit to a quorum queue of
  their own, which the sweeper files here (``drain_broker``).

Each dead letter carries a key (the task id of the message that gave up), unique in the table:
filing one twice (two drainers at once, a drainer that died between filing and removing it from
the list, a message delivered again after its dead letter was filed) keeps it once.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import redis
import structlog
from flask import current_app
from sqlalchemy import func, select

from app.applying.domain import dialect_insert
from app.base.extensions import db
from app.base.timeutil import parse_rfc3339, utcnow
from app.payload.envelope import Envelope
from app.payload.events import Event
from app.plumbing import pending
from app.plumbing.publish import send
from app.plumbing.queues import APPLY_EVENT_TASK, DELIVERY_LIMIT, dead_letter_queue
from app.records.models import DeadLetter

log = structlog.get_logger(__name__)

DEAD_LETTER_LIST = "voice:dead-letters"


class NotKept(Exception):
    """No store could take the dead letter now: the task must keep its message in the broker."""


def _redis() -> Any:
    return current_app.extensions["redis"]


def dead_letter(envelope: Envelope, error: str, attempts: int, letter_key: str) -> None:
    """Keep an event that gave up, under ``letter_key``; raises NotKept when nothing can keep it."""
    key = envelope.key
    record = {"letter_key": letter_key, "envelope": json.loads(envelope.to_json()), "error": error[:2000],
              "attempts": attempts, "failed_at": utcnow().isoformat()}
    try:
        _store(record)
    except Exception as exc:  # the database is down or broken
        db.session.rollback()
        if not pending.in_use():
            raise NotKept(f"the database cannot take it ({type(exc).__name__})") from exc
        try:
            _redis().rpush(DEAD_LETTER_LIST, json.dumps(record))
        except redis.RedisError as redis_exc:
            raise NotKept(f"neither the database ({type(exc).__name__}) nor Redis "
                          f"({type(redis_exc).__name__}) can take it") from redis_exc
        log.warning("dead_letter_to_redis", event_key=key, error_type=type(exc).__name__)
    try:
        pending.remove(key)
    except redis.RedisError:  # kept all the same; the sweeper may send the event once more
        log.warning("pending_remove_failed", event_key=key)
    log.error("event_dead_lettered", event_key=key, session_id=envelope.message.get("session_id"),
              attempts=attempts, error=error[:200])


def _store(record: dict[str, Any]) -> None:
    """File one dead letter; a letter already filed under its key is left as it is."""
    envelope = record["envelope"]
    values = {
        "letter_key": record["letter_key"],
        "fingerprint": Event.from_message(envelope["message"]).fingerprint,
        "session_id": envelope["message"]["session_id"],
        "message": envelope,
        "error": record["error"],
        "attempts": record["attempts"],
        "failed_at": parse_rfc3339(record["failed_at"]),
    }
    session = db.session
    insert = dialect_insert(session.connection().dialect.name)
    session.execute(insert(DeadLetter).values(values).on_conflict_do_nothing(index_elements=["letter_key"]))
    session.commit()


def drain_redis() -> int:
    """File the dead letters Redis held while the database was down; returns how many were read.

    Any number of drainers may run at once: each files the list's head (a no-op when another
    filed it already) and then removes that very record (not whatever is at the head by then)."""
    client = _redis()
    moved = 0
    try:
        while (raw := client.lindex(DEAD_LETTER_LIST, 0)) is not None:
            record = json.loads(raw)
            # Records written before dead letters had keys: the record's own digest is its key.
            record.setdefault("letter_key", "redis:" + hashlib.sha256(raw).hexdigest())
            _store(record)
            client.lrem(DEAD_LETTER_LIST, 1, raw)
            moved += 1
    except redis.RedisError:
        if pending.in_use():
            raise
        log.warning("dead_letter_drain_skipped")  # RabbitMQ: Redis is a cache, and holds none but old ones
    return moved


def drain_broker() -> int:
    """File the messages RabbitMQ dead-lettered past the quorum queues' delivery limit; returns
    how many. Each message is acknowledged only after its letter is committed (a drainer that
    dies in between leaves it in the queue, and filing it again keeps it once)."""
    settings = current_app.extensions["settings"]
    if settings.broker_is_redis or settings.celery_queue_type != "quorum":
        return 0
    moved = 0
    with current_app.extensions["celery"].connection_for_write() as connection:
        queue = dead_letter_queue().bind(connection.default_channel)
        queue.declare()
        while (message := queue.get(no_ack=False, accept=["json"])) is not None:
            headers = message.headers or {}
            if headers.get("task") == APPLY_EVENT_TASK:
                args = message.payload[0]
                envelope = Envelope(args[0], args[1], args[2] if len(args) > 2 else None)
                _store({"letter_key": f"broker:{headers.get('id')}", "envelope": json.loads(envelope.to_json()),
                        "error": f"delivered more than the queue's delivery limit ({DELIVERY_LIMIT}) allows",
                        "attempts": int(headers.get("x-delivery-count") or DELIVERY_LIMIT),
                        "failed_at": utcnow().isoformat()})
                log.error("event_dead_lettered", event_key=envelope.key, session_id=args[0].get("session_id"),
                          by="broker")
            else:  # a sweep or a prune: the next one does its work
                log.warning("broker_dead_lettered_task", task=headers.get("task"))
            message.ack()
            moved += 1
    return moved


def count() -> int:
    """Dead letters not replayed yet, in the database and in Redis."""
    unreplayed = db.session.scalar(select(func.count()).select_from(DeadLetter).where(DeadLetter.replayed_at.is_(None)))
    db.session.rollback()
    try:
        held = int(_redis().llen(DEAD_LETTER_LIST))
    except redis.RedisError:
        if pending.in_use():
            raise
        held = 0
    return int(unreplayed or 0) + held


def replay(letter_ids: list[int] | None, queue: str) -> list[int]:
    """Send dead letters again (all unreplayed ones when ``letter_ids`` is None).

    One letter per transaction, locked while it is sent: a concurrent replay skips it
    (PostgreSQL; on SQLite each transaction holds the single writer). A replay that dies between
    the send and the commit leaves the letter unreplayed: it is sent again, and applies once."""
    replayed: list[int] = []
    after = 0
    session = db.session
    while True:
        query = select(DeadLetter).where(DeadLetter.id > after).order_by(DeadLetter.id).limit(1)
        query = query.where(DeadLetter.id.in_(letter_ids)) if letter_ids is not None else query.where(
            DeadLetter.replayed_at.is_(None))
        letter = session.scalar(query.with_for_update(skip_locked=True))
        if letter is None:
            session.rollback()
            return replayed
        after = letter.id
        envelope = Envelope(letter.message["message"], letter.message["received_at"], letter.message.get("request_id"))
        send(envelope, queue, hold=True)
        letter.replayed_at = utcnow()
        session.commit()
        replayed.append(letter.id)
