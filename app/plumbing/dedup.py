"""The dedup cache: an event's Redis key, claimed before it is applied and marked done after.

A claim (short TTL) keeps two tasks from applying one event at once; the done mark (long TTL,
``DEDUP_TTL_SECONDS``) turns later copies away with one round trip. The database's unique
fingerprint stays the final guard when Redis has forgotten a key or cannot be reached.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import redis
import structlog
from flask import current_app

from app.base.timeutil import stamp
from app.plumbing import pending, transport

log = structlog.get_logger(__name__)

DEDUP_PREFIX = "voice:dedup:"
DONE = "done"  # stored as done:<stamp of the arrival time of the copy applied>
# A claim outlives the task's hard time limit, so a live task never loses its claim; a worker
# that died holding one frees it when it expires.
CLAIM_TTL_SECONDS = 120


class ClaimBusy(Exception):
    """Another task holds this event's claim right now; try again shortly."""


_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# One round trip: take the claim if nobody holds the key; if the event was applied from a copy
# that arrived no later than this one, drop it from the pending set and say so; else tell who
# holds the key. Times are stamps in one fixed format, so they compare as strings. Given the
# broker's unacknowledged hash and index and the message's delivery tag (KEYS[5..6], ARGV[5]: the
# task runs where its message is consumed), a duplicate also acknowledges its message here, and the
# worker's own acknowledgement then costs no round trip.
#
# Keys and Redis Cluster: on RabbitMQ, Redis is only this cache, and its keys are laid out so that
# a cluster could hold it (the service has no cluster client yet; tests/test_cluster.py). Every
# script and transaction here touches one key, the event's own, so each lands in one hash slot
# and events spread over the cluster. The pending set (KEYS[2..4], and finish's drop) is
# used only when Redis is the broker, and a broker cannot be a cluster (kombu's transport keeps
# its queues, unacked hash and their index in several keys it reads together), so there the
# cache shares one server with the broker. Putting the pending keys and every dedup key under
# one {hash tag} instead would keep them in one slot, but a single slot is a single node: no
# cluster at all.
_CLAIM = """
local current = redis.call('get', KEYS[1])
if not current then
  redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 'claimed'
end
if string.sub(current, 1, 5) == 'done:' and ARGV[4] >= string.sub(current, 6) then
  if #KEYS >= 4 then
    redis.call('hdel', KEYS[2], ARGV[3])
    redis.call('zrem', KEYS[3], ARGV[3])
    redis.call('hdel', KEYS[4], ARGV[3])
  end
  if #KEYS == 6 then
    redis.call('hdel', KEYS[5], ARGV[5])
    redis.call('zrem', KEYS[6], ARGV[5])
  end
  return 'duplicate'
end
return current
"""


def _client() -> redis.Redis:
    return current_app.extensions["redis"]


def claim(key: str, owner: str, received_at: datetime) -> str:
    """'claimed' (ours to apply), 'duplicate' (applied from a copy no later than this one; dropped
    from pending, and its message acknowledged when this process consumes it: see
    ``transport.current_delivery``), 'earlier' (applied, but this copy arrived first) or 'busy'
    (another task holds it). ``owner`` is the task's id."""
    keys, args, delivery = _claim_call(key, owner, received_at)
    return _claim_state(_client().eval(_CLAIM, len(keys), *keys, *args), owner, delivery)


# ``_CLAIM`` for a batch's events in one script: KEYS are each event's key, then the pending set's
# three keys and kombu's unacknowledged hash and index; ARGV the claim's TTL, then four values per
# event: the claim, the event's key, its arrival stamp and its message's delivery tag ('' where this
# process does not consume it). The events are taken in order, as the same scripts one after
# another would take them (a second copy of an event in the batch finds the first one's claim), and
# one answer per event comes back. One script instead of one per event: its text crosses the wire
# and is hashed once per batch, and Redis makes one script call.
_CLAIM_MANY = """
local events = #KEYS - 5
local data, due, sends, unacked, index = KEYS[events + 1], KEYS[events + 2], KEYS[events + 3],
  KEYS[events + 4], KEYS[events + 5]
local answers = {}
for i = 1, events do
  local claim, event, arrived, tag = ARGV[i * 4 - 2], ARGV[i * 4 - 1], ARGV[i * 4], ARGV[i * 4 + 1]
  local current = redis.call('get', KEYS[i])
  if not current then
    redis.call('set', KEYS[i], claim, 'EX', ARGV[1])
    answers[i] = 'claimed'
  elseif string.sub(current, 1, 5) == 'done:' and arrived >= string.sub(current, 6) then
    redis.call('hdel', data, event)
    redis.call('zrem', due, event)
    redis.call('hdel', sends, event)
    if tag ~= '' then
      redis.call('hdel', unacked, tag)
      redis.call('zrem', index, tag)
    end
    answers[i] = 'duplicate'
  else
    answers[i] = current
  end
end
return answers
"""


def claim_many(claims: list[tuple[str, str, datetime]]) -> list[str]:
    """``claim`` for a batch's events (key, owner, arrival time) on the Redis broker, where the
    pending set is in use, in one round trip and one script (``_CLAIM_MANY``): the answers are
    those the events' own claims, one after another, would give."""
    if not claims:
        return []
    keys: list[str] = []
    args: list[object] = [CLAIM_TTL_SECONDS]
    deliveries = []
    for key, owner, received_at in claims:
        delivery = transport.current_delivery(owner)
        keys.append(DEDUP_PREFIX + key)
        args += [f"claim:{owner}", key, stamp(received_at), delivery.tag if delivery is not None else ""]
        deliveries.append(delivery)
    keys += [pending.PENDING_DATA, pending.PENDING_DUE, pending.PENDING_SENDS, *transport.unacked_keys()]
    answers = _client().eval(_CLAIM_MANY, len(keys), *keys, *args)
    return [_claim_state(answer, owner, delivery)
            for answer, (_, owner, _), delivery in zip(answers, claims, deliveries, strict=True)]


def _claim_call(key: str, owner: str, received_at: datetime) -> tuple[list[str], list[object], Any]:
    keys = [DEDUP_PREFIX + key]
    args: list[object] = [f"claim:{owner}", CLAIM_TTL_SECONDS, key, stamp(received_at)]
    delivery = None
    if pending.in_use():
        keys += [pending.PENDING_DATA, pending.PENDING_DUE, pending.PENDING_SENDS]
        delivery = transport.current_delivery(owner)
        if delivery is not None:
            keys += list(delivery.unacked_keys)
            args.append(delivery.tag)
    return keys, args, delivery


def _claim_state(answer: bytes, owner: str, delivery: Any) -> str:
    state = answer.decode()
    if state == "duplicate" and delivery is not None:
        transport.acked_by_task(delivery.tag)
    if state in {"claimed", "duplicate"}:
        return state
    if state.startswith(DONE):
        return "earlier"
    # A redelivered message keeps its task id: its own stale claim is still its own.
    return "claimed" if state == f"claim:{owner}" else "busy"


def finish(key: str, received_at: datetime, owner: str | None = None) -> None:
    """Applied: remember it for DEDUP_TTL_SECONDS with the arrival time it was applied at, and
    drop it from the pending set (Redis broker), in one round trip: the acknowledgement of the
    message of task ``owner`` when this process consumes it, else one of its own."""
    ttl = current_app.extensions["settings"].dedup_ttl_seconds
    done = f"{DONE}:{stamp(received_at)}"
    drop = pending.in_use()

    def write(pipe: redis.client.Pipeline) -> None:
        pipe.set(DEDUP_PREFIX + key, done, ex=ttl)
        if drop:
            pending.drop(pipe, key)

    if not drop:
        # The cache alone (RabbitMQ): one command, no transaction. A cluster client follows ASK for
        # a command (a slot being moved) but not for a transaction, which would fail until the
        # move ends.
        _client().set(DEDUP_PREFIX + key, done, ex=ttl)
        return
    if owner is not None and transport.ride_on_ack(owner, write):
        return
    pipe = _client().pipeline(transaction=True)
    write(pipe)
    pipe.execute()


def finish_many(done: list[tuple[str, datetime, str]]) -> None:
    """``finish`` for several applied events (key, arrival time, owner) on the Redis broker, in one
    MULTI/EXEC: every done mark, every pending drop, and the acknowledgement of each message this
    process consumes (its delivery removed from kombu's unacknowledged set, as kombu's own
    acknowledgement does, which then costs no round trip). All of it is written or none."""
    ttl = current_app.extensions["settings"].dedup_ttl_seconds
    pipe = _client().pipeline(transaction=True)
    acked = []
    for key, received_at, owner in done:
        pipe.set(DEDUP_PREFIX + key, f"{DONE}:{stamp(received_at)}", ex=ttl)
        pending.drop(pipe, key)
        delivery = transport.current_delivery(owner)
        if delivery is not None:
            transport.remove_unacked(pipe, delivery)
            acked.append(delivery.tag)
    pipe.execute()
    for tag in acked:
        transport.acked_by_task(tag)


def release(key: str, owner: str) -> None:
    """Give up a claim after a failed transaction, so a retry need not wait for it to expire."""
    try:
        _client().eval(_RELEASE, 1, DEDUP_PREFIX + key, f"claim:{owner}")
    except redis.RedisError:
        log.warning("claim_release_failed", event_key=key)  # it expires on its own
