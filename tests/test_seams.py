"""Contracts for the private kombu and Celery internals the service leans on (docs/seams.md).

Each seam is relied on for a measured reason, and an upgrade that changed it would not raise: the
held write would skip the pending set, a duplicate would stay unacknowledged, a retry would wait in
a worker's memory. So each seam has a check, ``check_<seam>(env)``, which exercises the installed
kombu/Celery against a real Redis and raises ``AssertionError("seam <seam>: ...")`` naming what the
service assumes; a test that runs it (``test_seam_<seam>``); and an entry in ``SEAMS`` with a
deliberate change to that seam, under which ``test_each_contract_catches_a_changed_seam`` shows the
check failing. A check that can only read a signature says why behaviour is out of its reach.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import inspect
import json
import logging
import shlex
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import redis
from celery.bin.base import CLIContext
from celery.concurrency.solo import TaskPool as SoloPool
from celery.events.dispatcher import EventDispatcher
from celery.utils.nodenames import gethostname
from celery.worker import control as worker_control
from celery.worker import request as worker_request
from celery.worker import state as worker_state
from celery.worker import strategy as celery_strategy
from celery.worker.consumer import Consumer as CeleryConsumer
from flask import Flask
from kombu import Connection, Consumer, Producer, Queue
from kombu.asynchronous import Hub
from kombu.asynchronous.timer import Timer
from kombu.message import Message
from kombu.transport import native_delayed_delivery, virtual
from kombu.transport import redis as kombu_redis

from app.applying import fastpath
from app.base.timeutil import parse_rfc3339, stamp
from app.celery_app import UNACKED_RESTORE_INTERVAL, VISIBILITY_TIMEOUT, celery_config
from app.payload.envelope import Envelope
from app.payload.events import Event
from app.plumbing import dedup, transport
from app.plumbing.publish import AmqpPublisher, TaskMessages, send
from app.plumbing.queues import APPLY_EVENT_TASK, WEBHOOK_QUEUE
from app.plumbing.transport import HOLD_HEADER
from config import Settings
from tests.support import ROOT, RedisServer, rabbitmq_vhost

PROJECT_TRANSPORT = "app.plumbing.transport:Transport"
KOMBU_TRANSPORT = "redis"  # kombu's own Redis transport, for what kombu itself writes and reads
QUEUE = "seam-queue"
PROBE = "seam:probe"
HELD_HASH, HELD_ZSET = "seam:held:data", "seam:held:due"


# --- what every check gets ------------------------------------------------------------------------


@dataclass
class SeamEnv:
    """A real Redis (flushed), the service's app on it (SQLite), and connections closed afterwards."""

    redis_url: str
    sqlite_url: str
    app: Flask
    build: Callable[[Settings], Flask]
    client: redis.Redis
    tmp_path: Path
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def connection(self, transport_name: str = PROJECT_TRANSPORT, url: str | None = None,
                   **options: Any) -> Connection:
        conn = Connection(url or self.redis_url, transport=transport_name, transport_options=options)
        self.cleanups.append(conn.release)
        return conn


@pytest.fixture
def env(redis_server: RedisServer, sqlite_url: str, make_app: Any, tmp_path: Path) -> Iterator[SeamEnv]:
    """Checks register deliveries in app.plumbing.transport's per-process bookkeeping and claims in
    app.applying.fastpath's; both are put back as they were, so no other test sees them."""
    app = make_app(Settings(database_url=sqlite_url, redis_url=redis_server.url, log_format="console"))
    acks = transport._Acks
    saved = (acks.pid, acks.thread, acks.keys, dict(acks.tags), dict(acks.ids), dict(acks.riders),
             set(acks.acked), dict(fastpath._CLAIMED))
    seams = SeamEnv(redis_server.url, sqlite_url, app, make_app, redis.Redis.from_url(redis_server.url), tmp_path)
    try:
        yield seams
    finally:
        for cleanup in reversed(seams.cleanups):
            with contextlib.suppress(Exception):  # a check that stopped its own broker
                cleanup()
        seams.client.close()
        acks.pid, acks.thread, acks.keys = saved[:3]
        for live, kept in zip((acks.tags, acks.ids, acks.riders, acks.acked, fastpath._CLAIMED), saved[3:],
                              strict=True):
            live.clear()
            live.update(kept)


Check = Callable[[SeamEnv], None]


def seam(name: str) -> Callable[[Check], Check]:
    """Make a check fail as ``seam <name>: <what went wrong>``, followed by what the service assumes
    (the check's docstring, first paragraph), whatever it raised: an upgrade may as well rename a
    method (AttributeError) or change a signature (TypeError) as change a behaviour."""

    def wrap(check: Check) -> Check:
        assumed = " ".join((check.__doc__ or "").strip().split("\n\n")[0].split())

        @functools.wraps(check)
        def run(seams: SeamEnv) -> None:
            try:
                check(seams)
            except Exception as exc:
                detail = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
                raise AssertionError(f"seam {name}: {detail}\n  the service assumes: {assumed}") from exc

        run.seam_name = name  # type: ignore[attr-defined]
        return run

    return wrap


# --- helpers on real parts -----------------------------------------------------------------------


class Taker:
    """kombu's own consumer on a channel of its own, in this thread (as a solo worker consumes):
    every message taken stays unacknowledged until the check acknowledges it."""

    def __init__(self, connection: Connection, queue: str) -> None:
        self.connection = connection
        self.channel = connection.channel()
        self.received: list[Message] = []
        Consumer(self.channel, [Queue(queue, routing_key=queue)], on_message=self.received.append,
                 accept=["json"]).consume()

    def take(self, timeout: float = 2.0) -> Message | None:
        deadline = time.monotonic() + timeout
        while not self.received:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                self.connection.drain_events(timeout=left)
        return self.received.pop(0)


def take_one(connection: Connection, queue: str) -> Message:
    message = Taker(connection, queue).take()
    assert message is not None, f"no message arrived on {queue!r} within 2 s"
    return message


def publish(connection: Connection, queue: str, task_id: str, *, held: bool = False, priority: int = 0) -> None:
    """A message as Celery's are published (task id in the headers), optionally held."""
    headers: dict[str, Any] = {"id": task_id}
    if held:
        headers[HOLD_HEADER] = {"hash": HELD_HASH, "zset": HELD_ZSET, "field": task_id, "value": "held", "score": 1.0}
    Producer(connection.default_channel).publish({"probe": task_id}, routing_key=queue, exchange="", serializer="json",
                                                headers=headers, declare=[], retry=False, priority=priority)


def holders_of(client: redis.Redis, tag: str) -> list[str]:
    """Every hash or sorted set in Redis that still records ``tag`` (as a field or a member)."""
    found = []
    for key in client.scan_iter():
        kind = client.type(key)
        if (kind == b"hash" and client.hexists(key, tag)) or (kind == b"zset" and client.zscore(key, tag) is not None):
            found.append(key.decode())
    return sorted(found)


def list_holding(client: redis.Redis) -> dict[str, str]:
    """Which Redis list holds each queued message, by task id."""
    found = {}
    for key in client.scan_iter():
        if client.type(key) == b"list":
            for raw in client.lrange(key, 0, -1):
                found[json.loads(raw)["headers"]["id"]] = key.decode()
    return found


def snapshot(client: redis.Redis) -> dict[str, Any]:
    """Every key and its content (a sorted set's members without scores)."""
    state: dict[str, Any] = {}
    for key in client.scan_iter():
        kind = client.type(key).decode()
        state[key.decode()] = {"hash": client.hgetall, "list": lambda k: client.lrange(k, 0, -1),
                               "set": client.smembers, "zset": lambda k: set(client.zrange(k, 0, -1)),
                               }.get(kind, client.get)(key)
    return state


def event_envelope(session: str) -> Envelope:
    fields = {"sessionId": session, "status": "completed", "phoneNumber": "+254712345678"}
    event = Event(session, "completed", "+254712345678", None, None, fields)
    return Envelope(event.to_message(), "2026-03-06T14:00:00+00:00", "req-seams")


def send_event(seams: SeamEnv, envelope: Envelope) -> None:
    """The webhook's publish: the apply task's message, held in the pending set."""
    with seams.app.app_context():
        send(envelope, WEBHOOK_QUEUE, hold=True)


def mark_applied(seams: SeamEnv, envelope: Envelope) -> None:
    """The event's dedup key as app.plumbing.dedup.finish leaves it: applied, so its copies are duplicates."""
    seams.client.set(dedup.DEDUP_PREFIX + envelope.key, f"{dedup.DONE}:{stamp(parse_rfc3339(envelope.received_at))}")


def claimed_elsewhere(seams: SeamEnv, envelope: Envelope) -> None:
    """Another task holds the event's claim: the strategy's batch leaves it to a task request."""
    with seams.app.app_context():
        assert dedup.claim(envelope.key, "another-task", parse_rfc3339(envelope.received_at)) == "claimed"


def celery_consumer(seams: SeamEnv, requests: list[Any], **options: Any) -> CeleryConsumer:
    """Celery's own worker consumer for the service's app, built but not started: what the worker's
    steps call ``update_strategies`` and ``create_task_handler`` on. Starting it would start a
    worker; the controller stands in for the WorkController, of which the consumer's steps read
    these two attributes only."""
    controller = types.SimpleNamespace(state=worker_state, use_eventloop=False)
    consumer = CeleryConsumer(requests.append, app=seams.app.extensions["celery"], hostname="seams@test",
                              pool=SoloPool(), timer=Timer(), controller=controller, **options)
    seams.cleanups.append(lambda: [worker_state.task_ready(request) for request in requests])
    return consumer


# --- kombu's Redis transport: the unacknowledged-message bookkeeping -----------------------------


@seam("kombu_redis_unacked_keys")
def check_kombu_redis_unacked_keys(seams: SeamEnv) -> None:
    """kombu records a message it hands out, until acknowledged, as field <delivery tag> of the hash
    QoS.unacked_key and member <delivery tag> of the sorted set QoS.unacked_index_key, and nowhere
    else; app.plumbing.transport.current_delivery hands those key names to app/plumbing/dedup.py's claim script."""
    conn = seams.connection()
    publish(conn, QUEUE, "seam-task")
    message = take_one(conn, QUEUE)
    delivery = transport.current_delivery("seam-task")
    assert delivery is not None, ("QoS.append did not register the message by task id "
                                  "(app.plumbing.transport.QoS not used)")
    assert delivery.tag == message.delivery_tag, f"recorded tag {delivery.tag!r}, message tag {message.delivery_tag!r}"
    hash_key, index_key = delivery.unacked_keys
    raw = seams.client.hget(hash_key, delivery.tag)
    assert raw is not None, f"kombu did not record delivery tag {delivery.tag} in hash {hash_key!r}"
    assert seams.client.zscore(index_key, delivery.tag) is not None, (
        f"kombu did not record delivery tag {delivery.tag} in sorted set {index_key!r}")
    payload, _exchange, routing_key = json.loads(raw)
    assert routing_key == QUEUE and payload["headers"]["id"] == "seam-task", f"hash value {raw[:200]!r}"
    holders = holders_of(seams.client, delivery.tag)
    assert holders == sorted(delivery.unacked_keys), f"kombu records the delivery in {holders}"


def _unacked_per_queue(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    def append(self: Any, message: Any, delivery_tag: str) -> None:  # kombu N+1: one hash and index per queue
        queue = message.delivery_info["routing_key"]
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(f"{self.unacked_index_key}:{queue}", {delivery_tag: time.time()})
            pipe.hset(f"{self.unacked_key}:{queue}", delivery_tag, json.dumps([message._raw, "", queue]))
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)

    mp.setattr(kombu_redis.QoS, "append", append)


@seam("kombu_redis_channel_brpop_read")
def check_kombu_redis_channel_brpop_read(seams: SeamEnv) -> None:
    """kombu's Redis channel reads each BRPOP reply in ``_brpop_read(**options)``, which delivers
    its one message and returns True; app.plumbing.transport's channel then takes the messages
    waiting behind it in a take-ahead queue, as many as the consumer's prefetch leaves room for
    (``qos.can_consume_max_estimate()``), records each as kombu records the message it hands out
    (the unacked hash's [message, exchange, routing key], the index) and delivers them."""
    conn = seams.connection(take_ahead_queues=(QUEUE,))
    ids = [f"ahead-{i}" for i in range(4)]
    for task_id in ids:
        publish(conn, QUEUE, task_id)
    taker = Taker(conn, QUEUE)
    taker.channel.basic_qos(0, 3, False)
    first = taker.take()
    assert first is not None, "nothing was delivered"
    taken = [first, *taker.received]
    assert [m.headers["id"] for m in taken] == ids[:3], (
        f"after the BRPOP's message the channel delivered {[m.headers['id'] for m in taken]}, not the next ones up "
        "to the prefetch of 3: the take-ahead did not run")
    qos = taker.channel.qos
    for message in taken:
        payload, exchange, routing_key = json.loads(seams.client.hget(qos.unacked_key, message.delivery_tag))
        assert (payload["headers"]["id"], exchange, routing_key) == (message.headers["id"], "", QUEUE), payload
        assert seams.client.zscore(qos.unacked_index_key, message.delivery_tag) is not None
    assert list(list_holding(seams.client)) == ids[3:], "the take-ahead took more than the prefetch's room"
    qos.restore_unacked()  # a closing connection's deliveries go back, the taken-ahead ones with them
    assert sorted(list_holding(seams.client)) == ids, f"back in the queue: {sorted(list_holding(seams.client))}"


def _brpop_reply_read_by_kombu_alone(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    original = kombu_redis.Channel.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # kombu N+1: the reply read elsewhere
        original(self, *args, **kwargs)
        self.handlers["BRPOP"] = functools.partial(kombu_redis.Channel._brpop_read, self)

    mp.setattr(kombu_redis.Channel, "__init__", __init__)


@seam("dedup_claim_acknowledges_by_delivery_tag")
def check_dedup_claim_acknowledges_by_delivery_tag(seams: SeamEnv) -> None:
    """HDEL of the delivery tag from kombu's unacked hash and ZREM from its index, as app/plumbing/dedup.py's
    claim script does for a duplicate and its batch's done marks do for an applied event, acknowledge
    the message: kombu keeps no other record of it and does not deliver it again."""
    envelope = event_envelope("SEAM-DUPLICATE")
    send_event(seams, envelope)
    mark_applied(seams, envelope)
    message = take_one(seams.connection(), WEBHOOK_QUEUE)
    with seams.app.app_context():
        state = dedup.claim(envelope.key, message.headers["id"], parse_rfc3339(envelope.received_at))
    assert state == "duplicate", f"the claim answered {state!r}"
    left = holders_of(seams.client, message.delivery_tag)
    assert left == [], (f"after the claim's HDEL/ZREM kombu still records delivery tag {message.delivery_tag} "
                        f"in {left}: the turned-away duplicate would be delivered again")
    message.channel.qos.restore_unacked()  # what kombu does with a closing connection's deliveries
    assert seams.client.llen(WEBHOOK_QUEUE) == 0, "kombu put the message the claim acknowledged back in its queue"
    # The same writes in a batch's done marks (dedup.finish_many: transport.remove_unacked).
    applied = event_envelope("SEAM-APPLIED")
    send_event(seams, applied)
    message = take_one(seams.connection(), WEBHOOK_QUEUE)
    with seams.app.app_context():
        dedup.finish_many([(applied.key, parse_rfc3339(applied.received_at), message.headers["id"])])
    left = holders_of(seams.client, message.delivery_tag)
    assert left == [], f"after a batch's done marks kombu still records delivery tag {message.delivery_tag} in {left}"
    message.channel.qos.restore_unacked()
    assert seams.client.llen(WEBHOOK_QUEUE) == 0, "kombu put the message a batch acknowledged back in its queue"


def _unacked_also_indexed_elsewhere(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    original = kombu_redis.QoS.append

    def append(self: Any, message: Any, delivery_tag: str) -> None:  # kombu N+1: a second index, per consumer
        original(self, message, delivery_tag)
        with self.channel.conn_or_acquire() as client:
            client.zadd("unacked_by_consumer", {delivery_tag: time.time()})

    mp.setattr(kombu_redis.QoS, "append", append)


@seam("kombu_redis_qos_remove_from_indices")
def check_kombu_redis_qos_remove_from_indices(seams: SeamEnv) -> None:
    """QoS._remove_from_indices(tag) returns a MULTI/EXEC pipeline, not yet executed, that removes
    the tag from the unacked hash and index: app.plumbing.transport.QoS.ack adds a task's own writes (the
    done mark, the pending drop) to it, so both go in one round trip."""
    message = take_one(_published(seams), QUEUE)
    tag = message.delivery_tag
    pipe = message.channel.qos._remove_from_indices(tag)
    assert isinstance(pipe, redis.client.Pipeline), (
        f"it returned {pipe!r}, not a pipeline QoS.ack can add commands to")
    assert pipe.transaction, "the pipeline is not a MULTI/EXEC transaction"
    assert len(holders_of(seams.client, tag)) == 2, "it removed the message before the pipeline was executed"
    pipe.set(PROBE, tag)
    pipe.execute()
    assert holders_of(seams.client, tag) == [], f"executing it left the tag in {holders_of(seams.client, tag)}"
    assert seams.client.get(PROBE) == tag.encode(), "a command added to the pipeline was not executed with it"


def _published(seams: SeamEnv) -> Connection:
    conn = seams.connection()
    publish(conn, QUEUE, "seam-task")
    return conn


def _remove_at_once(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    def remove(self: Any, delivery_tag: str, pipe: Any = None) -> Any:  # kombu N+1: removes, returns replies
        with self.pipe_or_acquire(pipe) as p:
            return p.zrem(self.unacked_index_key, delivery_tag).hdel(self.unacked_key, delivery_tag).execute()

    mp.setattr(kombu_redis.QoS, "_remove_from_indices", remove)


@seam("kombu_redis_qos_pipe_or_acquire")
def check_kombu_redis_qos_pipe_or_acquire(seams: SeamEnv) -> None:
    """QoS.pipe_or_acquire() is a context manager yielding a MULTI/EXEC pipeline on the broker's
    Redis: app.plumbing.transport.QoS.reject writes what a task added to its rejected message's ack there."""
    qos = seams.connection().default_channel.qos
    with qos.pipe_or_acquire() as pipe:
        assert isinstance(pipe, redis.client.Pipeline), f"it yielded a {type(pipe).__name__}, not a pipeline"
        assert pipe.transaction, "the pipeline is not a MULTI/EXEC transaction"
        pipe.set(PROBE, "1")
        assert seams.client.get(PROBE) is None, "the command ran before execute()"
        pipe.execute()
    assert seams.client.get(PROBE) == b"1", "the pipeline's commands did not reach the broker's Redis"


def _pipe_or_acquire_yields_client(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    @contextlib.contextmanager
    def pipe_or_acquire(self: Any, pipe: Any = None, client: Any = None) -> Iterator[Any]:  # kombu N+1
        with self.channel.conn_or_acquire(client) as acquired:
            yield pipe or acquired

    mp.setattr(kombu_redis.QoS, "pipe_or_acquire", pipe_or_acquire)


@seam("kombu_redis_qos_ack")
def check_kombu_redis_qos_ack(seams: SeamEnv) -> None:
    """kombu's Redis QoS.ack does, in Redis, nothing but remove the tag from the unacked hash and
    index, then calls virtual.QoS.ack: app.plumbing.transport.QoS.ack replaces it with exactly that (plus a
    task's rider), skipping the round trip when the task's claim script already acknowledged."""
    assert kombu_redis.QoS.__mro__[1] is virtual.QoS, f"kombu's Redis QoS now derives from {kombu_redis.QoS.__mro__[1]}"
    message = take_one(_published(seams), QUEUE)
    qos, tag = message.channel.qos, message.delivery_tag
    before = snapshot(seams.client)
    kombu_redis.QoS.ack(qos, tag)  # kombu's own, which the service's override stands in for
    after = snapshot(seams.client)
    expected = {key: value for key, value in before.items() if key not in {qos.unacked_key, qos.unacked_index_key}}
    for key in (qos.unacked_key, qos.unacked_index_key):
        rest = ({f: v for f, v in before[key].items() if f != tag.encode()} if isinstance(before[key], dict)
                else before[key] - {tag.encode()})
        if rest:
            expected[key] = rest
    changed = sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))
    assert after == expected, (f"kombu's own ack changed {changed}, beyond removing the tag from {qos.unacked_key!r} "
                               f"and {qos.unacked_index_key!r}: app.plumbing.transport.QoS.ack does only that")


def _ack_counts_too(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    def ack(self: Any, delivery_tag: str) -> None:  # kombu N+1: also counts acknowledgements
        self._remove_from_indices(delivery_tag).incr("unacked_acks").execute()
        virtual.QoS.ack(self, delivery_tag)

    mp.setattr(kombu_redis.QoS, "ack", ack)


@seam("kombu_redis_channel_qos_class")
def check_kombu_redis_channel_qos_class(seams: SeamEnv) -> None:
    """A channel's QoS is an instance of its class's ``QoS`` attribute (app.plumbing.transport.QoS), and kombu
    routes a message's ack and reject through QoS.ack and QoS.reject, where what a task registered
    with ride_on_ack (app.plumbing.dedup.finish's done mark) is written with the acknowledgement."""
    conn = seams.connection()
    publish(conn, QUEUE, "seam-acked")
    publish(conn, QUEUE, "seam-rejected")
    taker = Taker(conn, QUEUE)
    acked, rejected = taker.take(), taker.take()
    assert acked is not None and rejected is not None, "the two messages did not arrive"
    assert type(acked.channel.qos) is transport.QoS, f"the channel's QoS is {type(acked.channel.qos)}"
    assert transport.ride_on_ack("seam-acked", lambda pipe: pipe.set(PROBE, "acked"))
    acked.ack()
    assert seams.client.get(PROBE) == b"acked", ("message.ack() did not reach app.plumbing.transport.QoS.ack: "
                                                 "the rider never ran")
    assert holders_of(seams.client, acked.delivery_tag) == [], "the acknowledged message is still recorded"
    assert transport.ride_on_ack("seam-rejected", lambda pipe: pipe.set(PROBE, "rejected"))
    rejected.reject(requeue=False)
    assert seams.client.get(PROBE) == b"rejected", "message.reject() did not reach app.plumbing.transport.QoS.reject"


def _basic_ack_past_the_override(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    def basic_ack(self: Any, delivery_tag: str, multiple: bool = False) -> None:  # kombu N+1
        kombu_redis.QoS.ack(self.qos, delivery_tag)

    mp.setattr(virtual.Channel, "basic_ack", basic_ack)


@seam("kombu_redis_qos_restore_unacked")
def check_kombu_redis_qos_restore_unacked(seams: SeamEnv) -> None:
    """Closing a channel calls QoS.restore_unacked, which puts its unacknowledged messages back in
    their queues: app.plumbing.transport.QoS.restore_unacked also forgets the connection's deliveries there,
    so no task rides its writes on an acknowledgement that can no longer happen."""
    message = take_one(_published(seams), QUEUE)
    assert transport.current_delivery("seam-task") is not None, "the delivery was not registered"
    message.channel.close()
    assert transport.current_delivery("seam-task") is None, (
        "closing the channel did not call QoS.restore_unacked: app.plumbing.transport still holds the delivery")
    assert seams.client.llen(QUEUE) == 1, "the unacknowledged message was not put back in its queue"
    assert holders_of(seams.client, message.delivery_tag) == [], "the restored message is still recorded as unacked"


def _restore_without_restore_unacked(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    def restore_unacked_once(self: Any, stderr: Any = None) -> None:  # kombu N+1: restores tag by tag
        self._flush()
        for tag in list(self._delivered):
            self.restore_by_tag(tag)
        self._delivered.clear()

    mp.setattr(virtual.QoS, "restore_unacked_once", restore_unacked_once)


# --- kombu's Redis transport: the channel's write path --------------------------------------------


@seam("kombu_redis_channel_put")
def check_kombu_redis_channel_put(seams: SeamEnv) -> None:
    """kombu writes every published message through Channel._put(queue, message, **kwargs), which
    app.plumbing.transport overrides to write a held message and its pending entry in one script."""
    conn = seams.connection()
    publish(conn, QUEUE, "seam-held", held=True)
    assert seams.client.hget(HELD_HASH, "seam-held") == b"held", (
        "the pending entry was not written: the publish did not go through app.plumbing.transport's _put")
    assert seams.client.zscore(HELD_ZSET, "seam-held") == 1.0, "the pending entry's due time was not written"
    queued = [json.loads(raw) for raw in seams.client.lrange(QUEUE, 0, -1)]
    assert [m["headers"]["id"] for m in queued] == ["seam-held"], f"queued: {queued}"
    assert HOLD_HEADER not in queued[0]["headers"], "the hold header reached the queue"


def _publish_past_put(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    original = virtual.Channel.basic_publish

    def basic_publish(self: Any, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> Any:  # kombu N+1
        self._put = types.MethodType(kombu_redis.Channel._put, self)  # writes through its own method
        try:
            return original(self, message, exchange, routing_key, **kwargs)
        finally:
            del self._put

    mp.setattr(virtual.Channel, "basic_publish", basic_publish)


@seam("kombu_redis_channel_expires")
def check_kombu_redis_channel_expires(seams: SeamEnv) -> None:
    """Channel._expires maps each queue declared with x-expires to its TTL: app.plumbing.transport's held
    write (one script, no PEXPIRE) refuses those queues rather than leave their keys without a TTL."""
    conn = seams.connection()
    channel = conn.default_channel
    Queue("seam-expiring", routing_key="seam-expiring", expires=60).bind(channel).declare()
    assert channel._expires.get("seam-expiring") == 60000, (
        f"a queue declared with x-expires is not in Channel._expires ({channel._expires!r})")
    try:
        publish(conn, "seam-expiring", "seam-held", held=True)
    except ValueError:
        pass
    else:
        raise AssertionError("a held write to an expiring queue was accepted, its key left without a TTL")
    publish(conn, "seam-expiring", "seam-plain")
    assert 0 < seams.client.pttl("seam-expiring") <= 60000, "kombu's own write to an expiring queue set no TTL"


def _expires_kept_elsewhere(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    def _new_queue(self: Any, queue: str, auto_delete: bool = False, **kwargs: Any) -> None:  # kombu N+1
        self.__dict__.setdefault("_queue_ttls", {})[queue] = self._get_queue_expire(kwargs)

    mp.setattr(kombu_redis.Channel, "_new_queue", _new_queue)


def _held_lands_with_kombus_own(seams: SeamEnv, priority: int) -> None:
    """A held message of ``priority`` is written to the list kombu's own publish writes it to."""
    publish(seams.connection(KOMBU_TRANSPORT), QUEUE, f"kombu-{priority}", priority=priority)
    publish(seams.connection(), QUEUE, f"held-{priority}", held=True, priority=priority)
    lists = list_holding(seams.client)
    assert lists.get(f"held-{priority}") == lists.get(f"kombu-{priority}"), (
        f"at priority {priority} the held write went to {lists.get(f'held-{priority}')!r}, "
        f"kombu's own to {lists.get(f'kombu-{priority}')!r}")


@seam("kombu_redis_channel_q_for_pri")
def check_kombu_redis_channel_q_for_pri(seams: SeamEnv) -> None:
    """Channel._q_for_pri(queue, priority) names the list kombu writes a message of that priority to,
    and at priority 0 (the service's) it is the queue's own name, which the service's tests and
    benchmarks read (LLEN voice-webhooks)."""
    channel = seams.connection().default_channel
    at_zero = channel._q_for_pri(WEBHOOK_QUEUE, 0)
    assert at_zero == WEBHOOK_QUEUE, f"priority 0 of {WEBHOOK_QUEUE!r} maps to {at_zero!r}"
    for priority in (0, 9):
        _held_lands_with_kombus_own(seams, priority)


def _prefixed_queue_keys(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    def _q_for_pri(self: Any, queue: str, pri: int) -> str:  # kombu N+1: queues under a prefix
        return f"_kombu.queue.{queue}{self.sep}{self.priority(pri)}"

    mp.setattr(kombu_redis.Channel, "_q_for_pri", _q_for_pri)


@seam("kombu_redis_channel_get_message_priority")
def check_kombu_redis_channel_get_message_priority(seams: SeamEnv) -> None:
    """Channel._get_message_priority(message, reverse=False) reads properties.priority (0 when
    absent), as kombu's _put does: app.plumbing.transport's held write picks its list with it."""
    channel = seams.connection().default_channel
    assert channel._get_message_priority({"properties": {"priority": 6}}, reverse=False) == 6
    assert channel._get_message_priority({"properties": {}}, reverse=False) == 0
    _held_lands_with_kombus_own(seams, 6)


def _priority_without_reverse(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    original = virtual.Channel._get_message_priority

    def _get_message_priority(self: Any, message: Any) -> int:  # kombu N+1: the reverse flag is gone
        return original(self, message)

    mp.setattr(kombu_redis.Channel, "_get_message_priority", _get_message_priority)


@seam("kombu_redis_channel_priority_steps")
def check_kombu_redis_channel_priority_steps(seams: SeamEnv) -> None:
    """kombu's consumer reads every list _q_for_pri maps a priority to (BRPOP over priority_steps):
    a held message of any priority 0-9 reaches a worker."""
    held = seams.connection()
    for priority in range(10):
        publish(held, QUEUE, f"held-{priority}", held=True, priority=priority)
    taker = Taker(seams.connection(KOMBU_TRANSPORT), QUEUE)
    taken = set()
    while len(taken) < 10 and (message := taker.take(timeout=1.0)) is not None:
        taken.add(message.headers["id"])
    left = list_holding(seams.client)
    assert not left, (f"kombu's consumer (priority_steps {taker.channel.priority_steps}) never read "
                      f"{sorted(set(left.values()))}, holding {sorted(left)}")


def _consumer_reads_base_key_only(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    original = kombu_redis.Channel._brpop_start

    def _brpop_start(self: Any, timeout: Any = None) -> Any:  # kombu N+1: priorities read another way
        self.priority_steps = [0]
        try:
            return original(self, timeout)
        finally:
            del self.priority_steps

    mp.setattr(kombu_redis.Channel, "_brpop_start", _brpop_start)


@seam("kombu_redis_channel_create_client")
def check_kombu_redis_channel_create_client(seams: SeamEnv) -> None:
    """kombu gets every client from Channel._create_client(asynchronous=...): app.plumbing.transport keeps one
    synchronous client per channel there (building a redis.Redis per publish cost as much as the
    LPUSH), and leaves the consumer's (BRPOP) client to kombu."""
    channel = seams.connection().default_channel
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second, "two uses got two clients: kombu no longer asks Channel._create_client"
        assert first.connection_pool is channel.pool, "the client is not on the channel's connection pool"
    consuming = channel.client
    assert consuming is not first and consuming.connection_pool is channel.async_pool, (
        "the consumer's client is not kombu's own asynchronous one")


def _clients_built_in_place(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    @contextlib.contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:  # kombu N+1
        yield client or self.Client(connection_pool=self.pool)

    mp.setattr(kombu_redis.Channel, "conn_or_acquire", conn_or_acquire)


@seam("kombu_redis_channel_conn_or_acquire")
def check_kombu_redis_channel_conn_or_acquire(seams: SeamEnv) -> None:
    """Channel.conn_or_acquire(client=None) is a (synchronous) context manager yielding a redis-py
    client on the broker's Redis, or the client it was given: app.plumbing.transport writes held messages
    with it, and its QoS restores with it."""
    channel = seams.connection().default_channel
    with channel.conn_or_acquire() as client:
        assert isinstance(client, redis.Redis), f"it yielded {client!r}"
        client.set(PROBE, "1")
    assert seams.client.get(PROBE) == b"1", "its client does not write to the broker's Redis"
    with channel.conn_or_acquire(seams.client) as given:
        assert given is seams.client, "it did not yield the client it was given"


def _async_conn_or_acquire(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    @contextlib.asynccontextmanager
    async def conn_or_acquire(self: Any, client: Any = None) -> Any:  # kombu N+1: asyncio clients
        yield client or self._create_client()

    mp.setattr(kombu_redis.Channel, "conn_or_acquire", conn_or_acquire)


@seam("kombu_redis_channel_from_transport_options")
def check_kombu_redis_channel_from_transport_options(seams: SeamEnv) -> None:
    """kombu sets a channel attribute from each transport option named in the class's
    from_transport_options: app.plumbing.transport adds min_replicas and replica_timeout_ms there
    (REDIS_MIN_REPLICAS, REDIS_REPLICA_TIMEOUT_MS)."""
    conn = seams.connection(min_replicas=1, replica_timeout_ms=20)
    channel = conn.default_channel
    assert (channel.min_replicas, channel.replica_timeout_ms) == (1, 20), (
        f"the channel has min_replicas={channel.min_replicas}, replica_timeout_ms={channel.replica_timeout_ms}")
    try:
        publish(conn, QUEUE, "seam-task")
    except transport.ReplicasBehind:
        pass
    else:
        raise AssertionError("a publish asking for 1 replica was acknowledged by a Redis without replicas")


def _options_read_from_elsewhere(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    original = virtual.Channel.__init__

    def __init__(self: Any, connection: Any, **kwargs: Any) -> None:  # kombu N+1: option names read elsewhere
        names = type(self).from_transport_options
        type(self).from_transport_options = kombu_redis.Channel.from_transport_options
        try:
            original(self, connection, **kwargs)
        finally:
            type(self).from_transport_options = names

    mp.setattr(virtual.Channel, "__init__", __init__)


# Options of celery_config that kombu reads from the Connection (its reconnect policy), and those it
# hands the redis-py connection pool; every other one must be a channel attribute.
FAILOVER_OPTIONS = ("max_retries", "interval_start", "interval_step", "interval_max")
POOL_OPTIONS = ("socket_timeout", "socket_connect_timeout")


@seam("celery_app_redis_transport_options")
def check_celery_app_redis_transport_options(seams: SeamEnv) -> None:
    """Every Redis transport option app/celery_app.py passes takes effect in kombu: a message
    unacknowledged for visibility_timeout (45 s) comes back, scanned for every
    unacked_restore_interval (5 s) since unacked_restore_throttle is 1, under a restore mutex of
    unacked_mutex_expire (30 s): a killed worker's messages return within 50 s, not kombu's 100."""
    options = celery_config(Settings(redis_url=seams.redis_url))["broker_transport_options"]
    conn = seams.connection(**options)
    channel = conn.default_channel
    failover = conn._extract_failover_opts()
    for name, value in options.items():
        if name in FAILOVER_OPTIONS:
            assert failover.get(name) == value, f"kombu's reconnect policy has {name}={failover.get(name)!r}"
        elif name in POOL_OPTIONS:
            got = channel.pool.connection_kwargs.get(name)
            assert got == value, f"the connection pool has {name}={got!r}, not {value!r}"
        else:
            assert name in type(channel).from_transport_options, f"kombu no longer reads the option {name!r}"
            assert getattr(channel, name) == value, f"the channel has {name}={getattr(channel, name)!r}"
    qos = channel.qos
    assert (qos.visibility_timeout, qos.unacked_mutex_expire) == (VISIBILITY_TIMEOUT, 30), (
        f"the QoS has visibility_timeout={qos.visibility_timeout}, unacked_mutex_expire={qos.unacked_mutex_expire}")
    # Each scan (throttle 1) brings back what has been unacknowledged longer than the timeout.
    publish(conn, QUEUE, "seam-late")
    publish(conn, QUEUE, "seam-recent")
    taker = Taker(conn, QUEUE)
    late, recent = taker.take(), taker.take()
    assert late is not None and recent is not None, "the two messages did not arrive"
    now = time.time()
    seams.client.zadd(qos.unacked_index_key, {late.delivery_tag: now - VISIBILITY_TIMEOUT - 1,
                                              recent.delivery_tag: now - VISIBILITY_TIMEOUT + 10})
    conn.transport.cycle.maybe_restore_messages()
    assert seams.client.llen(QUEUE) == 1, "a message past the visibility timeout was not restored (or a recent one was)"
    seams.client.zadd(qos.unacked_index_key, {recent.delivery_tag: now - VISIBILITY_TIMEOUT - 1})
    conn.transport.cycle.maybe_restore_messages()
    assert seams.client.llen(QUEUE) == 2, "the next scan was skipped: unacked_restore_throttle=1 was not applied"
    # The worker's event loop (its own connection, as a worker has): a scan every unacked_restore_interval s.
    looped = seams.connection(**options)
    looped.connect()
    hub = Hub()
    try:
        looped.transport.register_with_event_loop(looped.connection, hub)
        waits = [entry.eta - time.monotonic() for entry in hub.timer.queue
                 if getattr(entry.entry.fun, "__name__", "") == "maybe_restore_messages"]
    finally:
        hub.close()
    assert len(waits) == 1 and abs(waits[0] - UNACKED_RESTORE_INTERVAL) < 1, (
        f"restore scans are scheduled in {waits} s, not every {UNACKED_RESTORE_INTERVAL} s")


def _throttle_option_dropped(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    # kombu N+1 renames the option: the tuple app.plumbing.transport extends at import no longer names it.
    mp.setattr(transport.Channel, "from_transport_options",
               tuple(name for name in transport.Channel.from_transport_options if name != "unacked_restore_throttle"))


# --- Celery's worker: the apply task's strategy (app/applying/fastpath.py) --------------------------------


@seam("celery_task_strategy")
def check_celery_task_strategy(seams: SeamEnv) -> None:
    """The worker builds each task's strategy as Task.Strategy(task, app, consumer, **kwargs), and
    celery.worker.strategy.default(task, app, consumer, ...) returns Celery's handler for a message:
    app.applying.fastpath.in_batches is the apply task's Strategy and wraps default's handler."""
    parameters = list(inspect.signature(celery_strategy.default).parameters.values())[:3]
    assert [p.name for p in parameters] == ["task", "app", "consumer"] and all(
        p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters), (
        f"celery.worker.strategy.default{inspect.signature(celery_strategy.default)}: app.applying.fastpath calls "
        "default(task, app, consumer, **kwargs)")
    requests: list[Any] = []
    consumer = celery_consumer(seams, requests)
    consumer.update_strategies()  # as the worker's Tasks step does
    strategy = consumer.strategies[APPLY_EVENT_TASK]
    assert strategy.__qualname__ == "in_batches.<locals>.task_message_handler", (
        f"the apply task's strategy is {strategy!r}, not the one app.applying.fastpath builds")
    envelope = event_envelope("SEAM-NEW")
    send_event(seams, envelope)
    claimed_elsewhere(seams, envelope)
    message = take_one(seams.connection(), WEBHOOK_QUEUE)
    consumer.create_task_handler()(message)  # how the consumer hands a message to its strategy
    assert [request.id for request in requests] == [message.headers["id"]], (
        f"an event the batch left to the task did not reach Celery's own handler as a task request: {requests}")


@seam("kombu_hub_timer")
def check_kombu_hub_timer(seams: SeamEnv) -> None:
    """A worker's consumer holds the event loop's hub (``consumer.hub``), whose timer takes
    ``call_after(seconds, fun)`` and returns an entry with ``cancel()``, and the hub runs an entry
    that fell due in ``fire_timers``, between two polls: app.applying.fastpath applies a batch that
    no message joined for BATCH_IDLE_SECONDS that way."""
    hub = Hub()
    seams.cleanups.append(hub.close)
    requests: list[Any] = []
    consumer = celery_consumer(seams, requests, hub=hub)
    consumer.update_strategies()
    handle = consumer.create_task_handler()
    taker = Taker(seams.connection(), WEBHOOK_QUEUE)
    for session in ("SEAM-HELD-1", "SEAM-HELD-2"):
        send_event(seams, event_envelope(session))
    held = [taker.take(), taker.take()]
    for message in held:
        handle(message)
    assert not any(message.acknowledged for message in held), "the strategy did not hold the messages for a batch"
    time.sleep(fastpath.BATCH_IDLE_SECONDS * 4)
    hub.fire_timers()
    assert [holders_of(seams.client, message.delivery_tag) for message in held] == [[], []] and requests == [], (
        "the hub's fire_timers did not apply the held batch: its messages are still unacknowledged in Redis, "
        f"task requests {requests}")
    deadline = time.monotonic() + 5
    while not all(message.acknowledged for message in held) and time.monotonic() < deadline:
        hub.run_once()  # the acknowledgements the consumer put on the hub's next round (call_soon)
    assert all(message.acknowledged for message in held), "the held messages were never acknowledged in kombu"


def _timer_in_milliseconds(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    original = Timer.call_after

    def call_after(self: Any, msecs: float, fun: Any, *args: Any, **kwargs: Any) -> Any:  # kombu N+1
        return original(self, msecs * 1000, fun, *args, **kwargs)

    mp.setattr(Timer, "call_after", call_after)


def _default_strategy_reordered(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    original = celery_strategy.default

    def default(task: Any, consumer: Any, app: Any = None, **kwargs: Any) -> Any:  # Celery N+1
        return original(task, app, consumer, **kwargs)

    mp.setattr(celery_strategy, "default", default)


@seam("celery_strategy_ack")
def check_celery_strategy_ack(seams: SeamEnv) -> None:
    """The consumer calls a strategy's handler as (message, body, ack, reject, callbacks), and its
    ``ack`` called as ack(logger, connection_errors) acknowledges the message: that is how
    app.applying.fastpath acknowledges a duplicate it turns away, with no task request."""
    envelope = event_envelope("SEAM-DUPLICATE")
    send_event(seams, envelope)
    mark_applied(seams, envelope)
    requests: list[Any] = []
    consumer = celery_consumer(seams, requests)
    consumer.update_strategies()
    message = take_one(seams.connection(), WEBHOOK_QUEUE)
    consumer.create_task_handler()(message)
    assert requests == [], f"the duplicate went on to a task request: {requests}"
    assert message.acknowledged, ("ack(logger, connection_errors) did not acknowledge the duplicate's message "
                                  "(kombu's Message.ack_log_error): it stays reserved in the worker")


def _ack_log_error_keywords_only(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    def ack_log_error(self: Any, *, logger: Any, errors: Any, multiple: bool = False) -> None:  # kombu N+1
        try:
            self.ack(multiple=multiple)
        except errors as exc:
            logger.critical("Couldn't ack %r: %r", self.delivery_tag, exc)

    mp.setattr(Message, "ack_log_error", ack_log_error)


@seam("celery_event_dispatcher_groups")
def check_celery_event_dispatcher_groups(seams: SeamEnv) -> None:
    """With task events off, the worker's event dispatcher is enabled with groups {'worker'}
    (heartbeats only), and Flower's enable_events adds 'task' to those groups; Celery's strategy
    sends task-received with the fields it names here. app.applying.fastpath sends a batch's task
    events only while task events are on, with the same fields, so that Flower sees every task."""
    requests: list[Any] = []
    consumer = celery_consumer(seams, requests, task_events=False)  # worker_send_task_events=False
    events = consumer.blueprint.steps["celery.worker.consumer.events.Events"]
    events.start(consumer)
    seams.cleanups.append(lambda: events.shutdown(consumer))
    dispatcher = consumer.event_dispatcher
    assert dispatcher.enabled and set(dispatcher.groups) == {"worker"}, (
        f"with task events off the dispatcher has enabled={dispatcher.enabled}, groups={dispatcher.groups!r}")
    consumer.update_strategies()
    handle = consumer.create_task_handler()
    taker = Taker(seams.connection(), WEBHOOK_QUEUE)
    for session in ("SEAM-OFF", "SEAM-ON"):
        envelope = event_envelope(session)
        send_event(seams, envelope)
        mark_applied(seams, envelope)
    busy = event_envelope("SEAM-BUSY")
    send_event(seams, busy)
    claimed_elsewhere(seams, busy)
    published = TaskEventsSeen(seams.client)
    off = taker.take()
    handle(off)
    assert requests == [], "with task events off a duplicate was not turned away"
    assert published.of(off.headers["id"]) == {}, "with task events off the batch sent task events"
    worker_control.enable_events(types.SimpleNamespace(consumer=consumer))  # Flower's command
    assert "task" in dispatcher.groups, f"enable_events left groups {dispatcher.groups!r}"
    on = taker.take()
    handle(on)
    assert requests == [], "with task events on, a duplicate went on to a task request"
    ours = published.of(on.headers["id"])
    assert set(ours) == {"task-received", "task-started", "task-succeeded"}, (
        f"with task events on, the duplicate turned away sent {sorted(ours)}: Flower would not see it as a task")
    handed = taker.take()  # a claim held elsewhere: the batch leaves it to Celery's handler
    handle(handed)
    assert [request.id for request in requests] == [handed.headers["id"]], f"task requests {requests}"
    celerys = published.of(handed.headers["id"])
    assert "task-received" in celerys, f"Celery's strategy sent {sorted(celerys)} for a task it received"
    assert set(ours["task-received"]) == set(celerys["task-received"]), (
        "the batch's task-received and Celery's differ in their fields: "
        f"{sorted(set(ours['task-received']) ^ set(celerys['task-received']))}")
    assert ours["task-received"]["name"] == celerys["task-received"]["name"] == APPLY_EVENT_TASK


class TaskEventsSeen:
    """The task events published on Redis since it was made (kombu's fanout: PUBLISHes on the
    celeryev channels, each an event or a list of them, base64 in kombu's message)."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub()
        self.pubsub.psubscribe("*celeryev*")
        self.pubsub.get_message(timeout=1)  # the subscription's confirmation
        self.events: list[dict[str, Any]] = []

    def of(self, task_id: str) -> dict[str, dict[str, Any]]:
        """Each type of event sent for ``task_id`` so far, with its fields."""
        while (item := self.pubsub.get_message(timeout=0.3)) is not None:
            if item["type"] != "pmessage":
                continue
            message = json.loads(item["data"])
            body = message["body"]
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            found = json.loads(body)
            self.events += found if isinstance(found, list) else [found]
        return {event["type"]: event for event in self.events if event.get("uuid") == task_id}


def _groups_renamed(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    original = EventDispatcher.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # Celery N+1: the group filter renamed
        original(self, *args, **kwargs)
        self.group_filter = self.__dict__.pop("groups")

    mp.setattr(EventDispatcher, "__init__", __init__)


@seam("celery_consumer_connection_errors")
def check_celery_consumer_connection_errors(seams: SeamEnv) -> None:
    """consumer.connection_errors covers what the broker's transport raises when the broker is gone:
    app.applying.fastpath passes it to the ack, so a failed acknowledgement is logged, not raised into the
    consumer."""
    consumer = celery_consumer(seams, [])
    server = RedisServer(seams.tmp_path / "broker").start()
    try:
        conn = seams.connection(url=server.url)
        publish(conn, QUEUE, "seam-task")
        message = take_one(conn, QUEUE)
    finally:
        server.stop()
    try:
        message.ack_log_error(logging.getLogger("tests.seams"), consumer.connection_errors)
    except Exception as exc:
        raise AssertionError(f"acknowledging with the broker gone raised {exc!r}, which "
                             f"consumer.connection_errors {consumer.connection_errors} does not cover") from exc


def _connection_errors_reshaped(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    original = CeleryConsumer.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # Celery N+1: the tuple means something else
        original(self, *args, **kwargs)
        self.connection_errors = self.channel_errors

    mp.setattr(CeleryConsumer, "__init__", __init__)


@seam("celery_request_acknowledge")
def check_celery_request_acknowledge(seams: SeamEnv) -> None:
    """A task request acknowledges its message by calling on_ack(logger, connection_errors), with
    nothing else: app.applying.fastpath's ack of a duplicate makes that same call."""
    requests: list[Any] = []
    consumer = celery_consumer(seams, requests)
    consumer.update_strategies()
    envelope = event_envelope("SEAM-NEW")
    send_event(seams, envelope)
    claimed_elsewhere(seams, envelope)
    message = take_one(seams.connection(), WEBHOOK_QUEUE)
    consumer.create_task_handler()(message)
    assert len(requests) == 1, f"no task request was made: {requests}"
    request = requests[0]
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    on_ack = request._on_ack

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return on_ack(*args, **kwargs)

    request._on_ack = recording
    request.acknowledge()
    assert len(calls) == 1, f"acknowledge() called on_ack {len(calls)} times"
    args, kwargs = calls[0]
    assert (len(args), kwargs) == (2, {}) and isinstance(args[0], logging.Logger) and (
        args[1] == consumer.connection_errors), f"acknowledge() called on_ack(*{args!r}, **{kwargs!r})"
    assert message.acknowledged, "the request's acknowledgement did not acknowledge the message"


def _acknowledge_with_keywords(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    def acknowledge(self: Any) -> None:  # Celery N+1
        if not self.acknowledged:
            self._on_ack(logger=worker_request.logger, errors=self._connection_errors)
            self.acknowledged = True

    mp.setattr(worker_request.Request, "acknowledge", acknowledge)


# --- Celery's message, kombu's publish (app/plumbing/publish.py) ------------------------------------------

@seam("celery_amqp_create_task_message")
def check_celery_amqp_create_task_message(seams: SeamEnv) -> None:
    """celery.amqp.create_task_message(...) returns four items, (headers, properties, body,
    sent_event); of the headers only the task id (also the root id) and argsrepr depend on the
    call, so app.plumbing.publish.TaskMessages can build them once per process; the properties
    are the correlation id and an empty reply-to; the body is (args, kwargs, embed)."""
    celery = seams.app.extensions["celery"]
    args = ({"session_id": "S"}, "2026-03-06T14:00:00+00:00", None)
    built = [celery.amqp.create_task_message(task_id, APPLY_EVENT_TASK, args, {}, ignore_result=True,
                                             argsrepr=argsrepr, kwargsrepr="")
             for task_id, argsrepr in (("seam-a", "one"), ("seam-b", "two"))]
    assert all(len(each) == 4 for each in built), f"it returned {[len(each) for each in built]} items"
    (first, first_properties, first_body, _), (second, second_properties, _body, _) = built
    assert (first["id"], first["root_id"], first["task"], first["argsrepr"]) == (
        "seam-a", "seam-a", APPLY_EVENT_TASK, "one"), first
    varying = {key for key in first if first[key] != second.get(key)} | (set(second) - set(first))
    assert varying == {"id", "root_id", "argsrepr"}, f"headers that differ between two calls: {sorted(varying)}"
    assert first_properties == {"correlation_id": "seam-a", "reply_to": ""}, f"properties {first_properties!r}"
    assert second_properties["correlation_id"] == "seam-b", f"properties {second_properties!r}"
    assert len(first_body) == 3 and list(first_body[0]) == list(args) and first_body[1] == {}, f"body {first_body!r}"
    assert isinstance(first_body[2], dict), f"embed {first_body[2]!r}"


def _three_items(mp: pytest.MonkeyPatch, seams: SeamEnv) -> None:
    original = seams.app.extensions["celery"].amqp.create_task_message

    def create_task_message(*args: Any, **kwargs: Any) -> tuple[Any, ...]:  # Celery N+1: no sent event
        return tuple(original(*args, **kwargs))[:3]

    mp.setattr(seams.app.extensions["celery"].amqp, "create_task_message", create_task_message)


@seam("kombu_redis_message_layout")
def check_kombu_redis_message_layout(seams: SeamEnv) -> None:
    """The message app.plumbing.publish writes on the Redis broker is, field for field, the one
    kombu's producer and Redis channel write for Celery's message of the same task (same task id
    and delivery tag): the JSON body in base64, the content type and encoding, the headers, the
    properties the channel adds; and a worker reads it (kombu's own consumer decodes the body)."""
    celery = seams.app.extensions["celery"]
    envelope = event_envelope("SEAM-LAYOUT")
    args = (envelope.message, envelope.received_at, envelope.request_id)
    with seams.app.app_context():
        ours = TaskMessages().build(celery, QUEUE, args, "seam", task_id="seam-layout", delivery_tag="seam-tag")
    headers, properties, body, _sent_event = celery.amqp.create_task_message(
        "seam-layout", APPLY_EVENT_TASK, args, {}, ignore_result=True, argsrepr="seam", kwargsrepr="")
    written: list[dict[str, Any]] = []
    conn = Connection(seams.redis_url, transport=KOMBU_TRANSPORT)
    seams.cleanups.append(conn.release)
    channel = conn.default_channel
    channel._next_delivery_tag = lambda: "seam-tag"  # kombu's own tag generator: this message's tag
    channel._put = lambda queue, message, **_kw: written.append(json.loads(json.dumps(message)))
    Producer(channel).publish(body, routing_key=QUEUE, exchange="", serializer="json", headers=headers,
                              delivery_mode=2, declare=[], retry=False, **properties)
    assert written, "kombu's producer did not write through Channel._put"
    assert json.loads(json.dumps(ours)) == written[0], (
        f"app.plumbing.publish builds {json.dumps(ours, sort_keys=True)}\n"
        f"kombu writes {json.dumps(written[0], sort_keys=True)}")
    seams.client.lpush(QUEUE, json.dumps(ours))
    message = take_one(seams.connection(), QUEUE)
    assert message.headers["id"] == "seam-layout" and message.decode()[0][0] == envelope.message, (
        f"a consumer read {message.headers!r} {message.body!r}")


def _bodies_unencoded(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    mp.setattr(virtual.Channel, "body_encoding", None)  # kombu N+1: message bodies written as they are


@seam("kombu_amqp_message")
def check_kombu_amqp_message(seams: SeamEnv) -> None:
    """On RabbitMQ the message app.plumbing.publish.AmqpPublisher publishes is, as a consumer
    receives it, the one Celery's send_task publishes for the same task: body, content type and
    encoding, headers, delivery mode, priority, correlation id, exchange and routing key (not
    reply_to, which send_task fills for a result backend the service has none of); for quorum
    queues (topic exchanges) and classic ones (the default exchange). It leans on kombu's pyamqp channel:
    ``prepare_message(body, content_type=, content_encoding=, headers=, properties=)`` makes the
    py-amqp message and ``basic_publish`` publishes it, waiting for the confirm."""
    envelope = event_envelope("SEAM-AMQP")
    args = (envelope.message, envelope.received_at, envelope.request_id)
    for queue_type in ("quorum", "classic"):
        with rabbitmq_vhost() as url:  # a virtual host each: the two declare one exchange name as two types
            app = seams.build(Settings(database_url=seams.sqlite_url, redis_url=seams.redis_url, celery_broker_url=url,
                                       celery_queue_type=queue_type, log_format="console"))
            celery = app.extensions["celery"]
            queue = f"seam-amqp-{queue_type}"
            celery.amqp.queues.select_add(queue)  # as send_task makes a queue it does not know
            publisher = AmqpPublisher()
            with app.app_context():
                publisher.publish(celery, queue, args, "seam", task_id=f"seam-{queue_type}")
                celery.send_task(APPLY_EVENT_TASK, args=args, queue=queue, retry=False, argsrepr="seam",
                                 kwargsrepr="", task_id=f"seam-{queue_type}", ignore_result=True)
            publisher.drop()
            with celery.connection_for_write() as conn:
                got = [conn.default_channel.basic_get(queue, no_ack=True) for _ in range(2)]
            assert all(got), f"{queue_type}: {sum(map(bool, got))} of 2 messages arrived"
            ours, celerys = ({"body": m.body, "properties": {k: v for k, v in m.properties.items() if k != "reply_to"},
                              "route": (m.delivery_info["exchange"], m.delivery_info["routing_key"])} for m in got)
            assert ours == celerys, f"{queue_type}: AmqpPublisher published {ours}\nsend_task {celerys}"
            assert ours["properties"].get("application_headers", {}).get("id") == f"seam-{queue_type}", ours


def _headers_carried_elsewhere(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    from kombu.transport import pyamqp

    original = pyamqp.Channel.prepare_message

    def prepare_message(self: Any, body: Any, priority: Any = None, content_type: Any = None,
                        content_encoding: Any = None, headers: Any = None, properties: Any = None,
                        **kwargs: Any) -> Any:  # kombu N+1: the headers go in a property of its own
        return original(self, body, priority, content_type, content_encoding, None,
                        {**(properties or {}), "message_id": str((headers or {}).get("id"))}, **kwargs)

    mp.setattr(pyamqp.Channel, "prepare_message", prepare_message)


# --- Celery's worker command (worker/__main__.py) ------------------------------------------------


def procfile_worker_options() -> list[str]:
    """The options the Procfile's worker line gives ``python -m worker``, with a node name of its own."""
    line = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("worker:"))
    words = shlex.split(line.split("exec ", 1)[1])
    return [*words[words.index("worker") + 1:], "--hostname=worker-0@%h"]


@seam("celery_click_worker_command")
def check_celery_click_worker_command(seams: SeamEnv) -> None:
    """celery.bin.worker.worker is a click command whose params list worker/__main__.py extends with
    the app's user_options['worker'], which parses the Procfile's options (--pool, --loglevel,
    --queues, --hostname) given a CLIContext(app, no_color, workdir, quiet) as its obj, and whose
    callback takes the app from ctx.obj.app. Running the callback would start a worker: that part
    is read from its source."""
    from celery.bin.worker import worker as command

    celery = seams.app.extensions["celery"]
    assert isinstance(command, click.Command) and isinstance(command.params, list), f"{command!r}"
    assert all(isinstance(option, click.Parameter) for option in celery.user_options.get("worker", ())), (
        f"user_options['worker'] holds {celery.user_options.get('worker')!r}")
    context = CLIContext(app=celery, no_color=True, workdir=None, quiet=False)
    ctx = command.make_context("python -m worker", procfile_worker_options(), obj=context)
    params = ctx.params
    assert params["pool"] is SoloPool, f"--pool=solo parsed as {params['pool']!r}"
    assert params["loglevel"] == logging.INFO, f"--loglevel=INFO parsed as {params['loglevel']!r}"
    assert params["queues"] == ["voice-webhooks", "voice-replays", "voice-maintenance"], f"{params['queues']!r}"
    assert params["hostname"] == f"worker-0@{gethostname()}", f"--hostname parsed as {params['hostname']!r}"
    assert ctx.obj.app is celery and "ctx.obj.app" in inspect.getsource(command.callback), (
        "the worker command no longer takes its app from ctx.obj.app")


def _pool_option_renamed(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    from celery.bin.worker import worker as command

    renamed = []
    for option in command.params:  # Celery N+1: --pool is now --pool-class
        if option.name == "pool":
            option = click.Option(["--pool-class", "pool"], type=option.type, default=option.default)
        renamed.append(option)
    mp.setattr(command, "params", renamed)


# --- Celery's native delayed delivery (quorum queues' retries) -----------------------------------


@seam("celery_native_delayed_delivery")
def check_celery_native_delayed_delivery(seams: SeamEnv) -> None:
    """On quorum queues (app.plumbing.queues.queue_config: topic exchanges), Celery publishes a retry's
    countdown to the exchange celery_delayed_27 with a 28-bit routing key, the top of the
    celery_delayed_27..celery_delayed_0 chain (into celery_delayed_delivery) kombu declares at
    worker start: the retry waits in RabbitMQ, not unacknowledged in a worker's memory. The
    service's tests and runbook name these exchanges. Checked without a broker: the publish is
    captured where Celery hands it to kombu."""
    app = seams.build(Settings(database_url=seams.sqlite_url, redis_url=seams.redis_url,
                               celery_broker_url="amqp://guest:guest@127.0.0.1:1//", celery_queue_type="quorum",
                               log_format="console"))
    celery = app.extensions["celery"]
    published: list[dict[str, Any]] = []
    celery.amqp.send_task_message = lambda _producer, _name, _message, **options: published.append(options)
    celery.send_task(APPLY_EVENT_TASK, args=(), queue=WEBHOOK_QUEUE, countdown=3, retry=False)
    assert len(published) == 1, f"published {published!r}"
    exchange = published[0].get("exchange")
    top = native_delayed_delivery.level_name(native_delayed_delivery.MAX_LEVEL)
    assert getattr(exchange, "name", exchange) == top, (
        f"Celery publishes a countdown to {exchange!r}, but kombu declares the delay chain from {top!r}")
    assert published[0]["routing_key"] == native_delayed_delivery.calculate_routing_key(3, WEBHOOK_QUEUE), (
        f"routing key {published[0]['routing_key']!r}")
    names = (top, native_delayed_delivery.level_name(0), native_delayed_delivery.CELERY_DELAYED_DELIVERY_EXCHANGE)
    assert names == ("celery_delayed_27", "celery_delayed_0", "celery_delayed_delivery"), f"the chain is now {names}"


def _delay_chain_prefixed(mp: pytest.MonkeyPatch, _seams: SeamEnv) -> None:
    def level_name(level: int, prefix: str | None = None) -> str:  # kombu N+1: namespaced exchanges
        return f"{prefix or 'kombu'}_celery_delayed_{level}"

    mp.setattr(native_delayed_delivery, "level_name", level_name)


# --- one test per seam ----------------------------------------------------------------------------


def test_seam_kombu_redis_unacked_keys(env: SeamEnv) -> None:
    check_kombu_redis_unacked_keys(env)


def test_seam_dedup_claim_acknowledges_by_delivery_tag(env: SeamEnv) -> None:
    check_dedup_claim_acknowledges_by_delivery_tag(env)


def test_seam_kombu_redis_qos_remove_from_indices(env: SeamEnv) -> None:
    check_kombu_redis_qos_remove_from_indices(env)


def test_seam_kombu_redis_qos_pipe_or_acquire(env: SeamEnv) -> None:
    check_kombu_redis_qos_pipe_or_acquire(env)


def test_seam_kombu_redis_qos_ack(env: SeamEnv) -> None:
    check_kombu_redis_qos_ack(env)


def test_seam_kombu_redis_channel_qos_class(env: SeamEnv) -> None:
    check_kombu_redis_channel_qos_class(env)


def test_seam_kombu_redis_qos_restore_unacked(env: SeamEnv) -> None:
    check_kombu_redis_qos_restore_unacked(env)


def test_seam_kombu_redis_channel_put(env: SeamEnv) -> None:
    check_kombu_redis_channel_put(env)


def test_seam_kombu_redis_channel_expires(env: SeamEnv) -> None:
    check_kombu_redis_channel_expires(env)


def test_seam_kombu_redis_channel_q_for_pri(env: SeamEnv) -> None:
    check_kombu_redis_channel_q_for_pri(env)


def test_seam_kombu_redis_channel_get_message_priority(env: SeamEnv) -> None:
    check_kombu_redis_channel_get_message_priority(env)


def test_seam_kombu_redis_channel_priority_steps(env: SeamEnv) -> None:
    check_kombu_redis_channel_priority_steps(env)


def test_seam_kombu_redis_channel_create_client(env: SeamEnv) -> None:
    check_kombu_redis_channel_create_client(env)


def test_seam_kombu_redis_channel_conn_or_acquire(env: SeamEnv) -> None:
    check_kombu_redis_channel_conn_or_acquire(env)


def test_seam_kombu_redis_channel_from_transport_options(env: SeamEnv) -> None:
    check_kombu_redis_channel_from_transport_options(env)


def test_seam_celery_app_redis_transport_options(env: SeamEnv) -> None:
    check_celery_app_redis_transport_options(env)


def test_seam_celery_task_strategy(env: SeamEnv) -> None:
    check_celery_task_strategy(env)


def test_seam_kombu_redis_channel_brpop_read(env: SeamEnv) -> None:
    check_kombu_redis_channel_brpop_read(env)


def test_seam_kombu_hub_timer(env: SeamEnv) -> None:
    check_kombu_hub_timer(env)


def test_seam_celery_strategy_ack(env: SeamEnv) -> None:
    check_celery_strategy_ack(env)


def test_seam_celery_event_dispatcher_groups(env: SeamEnv) -> None:
    check_celery_event_dispatcher_groups(env)


def test_seam_celery_consumer_connection_errors(env: SeamEnv) -> None:
    check_celery_consumer_connection_errors(env)


def test_seam_celery_request_acknowledge(env: SeamEnv) -> None:
    check_celery_request_acknowledge(env)


def test_seam_celery_amqp_create_task_message(env: SeamEnv) -> None:
    check_celery_amqp_create_task_message(env)


def test_seam_kombu_redis_message_layout(env: SeamEnv) -> None:
    check_kombu_redis_message_layout(env)


def test_seam_kombu_amqp_message(env: SeamEnv) -> None:
    check_kombu_amqp_message(env)


def test_seam_celery_click_worker_command(env: SeamEnv) -> None:
    check_celery_click_worker_command(env)


def test_seam_celery_native_delayed_delivery(env: SeamEnv) -> None:
    check_celery_native_delayed_delivery(env)


# --- each contract, shown failing against a changed seam -----------------------------------------


@dataclass(frozen=True)
class Seam:
    check: Check
    change: Callable[[pytest.MonkeyPatch, SeamEnv], None]  # what an upgrade might do to it

    @property
    def name(self) -> str:
        return self.check.seam_name  # type: ignore[attr-defined]


SEAMS = (
    Seam(check_kombu_redis_unacked_keys, _unacked_per_queue),
    Seam(check_kombu_redis_channel_brpop_read, _brpop_reply_read_by_kombu_alone),
    Seam(check_dedup_claim_acknowledges_by_delivery_tag, _unacked_also_indexed_elsewhere),
    Seam(check_kombu_redis_qos_remove_from_indices, _remove_at_once),
    Seam(check_kombu_redis_qos_pipe_or_acquire, _pipe_or_acquire_yields_client),
    Seam(check_kombu_redis_qos_ack, _ack_counts_too),
    Seam(check_kombu_redis_channel_qos_class, _basic_ack_past_the_override),
    Seam(check_kombu_redis_qos_restore_unacked, _restore_without_restore_unacked),
    Seam(check_kombu_redis_channel_put, _publish_past_put),
    Seam(check_kombu_redis_channel_expires, _expires_kept_elsewhere),
    Seam(check_kombu_redis_channel_q_for_pri, _prefixed_queue_keys),
    Seam(check_kombu_redis_channel_get_message_priority, _priority_without_reverse),
    Seam(check_kombu_redis_channel_priority_steps, _consumer_reads_base_key_only),
    Seam(check_kombu_redis_channel_create_client, _clients_built_in_place),
    Seam(check_kombu_redis_channel_conn_or_acquire, _async_conn_or_acquire),
    Seam(check_kombu_redis_channel_from_transport_options, _options_read_from_elsewhere),
    Seam(check_celery_app_redis_transport_options, _throttle_option_dropped),
    Seam(check_celery_task_strategy, _default_strategy_reordered),
    Seam(check_kombu_hub_timer, _timer_in_milliseconds),
    Seam(check_celery_strategy_ack, _ack_log_error_keywords_only),
    Seam(check_celery_event_dispatcher_groups, _groups_renamed),
    Seam(check_celery_consumer_connection_errors, _connection_errors_reshaped),
    Seam(check_celery_request_acknowledge, _acknowledge_with_keywords),
    Seam(check_celery_amqp_create_task_message, _three_items),
    Seam(check_kombu_redis_message_layout, _bodies_unencoded),
    Seam(check_kombu_amqp_message, _headers_carried_elsewhere),
    Seam(check_celery_click_worker_command, _pool_option_renamed),
    Seam(check_celery_native_delayed_delivery, _delay_chain_prefixed),
)


def test_every_seam_has_its_contract_test_and_a_change() -> None:
    """A seam added to SEAMS without its named test (or the other way round) is caught here."""
    tests = {name.removeprefix("test_seam_") for name in globals() if name.startswith("test_seam_")}
    assert tests == {s.name for s in SEAMS}
    assert len({s.name for s in SEAMS}) == len(SEAMS)


@pytest.mark.parametrize("changed", SEAMS, ids=lambda s: s.name)
def test_each_contract_catches_a_changed_seam(changed: Seam, env: SeamEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seam changed as an upgrade might change it: its check must fail, naming the seam."""
    changed.change(monkeypatch, env)
    with pytest.raises(AssertionError, match=f"^seam {changed.name}: ") as failed:
        changed.check(env)
    print(f"{changed.name}: {str(failed.value).splitlines()[0]}")


# --- kombu's global_keyprefix, refused ----------------------------------------------------------


def test_global_keyprefix_is_refused_when_a_channel_is_made(redis_server: RedisServer) -> None:
    """global_keyprefix would put kombu's queues and unacked hash under a prefix the held write, the
    dedup claim and the pending set do not use: the project's channels refuse it at creation (the
    worker's first connection, the web's first publish) instead of writing beside each other."""
    options = {"global_keyprefix": "voice:"}
    prefixed = Connection(redis_server.url, transport=PROJECT_TRANSPORT, transport_options=options)
    with prefixed, pytest.raises(transport.UnsupportedTransportOption, match="global_keyprefix='voice:'"):
        prefixed.default_channel  # noqa: B018 - making the channel is the point
    sentinel = Connection("sentinel://127.0.0.1:1", transport="app.plumbing.transport:SentinelTransport",
                          transport_options={**options, "master_name": "mymaster"})
    with sentinel, pytest.raises(transport.UnsupportedTransportOption):  # before it asks any sentinel
        sentinel.default_channel  # noqa: B018
    with Connection(redis_server.url, transport=PROJECT_TRANSPORT, transport_options={"global_keyprefix": ""}) as conn:
        assert isinstance(conn.default_channel, transport.Channel)  # kombu's default, no prefix: accepted


# --- the take-ahead script on what kombu did not write ------------------------------------------


def test_take_ahead_stops_at_a_message_of_another_shape_and_loses_nothing(env: SeamEnv) -> None:
    """Behind the message BRPOP gave: two of kombu's, then one that is not JSON, then another of
    kombu's. The script takes the two, leaves the rest where it was (kombu's own consumer takes
    the odd one next, as it always did), and writes nothing for what it did not take."""
    conn = env.connection(take_ahead_queues=(QUEUE,))
    for task_id in ("first", "second", "third"):
        publish(conn, QUEUE, task_id)
    env.client.lpush(QUEUE, b"not json")
    publish(conn, QUEUE, "after-the-odd-one")
    taker = Taker(conn, QUEUE)
    taker.channel.basic_qos(0, 10, False)
    first = taker.take()
    assert first is not None
    assert [m.headers["id"] for m in [first, *taker.received]] == ["first", "second", "third"]
    behind, odd = env.client.lrange(QUEUE, 0, -1)  # the list's right end is the next to take
    assert odd == b"not json" and json.loads(behind)["headers"]["id"] == "after-the-odd-one", (
        "the odd message and the one behind it stay queued, in order")
    assert env.client.hlen(taker.channel.qos.unacked_key) == 3
