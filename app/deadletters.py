"""Dead letters: events that gave up after their last retry, kept, listed and replayed.

They go to the database, or to a Redis list while the database is down; the sweeper files the
Redis-held ones once the database is back.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from flask import current_app
from sqlalchemy import func, select

from app import pending
from app.envelope import Envelope
from app.events import Event
from app.extensions import db
from app.models import DeadLetter
from app.publish import send
from app.timeutil import parse_rfc3339, utcnow

log = structlog.get_logger(__name__)

DEAD_LETTER_LIST = "voice:dead-letters"


def _redis() -> Any:
    return current_app.extensions["redis"]


def dead_letter(envelope: Envelope, error: str, attempts: int) -> None:
    """Keep an event that gave up; in Redis when the database cannot take it."""
    key = envelope.key
    record = {"envelope": json.loads(envelope.to_json()), "error": error[:2000], "attempts": attempts,
              "failed_at": utcnow().isoformat()}
    try:
        _store(record)
    except Exception as exc:  # the database is down or broken: Redis holds it until it is back
        db.session.rollback()
        log.warning("dead_letter_to_redis", event_key=key, error_type=type(exc).__name__)
        _redis().rpush(DEAD_LETTER_LIST, json.dumps(record))
    pending.remove(key)
    log.error("event_dead_lettered", event_key=key, session_id=envelope.message.get("session_id"),
              attempts=attempts, error=error[:200])


def _store(record: dict[str, Any]) -> DeadLetter:
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


def drain_redis() -> int:
    """Move dead letters Redis held while the database was down into the table."""
    client = _redis()
    moved = 0
    while (raw := client.lindex(DEAD_LETTER_LIST, 0)) is not None:
        _store(json.loads(raw))
        client.lpop(DEAD_LETTER_LIST)
        moved += 1
    return moved


def count() -> int:
    """Dead letters not replayed yet, in the database and in Redis."""
    unreplayed = db.session.scalar(select(func.count()).select_from(DeadLetter).where(DeadLetter.replayed_at.is_(None)))
    db.session.rollback()
    return int(unreplayed or 0) + int(_redis().llen(DEAD_LETTER_LIST))


def replay(letter_ids: list[int] | None, queue: str) -> list[int]:
    """Send dead letters again (all unreplayed ones when ``letter_ids`` is None)."""
    query = select(DeadLetter).order_by(DeadLetter.id)
    query = query.where(DeadLetter.id.in_(letter_ids)) if letter_ids is not None else query.where(
        DeadLetter.replayed_at.is_(None)
    )
    replayed = []
    for letter in db.session.scalars(query):
        envelope = Envelope(letter.message["message"], letter.message["received_at"], letter.message.get("request_id"))
        send(envelope, queue, hold=True)
        letter.replayed_at = utcnow()
        db.session.commit()
        replayed.append(letter.id)
    return replayed
