"""Applying one event in a worker, exactly once in effect.

Claim the event's dedup key, apply it in one transaction, mark the key done (and drop the event
from the pending set). On RabbitMQ, where Redis is only the dedup cache, a Redis that cannot serve
(unreachable, or refusing: read-only after a failover, out of memory, loading) is not a reason to
wait: the database's fingerprint, checked under the recording's lock, decides.
"""

from __future__ import annotations

import redis
import structlog
from flask import current_app

from app.applying import fastpath
from app.applying.domain import DUPLICATE, apply_event
from app.base.extensions import db
from app.base.timeutil import parse_rfc3339
from app.payload.envelope import Envelope
from app.plumbing import dedup

log = structlog.get_logger(__name__)

# Redis errors that mean "not reachable now" rather than a broken command.
REDIS_DOWN: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)
# Where Redis is only the cache (RabbitMQ), any error of it leaves the decision to the database;
# a Redis Cluster client also raises its own RedisClusterException (no RedisError) when no node
# answers or a slot has no master it knows.
CACHE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, redis.exceptions.RedisClusterException)


def deliver(envelope: Envelope, owner: str) -> str:
    """Apply one event exactly once in effect; returns the domain outcome or DUPLICATE.

    Raises ClaimBusy, or the database's or Redis's own error, for the task to retry.
    """
    event = envelope.event
    key = event.key
    received_at = parse_rfc3339(envelope.received_at)
    cache_optional = not current_app.extensions["settings"].broker_is_redis
    try:
        state = "claimed" if fastpath.take_claim(owner) else dedup.claim(key, owner, received_at)
    except CACHE_ERRORS as exc:
        if not cache_optional:
            raise  # Redis is the broker too: nothing can be acknowledged anyway, so retry
        log.warning("dedup_cache_unavailable", event_key=key, error_type=type(exc).__name__)
        return apply_event(db.session, event, received_at)  # the fingerprint is the guard
    if state == "duplicate":
        return DUPLICATE
    if state == "busy":
        raise dedup.ClaimBusy(key)
    if state == "earlier":
        # This copy arrived before the one applied: the database re-times the event under its lock.
        outcome = apply_event(db.session, event, received_at)
    else:
        try:
            outcome = apply_event(db.session, event, received_at)
        except BaseException:
            dedup.release(key, owner)
            raise
    try:
        dedup.finish(key, received_at, owner)
    except CACHE_ERRORS as exc:
        if not cache_optional:
            raise
        # Committed; a later copy meets the fingerprint. The claim expires on its own.
        log.warning("dedup_mark_failed", event_key=key, error_type=type(exc).__name__)
    return outcome
