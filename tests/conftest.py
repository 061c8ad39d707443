"""Fixtures on real parts: a private redis-server, a fresh PostgreSQL database, a SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from flask_migrate import upgrade
from sqlalchemy import delete

from app import create_app
from app.base.extensions import db
from app.records.models import DeadLetter, HookOutbox, Participant, VoiceRecording, WebhookEvent
from config import Settings, key_digest
from tests.support import RedisServer, adopt_orphans, leftovers, pg_database

API_KEY = "test-api-key"


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Fails the session when a process, folder (a PostgreSQL or RabbitMQ node's), database,
    RabbitMQ vhost, network namespace, link or address the suite made is still there at its end.
    Set up first, so it looks after every other fixture's teardown; it looks only at what this test
    process made (``tests.support.made`` records each as it is made), not at other suites on the
    machine. tests/test_leftovers.py checks that each kind, left behind, is reported."""
    adopt_orphans()
    yield
    found = leftovers()
    if found:
        pytest.fail("the suite left behind:\n" + "\n".join(found), pytrace=False)


def migrate(database_url: str, redis_url: str) -> None:
    """Make the schema the way the release step does: Alembic migrations."""
    app = create_app(Settings(database_url=database_url, redis_url=redis_url))
    with app.app_context():
        upgrade()
        db.engine.dispose()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the suite's own on a free port (the machine's shared one is left alone)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgresql_url(redis_server: RedisServer) -> Iterator[str]:
    """A database made for this run on the machine's PostgreSQL, migrated, dropped at the end."""
    with pg_database() as url:
        migrate(url, redis_server.url)
        yield url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> str:
    """A migrated SQLite file, the service's default kind of database."""
    url = f"sqlite:///{Path(tmp_path_factory.mktemp('sqlite')) / 'voice.db'}"
    migrate(url, redis_server.url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def settings(database_url: str, redis_server: RedisServer) -> Settings:
    """Settings built directly, as tests do; one API key."""
    return Settings(
        database_url=database_url,
        redis_url=redis_server.url,
        api_key_digests=(key_digest(API_KEY),),
        log_format="console",
    )


@pytest.fixture
def make_app(redis_server: RedisServer) -> Iterator:
    """Build apps from settings; empties their database and Redis first, disposes them after."""
    built: list[Flask] = []

    def build(settings: Settings) -> Flask:
        app = create_app(settings)
        with app.app_context():
            for model in (WebhookEvent, Participant, DeadLetter, HookOutbox, VoiceRecording):
                db.session.execute(delete(model))
            db.session.commit()
        redis.Redis.from_url(redis_server.url).flushdb()
        built.append(app)
        return app

    yield build
    for app in built:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()
        app.extensions["redis"].close()


@pytest.fixture
def app(make_app, settings: Settings) -> Flask:
    """The app on this test's database, empty."""
    return make_app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    """Headers that pass the read API's bearer check."""
    return {"Authorization": f"Bearer {API_KEY}"}
