"""The dedup cache on a Redis Cluster of three masters (each with a replica), RabbitMQ as the broker.

The app's client is given one startup node only and learns the rest of the layout from it: claims
and finishes of events whose keys live on every master reach them, and a slot that moves to
another master while the app runs (ASK while it moves, MOVED once it has) is followed. The calls
the service makes on the cache on RabbitMQ all work on a cluster: the claim and release scripts,
the done mark's transaction, /readyz's ping, the gauges and the drain of old Redis dead letters.
With no node answering, the app still starts, /readyz says degraded, and the database's
fingerprint decides.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from flask import Flask
from redis.crc import key_slot
from sqlalchemy import func, select

from app.applying import deadletters
from app.applying.delivery import CACHE_ERRORS
from app.base.extensions import db
from app.operating.gauges import state_counts
from app.payload.envelope import Envelope
from app.payload.events import Event
from app.plumbing import dedup, pending
from app.records.models import DeadLetter
from config import Settings
from tests.redis_cluster import LocalCluster, applied_once, claim_cycle
from tests.redis_ha import Node
from tests.support import free_port

BROKER = "amqp://guest:guest@127.0.0.1:5672//"
ARRIVED = datetime(2026, 3, 6, 14, 0, 5, tzinfo=UTC)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(Path(tmp_path_factory.mktemp("redis-cluster")) / "nodes") as started:
        yield started


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def cluster_app(make_app: Callable[[Settings], Flask], settings: Settings, cluster: LocalCluster) -> Flask:
    """The app with one startup node in its URL (the first master's)."""
    for node in cluster.masters():
        node.client().flushall()
    first = cluster.masters()[0]
    return make_app(dataclasses.replace(settings, redis_url=cluster.url_of(first), celery_broker_url=BROKER))


def event_key_in_slot(slot: int, start: int = 0) -> str:
    """An event key whose dedup key hashes to ``slot``."""
    n = start
    while key_slot(f"{dedup.DEDUP_PREFIX}event-{n}".encode()) != slot:
        n += 1
    return f"event-{n}"


def stored_on(node: Node, key: str) -> bytes | None:
    """The key's value on this node itself; None when the node does not hold it (a node importing
    the key's slot is read with ASKING, a node that sends the reader elsewhere does not hold it)."""
    client = node.client()
    try:
        client.execute_command("ASKING")
        return client.get(dedup.DEDUP_PREFIX + key)
    except redis.exceptions.AskError:  # MOVED or ASK: elsewhere
        return None
    finally:
        client.close()


def test_claims_and_finishes_reach_every_master(cluster_app: Flask, cluster: LocalCluster) -> None:
    masters = cluster.masters()
    keys: dict[int, str] = {}
    n = 0
    while len(keys) < len(masters):  # an event on each master
        key = f"event-{n}"
        owner = cluster.master_of_slot(key_slot((dedup.DEDUP_PREFIX + key).encode()))
        keys.setdefault(owner.port, key)
        n += 1
    with cluster_app.app_context():
        for key in keys.values():
            claim_cycle(key, ARRIVED)
    for node in masters:  # each done mark on the master that serves its slot
        assert (stored_on(node, keys[node.port]) or b"").startswith(b"done:"), node.port


def test_a_slot_moved_while_the_app_runs_is_followed(cluster_app: Flask, cluster: LocalCluster) -> None:
    """ASK while the slot is migrating (the key is not on the old master), MOVED once it has moved
    (the client's table still names the old master).

    The claim and release scripts follow ASK. The done mark's transaction may not while the slot
    is migrating (the cluster client's transactions treat ASK as MOVED and never send ASKING):
    then it fails with a Redis error, which the worker treats as the cache being unavailable (the
    event is committed; a later copy meets the fingerprint once the claim expires)."""
    source, target = cluster.masters()[:2]
    slot = next(s for s in range(16384) if cluster.master_of_slot(s) is source)
    key = event_key_in_slot(slot)
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    with cluster_app.app_context():
        warm = event_key_in_slot(slot, 10**6)
        assert dedup.claim(warm, "task-0", ARRIVED) == "claimed"  # the client knows the layout now
        dedup.release(warm, "task-0")
        target.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        # The slot is moving, and the key is on neither: the old master answers ASK.
        assert dedup.claim(key, "task-a", ARRIVED) == "claimed"
        assert stored_on(target, key) == b"claim:task-a"
        assert stored_on(source, key) is None
        dedup.release(key, "task-a")
        assert stored_on(target, key) is None
        assert dedup.claim(key, "task-b", ARRIVED) == "claimed"
        try:
            dedup.finish(key, ARRIVED)
        except CACHE_ERRORS:
            assert stored_on(target, key) == b"claim:task-b"  # not marked: the claim stands
        for node in cluster.masters():
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        # Moved: the client's table may still name the old master, which answers MOVED.
        dedup.finish(key, ARRIVED)
        assert (stored_on(target, key) or b"").startswith(b"done:")
        later = event_key_in_slot(slot, int(key.removeprefix("event-")) + 1)
        assert dedup.claim(later, "task-c", ARRIVED) == "claimed"
        dedup.finish(later, ARRIVED)
        assert dedup.claim(key, "task-d", ARRIVED) == "duplicate"
    assert (stored_on(target, later) or b"").startswith(b"done:")
    assert stored_on(source, later) is None


def test_readyz_is_ready_on_a_cluster(cluster_app: Flask) -> None:
    response = cluster_app.test_client().get("/readyz")
    assert response.status_code == 200, response.json
    assert response.json["status"] == "ready", response.json
    assert response.json["checks"]["redis"]["ok"] is True


def test_gauges_and_old_dead_letters_on_a_cluster(cluster_app: Flask) -> None:
    """On RabbitMQ the pending set is not used (its multi-key commands never reach the cluster);
    the dead-letter list is one key, counted and drained."""
    event = Event("CLUSTER-DL", "completed", "+254712345678", None, 42,
                  {"sessionId": "CLUSTER-DL", "status": "completed", "phoneNumber": "+254712345678",
                   "duration": "42"})
    envelope = Envelope(event.to_message(), "2026-03-06T14:00:05+00:00")
    record = {"letter_key": "cluster-letter", "envelope": json.loads(envelope.to_json()), "error": "old",
              "attempts": 3, "failed_at": "2026-03-06T14:00:06+00:00"}
    with cluster_app.app_context():
        assert pending.in_use() is False
        assert state_counts("pending") == 0
        cluster_app.extensions["redis"].rpush(deadletters.DEAD_LETTER_LIST, json.dumps(record))
        assert state_counts("dead_letters") == 1
        assert deadletters.drain_redis() == 1
        assert state_counts("dead_letters") == 1  # filed in the database now
        assert cluster_app.extensions["redis"].llen(deadletters.DEAD_LETTER_LIST) == 0
        assert db.session.scalar(select(func.count()).select_from(DeadLetter)) == 1


def test_the_worker_applies_once_on_a_cluster(cluster_app: Flask) -> None:
    with cluster_app.app_context():
        applied_once("CLUSTER-1")


@pytest.mark.parametrize("error", [
    redis.exceptions.ClusterDownError, redis.exceptions.MasterDownError, redis.exceptions.TryAgainError,
    redis.exceptions.MovedError, redis.exceptions.AskError, redis.ConnectionError, redis.TimeoutError,
    redis.exceptions.RedisClusterException, redis.exceptions.SlotNotCoveredError,
])
def test_what_a_cluster_raises_in_a_failover_is_the_cache_unavailable(error: type[Exception]) -> None:
    assert issubclass(error, CACHE_ERRORS)


def test_no_node_answering_leaves_the_decision_to_the_database(make_app: Callable[[Settings], Flask],
                                                                 settings: Settings) -> None:
    """The app starts without its cache (the client is made on first use), says degraded, and
    applies each event once by the fingerprint."""
    app = make_app(dataclasses.replace(settings, redis_url=f"redis+cluster://127.0.0.1:{free_port()}",
                                       celery_broker_url=BROKER))
    response = app.test_client().get("/readyz")
    assert response.status_code == 200, response.json
    assert response.json["status"] == "degraded", response.json
    assert response.json["degraded"] == ["redis"]
    with app.app_context():
        applied_once("CLUSTER-2")
