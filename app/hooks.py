"""The ready hook: a Celery task sent to the operator's own consumer whenever a recording's URL is
set or changes, through an outbox.

- ``stage`` (inside the transaction that changes the recording): write the outbox row, holding
  the recording as the single GET shows it at that commit. The change and the send commit together.
- ``relay`` (after commit, and periodically by the sweeper): hand each row to the broker, then
  delete it. A crash or a broker outage in between leaves the row, and the next relay sends it
  again: at least once, always under the same task id (recording id + URL), so a consumer can
  ignore repeats.
"""

from __future__ import annotations

import uuid

import redis
import structlog
from flask import current_app, has_app_context
from kombu.exceptions import OperationalError as KombuOperationalError
from prometheus_client import Counter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import HookOutbox, VoiceRecording
from app.timeutil import utcnow
from app.views import recording_view

log = structlog.get_logger(__name__)

# Fixed forever: consumers compare task ids across deployments and versions.
TASK_ID_NAMESPACE = uuid.UUID("6f1d8a52-3c0e-5b7e-9a41-0d2c7e9b1f35")
RELAY_BATCH = 100
# What a broker outage raises when publishing.
BROKER_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, KombuOperationalError, OSError)

SENT = Counter("voice_hook_sent_total", "Ready-hook tasks the broker accepted, by path (commit, sweeper).", ["path"])
FAILED = Counter("voice_hook_failed_total", "Ready-hook sends the broker refused; the outbox keeps them.")


def hook_task() -> str:
    """The configured task name; empty when the hook is off (or outside the app)."""
    return current_app.extensions["settings"].voice_hook_task if has_app_context() else ""


def task_id(recording_id: str, url: str) -> str:
    """The same recording and URL give the same id, on every send and every host."""
    return str(uuid.uuid5(TASK_ID_NAMESPACE, f"{recording_id}\n{url}"))


def stage(session: Session, recording: VoiceRecording, url_before: str | None) -> None:
    """In the changing transaction: queue the hook if the recording's URL was set or changed."""
    url = recording.recording_url
    if not url or url == url_before or not hook_task():
        return
    session.add(HookOutbox(recording_id=recording.id, task_id=task_id(recording.id, url),
                           recording=recording_view(recording), created_at=utcnow(), attempts=0))


def relay(session: Session, recording_id: str | None = None, path: str = "commit") -> int:
    """Send what the outbox holds (for one recording, or all); returns how many the broker took.

    One row per transaction, locked while it is sent: a concurrent relay skips it rather than send
    it twice (PostgreSQL; SQLite's single writer serializes relays anyway). Stops at the first
    broker error; the row stays for the next relay.
    """
    name = hook_task()
    if not name:
        return 0
    settings = current_app.extensions["settings"]
    celery = current_app.extensions["celery"]
    sent = 0
    while sent < RELAY_BATCH:
        query = select(HookOutbox).order_by(HookOutbox.id).limit(1).with_for_update(skip_locked=True)
        if recording_id is not None:
            query = query.where(HookOutbox.recording_id == recording_id)
        row = session.scalar(query)
        if row is None:
            session.rollback()
            break
        context = {"recording_id": row.recording_id, "hook_task_id": row.task_id}
        try:
            celery.send_task(
                name, args=(row.recording,), queue=settings.voice_hook_queue, task_id=row.task_id, retry=False,
                argsrepr=f"recording_id={row.recording_id}", kwargsrepr="",
            )
        except BROKER_ERRORS as exc:
            row.attempts += 1
            attempts = row.attempts
            session.commit()
            FAILED.inc()
            log.warning("hook_send_failed", **context, attempts=attempts, error_type=type(exc).__name__)
            break
        session.delete(row)
        session.commit()
        SENT.labels(path=path).inc()
        sent += 1
        log.info("hook_sent", **context, path=path)
    return sent


def relay_after_commit(session: Session, recording_id: str) -> None:
    """The worker's send right after the change committed; the sweeper covers any failure here."""
    if not hook_task():
        return
    try:
        relay(session, recording_id, path="commit")
    except Exception as exc:  # the database is down now: the row is safe, and the sweeper sends it
        session.rollback()
        log.warning("hook_relay_deferred", recording_id=recording_id, error_type=type(exc).__name__)


def backlog(session: Session) -> int:
    count = session.scalar(select(func.count()).select_from(HookOutbox))
    session.rollback()
    return int(count or 0)
