"""Celery tasks: thin. They rebuild the envelope, call the delivery functions, and own retries."""

from __future__ import annotations

import math
import random

import redis
import structlog
from celery import Task, shared_task
from flask import current_app
from sqlalchemy import exc as sa_exc

from app import deadletters, metrics, pending
from app.dedup import ClaimBusy
from app.delivery import REDIS_DOWN, deliver
from app.domain import DUPLICATE
from app.envelope import Envelope
from app.extensions import db
from app.hooks import relay as relay_hooks
from app.hooks import relay_after_commit
from app.logs import mask_phone
from app.publish import resend_due
from app.queues import APPLY_EVENT_TASK, PRUNE_TASK, SWEEP_TASK
from app.retention import prune
from app.timeutil import parse_rfc3339, utcnow

log = structlog.get_logger(__name__)

# Only these are worth waiting for: the database or Redis unreachable, a lock or pool timeout,
# or another task applying the same event right now. Anything else is not retried.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    redis.ConnectionError,
    redis.TimeoutError,
    ClaimBusy,
)
# Retry policy: exponential backoff from 1 s with equal jitter, capped; the number of retries is
# EVENT_MAX_RETRIES (default 14: about five minutes of outage before an event is dead-lettered).
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0  # below the broker's visibility timeout, so a waiting retry is never redelivered
CLAIM_BUSY_MAX_SECONDS = 5.0  # the other task usually finishes in milliseconds
PRUNE_TASK_SECONDS = 8.0  # under the soft time limit (12 s); about a million events at the measured rate


def backoff_seconds(retries: int, busy: bool = False) -> float:
    """Exponential backoff with equal jitter: half of the step fixed, half random."""
    cap = CLAIM_BUSY_MAX_SECONDS if busy else BACKOFF_MAX_SECONDS
    step = min(cap, BACKOFF_FIRST_SECONDS * 2**retries)
    return step / 2 + random.uniform(0, step / 2)  # noqa: S311 - jitter, not a secret


# max_retries=None: the task counts its retries itself against EVENT_MAX_RETRIES, and dead-letters
# the event after the last one instead of letting Celery drop it as failed. The strategy turns a
# recognised duplicate away as its message arrives (app.fastpath), before a task request is built.
@shared_task(bind=True, name=APPLY_EVENT_TASK, acks_late=True, max_retries=None,
             Strategy="app.fastpath:duplicates_first")
def apply_webhook_event(self: Task, message: dict, received_at: str, request_id: str | None = None) -> str:
    envelope = Envelope(message, received_at, request_id)
    structlog.contextvars.clear_contextvars()  # nothing carries over from the process's previous task
    structlog.contextvars.bind_contextvars(
        request_id=request_id, task_id=self.request.id, session_id=message.get("session_id"), event_key=envelope.key
    )
    try:
        outcome = deliver(envelope, owner=self.request.id)
    except TRANSIENT_ERRORS as exc:
        attempts = self.request.retries + 1
        settings = current_app.extensions["settings"]
        # Busy is not a failure of this event: the claim's holder applies it, or died (killed, or
        # its host cut off) and its claim expires within dedup.CLAIM_TTL_SECONDS. Dead-lettering
        # while the claim stands would leave the event unapplied (the dead letter drops it from the
        # pending set), so a busy copy keeps waiting, CLAIM_BUSY_MAX_SECONDS apart at most.
        if self.request.retries >= settings.event_max_retries and not isinstance(exc, ClaimBusy):
            deadletters.dead_letter(envelope, f"{type(exc).__name__}: {exc}", attempts)
            metrics.observe_event("dead_lettered")
            return "dead_lettered"
        countdown = backoff_seconds(self.request.retries, busy=isinstance(exc, ClaimBusy))
        if settings.celery_queue_type == "quorum":
            # RabbitMQ's delayed delivery counts whole seconds, and refuses (and drops) a message
            # whose countdown rounds down to zero.
            countdown = float(max(1, math.ceil(countdown)))
        pending.postpone(envelope.key, countdown)
        metrics.observe_event("retried")
        log.warning("event_retry", attempt=attempts, countdown=round(countdown, 2), error_type=type(exc).__name__)
        raise self.retry(exc=exc, countdown=countdown, max_retries=None) from None
    except Exception as exc:  # not transient: retrying cannot help, so keep it rather than loop or lose it
        log.exception("event_failed")
        deadletters.dead_letter(envelope, f"{type(exc).__name__}: {exc}", self.request.retries + 1)
        metrics.observe_event("dead_lettered")
        return "dead_lettered"
    relay_after_commit(db.session, message["session_id"])
    lag = None if outcome == DUPLICATE else (utcnow() - parse_rfc3339(received_at)).total_seconds()
    metrics.observe_event(outcome, lag)
    log.info("event_applied", outcome=outcome, phone_number=mask_phone(message.get("phone_number")),
             status=message.get("status"))
    return outcome


@shared_task(name=SWEEP_TASK)
def sweep_pending_task() -> int:
    """Periodic: send again what was accepted but not applied, relay the ready hooks a failed relay
    left in the outbox, and file Redis-held dead letters."""
    try:
        deadletters.drain_redis()
    except (sa_exc.SQLAlchemyError, *REDIS_DOWN):
        log.warning("dead_letter_drain_deferred")
    relay_hooks_later()
    return resend_due()


def relay_hooks_later() -> None:
    try:
        relay_hooks(db.session, path="sweeper")
    except sa_exc.SQLAlchemyError:
        db.session.rollback()
        log.warning("hook_relay_deferred")


@shared_task(name=PRUNE_TASK)
def prune_events_task() -> int:
    """Periodic (when EVENT_RETENTION_DAYS is set): delete stored events older than the window,
    for at most PRUNE_TASK_SECONDS (below the task time limit); the next run goes on from there."""
    days = current_app.extensions["settings"].event_retention_days
    return prune(db.session, days, max_seconds=PRUNE_TASK_SECONDS).deleted if days else 0
