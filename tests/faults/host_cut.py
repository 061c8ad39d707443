"""Fault scenario: one of two worker hosts drops off the network for 20 s, then comes back.

Two worker "hosts" are network namespaces of the scenario's own (``tests.netns``), each running a
Celery worker that reaches Redis (broker and dedup cache) and PostgreSQL over its own veth link;
gunicorn stays on the machine. Mid-stream one host's link goes down (its packets vanish, as when
a host is cut off) for 20 s and comes back. The other host keeps applying. What the cut-off host
had taken and not acknowledged comes back through the broker: kombu restores an unacknowledged
message after the visibility timeout (``app.celery_app.VISIBILITY_TIMEOUT``), and the pending
set's sweeper sends it again after ``PENDING_REDELIVERY_SECONDS``; the dedup claim (its TTL,
``app.plumbing.dedup.CLAIM_TTL_SECONDS``, outlives a task) and the database fingerprint keep each event to
one application. Nothing lost, nothing applied twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import redis

from tests.e2e.stack import Stack, start_formation, worker_line
from tests.faults.scenarios import (
    BACKLOG_SECONDS,
    STALE_CLAIM_RETURNS_WITHIN,
    SWEEPER_RESENDS_WITHIN,
    UNACKED_RETURNS_WITHIN,
    Tally,
    budget,
    make_events,
    post_like_at,
    tally,
    wait_until_applied,
)
from tests.faults.sentinel import SteadyStream
from tests.netns import Host, Hosts
from tests.redis_ha import Node
from tests.support import PostgresServer, postgres_bin, wait_for

CUT_SECONDS = 20.0
WORKERS_PER_HOST = 2  # each host's formation (honcho's -c worker=2)
# Both hosts applying before the cut; the stream going on after it until the web has taken this
# many more events (it never lost Redis).
WARM_UP_SECONDS = 90
ACCEPTED_AFTER_CUT = 40
STREAM_AFTER_CUT_SECONDS = 60
# What the cut-off host held comes back, counted from the moment of the cut: a message it had
# taken and not acknowledged once its visibility timeout has passed; an event it had claimed,
# when its task was killed holding the claim (its time limits fire late, once the link is back),
# once that claim expires (it was taken before the cut); an event the broker no longer holds
# (a retry that could not be sent), from the pending set. Then the backlog.
RECOVERY_SECONDS = max(UNACKED_RETURNS_WITHIN, STALE_CLAIM_RETURNS_WITHIN,
                       CUT_SECONDS + SWEEPER_RESENDS_WITHIN) + BACKLOG_SECONDS
TIME_LIMIT = budget(WARM_UP_SECONDS, CUT_SECONDS, STREAM_AFTER_CUT_SECONDS, RECOVERY_SECONDS, BACKLOG_SECONDS)


class ReachablePostgres(PostgresServer):
    """The suite's PostgreSQL server, also listening on the addresses the hosts reach it by."""

    def __init__(self, addresses: list[str], subnet: str) -> None:
        super().__init__()
        self.addresses = addresses
        self.subnet = subnet

    def init(self) -> ReachablePostgres:
        super().init()
        with open(self.datadir / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.subnet} trust\n")
        return self

    def start(self) -> ReachablePostgres:
        listen = ",".join(["127.0.0.1", *self.addresses])
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses={listen} -c fsync=off"
        self._run(postgres_bin("pg_ctl"), "-D", str(self.datadir), "-o", options,
                  "-l", str(self.workdir / "postgres.log"), "-w", "start")
        return self


def start_worker_on(stack: Stack, host: Host, name: str, redis_port: int,
                    pg_port: int) -> list[subprocess.Popen[bytes]]:
    """The host's worker formation: two copies of the Procfile's worker line, as honcho's
    ``-c worker=2`` runs them, inside the host's namespace against the machine's servers; one
    process group."""
    env = {**stack.env(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PROMETHEUS_MULTIPROC_DIR": str(stack.workdir / "metrics" / f"host-{name}"),  # a folder per machine
           "REDIS_URL": f"redis://{host.server_address}:{redis_port}/0",
           "DATABASE_URL": f"postgresql+psycopg://postgres@{host.server_address}:{pg_port}/postgres"}
    argvs = [host.command(worker_line("--without-gossip", "--without-mingle", f"--hostname={name}-{stack.port}-{i}@%h"))
             for i in range(WORKERS_PER_HOST)]
    return start_formation(argvs, stack.workdir / f"worker-{name}.log", env)


def applied_by(stack: Stack, name: str) -> int:
    path = stack.workdir / f"worker-{name}.log"
    count = 0
    for line in path.read_text(errors="replace").splitlines():
        if '"event": "event_applied"' in line and json.loads(line).get("outcome") in {"applied", "no_effect"}:
            count += 1
    return count


def host_cut_off(workdir: Path, seed: int = 12, cut_seconds: float = CUT_SECONDS) -> Tally:
    events = make_events(sessions=1000, participants=2, per_session=2, seed=seed, prefix="cut")
    workers: dict[str, list[subprocess.Popen[bytes]]] = {}
    with Hosts(2) as hosts:
        a, b = hosts.hosts
        node = Node(workdir, "redis", "--bind", "127.0.0.1", a.server_address, b.server_address,
                    "--protected-mode", "no")
        postgres = ReachablePostgres([a.server_address, b.server_address], str(hosts.subnet))
        try:
            node.start()
            postgres.init().start()
            stack = Stack(workdir, postgres.url, redis_url=f"redis://127.0.0.1:{node.port}/0", beat=True,
                          PENDING_REDELIVERY_SECONDS="10")
            try:
                stack.start()
                stack.stop_process("worker")  # the machine's own worker: the two hosts replace it
                workers = {"a": start_worker_on(stack, a, "a", node.port, postgres.port),
                           "b": start_worker_on(stack, b, "b", node.port, postgres.port)}
                return _run(stack, hosts, a, workers, node, cut_seconds, events)
            finally:
                for formation in workers.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(formation[0].pid, signal.SIGKILL)
                    for process in formation:
                        process.wait(timeout=10)
                stack.stop()
        finally:
            postgres.remove()
            node.kill()


def _run(stack: Stack, hosts: Hosts, cut_host: Host, workers: dict[str, list[subprocess.Popen[bytes]]], node: Node,
         cut_seconds: float, events: list[dict[str, str]]) -> Tally:
    with SteadyStream(stack, events, pause=0.05) as stream:
        wait_for(lambda: applied_by(stack, "a") >= 20 and applied_by(stack, "b") >= 20, timeout=WARM_UP_SECONDS)
        before = {name: applied_by(stack, name) for name in workers}
        cut_at = time.monotonic()
        hosts.cut(cut_host)
        time.sleep(cut_seconds)  # the fault itself lasts this long; nothing is waited for here
        during = {name: applied_by(stack, name) - before[name] for name in workers}
        hosts.restore(cut_host)
        restored_at = time.monotonic()
        wait_for(lambda: stream.accepted_since(restored_at) >= ACCEPTED_AFTER_CUT, timeout=STREAM_AFTER_CUT_SECONDS)
    posted = stream.posted
    refused = [p.fields for p in posted if p.attempt.status != 200]
    for fields in refused:  # none expected (the web and Redis never lost each other); AT would retry
        post_like_at(stack, fields, time.monotonic() + 30)
    sent = [p.fields for p in posted]
    wait_until_applied(stack, sent, timeout=max(0.0, cut_at + RECOVERY_SECONDS - time.monotonic()))
    applied_at = time.monotonic()
    client = redis.Redis(port=node.port)
    wait_for(lambda: client.llen("voice-webhooks") == 0 and client.zcard("voice:pending:due") == 0,
             timeout=BACKLOG_SECONDS)
    client.close()
    alive = {name: all(process.poll() is None for process in formation) for name, formation in workers.items()}
    return tally(
        stack, f"a worker host cut off the network for {cut_seconds:g} s", sent,
        answers=dict(Counter(str(p.attempt.status) for p in posted)),
        applied_during_cut=during,
        applied_by_host={name: applied_by(stack, name) for name in workers},
        all_applied_after_cut_s=round(applied_at - cut_at, 1),
        workers_alive=alive,
    )
