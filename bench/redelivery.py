"""What the worker's prefetch multiplier costs when a worker is killed, against what it gains in
throughput, on the Redis broker with late acknowledgement.

For each prefetch multiplier (1, 4, 16) and pool (prefork with two processes, solo):

- throughput: N new events queued, one worker started, timed from its first event to its last
  (the pending set empties as events are applied), in alternating turns; the median is reported;
- redelivery: events queued, worker A started (with or without beat, which runs the pending-set
  sweeper), its whole process group SIGKILLed mid-stream. The messages it held are Redis's
  ``unacked`` hash right after the kill; worker B starts at once, and the database is polled for
  each held event's row: its wait is the time from the kill to that row. At the end every queued
  event must have exactly one row and one application (the workers' ``event_applied`` lines); a
  held message whose event was committed before the kill comes back as a duplicate.

Its own redis-server and PostgreSQL, and a SQLite file; nothing shared is touched.

    python -m bench.redelivery                      # the full run (about half an hour)
    python -m bench.redelivery --events 300 --throughput-rounds 1 --prefetch 1,16 --pools solo
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

from app import create_app
from app.base.extensions import db
from app.base.timeutil import utcnow
from app.celery_app import UNACKED_RESTORE_INTERVAL, VISIBILITY_TIMEOUT
from app.payload.events import Event
from app.plumbing.pending import PENDING_DUE
from app.plumbing.publish import enqueue
from app.plumbing.queues import ALL_QUEUES, WEBHOOK_QUEUE
from bench.run import BIN, ROOT, events, step
from config import Settings
from tests.conftest import migrate
from tests.support import PostgresServer, RedisServer, group_members, spawn, stop_group, wait_for

POOLS = {"prefork": ["--pool=prefork", "--concurrency=2"], "solo": ["--pool=solo"]}
UNACKED = "unacked"  # kombu's Redis transport: delivery tag -> [message, exchange, routing key]
APPLIED_OUTCOMES = {"applied", "no_effect"}


@dataclass
class Bench:
    workdir: Path
    env: dict[str, str]
    settings: Settings
    engine: sa.Engine
    client: redis.Redis
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        process = spawn(argv, log=self.workdir / f"{name}.log", cwd=ROOT, env=self.env)
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        stop_group(process, signal.SIGTERM, timeout=30)
        self.started.remove(process)

    def worker(self, name: str, prefetch: int, pool: str) -> subprocess.Popen[bytes]:
        """A worker as the Procfile starts one (every queue), with this pool and prefetch."""
        return self.start(name, [str(BIN / "celery"), "-A", "worker", "worker", "--loglevel=INFO",
                                 f"--queues={','.join(ALL_QUEUES)}", *POOLS[pool], f"--prefetch-multiplier={prefetch}",
                                 "--without-gossip", "--without-mingle", f"--hostname={name}@%h"])

    def queue(self, batch: list[Event]) -> None:
        app = create_app(self.settings)
        with app.app_context():
            for event in batch:
                enqueue(event, utcnow(), None)
            db.engine.dispose()
        app.extensions["redis"].close()

    def stored(self, prefix: str) -> set[str]:
        """Fingerprints of the batch's events that have their row."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT fingerprint FROM webhook_events WHERE recording_id LIKE :p ESCAPE '!'"),
                                {"p": f"{prefix}!_%"})
            return {row[0] for row in rows}

    def dead_letters(self, prefix: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM dead_letters WHERE session_id LIKE :p ESCAPE '!'"),
                                    {"p": f"{prefix}!_%"}).scalar_one())

    def settled(self) -> bool:
        """Nothing queued, held by a worker, or waiting in the pending set."""
        return not any(self.client.llen(queue) for queue in ALL_QUEUES) and not self.client.hlen(UNACKED) \
            and not self.client.zcard(PENDING_DUE)


# --- throughput ------------------------------------------------------------------------------


def throughput(bench: Bench, prefetch: int, pool: str, n: int) -> float:
    """Queue n new events, start one worker, time it from its first event to its last."""
    bench.queue(events(n, f"tp{prefetch}{pool}{time.time_ns()}"))
    total = bench.client.zcard(PENDING_DUE)
    worker = bench.worker(f"tp-{prefetch}-{pool}-{time.time_ns()}", prefetch, pool)
    wait_for(lambda: bench.client.zcard(PENDING_DUE) < total, timeout=60, interval=0.005)
    started = time.perf_counter()
    first_left = bench.client.zcard(PENDING_DUE)
    wait_for(lambda: bench.client.zcard(PENDING_DUE) == 0, timeout=600, interval=0.01)
    elapsed = time.perf_counter() - started
    bench.stop(worker)
    return first_left / elapsed


# --- redelivery after a kill -----------------------------------------------------------------


def held_messages(client: redis.Redis) -> dict[str, float]:
    """What Redis records as delivered and not acknowledged: event fingerprint -> when delivered."""
    delivered = {tag: score for tag, score in client.zrange("unacked_index", 0, -1, withscores=True)}
    held = {}
    for tag, raw in client.hgetall(UNACKED).items():
        message = json.loads(raw)[0]
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        if not (args and isinstance(args[0], dict) and "session_id" in args[0]):
            continue  # a sweep task on the maintenance queue, not an event
        held[Event.from_message(args[0]).fingerprint] = delivered.get(tag, 0.0)
    return held


def applications(logs: list[Path], prefix: str) -> tuple[Counter[str], Counter[str]]:
    """Per event key: how often a worker applied it (a new row), how often it met it as a duplicate."""
    applied: Counter[str] = Counter()
    duplicates: Counter[str] = Counter()
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            if '"event_applied"' not in line:
                continue
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if not str(entry.get("session_id", "")).startswith(prefix + "_"):
                    continue
                if entry.get("outcome") in APPLIED_OUTCOMES:
                    applied[entry["event_key"]] += 1
                elif entry.get("outcome") == "duplicate":
                    duplicates[entry["event_key"]] += 1
    return applied, duplicates


def kill_run(bench: Bench, prefetch: int, pool: str, with_beat: bool, n: int, kill_after: int,
             timeout: float, queue_age: float, jitter: float) -> dict[str, Any]:
    """Queue n events, start worker A after queue_age seconds, SIGKILL it jitter seconds after it
    stored kill_after of them (so that the kill does not follow a commit in lockstep), and let
    worker B finish."""
    tag = f"{prefetch}-{pool}-{'beat' if with_beat else 'nobeat'}-{time.time_ns()}"
    prefix = f"k{time.time_ns()}"
    batch = events(n, prefix)
    fingerprints = {event.fingerprint for event in batch}
    beat = None
    if with_beat:  # beat is started first, as it is always running in the service
        beat = bench.start(f"beat-{tag}", [str(BIN / "celery"), "-A", "worker", "beat", "--loglevel=INFO",
                                           f"--schedule={bench.workdir / f'beat-{tag}'}"])
    queued_at = time.time()
    bench.queue(batch)
    time.sleep(queue_age)
    worker_a = bench.worker(f"a-{tag}", prefetch, pool)
    wait_for(lambda: len(bench.stored(prefix)) >= kill_after, timeout=120, interval=0.01)
    time.sleep(jitter)
    killed_at = time.time()
    os.killpg(worker_a.pid, signal.SIGKILL)
    wait_for(lambda: not group_members(worker_a.pid), timeout=10, interval=0.005)
    worker_a.wait(timeout=10)
    bench.started.remove(worker_a)
    held = held_messages(bench.client)
    stored_at_kill = bench.stored(prefix)
    queued_at_kill = bench.client.llen(WEBHOOK_QUEUE)
    worker_b = bench.worker(f"b-{tag}", prefetch, pool)
    waiting = set(held) - stored_at_kill
    waits: dict[str, float] = {}
    deadline = killed_at + timeout
    stored = stored_at_kill
    while time.time() < deadline:
        stored = bench.stored(prefix)
        now = time.time()
        for fingerprint in waiting & stored:
            waits[fingerprint] = now - killed_at
        waiting -= stored
        if not waiting and len(stored) == n:
            break
        time.sleep(0.1)
    all_stored_after = time.time() - killed_at
    with contextlib.suppress(TimeoutError):  # let redundant copies (restored or re-sent) run too
        wait_for(bench.settled, timeout=max(5.0, deadline - time.time()), interval=0.2)
    bench.stop(worker_b)
    stored = bench.stored(prefix)  # what the last copies stored after the polling stopped counts too
    if beat is not None:
        bench.stop(beat)
    applied, duplicates = applications([bench.workdir / f"a-{tag}.log", bench.workdir / f"b-{tag}.log"], prefix)
    keys = {event.key for event in batch}
    ordered = sorted(waits.values())
    return {
        "prefetch": prefetch, "pool": pool, "beat": with_beat, "events": n, "queue_age_s": queue_age,
        "jitter_s": round(jitter, 3),
        "stored_at_kill": len(stored_at_kill), "queued_at_kill": queued_at_kill,
        "seconds_from_queue_to_kill": round(killed_at - queued_at, 2),
        "held": len(held), "held_already_stored": len(set(held) & stored_at_kill),
        "held_delivered_before_kill_s": [round(killed_at - at, 2) for at in sorted(held.values())],
        "held_waiting": len(set(held) - stored_at_kill),
        "max_wait_s": round(ordered[-1], 1) if ordered else None,
        "median_wait_s": round(statistics.median(ordered), 1) if ordered else None,
        "waits_s": [round(w, 1) for w in ordered],
        "never_stored_held": len(waiting),
        "all_stored_after_s": round(all_stored_after, 1),
        "lost": len(fingerprints - stored),
        # A lost event still in the pending set is one the sweeper (beat) would send again.
        "lost_still_pending": sum(1 for event in batch if event.fingerprint not in stored
                                  and bench.client.zscore(PENDING_DUE, event.key) is not None),
        "applied_twice": sum(1 for key in keys if applied[key] > 1),
        "logged_applications": sum(applied[key] for key in keys),
        "duplicate_deliveries": sum(duplicates[key] for key in keys),
        "dead_letters": bench.dead_letters(prefix),
    }


# --- report ----------------------------------------------------------------------------------


def table(database: str, rates: dict[tuple[int, str], list[float]], kills: list[dict[str, Any]]) -> str:
    lines = [f"## {database}", "",
             "| prefetch | pool | events/s (median of turns) | turns | beat | held at kill (already stored) "
             "| wait max / median s | all stored after s | lost | applied twice | duplicate deliveries "
             "| dead letters |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (prefetch, pool), turns in rates.items():
        runs = [k for k in kills if (k["prefetch"], k["pool"]) == (prefetch, pool)] or [None]
        for run in runs:
            rate = f"{statistics.median(turns):.0f}" if turns else "-"
            turn_text = ", ".join(f"{t:.0f}" for t in turns)
            if run is None:
                lines.append(f"| {prefetch} | {pool} | {rate} | {turn_text} | | | | | | | | |")
                continue
            lines.append(
                f"| {prefetch} | {pool} | {rate} | {turn_text} | {'yes' if run['beat'] else 'no'} "
                f"| {run['held']} ({run['held_already_stored']}) | {run['max_wait_s']} / {run['median_wait_s']} "
                f"| {run['all_stored_after_s']} | {run['lost']} | {run['applied_twice']} "
                f"| {run['duplicate_deliveries']} | {run['dead_letters']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefetch", default="1,4,16", help="comma-separated prefetch multipliers")
    parser.add_argument("--pools", default="prefork,solo", help="comma-separated: prefork (2 processes), solo")
    parser.add_argument("--databases", default="postgresql,sqlite",
                        help="throughput is measured on each; the kill runs on the first only")
    parser.add_argument("--events", type=int, default=1500, help="events a throughput turn drains")
    parser.add_argument("--throughput-rounds", type=int, default=3)
    parser.add_argument("--kill-events", type=int, default=600, help="events queued for a kill run")
    parser.add_argument("--kill-after", type=int, default=200, help="worker A is killed once this many are stored")
    parser.add_argument("--kill-timeout", type=float, default=180.0,
                        help="seconds after the kill to wait for every event before counting the rest lost")
    parser.add_argument("--beat", default="no,yes", help="kill runs without and/or with beat: no, yes")
    parser.add_argument("--pending-redelivery-seconds", type=int, default=0,
                        help="PENDING_REDELIVERY_SECONDS for the run (0: the service's default)")
    parser.add_argument("--queue-age", type=float, default=0.0,
                        help="seconds the kill run's events wait in the queue before worker A starts (a backlog)")
    parser.add_argument("--seed", type=int, default=1, help="seeds the delay between the threshold and the kill")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    prefetches = [int(p) for p in args.prefetch.split(",")]
    pools = [p for p in args.pools.split(",") if p]
    databases = [d for d in args.databases.split(",") if d]
    beats = [b == "yes" for b in args.beat.split(",") if b]
    if not set(pools) <= set(POOLS) or not set(databases) <= {"postgresql", "sqlite"}:
        raise SystemExit("--pools takes prefork, solo; --databases takes postgresql, sqlite")

    workdir = Path(tempfile.mkdtemp(prefix="voice-redelivery-"))
    redis_server = RedisServer(workdir / "redis").start()
    postgres = PostgresServer().init().start() if "postgresql" in databases else None
    urls = {"sqlite": f"sqlite:///{workdir / 'voice.db'}", **({"postgresql": postgres.url} if postgres else {})}
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, "REDIS_URL": redis_server.url, "LOG_FORMAT": "json", "LOG_LEVEL": "INFO",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "WORKER_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1"}
    if args.pending_redelivery_seconds:
        env["PENDING_REDELIVERY_SECONDS"] = str(args.pending_redelivery_seconds)
    redelivery_seconds = Settings.from_env(env).pending_redelivery_seconds
    report: dict[str, Any] = {"visibility_timeout_s": VISIBILITY_TIMEOUT,
                              "unacked_restore_interval_s": UNACKED_RESTORE_INTERVAL,
                              "pending_redelivery_seconds": redelivery_seconds, "databases": {}}
    benches: list[Bench] = []
    jitter = random.Random(args.seed)  # noqa: S311 - a delay, not a secret
    try:
        for database in databases:
            url = urls[database]
            migrate(url, redis_server.url)
            settings = Settings(database_url=url, redis_url=redis_server.url, log_level="WARNING",
                                pending_redelivery_seconds=redelivery_seconds)
            bench = Bench(workdir, {**env, "DATABASE_URL": url}, settings, sa.create_engine(url),
                          redis.Redis.from_url(redis_server.url))
            benches.append(bench)
            configs = [(p, pool) for p in prefetches for pool in pools]
            rates: dict[tuple[int, str], list[float]] = {c: [] for c in configs}
            for turn in range(args.throughput_rounds):
                order = configs if turn % 2 == 0 else configs[::-1]  # alternate, so drift hits all alike
                for prefetch, pool in order:
                    rate = throughput(bench, prefetch, pool, args.events)
                    rates[(prefetch, pool)].append(rate)
                    step(f"{database}: throughput turn {turn + 1}/{args.throughput_rounds}, prefetch {prefetch}, "
                         f"{pool}: {rate:.0f} events/s")
            kills = []
            if database == databases[0]:
                for with_beat in beats:
                    for prefetch, pool in configs:
                        step(f"{database}: kill run, prefetch {prefetch}, {pool}, {'with' if with_beat else 'no'} beat")
                        run = kill_run(bench, prefetch, pool, with_beat, args.kill_events, args.kill_after,
                                       args.kill_timeout, args.queue_age, jitter.uniform(0, 0.25))
                        kills.append(run)
                        step(f"  held {run['held']} ({run['held_already_stored']} already stored), wait max "
                             f"{run['max_wait_s']} s median {run['median_wait_s']} s, lost {run['lost']}, "
                             f"applied twice {run['applied_twice']}, duplicate deliveries "
                             f"{run['duplicate_deliveries']}")
            report["databases"][database] = {
                "throughput": {f"{p}-{pool}": turns for (p, pool), turns in rates.items()}, "kills": kills}
            print(table(database, rates, kills), flush=True)
    finally:
        for bench in benches:
            for process in list(bench.started):
                bench.stop(process)
            bench.engine.dispose()
            bench.client.close()
        redis_server.stop()
        if postgres is not None:
            postgres.remove()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"visibility timeout {VISIBILITY_TIMEOUT} s, unacked restore every {UNACKED_RESTORE_INTERVAL} s, "
          f"PENDING_REDELIVERY_SECONDS={redelivery_seconds}; kill runs: {args.kill_events} events, worker A "
          f"started {args.queue_age:g} s after they were queued and killed once {args.kill_after} were stored")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
