"""The change feed is read on a primary only, and the service takes a libpq multi-host URL.

A hot standby learns of the primary's transactions only from the WAL it has replayed, so a feed
horizon computed there could pass a position that commits later: on a standby the feed answers
503 with Retry-After instead. The per-recording reads may use a standby. A DATABASE_URL naming
several hosts with ``target_session_attrs=read-write`` reaches whichever of them takes writes,
which is how the service follows a failover without a restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event, make_url

from app import create_app, engine_options
from app.applying.domain import apply_event
from app.base.extensions import db
from app.payload.events import Event
from app.records.changes import STANDBY_REFUSED
from config import Settings, key_digest
from tests.conftest import API_KEY, migrate
from tests.faults.pg_failover import PostgresPair
from tests.support import RedisServer, wait_for

FEED = "/api/v1/voice/changes"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MULTI_HOST = ("postgresql+psycopg://postgres@/test?host=127.0.0.1:5432&host=127.0.0.1:5433"
              "&target_session_attrs=read-write")


def built(database_url: str, redis_url: str) -> Flask:
    return create_app(Settings(database_url=database_url, redis_url=redis_url,
                               api_key_digests=(key_digest(API_KEY),), log_format="console"))


def dispose(app: Flask) -> None:
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    app.extensions["redis"].close()


@pytest.fixture
def statements(app: Flask) -> Iterator[list[str]]:
    """The SQL the app's engine sends while the test runs."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", record)
    yield sent
    event.remove(engine, "before_cursor_execute", record)


def test_the_feed_asks_postgresql_whether_it_is_a_standby_and_sqlite_nothing(
        app: Flask, statements: list[str], database_url: str) -> None:
    answer = app.test_client().get(FEED, headers=AUTH)
    assert answer.status_code == 200, answer.get_json()
    asked = [s for s in statements if "pg_is_in_recovery" in s]
    assert len(asked) == (1 if database_url.startswith("postgresql") else 0)


@pytest.fixture(scope="module")
def pair() -> Iterator[PostgresPair]:
    """A primary and its synchronous hot standby, both stopped and removed at the end."""
    servers = PostgresPair()
    try:
        yield servers.start()
    finally:
        servers.remove()


@pytest.mark.postgres
def test_a_standby_refuses_the_feed_and_serves_the_reads(pair: PostgresPair, redis_server: RedisServer) -> None:
    migrate(pair.url, redis_server.url)  # through the two-host URL: on the one that takes writes
    primary = built(pair.url, redis_server.url)
    standby = built(f"postgresql+psycopg://postgres@127.0.0.1:{pair.standby.port}/postgres", redis_server.url)
    try:
        with primary.app_context():
            apply_event(db.session, Event("standby_1", "completed", "+254712345678", None, 30,
                                          {"sessionId": "standby_1", "status": "completed"}), datetime.now(UTC))
        assert primary.test_client().get(FEED, headers=AUTH).status_code == 200
        reader = standby.test_client()
        wait_for(lambda: reader.get("/api/v1/voice/recordings/standby_1", headers=AUTH).status_code == 200,
                 timeout=10)  # replayed there: the standby serves the per-recording reads and the list
        assert reader.get("/api/v1/voice/recordings", headers=AUTH).get_json()["recordings"]

        refused = reader.get(FEED, headers=AUTH)
        assert refused.status_code == 503
        assert refused.get_json() == {"error": STANDBY_REFUSED}
        assert refused.headers["Retry-After"].isdigit()
    finally:
        dispose(primary)
        dispose(standby)


def test_a_multi_host_url_is_accepted_and_reaches_libpq_whole() -> None:
    settings = Settings.from_env({"DATABASE_URL": MULTI_HOST})
    assert settings.database_url == MULTI_HOST
    options = engine_options(settings.database_url)
    assert options["connect_args"]["connect_timeout"] == 5  # each host's, and the timeouts as for one
    assert options["pool_pre_ping"]  # a pooled connection to a host that died is replaced, not used
    app = create_app(settings)
    with app.app_context():
        engine = db.engine
        _args, params = engine.dialect.create_connect_args(make_url(MULTI_HOST))
    assert (params["host"], params["port"]) == ("127.0.0.1,127.0.0.1", "5432,5433")
    assert params["target_session_attrs"] == "read-write"
    dispose(app)
