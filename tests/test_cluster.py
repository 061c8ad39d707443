"""The dedup cache on a Redis Cluster node: every script and transaction the worker sends it keeps
its keys in one hash slot, as Redis itself reports them (COMMAND GETKEYS, CLUSTER KEYSLOT).

One cluster-mode redis-server holding all 16384 slots is enough: a node in cluster mode refuses a
multi-key command or transaction across slots (CROSSSLOT) even when it holds every slot.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from flask import Flask
from sqlalchemy import func, select

from app.applying.domain import APPLIED, DUPLICATE
from app.base.extensions import db
from app.payload.envelope import Envelope
from app.payload.events import Event
from app.plumbing import dedup
from app.records.models import WebhookEvent
from config import Settings
from tests.redis_cluster import claim_cycle, port_with_free_bus
from tests.redis_ha import Node
from tests.support import wait_for

# A broker URL that is never contacted here: what matters is that Redis is not the broker.
RABBITMQ_BROKER = "amqp://guest:guest@127.0.0.1:5672/voice-unused"
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')


@pytest.fixture(scope="module")
def cluster_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = Node(Path(tmp_path_factory.mktemp("cluster")), "node", "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf")
    node.port = port_with_free_bus()
    try:
        node.start()
        client = node.client()
        try:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        except redis.ResponseError:  # before Redis 7: every slot by name
            client.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
        wait_for(lambda: client.cluster("info")["cluster_state"] == "ok", timeout=20)
        yield node
    finally:
        node.kill()


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def cache_app(make_app: Callable[[Settings], Flask], settings: Settings, cluster_node: Node) -> Flask:
    """The worker's app with RabbitMQ as the broker and the cluster node as the dedup cache."""
    cluster_node.client().flushall()
    return make_app(dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{cluster_node.port}/0",
                                        celery_broker_url=RABBITMQ_BROKER))


def sent_commands(node: Node, work: Callable[[], None]) -> list[tuple[str, list[str]]]:
    """(client, arguments) of every command clients sent while ``work`` ran, from MONITOR's raw
    lines (arguments are quoted there, so a script's body with spaces stays one argument)."""
    seen: list[tuple[str, list[str]]] = []
    watcher, ender = node.client(), node.client()
    ender.ping()
    with watcher.monitor() as monitor:
        ready = threading.Event()

        def listen() -> None:
            ready.set()
            while True:
                line = monitor.connection.read_response()
                line = line.decode() if isinstance(line, bytes) else line
                client = line.split("[", 1)[1].split("]", 1)[0].split(" ", 1)[1]
                args = [bytes(a, "utf-8").decode("unicode_escape") for a in _ARG.findall(line.split("]", 1)[1])]
                if args == ["ECHO", "end-of-test"]:
                    return
                if client != "lua":
                    seen.append((client, args))

        listener = threading.Thread(target=listen)
        listener.start()
        ready.wait()
        time.sleep(0.2)
        work()
        ender.echo("end-of-test")
        listener.join(timeout=10)
    watcher.close()
    ender.close()
    return seen


def units(commands: list[tuple[str, list[str]]]) -> list[list[list[str]]]:
    """Commands grouped as Redis runs them atomically: one command, or one MULTI ... EXEC block."""
    grouped: list[list[list[str]]] = []
    open_blocks: dict[str, list[list[str]]] = {}
    for client, args in commands:
        name = args[0].upper()
        if name == "MULTI":
            open_blocks[client] = []
        elif name == "EXEC":
            grouped.append(open_blocks.pop(client))
        elif client in open_blocks:
            open_blocks[client].append(args)
        else:
            grouped.append([args])
    return grouped


def slots_of(node: Node, unit: list[list[str]]) -> set[int]:
    client = node.client()
    keys = set()
    for args in unit:
        try:
            keys.update(client.command_getkeys(*args))
        except redis.ResponseError:  # a command without keys (PING, ...)
            continue
    return {int(client.execute_command("CLUSTER", "KEYSLOT", key)) for key in keys}


def envelope(second: int) -> Envelope:
    fields = {"sessionId": "CLU", "status": "completed", "phoneNumber": "+254712345678", "duration": "42"}
    return Envelope(Event("CLU", "completed", "+254712345678", None, 42, fields).to_message(),
                    f"2026-03-06T14:00:{second:02d}+00:00")


def test_every_dedup_operation_keeps_its_keys_in_one_slot(cache_app: Flask, cluster_node: Node) -> None:
    arrived = datetime(2026, 3, 6, 14, 0, 5, tzinfo=UTC)

    def work() -> None:
        with cache_app.app_context():
            for n in range(3):
                claim_cycle(f"event-{n}", arrived)

    commands = sent_commands(cluster_node, work)
    grouped = units(commands)
    assert {args[0].upper() for unit in grouped for args in unit} >= {"EVAL", "SET"}
    keyed = [(unit, slots) for unit in grouped if (slots := slots_of(cluster_node, unit))]  # not PING, HELLO
    # Per event: five claims, one release (scripts), one finish (a transaction): all were seen.
    assert len(keyed) == 3 * 7, keyed
    assert [(unit, slots) for unit, slots in keyed if len(slots) != 1] == []
    spread = [slots for _, slots in keyed]
    # Per-event keys: the events spread over slots (three events, three slots).
    assert len(set().union(*spread)) == 3


def test_the_worker_applies_once_with_the_cache_on_a_cluster(cache_app: Flask) -> None:
    from app.applying.delivery import deliver

    with cache_app.app_context():
        assert deliver(envelope(1), owner="task-1") == APPLIED
        assert deliver(envelope(1), owner="task-2") == DUPLICATE
        assert db.session.scalar(select(func.count()).select_from(WebhookEvent)) == 1


def test_on_the_redis_broker_the_claim_spans_slots(make_app: Callable[[Settings], Flask], settings: Settings,
                                                   cluster_node: Node) -> None:
    """Why a Redis broker's cache cannot be a cluster: there the claim also drops the event from
    the pending set, keys in other slots, and a cluster refuses that script."""
    app = make_app(dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{cluster_node.port}/0"))
    arrived = datetime(2026, 3, 6, 14, 0, 5, tzinfo=UTC)
    with app.app_context(), pytest.raises(redis.ResponseError, match="hash to the same slot"):
        dedup.claim("event-x", "task-a", arrived)
