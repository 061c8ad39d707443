"""Fault enumeration: every call each path makes to Redis, RabbitMQ and PostgreSQL, faulted in
turn (the process killed just before it, killed just after it took effect, the call failing with
the client's own error), and the invariants checked once the service settled.

The enumeration runs once for the module (lanes side by side, about ten minutes on two cores);
each path's test then asserts on its runs. ``python -m tests.enumerate.run`` runs the same and
prints the table. ENUM_SERVICE_ROOT names another checkout of the service to run (default: this
one), e.g. a ``git worktree`` of a commit, so that a tree being edited does not run half-changed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from tests.enumerate import checks
from tests.enumerate.engine import PathReport, Session, details, enumerate_paths, plan_jobs, table
from tests.enumerate.lane import INJECT
from tests.enumerate.paths import DEFAULT_PATHS, PATHS, event
from tests.support import ROOT

pytestmark = pytest.mark.faults

SERVICE_ROOT = Path(os.environ.get("ENUM_SERVICE_ROOT") or ROOT).resolve()
# The whole enumeration, started by the first test that needs it (its time limit covers it): about
# 540 s on a quiet machine, and near 900 s with both cores kept busy by other work.
ENUMERATION_SECONDS = 1500
# Calls each path makes at least, today: a recording that saw fewer missed part of the path.
MIN_STEPS = {"webhook-redis": 1, "webhook-rabbitmq": 2, "apply-redis": 11, "apply-rabbitmq": 11,
             "retry-redis": 6, "retry-rabbitmq": 6, "deadletter-redis": 5, "deadletter-rabbitmq": 5,
             "drain": 4, "replay": 5, "hook-redis": 20, "sweep": 4, "prune": 4}


@pytest.fixture(scope="module")
def enumeration(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PathReport]:
    reports = enumerate_paths(list(DEFAULT_PATHS), SERVICE_ROOT, Path(tmp_path_factory.mktemp("enumerate")))
    print(table(reports))
    print(details(reports))
    return {report.path.name: report for report in reports}


@pytest.mark.timeout(ENUMERATION_SECONDS)
@pytest.mark.parametrize("name", DEFAULT_PATHS)
def test_every_fault_on_the_path_leaves_the_invariants_true(enumeration: dict[str, PathReport], name: str) -> None:
    """Each (step, kind) was run with the fault placed where it was recorded, and after it every
    event answered 200 was applied once at its first arrival, every dead letter listed once and
    replayable, every ready recording's hook sent with its latest state last, and nothing left in
    the pending set or the hook outbox."""
    report = enumeration[name]
    assert report.error is None, report.error
    assert report.recording is not None and report.recording.held, report.recording
    assert len(report.steps) >= MIN_STEPS[name], [s.label for s in report.steps]
    wanted = {key for job in plan_jobs(report.path, report.steps, report.sides, report.path.kinds, merge=False)
              for key in job.counts_for}
    ran = {(r.step, r.kind) for r in report.results}
    assert ran == wanted, f"runs missing: {sorted(wanted - ran)}"
    unplaced = [(r.step, r.kind, r.notes.get("not_placed")) for r in report.results if not r.placed]
    assert not unplaced, unplaced
    broken = [(r.step, r.label, r.kind, r.broken) for r in report.results if not r.held]
    assert not broken, "\n".join(map(str, broken))


# --- the harness's own parts -----------------------------------------------------------------


def _interceptor() -> Any:
    """The interceptor module, loaded as a child process loads it (inert: no plan in the env)."""
    spec = importlib.util.spec_from_file_location("enum_sitecustomize", INJECT / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(30)
def test_the_interceptor_reads_packed_commands_and_task_messages() -> None:
    """One packed send is one step, labelled the same in every run (hashes and session ids out),
    and a publish's arrival time is found in the pending entry or in Celery's base64 body."""
    sitecustomize = _interceptor()
    assert sitecustomize.STATE is None  # inert without VOICE_ENUM
    def pack(*args: bytes) -> bytes:
        return f"*{len(args)}\r\n".encode() + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)

    packed = pack(b"MULTI") + pack(b"ZREM", b"unacked_index", b"tag") + pack(
        b"SET", b"voice:dedup:0123456789abcdef", b"done") + pack(b"EXEC")
    commands = sitecustomize._commands(packed)
    assert [c[0] for c in commands] == [b"MULTI", b"ZREM", b"SET", b"EXEC"]
    assert sitecustomize._redis_label(commands) == "redis MULTI(ZREM,SET)"
    assert sitecustomize._redis_label([[b"EVAL", b"script", b"1", b"voice:dedup:0123456789abcdef0123"]]) \
        == "redis EVAL(voice:dedup:*)"
    message = {"session_id": "enum-l1-0123456789", "duration": 17}
    body = json.dumps([[message, "2026-01-01T00:00:00+00:00", None], {}, {}]).encode()
    import base64

    kombu_message = json.dumps({"body": base64.b64encode(body).decode(), "headers": {}}).encode()
    assert sitecustomize.task_in(kombu_message) == (message, "2026-01-01T00:00:00+00:00")
    assert sitecustomize.task_in(body) == (message, "2026-01-01T00:00:00+00:00")
    assert sitecustomize._sql_label("SELECT x FROM voice_recordings WHERE id = 1 FOR UPDATE") \
        == "db SELECT voice_recordings FOR UPDATE"


# Run with the interceptor armed on the worker role, a refusal struck on its first publish: the
# path's later publishes are refused too, Celery's own events are not the path's and go through.
_REFUSING_THEN_HEARTBEAT = """
import json, os, sys
import amqp, sitecustomize
from amqp.exceptions import MessageNacked

plan = {"trace": sys.argv[2], "fault": {"step": 0, "label": "amqp basic_publish enum-refused", "occurrence": 1,
                                        "kind": "refuse"}, "db": None}
vhost = sys.argv[1].rsplit("/", 1)[1]
conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest", virtual_host=vhost, confirm_publish=True)
conn.connect()
channel = conn.channel()
channel.exchange_declare("celeryev", "topic", durable=True, auto_delete=False)
sitecustomize.STATE.arm(plan, "enum-l0-0123456789")
outcomes = []
for exchange, key in (("", "enum-refused"), ("", "enum-refused"), ("celeryev", "worker.heartbeat")):
    try:
        channel.basic_publish(amqp.Message(b"{}"), exchange=exchange, routing_key=key)
        outcomes.append("confirmed")
    except MessageNacked:
        outcomes.append("nacked")
sitecustomize.STATE.end("done")
conn.close()
print(json.dumps(outcomes))
"""


@pytest.mark.timeout(60)
def test_a_refusing_broker_refuses_the_path_not_celerys_own_events(tmp_path: Path) -> None:
    """The worker's heartbeat can fall due on the armed thread before the path's deferred reject;
    refused, Celery's unlimited retries of it never returned and the worker stopped taking work."""
    import subprocess
    import sys

    from tests.support import rabbitmq_vhost

    trace = tmp_path / "path.trace"
    env = {**os.environ, "PYTHONPATH": str(INJECT), "VOICE_ENUM": json.dumps({"role": "worker", "dir": str(tmp_path)})}
    with rabbitmq_vhost() as broker_url:
        done = subprocess.run([sys.executable, "-c", _REFUSING_THEN_HEARTBEAT, broker_url, str(trace)], env=env,
                              capture_output=True, text=True, timeout=45)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["nacked", "nacked", "confirmed"]
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [r["label"] for r in records if r["event"] == "step"] == ["amqp basic_publish enum-refused"] * 2
    assert [r["what"] for r in records if r["event"] == "outside"] == ["amqp publish worker.heartbeat"]
    # Nothing of it counted as the path's: the one frame no step covers is the path's confirm.select.
    assert [r["what"] for r in records if r["event"] == "side"] == ["amqp (85, 10)"]


_REDIS_PATH_THEN_HEARTBEAT = """
import json, sys
import redis, sitecustomize

plan = {"trace": sys.argv[2], "fault": None, "db": None}
client = redis.Redis.from_url(sys.argv[1])
client.ping()
sitecustomize.STATE.arm(plan, "enum-l0-0123456789")
client.lpush("enum-queue", "one")
client.publish("/0.celeryev/worker.heartbeat", "{}")  # the worker's heartbeat, fallen due mid-path
client.publish("/0.celery.pidbox/", "{}")
client.publish("/0.enum-fanout/key", "{}")  # any other fanout is a call like the rest
client.lpush("enum-queue", "two")
sitecustomize.STATE.end("done")
print(client.llen("enum-queue"))
"""


@pytest.mark.timeout(60)
def test_celerys_own_events_on_redis_are_not_the_paths_steps(tmp_path: Path) -> None:
    """On Redis, Celery's heartbeat is a PUBLISH to kombu's fanout channel: one that fell due while
    a worker path was armed was numbered as a step, and the path's recordings differed by it."""
    import subprocess
    import sys

    from tests.support import RedisServer

    trace = tmp_path / "path.trace"
    env = {**os.environ, "PYTHONPATH": str(INJECT), "VOICE_ENUM": json.dumps({"role": "worker", "dir": str(tmp_path)})}
    server = RedisServer(tmp_path / "redis").start()
    try:
        done = subprocess.run([sys.executable, "-c", _REDIS_PATH_THEN_HEARTBEAT, server.url, str(trace)], env=env,
                              capture_output=True, text=True, timeout=45)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    steps = [r["label"] for r in records if r["event"] == "step"]
    assert len(steps) == 3 and steps[0] == steps[2] and steps[1].startswith("redis PUBLISH"), steps
    assert [r["what"] for r in records if r["event"] == "outside"] == [
        "redis PUBLISH /0.celeryev/worker.heartbeat", "redis PUBLISH /0.celery.pidbox/"]


@pytest.mark.timeout(30)
def test_kills_that_leave_the_same_state_are_run_once() -> None:
    """'after k' and 'before k+1' share a run only where no broker frame came between them."""
    from tests.enumerate.engine import Step

    steps = [Step(0, "amqp basic_publish voice-webhooks", False), Step(1, "amqp confirm", False),
             Step(2, "db COMMIT", False)]
    jobs = plan_jobs(PATHS["webhook-rabbitmq"], steps, {1: ["amqp (50, 10)"]}, ("before", "after", "fail"), True)
    shared = [job.counts_for for job in jobs if len(job.counts_for) > 1]
    assert shared == [[(0, "after"), (1, "before")]]  # 1 -> 2 has a declare between: run apart
    assert sum(len(job.counts_for) for job in jobs) == 9


@pytest.mark.timeout(180)
def test_the_checks_see_an_event_the_broker_lost(tmp_path: Path) -> None:
    """The invariants can fail: an accepted event whose message and pending entry are both gone
    (what no fault of a correct service may cause) is reported lost once nothing is left to
    bring it back."""
    path = PATHS["apply-redis"]
    with Session(SERVICE_ROOT, tmp_path, print) as session, session.lane(path) as lane:
        lane.stop_process("worker")
        marker = f"enum-{lane.name}-{secrets.token_hex(5)}"
        expect = checks.Expect(marker, applied=[17])
        assert lane.post(event(marker, 17), marker).status == 200
        lane.client.delete("voice-webhooks", checks.PENDING_DATA, checks.PENDING_DUE)
        lane.start_worker()
        started = time.monotonic()
        checks.settle(lane, expect, timeout=60)
        assert time.monotonic() - started < 30  # quiet: no need to wait for the deadline
        assert checks.broken_invariants(lane, expect) == ["applied exactly once (event 17 lost)"]
