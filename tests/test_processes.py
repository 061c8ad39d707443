"""The Procfile: every process the contract names, the worker on every queue, migrations on release."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flask import Flask

from app.applying.tasks import BACKOFF_MAX_SECONDS
from app.celery_app import TASK_TIME_LIMIT, VISIBILITY_TIMEOUT
from app.plumbing.dedup import CLAIM_TTL_SECONDS
from app.plumbing.queues import ALL_QUEUES
from tests.support import ROOT, RedisServer, spawn, sqlite_only, stop_group, wait_for


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


def test_the_beat_line_starts_on_a_fresh_checkout(tmp_path: Path, redis_server: RedisServer) -> None:
    """A fresh clone has no instance/ folder: the beat line makes it, starts, and sends sweeps."""
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(checkout)], check=True, timeout=120)
    for tracked in ("app", "worker", "config.py"):  # the working tree's code, not the last commit's
        target = checkout / tracked
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        (shutil.copytree if (ROOT / tracked).is_dir() else shutil.copy)(ROOT / tracked, target)
    assert not (checkout / "instance").exists()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "REDIS_URL": redis_server.url, "DATABASE_URL": f"sqlite:///{tmp_path / 'voice.db'}"}
    env.pop("CELERY_BEAT_SCHEDULE", None)
    log = tmp_path / "beat.log"
    beat = spawn(["bash", "-c", procfile()["beat"]], log=log, cwd=checkout, env=env)
    try:
        wait_for(lambda: "Sending due task sweep-pending" in log.read_text(), timeout=60, interval=0.2)
        assert (checkout / "instance").is_dir()
    finally:
        stop_group(beat)
    assert "FileNotFoundError" not in log.read_text()


@sqlite_only
def test_each_sweep_records_when_it_ran(app: Flask) -> None:
    from app.applying.tasks import sweep_pending_task
    from app.base import metrics

    before = time.time()
    with app.app_context():
        sweep_pending_task()  # the task's body, as a worker runs it
    assert metrics.SWEEP_LAST_RUN._value.get() >= before
    assert metrics.SWEEP_INTERVAL._value.get() == app.extensions["settings"].sweep_interval_seconds
