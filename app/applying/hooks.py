"""The ready hook: a Celery task sent to the operator's own consumer whenever a recording's URL is
set or changes, through an outbox.

- ``stage`` (inside the transaction that changes the recording): write the outbox row, holding
  the recording as the single GET shows it at that commit. The change and the send commit together.
- ``relay`` (after commit, and periodically by the sweeper): hand each row to the broker, then
  delete it. A crash or a broker outage in between leaves the row, and the next relay sends it
  again: at least once, always under the same task id, derived from the recording id and the
  change that set the URL (its order key): a consumer can ignore repeats, and a URL that goes
  A -> B -> A sends three distinct tasks.
- A recording's hooks go out in the order of its changes: a relay sends only the oldest row of
  each recording, so a newer row never passes an older one that another relay holds or failed to
  send. A row that fails holds back its own recording's later rows, never other recordings'.
- On the Redis broker with ``REDIS_MIN_REPLICAS``, the broker's write waits for its replicas
  (``app.plumbing.transport``) before the row is deleted, as a webhook's task does.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection

import structlog
from flask import current_app, has_app_context
from prometheus_client import Counter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.base.timeutil import utcnow
from app.records.models import HookOutbox, VoiceRecording
from app.records.views import recording_view

log = structlog.get_logger(__name__)

# Fixed forever: consumers compare task ids across deployments and versions.
TASK_ID_NAMESPACE = uuid.UUID("6f1d8a52-3c0e-5b7e-9a41-0d2c7e9b1f35")
RELAY_BATCH = 100
RELAY_FAILURES_IN_A_ROW = 3
STAGED = "voice_hook_staged"  # session.info: the session's transaction wrote an outbox row

SENT = Counter("voice_hook_sent_total", "Ready-hook tasks the broker accepted, by path (commit, sweeper).", ["path"])
FAILED = Counter("voice_hook_failed_total", "Ready-hook sends the broker refused; the outbox keeps them.")


def hook_task() -> str:
    """The configured task name; empty when the hook is off (or outside the app)."""
    return current_app.extensions["settings"].voice_hook_task if has_app_context() else ""


def task_id(recording_id: str, change: str) -> str:
    """The same recording and change give the same id, on every send and every host. ``change``
    is the order key of the event that set the URL (``VoiceRecording.url_key``)."""
    return str(uuid.uuid5(TASK_ID_NAMESPACE, f"{recording_id}\n{change}"))


def stage(session: Session, recording: VoiceRecording, url_before: str | None) -> None:
    """In the changing transaction: queue the hook if the recording's URL was set or changed."""
    url = recording.recording_url
    if not url or url == url_before or not hook_task():
        return
    session.add(HookOutbox(recording_id=recording.id, task_id=task_id(recording.id, recording.url_key or url),
                           recording=recording_view(recording), created_at=utcnow(), attempts=0))
    session.info[STAGED] = True


def relay(session: Session, recording_id: str | Collection[str] | None = None, path: str = "commit") -> int:
    """Send what the outbox holds (for one recording, for several, or all); returns how many the
    broker took.

    One row per transaction, locked while it is sent: a concurrent relay skips it rather than send
    it twice (PostgreSQL; SQLite's single writer serializes relays anyway). Only the oldest row of
    a recording is ever sent. A row whose send fails stays (its attempts counted) and holds back
    its recording for this relay; the relay goes on with other recordings, and stops after
    ``RELAY_FAILURES_IN_A_ROW`` failures in a row (the broker is down: every row would fail).
    """
    name = hook_task()
    if not name:
        return 0
    settings = current_app.extensions["settings"]
    celery = current_app.extensions["celery"]
    sent = 0
    failures_in_a_row = 0
    held_back: set[str] = set()
    only = [recording_id] if isinstance(recording_id, str) else recording_id
    while sent < RELAY_BATCH and failures_in_a_row < RELAY_FAILURES_IN_A_ROW:
        oldest = select(func.min(HookOutbox.id)).group_by(HookOutbox.recording_id)
        if only is not None:
            oldest = oldest.where(HookOutbox.recording_id.in_(only))
        if held_back:
            oldest = oldest.where(HookOutbox.recording_id.not_in(held_back))
        query = (select(HookOutbox).where(HookOutbox.id.in_(oldest.scalar_subquery())).order_by(HookOutbox.id)
                 .limit(1).with_for_update(skip_locked=True))
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
        except Exception as exc:  # the broker refused it (down, or this message): the row stays
            row.attempts += 1
            attempts = row.attempts
            held_back.add(row.recording_id)
            session.commit()
            FAILED.inc()
            failures_in_a_row += 1
            log.warning("hook_send_failed", **context, attempts=attempts, error_type=type(exc).__name__)
            continue
        session.delete(row)
        session.commit()
        SENT.labels(path=path).inc()
        sent += 1
        failures_in_a_row = 0
        log.info("hook_sent", **context, path=path)
    return sent


def relay_after_commit(session: Session, recording_id: str | Collection[str]) -> None:
    """The worker's send right after the change committed (a batch's: of the recordings it
    changed), when that change staged a hook; other recordings' rows are the sweeper's, as is any
    failure here. An event that staged nothing costs no query here."""
    if not session.info.pop(STAGED, False) or not hook_task():
        return
    try:
        relay(session, recording_id, path="commit")
    except Exception as exc:  # the database is down now: the row is safe, and the sweeper sends it
        session.rollback()
        log.warning("hook_relay_deferred", error_type=type(exc).__name__,
                    **({"recording_id": recording_id} if isinstance(recording_id, str)
                       else {"recording_ids": sorted(recording_id)}))


def backlog(session: Session) -> int:
    count = session.scalar(select(func.count()).select_from(HookOutbox))
    session.rollback()
    return int(count or 0)
