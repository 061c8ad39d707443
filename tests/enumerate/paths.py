"""The paths the enumeration covers, each a short scenario on a lane: set the scene, run the
path under test with a plan (record, or fault one step), restart what died, settle, check.

Processes under test:
- webhook paths: gunicorn (one process, one thread), as Africa's Talking posts to it; a killed
  web process is replaced by gunicorn's master, and the event is posted again until answered 200;
- worker paths (apply, retry, dead letter, hook relay): the solo ``python -m worker``, armed by
  the delivery of the run's message; a killed worker is started again by the harness;
- commands (drain, replay, sweep, prune): ``flask voice ...``, armed from its start; one that
  died or failed is run again unarmed, as an operator would.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.enumerate.checks import DEAD_LETTER_LIST, PENDING_DATA, PENDING_DUE, Expect, marked
from tests.enumerate.lane import REDELIVERY_SECONDS, Lane, LaneSpec
from tests.support import wait_for

PHONE = "+254711000001"
KINDS = ("before", "after", "fail", "refuse")
PATH_END_SECONDS = 30.0


def event(marker: str, duration: int, url: str | None = None) -> dict[str, str]:
    """A completed call's callback; a session's events differ by duration."""
    fields = {"sessionId": marker, "phoneNumber": PHONE, "status": "completed", "duration": str(duration)}
    if url:
        fields["recordingUrl"] = f"https://voice.africastalking.com/recordings/{marker}-{url}.mp3"
    return fields


class SceneNeverArmed(Exception):
    """A scene's own event reached the worker without arming it (taken ahead behind another
    message, as a path's event can be): the scene it was to set did not happen, and the run is
    made again, as a run whose path never started is."""


@dataclass
class Run:
    """One run of a path on a lane: its marker (the session id), plan and outcome."""

    lane: Lane
    marker: str
    fault: dict[str, Any] | None
    expect: Expect
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def trace(self) -> Path:
        return self.lane.plans / f"{self.marker}.trace"

    def plan(self, on: str, db: str | None = None, fault: bool = True, trace: Path | None = None) -> dict[str, Any]:
        return {"on": on, "trace": str(trace or self.trace), "fault": self.fault if fault else None, "db": db}

    def arm(self, on: str, db: str | None = None, fault: bool = True, trace: Path | None = None) -> None:
        """Leave the plan where the role's interceptor takes it when the path starts."""
        plan = self.plan(on, db, fault, trace)
        path = self.lane.plans / f"{self.marker}.plan"
        path.with_suffix(".tmp").write_text(json.dumps(plan))
        path.with_suffix(".tmp").rename(path)

    def disarm(self) -> None:
        """A plan nobody took (the path never started) must not arm a later one."""
        (self.lane.plans / f"{self.marker}.plan").unlink(missing_ok=True)

    def post(self, fields: dict[str, str]) -> None:
        """Post like Africa's Talking; an event answered 200 must be applied once."""
        answers = self.lane.post_like_at(fields, self.marker)
        self.notes.setdefault("answers", []).extend(answers)
        if answers[-1] == 200:
            self.expect.applied.append(int(fields["duration"]))
        else:
            self.notes["unanswered"] = fields["duration"]

    def trace_records(self, trace: Path | None = None) -> list[dict[str, Any]]:
        path = trace or self.trace
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_path_end(self, trace: Path | None = None) -> None:
        """Until the worker's path ended (the trace says so) or the worker died."""
        fired: list[float] = []

        def ended() -> bool:
            events = {r["event"] for r in self.trace_records(trace)}
            if "fault" in events and not fired:
                fired.append(time.monotonic())
            # After a failed call the path may go on on a new connection without ever ending the
            # way it was recorded; the settling that follows waits for whatever it still does.
            return bool(events & {"end", "killed"}) or self.lane.worker_died() or bool(
                fired and time.monotonic() - fired[0] > 2)

        try:
            wait_for(ended, timeout=PATH_END_SECONDS, interval=0.05)
        except TimeoutError:
            self.notes["path_end"] = "not seen"
        if any(r["event"] == "killed" for r in self.trace_records(trace)):
            wait_for(self.lane.worker_died, timeout=10, interval=0.02)  # the kill is on its way

    def run_command(self, *args: str) -> None:
        """The command under test, armed; run again unarmed if it died or failed."""
        done = self.lane.flask(*args, plan={**self.plan("cli"), "marker": self.marker})
        self.notes["exit"] = done.returncode
        if done.returncode != 0:
            again = self.lane.flask(*args)
            self.notes["rerun_exit"] = again.returncode
            if again.returncode != 0:
                self.notes["rerun_output"] = (again.stdout + again.stderr)[-400:]


@dataclass
class PathDef:
    """A path: how its lanes run, the scenario, and what the checks expect."""

    name: str
    about: str
    role: str  # the process under test: web, worker or cli
    scenario: Callable[[Run], None]
    spec: LaneSpec = field(default_factory=LaneSpec)
    kinds: tuple[str, ...] = KINDS
    dead_letters_ok: bool = False
    hooks: bool = False
    settle_seconds: float = 60.0
    # Rough seconds per run, for sharing lanes between paths.
    run_seconds: float = 10.0

    def new_run(self, lane: Lane, fault: dict[str, Any] | None) -> Run:
        marker = f"enum-{lane.name}-{secrets.token_hex(5)}"
        return Run(lane, marker, fault, Expect(marker, dead_letters_ok=self.dead_letters_ok, hooks=self.hooks))


# --- scenarios -------------------------------------------------------------------------------


def webhook(run: Run) -> None:
    """The web takes an event and answers; the killed web process is replaced by gunicorn."""
    run.arm("web")
    run.post(event(run.marker, 17))
    run.disarm()


def worker_path(db: str | None = None, url: bool = False) -> Callable[[Run], None]:
    def scenario(run: Run) -> None:
        run.arm("worker", db=db)
        run.post(event(run.marker, 17, "a" if url else None))
        run.wait_path_end()
        run.disarm()
        if run.lane.restart_worker_if_dead():
            run.notes["worker_restarted"] = True

    scenario.__doc__ = f"The worker applies an event (database failing: {db or 'no'})."
    return scenario


def hook_relay(run: Run) -> None:
    """URL A applied before the path; the path applies URL B (its relay after commit is the part
    of interest); then A again, so that the URL goes A -> B -> A."""
    lane = run.lane
    run.post(event(run.marker, 10, "a"))
    wait_for(lambda: lane.query("SELECT 1 FROM webhook_events WHERE recording_id = %s", run.marker)
             and not lane.query("SELECT 1 FROM hook_outbox WHERE recording_id = %s", run.marker),
             timeout=30, interval=0.1)
    run.arm("worker")
    run.post(event(run.marker, 20, "b"))
    run.wait_path_end()
    run.disarm()
    if lane.restart_worker_if_dead():
        run.notes["worker_restarted"] = True
    run.notes["then"] = "url a again"


def hook_relay_then(run: Run) -> None:
    """After the path settled: URL A again."""
    run.post(event(run.marker, 30, "a"))


def dead_letter_first(db: str, where: str) -> Callable[[Run], None]:
    """Set the scene for a command on dead letters: an event the worker dead-letters (with the
    database failing as ``db`` says), kept in ``where`` (redis: the list; db: the table)."""
    def scene(run: Run) -> None:
        lane = run.lane
        setup_trace = lane.plans / f"{run.marker}.setup.trace"
        run.arm("worker", db=db, fault=False, trace=setup_trace)
        run.post(event(run.marker, 17))
        run.wait_path_end(setup_trace)
        if not any(r["event"] == "armed" for r in run.trace_records(setup_trace)):
            raise SceneNeverArmed(f"{run.marker}: the worker applied the scene's event unarmed")
        if where == "redis":
            wait_for(lambda: marked(lane.client.lrange(DEAD_LETTER_LIST, 0, -1), run.marker), timeout=30,
                     interval=0.1)
        else:
            wait_for(lambda: lane.query("SELECT 1 FROM dead_letters WHERE session_id = %s", run.marker),
                     timeout=30, interval=0.1)
    return scene


def drain(run: Run) -> None:
    """``flask voice dead-letters`` files a dead letter Redis held while the database was down."""
    dead_letter_first("all", "redis")(run)
    run.run_command("voice", "dead-letters")


def replay(run: Run) -> None:
    """``flask voice replay --all`` sends a dead letter again."""
    dead_letter_first("twice", "db")(run)
    run.run_command("voice", "replay", "--all")


def sweep(run: Run) -> None:
    """``flask voice sweep`` sends again an accepted event whose message the broker lost (taken
    by a worker that died before recording it: here removed from the queue while no worker runs)."""
    lane = run.lane
    lane.stop_process("worker")
    lane.stop_process("beat")
    run.post(event(run.marker, 17))
    lane.client.delete("voice-webhooks")
    keys = [key for key, value in lane.client.hgetall(PENDING_DATA).items() if run.marker.encode() in value]
    assert keys, "the event is not in the pending set"
    due = float(lane.client.zscore(PENDING_DUE, keys[0]) or 0)
    time.sleep(max(0.0, due - time.time()) + 0.2)
    run.run_command("voice", "sweep")
    lane.start_worker()
    lane.start_beat()


def prune(run: Run) -> None:
    """``flask voice prune`` deletes an event older than EVENT_RETENTION_DAYS and keeps a new one."""
    lane = run.lane
    run.post(event(run.marker, 5))
    run.post(event(run.marker, 6))
    wait_for(lambda: len(lane.query("SELECT 1 FROM webhook_events WHERE recording_id = %s", run.marker)) == 2,
             timeout=30, interval=0.1)
    lane.query("UPDATE webhook_events SET received_at = received_at - interval '30 days' "
               "WHERE recording_id = %s AND duration = 5 RETURNING id", run.marker)
    run.expect.applied.remove(5)
    run.expect.gone.append(5)
    run.run_command("voice", "prune")


# --- what runs after the first settle, and between runs ---------------------------------------

THEN: dict[str, Callable[[Run], None]] = {"hook-redis": hook_relay_then, "hook-rabbitmq": hook_relay_then}


def after_run(path: PathDef, lane: Lane, faulted: bool) -> None:
    """Put the lane back as the next run expects it: after a fault, an unarmed event through web
    and worker, so that the next run meets warm processes again (a failed call closed a
    connection; a pool that must open a new one skips its pre-ping)."""
    if path.name == "drain":
        lane.stop_process("beat")
    if path.name == "sweep":
        lane.stop_process("worker")
        lane.stop_process("beat")
    elif faulted:
        lane.restart_worker_if_dead()
        lane.warm_up()


def before_settle(path: PathDef, lane: Lane) -> None:
    """Start what settles the path: the sweeper where the scenario kept it off."""
    if path.name == "drain":
        lane.start_beat()
    if lane.processes.get("web") is not None and lane.processes["web"].poll() is not None:
        lane.stop_process("web", signal.SIGKILL)
        lane.start_web()


# --- the paths -------------------------------------------------------------------------------

RABBITMQ = "rabbitmq"
NO_RETRIES = {"EVENT_MAX_RETRIES": "0"}
# The longest recovery a run may need: a claim left by a task that died or could not release it
# (CLAIM_TTL_SECONDS, 120 s) and the busy copy's next retry (CLAIM_BUSY_MAX_SECONDS, 5 s); the Redis
# transport's visibility timeout (45 s) and the sweeper (5 s) fit within it.
REDIS_SETTLE = 140.0
RABBIT_SETTLE = 140.0

PATHS: dict[str, PathDef] = {p.name: p for p in [
    PathDef("webhook-redis", "web: enqueue on the Redis broker (message and pending entry in one script)", "web",
            webhook, settle_seconds=REDIS_SETTLE, run_seconds=6),
    PathDef("webhook-rabbitmq", "web: publish with publisher confirms on RabbitMQ", "web", webhook,
            LaneSpec(broker=RABBITMQ), settle_seconds=RABBIT_SETTLE, run_seconds=6),
    PathDef("apply-redis", "worker: take, hold in a batch, claim, apply, mark done and acknowledge (Redis broker)",
            "worker", worker_path(),
            settle_seconds=REDIS_SETTLE, run_seconds=35),
    PathDef("apply-rabbitmq", "worker: take, claim, apply, acknowledge (RabbitMQ; Redis only the dedup cache)",
            "worker", worker_path(), LaneSpec(broker=RABBITMQ),
            settle_seconds=RABBIT_SETTLE, run_seconds=8),
    PathDef("retry-redis", "worker: the database fails the batch's transaction, then the task's attempt alone; "
            "the task retries (Redis broker)", "worker", worker_path(db="twice"), settle_seconds=REDIS_SETTLE,
            run_seconds=35),
    PathDef("retry-rabbitmq", "worker: the database fails once, the task retries (RabbitMQ)", "worker",
            worker_path(db="first"), LaneSpec(broker=RABBITMQ), settle_seconds=RABBIT_SETTLE, run_seconds=10),
    PathDef("deadletter-redis", "worker: EVENT_MAX_RETRIES=0, the database down: the event is dead-lettered",
            "worker", worker_path(db="all"), LaneSpec(env=NO_RETRIES), dead_letters_ok=True,
            settle_seconds=REDIS_SETTLE, run_seconds=30),
    PathDef("deadletter-rabbitmq", "worker: EVENT_MAX_RETRIES=0, the database down (RabbitMQ)", "worker",
            worker_path(db="all"), LaneSpec(broker=RABBITMQ, env=NO_RETRIES), dead_letters_ok=True,
            settle_seconds=RABBIT_SETTLE, run_seconds=12),
    PathDef("drain", "flask voice dead-letters: files the dead letters Redis held (Redis broker)", "cli", drain,
            LaneSpec(env=NO_RETRIES, beat=False), dead_letters_ok=True, settle_seconds=REDIS_SETTLE,
            run_seconds=10),
    PathDef("replay", "flask voice replay --all (Redis broker)", "cli", replay, LaneSpec(env=NO_RETRIES),
            dead_letters_ok=True, settle_seconds=REDIS_SETTLE, run_seconds=12),
    PathDef("hook-redis", "worker: apply URL B after URL A, relay the ready hook after commit; then A again",
            "worker", hook_relay, hooks=True, settle_seconds=REDIS_SETTLE, run_seconds=35),
    PathDef("hook-rabbitmq", "worker: the hook relay on RabbitMQ", "worker", hook_relay, LaneSpec(broker=RABBITMQ),
            hooks=True, settle_seconds=RABBIT_SETTLE, run_seconds=10),
    PathDef("sweep", "flask voice sweep: re-sends an accepted event whose message was lost (Redis broker)", "cli",
            sweep, LaneSpec(beat=False), settle_seconds=REDIS_SETTLE, run_seconds=12),
    PathDef("prune", "flask voice prune with EVENT_RETENTION_DAYS=7 (Redis broker)", "cli", prune,
            LaneSpec(env={"EVENT_RETENTION_DAYS": "7"}), settle_seconds=REDIS_SETTLE, run_seconds=8),
]}
# hook-rabbitmq is left out by default: the relay's windows are the same on both brokers.
DEFAULT_PATHS = tuple(name for name in PATHS if name != "hook-rabbitmq")
assert REDELIVERY_SECONDS <= 5
