"""A running stack per database and broker, shared by a module's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import Stack
from tests.support import pg_database, rabbitmq_vhost

TOKEN = "tok-e2e-5ecr3t-value"
SECRET = "hmac-e2e-5ecr3t-value"

STACKS = [
    pytest.param(("sqlite", "redis"), id="sqlite-redis"),
    pytest.param(("postgresql", "redis"), id="postgresql-redis", marks=pytest.mark.postgres),
    pytest.param(("postgresql", "rabbitmq"), id="postgresql-rabbitmq", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="module", params=STACKS)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """gunicorn and a Celery worker on free ports with their own Redis, on SQLite or PostgreSQL,
    with Redis or RabbitMQ (a virtual host of its own) as the broker."""
    database, broker = request.param
    workdir = Path(tmp_path_factory.mktemp(f"stack-{database}-{broker}"))
    if database == "sqlite":
        yield from _run(Stack(workdir, f"sqlite:///{workdir / 'voice.db'}"), request)
        return
    with pg_database("voice_e2e") as url:
        if broker == "redis":
            yield from _run(Stack(workdir, url), request)
            return
        with rabbitmq_vhost() as broker_url:
            yield from _run(Stack(workdir, url, CELERY_BROKER_URL=broker_url), request)


def _run(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Stack]:
    try:
        yield stack.start()
    finally:
        stack.stop()
        if request.session.testsfailed:
            for name in ("web", "worker"):
                print(f"----- {name} log (last 3000 chars) -----\n{stack.log(name)[-3000:]}")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack that requires a webhook token or signature, on SQLite."""
    workdir = Path(tmp_path_factory.mktemp("secured"))
    stack = Stack(workdir, f"sqlite:///{workdir / 'voice.db'}", WEBHOOK_TOKENS=TOKEN, WEBHOOK_SECRETS=SECRET)
    try:
        yield stack.start()
    finally:
        stack.stop()
