"""The worker's processes load only what a worker needs: every module imported there is resident in
each of them (the main process and every pool process), and bench/worker_memory.py holds them to a
memory goal. A fresh interpreter imports the entry points and reports what it loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT

# Modules only the web, the ``flask`` commands or the ``celery`` umbrella command use.
WEB_ONLY = (
    "app.payload.openapi", "app.operating.ops", "app.reading.api", "app.intake.webhook", "app.base.security",
    "app.operating.cli", "app.operating.simulator",
    "flask_migrate", "alembic",
)
UMBRELLA_ONLY = ("celery.bin.celery", "celery.bin.amqp", "click_repl", "prompt_toolkit", "flower", "tornado")


def loaded(code: str, database_url: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": "redis://127.0.0.1:1/0"}  # never connected
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.fixture(scope="module")
def sqlite_worker(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('worker-imports') / 'voice.db'}"
    return loaded("import worker.__main__", url)


def test_the_worker_loads_no_web_module(sqlite_worker: set[str]) -> None:
    assert "app.applying.tasks" in sqlite_worker and "celery.bin.worker" in sqlite_worker  # what it does need
    assert sorted(sqlite_worker & set(WEB_ONLY)) == []


def test_the_worker_entry_point_loads_no_celery_subcommand_or_plugin(sqlite_worker: set[str]) -> None:
    assert sorted(sqlite_worker & set(UMBRELLA_ONLY)) == []


def test_a_worker_loads_one_database_dialect(sqlite_worker: set[str]) -> None:
    assert "sqlalchemy.dialects.sqlite" in sqlite_worker
    assert "sqlalchemy.dialects.postgresql" not in sqlite_worker and "psycopg" not in sqlite_worker
    on_postgresql = loaded("import worker", "postgresql+psycopg://postgres@127.0.0.1:1/voice")  # never connected
    assert "sqlalchemy.dialects.postgresql" in on_postgresql
    assert "sqlalchemy.dialects.sqlite" not in on_postgresql and "sqlite3" not in on_postgresql


def test_the_web_still_loads_its_blueprints_and_commands(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'voice.db'}"
    web = loaded("import wsgi\nassert {'webhook', 'api', 'ops'} <= set(wsgi.app.blueprints)\n"
                 "assert {'voice', 'db'} <= set(wsgi.app.cli.commands)", url)
    assert {"app.payload.openapi", "app.operating.cli", "app.operating.simulator"} <= web
