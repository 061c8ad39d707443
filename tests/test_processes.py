"""The Procfile: every process the contract names, the worker on every queue, migrations on release."""

from __future__ import annotations

import re

from app.celery_app import TASK_TIME_LIMIT, VISIBILITY_TIMEOUT
from app.dedup import CLAIM_TTL_SECONDS
from app.queues import ALL_QUEUES
from app.tasks import BACKOFF_MAX_SECONDS
from tests.support import ROOT


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_procfile_has_every_process() -> None:
    assert set(procfile()) == {"release", "web", "worker", "beat", "flower"}
    assert "db upgrade" in procfile()["release"]
    assert "gunicorn.conf.py" in procfile()["web"] and "wsgi:app" in procfile()["web"]


def test_worker_consumes_every_queue() -> None:
    match = re.search(r"--queues=(\S+)", procfile()["worker"])
    assert match is not None
    assert set(match.group(1).split(",")) == set(ALL_QUEUES)


def test_flower_refuses_to_start_without_basic_auth() -> None:
    assert 'test -n "$FLOWER_BASIC_AUTH"' in procfile()["flower"]


def test_time_limits_fit_the_claim_and_the_visibility_timeout() -> None:
    assert TASK_TIME_LIMIT < CLAIM_TTL_SECONDS
    assert max(TASK_TIME_LIMIT, BACKOFF_MAX_SECONDS) < VISIBILITY_TIMEOUT
