"""Celery tasks: thin. They rebuild the envelope, call the delivery functions, and own retries."""

from __future__ import annotations

import math
import random
import time
from typing import NoReturn

import redis
import structlog
from celery import Task, shared_task
from celery.exceptions import Reject
from flask import current_app
from sqlalchemy import exc as sa_exc

from app.applying import deadletters
from app.applying.delivery import deliver
from app.applying.domain import DUPLICATE
from app.applying.hooks import relay as relay_hooks
from app.applying.hooks import relay_after_commit
from app.applying.retention import prune
from app.base import metrics
from app.base.extensions import db
from app.base.logs import mask_phone
from app.base.timeutil import parse_rfc3339, utcnow
from app.payload.envelope import Envelope
from app.plumbing import pending
from app.plumbing.dedup import ClaimBusy
from app.plumbing.publish import resend_due
from app.plumbing.queues import APPLY_EVENT_TASK, PRUNE_TASK, SWEEP_TASK

log = structlog.get_logger(__name__)

# Only these are worth waiting for: the database or Redis unreachable, a lock or pool timeout,
# a Redis that refuses writes for now (a replica after a failover, out of memory under
# noeviction, loading its data), or another task applying the same event right now. Anything else
# is not retried.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
    redis.exceptions.RedisClusterException,  # a cluster cache with no node answering (dedup.release)
    ClaimBusy,
)
# Retry policy: exponential backoff from 1 s with equal jitter, capped; the number of retries is
# EVENT_MAX_RETRIES (default 14: about five minutes of outage before an event is dead-lettered).
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0  # below the broker's visibility timeout, so a waiting retry is never redelivered
CLAIM_BUSY_MAX_SECONDS = 5.0  # the other task usually finishes in milliseconds
# When the broker refuses a retry's message, the task's own message goes back to its queue after
# this pause (not at once: the broker that refused is likely to refuse again right away).
REQUEUE_PAUSE_SECONDS = 5.0
PRUNE_TASK_SECONDS = 8.0  # under the soft time limit (12 s); about a million events at the measured rate


def backoff_seconds(retries: int, busy: bool = False) -> float:
    """Exponential backoff with equal jitter: half of the step fixed, half random."""
    cap = CLAIM_BUSY_MAX_SECONDS if busy else BACKOFF_MAX_SECONDS
    step = min(cap, BACKOFF_FIRST_SECONDS * 2**retries)
    return step / 2 + random.uniform(0, step / 2)  # noqa: S311 - jitter, not a secret


# max_retries=None: the task counts its retries itself against EVENT_MAX_RETRIES, and dead-letters
# the event after the last one instead of letting Celery drop it as failed. The strategy turns a
# recognised duplicate away as its message arrives (app.applying.fastpath), before a task request is built.
@shared_task(bind=True, name=APPLY_EVENT_TASK, acks_late=True, max_retries=None,
             Strategy="app.applying.fastpath:in_batches")
def apply_webhook_event(self: Task, message: dict, received_at: str, request_id: str | None = None) -> str:
    envelope = Envelope(message, received_at, request_id)
    structlog.contextvars.clear_contextvars()  # nothing carries over from the process's previous task
    structlog.contextvars.bind_contextvars(
        request_id=request_id, task_id=self.request.id, session_id=message.get("session_id"), event_key=envelope.key
    )
    try:
        outcome = deliver(envelope, owner=self.request.id)
    except TRANSIENT_ERRORS as exc:
        settings = current_app.extensions["settings"]
        # Busy is not a failure of this event: the claim's holder applies it, or died (killed, or
        # its host cut off) and its claim expires within dedup.CLAIM_TTL_SECONDS. Dead-lettering
        # while the claim stands would leave the event unapplied (the dead letter drops it from the
        # pending set), so a busy copy keeps waiting, CLAIM_BUSY_MAX_SECONDS apart at most.
        if self.request.retries >= settings.event_max_retries and not isinstance(exc, ClaimBusy):
            return give_up(self, envelope, exc)
        retry_later(self, envelope, exc, backoff_seconds(self.request.retries, busy=isinstance(exc, ClaimBusy)))
    except Exception as exc:  # not transient: retrying cannot help, so keep it rather than loop or lose it
        log.exception("event_failed")
        return give_up(self, envelope, exc)
    relay_after_commit(db.session, message["session_id"])
    lag = None if outcome == DUPLICATE else (utcnow() - parse_rfc3339(received_at)).total_seconds()
    metrics.observe_event(outcome, lag)
    log.info("event_applied", outcome=outcome, phone_number=mask_phone(message.get("phone_number")),
             status=message.get("status"))
    return outcome


def give_up(task: Task, envelope: Envelope, exc: BaseException) -> str:
    """Dead-letter the event; while no store can take it, its message stays in the broker."""
    try:
        deadletters.dead_letter(envelope, f"{type(exc).__name__}: {exc}", task.request.retries + 1,
                                letter_key=task.request.id)
    except deadletters.NotKept as not_kept:
        log.warning("dead_letter_deferred", reason=str(not_kept))
        retry_later(task, envelope, not_kept, BACKOFF_MAX_SECONDS)
    metrics.observe_event("dead_lettered")
    return "dead_lettered"


def retry_later(task: Task, envelope: Envelope, exc: BaseException, countdown: float) -> NoReturn:
    """Send the task again after ``countdown``; when the broker refuses that message, put this
    one back in its queue instead. Celery's own answer to a refused retry is a reject without
    requeue, which a broker without a dead-letter queue (RabbitMQ's default) discards."""
    settings = current_app.extensions["settings"]
    if settings.celery_queue_type == "quorum":
        # RabbitMQ's delayed delivery counts whole seconds, and refuses (and drops) a message
        # whose countdown rounds down to zero.
        countdown = float(max(1, math.ceil(countdown)))
    pending.postpone(envelope.key, countdown)
    metrics.observe_event("retried")
    log.warning("event_retry", attempt=task.request.retries + 1, countdown=round(countdown, 2),
                error_type=type(exc).__name__)
    try:
        raise task.retry(exc=exc, countdown=countdown, max_retries=None) from None
    except Reject as refused:  # Celery could not publish the retry
        log.warning("retry_refused", error=str(refused.reason)[:200])
        time.sleep(min(countdown, REQUEUE_PAUSE_SECONDS))
        raise Reject(refused.reason, requeue=True) from None


@shared_task(name=SWEEP_TASK)
def sweep_pending_task() -> int:
    """Periodic: send again what was accepted but not applied, relay the ready hooks a failed relay
    left in the outbox, and file Redis-held dead letters."""
    try:
        deadletters.drain_redis()
        deadletters.drain_broker()
    except Exception as exc:  # the database, Redis or the broker cannot now: the next sweep files them
        db.session.rollback()
        log.warning("dead_letter_drain_deferred", error_type=type(exc).__name__)
    relay_hooks_later()
    resent = resend_due()
    metrics.note_sweep(current_app.extensions["settings"].sweep_interval_seconds)
    return resent


def relay_hooks_later() -> None:
    """The sweeper's relay: whatever fails here (the database, the broker), the rows stay for
    the next sweep, and the sweep goes on with the pending set."""
    try:
        relay_hooks(db.session, path="sweeper")
    except Exception as exc:
        db.session.rollback()
        log.warning("hook_relay_deferred", error_type=type(exc).__name__)


@shared_task(name=PRUNE_TASK)
def prune_events_task() -> int:
    """Periodic (when EVENT_RETENTION_DAYS is set): delete stored events older than the window,
    for at most PRUNE_TASK_SECONDS (below the task time limit); the next run goes on from there."""
    days = current_app.extensions["settings"].event_retention_days
    return prune(db.session, days, max_seconds=PRUNE_TASK_SECONDS).deleted if days else 0
