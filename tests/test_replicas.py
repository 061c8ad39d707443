"""REDIS_MIN_REPLICAS and Sentinel URLs on real redis-servers: a master with a replica, and a
Sentinel group. A webhook is answered 200 only when enough replicas hold its write, in the same
round trip as the write; with a replica gone it is answered 503 within the timeout."""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from app.plumbing.pending import PENDING_DATA
from app.plumbing.queues import WEBHOOK_QUEUE
from config import ConfigError, Settings
from tests.redis_ha import MASTER_NAME, ReplicatedRedis, SentinelGroup
from tests.support import sent_to_redis

URL = "/api/v1/voice/webhook"
# Longer than the environment may set (tests build Settings directly), so that a replica slowed
# by a busy machine still answers in time where the test expects it to; the refusal test uses
# the default.
TIMEOUT_MS = 2000
REFUSAL_TIMEOUT_MS = 200


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """Publishing writes no row: SQLite is enough."""
    return sqlite_url


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[ReplicatedRedis]:
    with ReplicatedRedis(tmp_path, replicas=1) as servers:
        yield servers


@pytest.fixture
def waiting_app(make_app: Callable[[Settings], Flask], settings: Settings, replicated: ReplicatedRedis,
                request: pytest.FixtureRequest) -> Flask:
    timeout_ms = getattr(request, "param", TIMEOUT_MS)
    return make_app(dataclasses.replace(settings, redis_url=replicated.url, redis_min_replicas=1,
                                        redis_replica_timeout_ms=timeout_ms))


def webhook(n: int) -> dict[str, str]:
    return {"sessionId": f"REP_{n}", "phoneNumber": "+254712345678", "status": "busy", "duration": str(n)}


def test_a_webhook_is_answered_once_the_replica_holds_it(waiting_app: Flask, replicated: ReplicatedRedis) -> None:
    client = waiting_app.test_client()
    for n in range(5):
        assert client.post(URL, data=webhook(n)).status_code == 200
    # WAIT returned 1 before each answer: the replica holds every message and pending entry already.
    replica = replicated.replicas[0].client()
    assert replica.llen(WEBHOOK_QUEUE) == 5
    assert replica.hlen(PENDING_DATA) == 5


@pytest.mark.parametrize("waiting_app", [REFUSAL_TIMEOUT_MS], indirect=True)
def test_without_the_replica_a_webhook_is_refused_within_the_timeout(waiting_app: Flask,
                                                                     replicated: ReplicatedRedis) -> None:
    client = waiting_app.test_client()
    client.post(URL, data=webhook(0))  # connections made and the script loaded before the clock starts
    replica = replicated.replicas[0].process
    assert replica is not None
    replica.send_signal(signal.SIGSTOP)  # alive but silent: WAIT must time out
    try:
        started = time.monotonic()
        response = client.post(URL, data=webhook(1))
        elapsed = time.monotonic() - started
    finally:
        replica.send_signal(signal.SIGCONT)
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert response.get_json()["status"] == "webhook_error"
    assert REFUSAL_TIMEOUT_MS / 1000 <= elapsed < 1.0  # it waited for the replica, and no longer than a second
    replicated.replicas[0].kill()
    started = time.monotonic()
    response = client.post(URL, data=webhook(2))
    assert response.status_code == 503 and time.monotonic() - started < 1.0


def commands_by_client(redis_url: str, work: Callable[[], None]) -> list[tuple[str, str]]:
    """(client address, command name) for every command clients sent while ``work`` ran."""
    return [(f"{entry['client_address']}:{entry['client_port']}", entry["command"].split(" ", 1)[0].upper())
            for entry in sent_to_redis(redis_url, work)]


def test_the_write_and_its_wait_go_together_on_one_connection(waiting_app: Flask,
                                                              replicated: ReplicatedRedis) -> None:
    client = waiting_app.test_client()
    assert client.post(URL, data=webhook(0)).status_code == 200  # first use: the script is loaded
    accepted = 20

    def post() -> None:
        for n in range(1, accepted + 1):
            assert client.post(URL, data=webhook(n)).status_code == 200

    seen = commands_by_client(replicated.url, post)
    assert [command for _, command in seen] == ["EVALSHA", "WAIT"] * accepted
    # Each WAIT follows its own EVALSHA on the same connection (WAIT counts that connection's writes).
    assert all(seen[i][0] == seen[i + 1][0] for i in range(0, len(seen), 2))


def test_a_promoted_master_without_the_script_loads_it(waiting_app: Flask, replicated: ReplicatedRedis) -> None:
    client = waiting_app.test_client()
    assert client.post(URL, data=webhook(0)).status_code == 200
    replicated.master.client().script_flush()  # as a newly promoted master that never ran it
    assert client.post(URL, data=webhook(1)).status_code == 200
    assert replicated.replicas[0].client().llen(WEBHOOK_QUEUE) == 2


def test_the_service_writes_to_the_master_the_sentinels_name(make_app: Callable[[Settings], Flask],
                                                             settings: Settings, tmp_path: Path) -> None:
    with SentinelGroup(tmp_path, replicas=1, sentinels=1) as group:
        app = make_app(dataclasses.replace(settings, redis_url=group.url, redis_sentinel_master=MASTER_NAME))
        assert app.config["CELERY"]["broker_transport"] == "app.plumbing.transport:SentinelTransport"
        client = app.test_client()
        assert client.post(URL, data=webhook(1)).status_code == 200
        assert client.get("/readyz").status_code == 200
        app.extensions["redis"].set("voice:probe", "1")
        master = group.master.client()
        assert master.llen(WEBHOOK_QUEUE) == 1 and master.hlen(PENDING_DATA) == 1
        assert master.get("voice:probe") == b"1"


@pytest.mark.parametrize(("env", "named"), [
    ({"REDIS_URL": "sentinel://h1:26379;redis://h2:6379/0"}, "REDIS_URL"),
    ({"REDIS_URL": "sentinel://:26379/0"}, "REDIS_URL"),
    ({"REDIS_URL": "sentinel://h1:port/0"}, "REDIS_URL"),
    ({"REDIS_URL": "sentinel://h1:26379/zero"}, "REDIS_URL"),
    ({"CELERY_BROKER_URL": "sentinel://h1:26379;sentinel://h2:x/0"}, "CELERY_BROKER_URL"),
    ({"REDIS_SENTINEL_MASTER": "my master"}, "REDIS_SENTINEL_MASTER"),
    ({"REDIS_MIN_REPLICAS": "-1"}, "REDIS_MIN_REPLICAS"),
    ({"REDIS_MIN_REPLICAS": "one"}, "REDIS_MIN_REPLICAS"),
    ({"REDIS_REPLICA_TIMEOUT_MS": "0"}, "REDIS_REPLICA_TIMEOUT_MS"),
    ({"REDIS_REPLICA_TIMEOUT_MS": "5000"}, "REDIS_REPLICA_TIMEOUT_MS"),
    ({"REDIS_MIN_REPLICAS": "1", "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"}, "REDIS_MIN_REPLICAS"),
])
def test_bad_high_availability_settings_name_their_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


def test_sentinel_settings_are_read() -> None:
    settings = Settings.from_env({
        "REDIS_URL": "sentinel://:pw@h1:26379;sentinel://h2:26380;sentinel://h3/2",
        "REDIS_SENTINEL_MASTER": "voice",
        "REDIS_MIN_REPLICAS": "1",
        "REDIS_REPLICA_TIMEOUT_MS": "150",
    })
    assert settings.broker_is_redis and settings.broker_transport_holds_pending
    assert (settings.redis_sentinel_master, settings.redis_min_replicas, settings.redis_replica_timeout_ms) == (
        "voice", 1, 150)
    from config import parse_sentinel_url

    url = parse_sentinel_url(settings.redis_url)
    assert url.sentinels == (("h1", 26379), ("h2", 26380), ("h3", 26379))
    assert (url.db, url.password) == (2, "pw")
    defaults = Settings.from_env({})
    assert (defaults.redis_sentinel_master, defaults.redis_min_replicas, defaults.redis_replica_timeout_ms) == (
        "mymaster", 0, 200)
