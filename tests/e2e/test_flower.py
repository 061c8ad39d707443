"""Flower, as the Procfile starts it: behind basic auth, and seeing the workers' task events."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.request

import pytest

from tests.e2e.conftest import STACKS
from tests.e2e.stack import Stack
from tests.support import ROOT, free_port, spawn, stop_group, wait_for

pytestmark = pytest.mark.e2e


def procfile_command(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}: "):
            return line.split(": ", 1)[1]
    raise KeyError(name)


def fetch(url: str, auth: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


# Flower reads the workers' events from the broker: one stack per broker; the database plays no part.
BROKERS = [param for param in STACKS if param.id in {"sqlite-redis", "postgresql-rabbitmq"}]


@pytest.mark.parametrize("stack", BROKERS, indirect=True)
def test_flower_needs_basic_auth_and_sees_task_events(stack: Stack) -> None:
    port = free_port()
    env = {**stack.env(), "FLOWER_PORT": str(port), "FLOWER_BASIC_AUTH": "ops:flower-test-password",
           "PATH": f"{ROOT / '.venv' / 'bin'}:{stack.env()['PATH']}"}
    flower = spawn(["bash", "-c", procfile_command("flower")], log=stack.workdir / "flower.log", cwd=ROOT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: fetch(base + "/healthcheck")[0] == 200, timeout=30)
        assert fetch(base + "/api/workers")[0] == 401
        assert fetch(base + "/api/workers", "ops:wrong")[0] == 401
        sent = []

        def seen(state: str | None = None) -> list[str]:
            status, body = fetch(base + "/api/tasks?limit=1000", "ops:flower-test-password")
            tasks = json.loads(body).values() if status == 200 else []
            return [str(task.get("args")) for task in tasks if task.get("name") == "voice.apply_webhook_event"
                    and state in {None, task.get("state")}]

        def task_seen() -> bool:
            # Workers send no task events until Flower turns them on (it does as it starts, and
            # every few seconds): post until it sees one.
            sent.append(f"flower_{port}_{len(sent)}")
            assert stack.post_form({"sessionId": sent[-1], "status": "busy"})[0] == 200
            return bool(seen())

        wait_for(task_seen, timeout=30, interval=0.5)
        # From then on Flower sees every task.
        after = [f"flower_{port}_after_{n}" for n in range(5)]
        for session in after:
            assert stack.post_form({"sessionId": session, "status": "busy"})[0] == 200
        wait_for(lambda: all(any(session in args for args in seen()) for session in after), timeout=30, interval=0.5)
        # ...each as a task that succeeded, batched or not (on the Redis broker a batch sends the
        # events Celery sends for a task: app.applying.fastpath).
        wait_for(lambda: all(any(session in args for args in seen("SUCCESS")) for session in after), timeout=30,
                 interval=0.5)
    finally:
        stop_group(flower, timeout=10)  # SIGKILL if it does not stop in time


def test_flower_refuses_to_start_without_credentials() -> None:
    """No stack needed: the Procfile's command refuses before Flower starts."""
    env = {**{k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"},
           "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", procfile_command("flower")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode != 0
    assert "FLOWER_BASIC_AUTH" in done.stderr
