"""kombu's Redis transport, with the pending entry written in the same round trip as the message.

- A message published with the ``HOLD_HEADER`` header carries an entry for a Redis hash and sorted
  set (the service's pending set). The channel takes the header off the message and writes the
  entry and the message in one script: both are in Redis or neither is, in one round trip.
  Celery still builds the message; only where it is written changes.
- kombu builds a new ``redis.Redis`` object for every publish; with redis-py 8 building one (its
  response-callback tables) costs as much as the LPUSH it is made for. A client over the
  channel's connection pool holds no connection of its own and is thread-safe, so the channel
  keeps one. The asynchronous (BRPOP) client a worker consumes with is left as kombu makes it.
- With ``min_replicas`` (REDIS_MIN_REPLICAS) every publish is followed by ``WAIT`` on the same
  connection, in the same round trip (one non-transactional pipeline): the publish fails unless
  that many replicas acknowledged it, so an acknowledged event survives the loss of the master,
  and so do what the service publishes after it (a retry, a re-send, a replay, a ready hook whose
  outbox row is deleted once the broker has it).
- A task that runs in the thread that consumes its message (the solo pool) can hand its own
  writes to the message's acknowledgement (``ride_on_ack``): they go in the ack's MULTI/EXEC, one
  round trip for both; a task that acknowledged its message itself, inside a script of its own,
  says so (``acked_by_task``) and the ack costs no round trip. Elsewhere (a prefork pool process,
  whose parent acknowledges; a pool thread) the task writes on its own, as before.
- The same channel serves one Redis server (``redis://``) and the master a Sentinel group names
  (``sentinel://``, kombu's Sentinel channel underneath, which finds the master again after a
  failover).
- It leans on kombu internals (``_put``, ``_q_for_pri``, the QoS's unacked hash and index...):
  docs/seams.md lists them, and tests/test_seams.py fails when an upgrade changes one.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps, loads

HOLD_HEADER = "x-voice-hold"

# Checks every key's type before writing anything, so that a key of the wrong type refuses the
# whole publish instead of leaving half of it written (Redis does not undo a script's writes).
# KEYS: hash, sorted set, queue. ARGV: field, value, score, message.
_PUT_HELD = """
local kinds = {redis.call('type', KEYS[1])['ok'], redis.call('type', KEYS[2])['ok'],
               redis.call('type', KEYS[3])['ok']}
local wanted = {'hash', 'zset', 'list'}
for i = 1, 3 do
  if kinds[i] ~= 'none' and kinds[i] ~= wanted[i] then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' is a ' .. kinds[i])
  end
end
redis.call('hsetnx', KEYS[1], ARGV[1], ARGV[2])
redis.call('zadd', KEYS[2], 'NX', ARGV[3], ARGV[1])
return redis.call('lpush', KEYS[3], ARGV[4])
"""


_PUT_HELD_SHA = hashlib.sha1(_PUT_HELD.encode(), usedforsecurity=False).hexdigest()  # how Redis names scripts

# Takes up to ARGV[1] more messages from the list KEYS[1] (those a BRPOP would take next) and
# records each as kombu records a message it hands out (``QoS.append``: field <delivery tag> of
# the unacknowledged hash KEYS[2], valued [message, exchange, routing key], and member of the
# index KEYS[3], scored ARGV[2]), all in one round trip. Only messages of the shape kombu writes
# are taken, the first other one ends the run (kombu's own consumer then takes it, as before);
# the keys' types are checked before anything is written, so a script error takes nothing.
_TAKE_AHEAD = """
local kinds = {redis.call('type', KEYS[2])['ok'], redis.call('type', KEYS[3])['ok']}
if (kinds[1] ~= 'none' and kinds[1] ~= 'hash') or (kinds[2] ~= 'none' and kinds[2] ~= 'zset') then
  return redis.error_reply('WRONGTYPE the unacknowledged hash or its index')
end
local items = redis.call('lrange', KEYS[1], -tonumber(ARGV[1]), -1)
local taken = {}
for i = #items, 1, -1 do
  local ok, message = pcall(cjson.decode, items[i])
  if not ok or type(message) ~= 'table' or type(message['properties']) ~= 'table' then break end
  local properties = message['properties']
  local info = properties['delivery_info']
  if type(properties['delivery_tag']) ~= 'string' or type(info) ~= 'table' then break end
  local ok_ex, exchange = pcall(cjson.encode, info['exchange'])
  local ok_rk, routing_key = pcall(cjson.encode, info['routing_key'])
  if not ok_ex or not ok_rk then break end
  taken[#taken + 1] = {items[i], properties['delivery_tag'], exchange, routing_key}
end
if #taken == 0 then return {} end
redis.call('rpop', KEYS[1], #taken)
local out = {}
for i, t in ipairs(taken) do
  redis.call('zadd', KEYS[3], ARGV[2], t[2])
  redis.call('hset', KEYS[2], t[2], '[' .. t[1] .. ', ' .. t[3] .. ', ' .. t[4] .. ']')
  out[i] = t[1]
end
return out
"""
_TAKE_AHEAD_SHA = hashlib.sha1(_TAKE_AHEAD.encode(), usedforsecurity=False).hexdigest()


class ReplicasBehind(redis.RedisError):
    """Fewer replicas than REDIS_MIN_REPLICAS acknowledged a held write in time."""


# kombu transport options this channel does not handle. ``global_keyprefix`` makes kombu prefix
# every key it writes (queues, the unacked hash and its index), while the held write's script
# (above), app.plumbing.dedup's claim script and app.plumbing.pending name their keys unprefixed: held entries and
# acknowledgements would miss kombu's keys without an error. Refused until those scripts take it.
UNSUPPORTED_OPTIONS = ("global_keyprefix",)


class UnsupportedTransportOption(ValueError):
    """A kombu transport option the project's Redis channel would silently get wrong."""


def refuse_unsupported_options(options: Mapping[str, Any]) -> None:
    """Raise before any channel exists when ``options`` set one of ``UNSUPPORTED_OPTIONS``."""
    for name in UNSUPPORTED_OPTIONS:
        if options.get(name):
            raise UnsupportedTransportOption(
                f"broker transport option {name}={options[name]!r} is not supported by app.plumbing.transport: kombu "
                "would prefix its queue and unacked keys, but the held write, the dedup claim (app.plumbing.dedup) "
                "and the pending set (app.plumbing.pending) use unprefixed keys; remove the option")


class _Acks:
    """Per process: the messages its consuming channel took and has not acknowledged, by task id,
    and what tasks added to their acknowledgements. Used only by a task running in the consuming
    thread itself (the solo pool): a prefork pool process (the parent acknowledges) or a pool
    thread (several messages of one task id could be reserved at once) writes on its own."""

    pid: int | None = None
    thread: int | None = None
    keys: tuple[str, str] = ("unacked", "unacked_index")
    tags: dict[str, str] = {}  # task id -> delivery tag of its message taken last
    ids: dict[str, str] = {}  # delivery tag -> task id
    riders: dict[str, Callable[[Any], None]] = {}  # delivery tag -> adds commands to the ack
    acked: set[str] = set()  # delivery tags the task acknowledged itself


@dataclass(frozen=True)
class Delivery:
    tag: str
    unacked_keys: tuple[str, str]  # kombu's hash of unacknowledged messages, and its index


def current_delivery(task_id: str) -> Delivery | None:
    """The message task ``task_id`` runs for, when the calling thread is the one consuming it."""
    if _Acks.pid != os.getpid() or _Acks.thread != threading.get_ident():
        return None
    tag = _Acks.tags.get(task_id)
    return Delivery(tag, _Acks.keys) if tag is not None else None


def unacked_keys() -> tuple[str, str]:
    """kombu's hash of unacknowledged messages and its index, as this process's channel names them."""
    return _Acks.keys


def ride_on_ack(task_id: str, add: Callable[[Any], None]) -> bool:
    """Have ``add(pipe)`` put its commands in the MULTI/EXEC that acknowledges the task's message;
    False (nothing registered: write now) where this thread does not consume that message."""
    delivery = current_delivery(task_id)
    if delivery is None:
        return False
    _Acks.riders[delivery.tag] = add
    return True


def remove_unacked(pipe: Any, delivery: Delivery) -> None:
    """Add to ``pipe`` what kombu's acknowledgement writes: the delivery out of the unacknowledged
    hash and its index (``QoS._remove_from_indices``); the caller then says ``acked_by_task``."""
    unacked, index = delivery.unacked_keys
    pipe.zrem(index, delivery.tag)
    pipe.hdel(unacked, delivery.tag)


def acked_by_task(delivery_tag: str) -> None:
    """The task removed its message from the unacknowledged set itself (in a script of its own)."""
    _Acks.acked.add(delivery_tag)


def _forget(delivery_tag: str) -> tuple[Callable[[Any], None] | None, bool]:
    task_id = _Acks.ids.pop(delivery_tag, None)
    if task_id is not None and _Acks.tags.get(task_id) == delivery_tag:
        del _Acks.tags[task_id]
    acked = delivery_tag in _Acks.acked
    _Acks.acked.discard(delivery_tag)
    return _Acks.riders.pop(delivery_tag, None), acked


class QoS(kombu_redis.QoS):
    """kombu's unacknowledged-message bookkeeping, carrying what a task added to its message's
    acknowledgement (see ``ride_on_ack``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: set[str] = set()  # delivery tags the take-ahead script recorded already
        _Acks.pid = os.getpid()
        _Acks.keys = (self.unacked_key, self.unacked_index_key)

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:  # in Redis already: only the channel's own bookkeeping
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)
        task_id = (message.headers or {}).get("id")
        if task_id:
            _Acks.thread = threading.get_ident()
            _Acks.tags[task_id] = delivery_tag
            _Acks.ids[delivery_tag] = task_id

    def ack(self, delivery_tag: str) -> None:
        rider, acked = _forget(delivery_tag)
        if not acked:
            pipe = self._remove_from_indices(delivery_tag)
            if rider is not None:
                rider(pipe)
            pipe.execute()
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        rider, _acked = _forget(delivery_tag)
        if rider is not None:  # what the task committed is remembered even when its message is rejected
            with self.pipe_or_acquire() as pipe:
                rider(pipe)
                pipe.execute()
        super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client: Any = None) -> None:
        super().restore_unacked(client)
        for tag in list(_Acks.ids):  # the connection is gone: so are its deliveries
            _forget(tag)


class HoldingChannel:
    """What the project adds to kombu's Redis channels (mixed into the plain and the Sentinel one)."""

    _sync_client: Any = None
    # Transport options (REDIS_MIN_REPLICAS, REDIS_REPLICA_TIMEOUT_MS): 0 waits for no replica.
    min_replicas: int = 0
    replica_timeout_ms: int = 200
    # Transport option: queues whose waiting messages a consumer takes ahead, as many as its
    # prefetch allows, in one round trip after each message BRPOP gave it.
    take_ahead_queues: tuple[str, ...] = ()

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        refuse_unsupported_options(connection.client.transport_options or {})
        super().__init__(connection, **kwargs)

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._sync_client is None:
            self._sync_client = super()._create_client()
        return self._sync_client

    def _brpop_read(self, **options: Any) -> bool:
        """kombu's read of a BRPOP reply (one message delivered); then, as the consumer's
        prefetch allows, the messages waiting behind it in a take-ahead queue, in one round trip."""
        delivered = super()._brpop_read(**options)
        if delivered and self.take_ahead_queues:
            self._take_ahead()
        return delivered

    def _take_ahead(self) -> None:
        room = self.qos.can_consume_max_estimate()
        for queue in self.take_ahead_queues:
            if not room or queue not in self.active_queues:
                continue
            key = self._q_for_pri(queue, self.priority_steps[0])
            keys = [key, self.qos.unacked_key, self.qos.unacked_index_key]
            try:
                with self.conn_or_acquire() as client:
                    try:
                        items = client.evalsha(_TAKE_AHEAD_SHA, len(keys), *keys, room, time.time())
                    except redis.exceptions.NoScriptError:
                        client.script_load(_TAKE_AHEAD)
                        items = client.evalsha(_TAKE_AHEAD_SHA, len(keys), *keys, room, time.time())
            except redis.RedisError:
                return  # nothing was taken (one script): the next BRPOP takes them one by one
            for item in items:
                message = loads(item)
                self.qos.recorded.add(message["properties"]["delivery_tag"])
                self.connection._deliver(message, queue)
                room -= 1

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        hold = (message.get("headers") or {}).pop(HOLD_HEADER, None)
        if hold is None or kwargs.get("_publish_batch") is not None or (self._expires and queue in self._expires):
            if hold is not None:
                raise ValueError(f"{HOLD_HEADER} is not supported on batched or expiring queues")
            if self.min_replicas and kwargs.get("_publish_batch") is None and not (
                    self._expires and queue in self._expires):
                key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
                with self.conn_or_acquire() as client:
                    push(client, key, dumps(message), None, self.min_replicas, self.replica_timeout_ms)
                return None
            return super()._put(queue, message, **kwargs)
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client:
            push(client, key, dumps(message), hold, self.min_replicas, self.replica_timeout_ms)
        return None


def push(client: redis.Redis, key: str, message: str, hold: Mapping[str, Any] | None, min_replicas: int = 0,
         replica_timeout_ms: int = 200) -> None:
    """Write a serialized message to the list ``key`` the way kombu's Redis channel does (LPUSH),
    with its pending entry when ``hold`` is given (the script: both or neither), and with
    ``min_replicas`` followed by WAIT on the same connection, in the same round trip. The channel's
    ``_put`` and the web's publish (``app.plumbing.publish``) both write through here."""
    if hold is None:
        if not min_replicas:
            client.lpush(key, message)
            return
        pipe = client.pipeline(transaction=False)
        pipe.lpush(key, message)
        pipe.execute_command("WAIT", min_replicas, replica_timeout_ms)
        _pushed, acknowledged = pipe.execute()
        _enough_replicas(acknowledged, min_replicas, replica_timeout_ms)
        return
    keys = [hold["hash"], hold["zset"], key]
    args = [hold["field"], hold["value"], hold["score"], message]
    if min_replicas:
        _put_held_and_wait(client, keys, args, min_replicas, replica_timeout_ms)
        return
    try:
        client.evalsha(_PUT_HELD_SHA, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:  # first use on this server, or a newly promoted master
        client.script_load(_PUT_HELD)
        client.evalsha(_PUT_HELD_SHA, len(keys), *keys, *args)


def _enough_replicas(acknowledged: Any, min_replicas: int, replica_timeout_ms: int) -> None:
    if int(acknowledged) < min_replicas:
        raise ReplicasBehind(f"{acknowledged} of {min_replicas} replicas acknowledged the write "
                             f"within {replica_timeout_ms} ms")


def _put_held_and_wait(client: redis.Redis, keys: list[str], args: list[Any], min_replicas: int,
                       replica_timeout_ms: int) -> None:
    """The script, then WAIT, in one round trip on one connection (WAIT counts the replicas that
    hold every write its own connection made). redis-py's Script object would add a SCRIPT EXISTS
    round trip to a pipeline, so the script is sent by its SHA-1 and loaded only when the server
    does not know it (first use, or a newly promoted master)."""
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        pipe.evalsha(_PUT_HELD_SHA, len(keys), *keys, *args)
        pipe.execute_command("WAIT", min_replicas, replica_timeout_ms)
        written, acknowledged = pipe.execute(raise_on_error=False)
        if isinstance(written, redis.exceptions.NoScriptError) and attempt == 1:
            client.script_load(_PUT_HELD)
            continue
        if isinstance(written, Exception):
            raise written
        if isinstance(acknowledged, Exception):
            raise acknowledged
        _enough_replicas(acknowledged, min_replicas, replica_timeout_ms)
        return


_OPTIONS = ("min_replicas", "replica_timeout_ms", "take_ahead_queues")


class Channel(HoldingChannel, kombu_redis.Channel):
    QoS = QoS
    from_transport_options = kombu_redis.Channel.from_transport_options + _OPTIONS


class SentinelChannel(HoldingChannel, kombu_redis.SentinelChannel):
    QoS = QoS
    from_transport_options = kombu_redis.SentinelChannel.from_transport_options + _OPTIONS


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
