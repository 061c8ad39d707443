"""A running stack per database, shared by a module's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import Stack
from tests.support import pg_database


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """gunicorn and a Celery worker on free ports, with their own Redis, on SQLite or PostgreSQL."""
    workdir = Path(tmp_path_factory.mktemp(f"stack-{request.param}"))
    if request.param == "sqlite":
        yield from _run(Stack(workdir, f"sqlite:///{workdir / 'voice.db'}"), request)
    else:
        with pg_database("voice_e2e") as url:
            yield from _run(Stack(workdir, url), request)


def _run(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Stack]:
    try:
        yield stack.start()
    finally:
        stack.stop()
        if request.session.testsfailed:
            for name in ("web", "worker"):
                print(f"----- {name} log (last 3000 chars) -----\n{stack.log(name)[-3000:]}")
