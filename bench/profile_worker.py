"""Where a worker's time goes: py-spy samples one solo worker process while it drains queued events
(new ones, or the same again as duplicates), and the collapsed stacks are summed per function.

    python -m bench.profile_worker --duplicates            # what a duplicate costs, by function
    python -m bench.profile_worker --events 2000 --top 40  # new events

Prints the share of samples whose stack passes through each function (inclusive) and the share
spent in it (exclusive, the leaf). Needs py-spy (requirements-bench.txt) and ptrace rights (root).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from app import create_app
from app.base.extensions import db
from app.base.timeutil import utcnow
from app.plumbing.pending import PENDING_DUE
from app.plumbing.publish import enqueue
from bench.run import BIN, Processes, events, step
from config import Settings
from tests.conftest import migrate
from tests.support import PostgresServer, RedisServer, wait_for


def queue(settings: Settings, batch: list) -> int:
    app = create_app(settings)
    with app.app_context():
        for event in batch:
            enqueue(event, utcnow(), None)
        db.engine.dispose()
    return redis.Redis.from_url(settings.redis_url).zcard(PENDING_DUE)


def drain(procs: Processes, settings: Settings, argv: list[str], profile: Path | None) -> float:
    client = redis.Redis.from_url(settings.redis_url)
    total = client.zcard(PENDING_DUE)
    worker = procs.start("worker", argv, WORKER_METRICS_PORT="0")
    spy = None
    if profile is not None:
        time.sleep(0.5)  # py-spy attached before the interpreter is up fails ("Failed to find python version")
        spy = subprocess.Popen([str(BIN / "py-spy"), "record", "--pid", str(worker.pid), "--rate", "500",
                                "--format", "raw", "--output", str(profile), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: client.zcard(PENDING_DUE) < total, timeout=60, interval=0.005)
    started, first_left = time.perf_counter(), client.zcard(PENDING_DUE)
    wait_for(lambda: client.zcard(PENDING_DUE) == 0, timeout=600, interval=0.01)
    rate = first_left / (time.perf_counter() - started)
    if spy is not None:
        spy.send_signal(2)
        spy.wait(timeout=30)
    procs.stop("worker")
    return rate


def summarize(profile: Path, top: int, focus: str) -> str:
    """Inclusive and exclusive shares per function, over the samples whose stack contains focus."""
    inclusive: collections.Counter[str] = collections.Counter()
    exclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in profile.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if focus not in stack:
            continue  # the idle waits of the event loop, the metrics thread...
        n = int(count)
        total += n
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[1].split(":")[0].split("/")[-1] + ")"
                  if " (" in frame else frame for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        exclusive[frames[-1]] += n
    lines = [f"{total} samples in {focus}", "", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    lines += ["", "exclusive (leaf):"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in exclusive.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1500)
    parser.add_argument("--duplicates", action="store_true", help="profile the second drain (duplicates)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--pool", default="solo")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--log-level", default="INFO",
                        help="the worker's LOG_LEVEL: INFO (the Procfile's) writes a line per event, WARNING none")
    parser.add_argument("--focus", default="_deliver",
                        help="count only samples whose stack passes through this (kombu 5.7 delivering a message)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="voice-profile-"))
    redis_server = RedisServer(workdir / "redis").start()
    postgres = PostgresServer().init().start() if args.database == "postgresql" else None
    url = postgres.url if postgres else f"sqlite:///{workdir / 'voice.db'}"
    env = {**os.environ, "REDIS_URL": redis_server.url, "DATABASE_URL": url, "LOG_FORMAT": "json",
           "LOG_LEVEL": args.log_level, "PROMETHEUS_MULTIPROC_DIR": str(workdir), "API_KEYS": "bench"}
    procs = Processes(workdir, env)
    argv = [sys.executable, "-m", "worker", f"--loglevel={args.log_level}", "--queues=voice-webhooks",
            "--without-gossip", "--without-mingle", f"--pool={args.pool}", "--concurrency=1"]
    try:
        migrate(url, redis_server.url)
        settings = Settings(redis_url=redis_server.url, database_url=url, log_level="WARNING")
        batch = events(args.events, f"p{time.time_ns()}")
        profile = workdir / "profile.txt"
        step(f"queued {queue(settings, batch)} new events")
        rate = drain(procs, settings, argv, None if args.duplicates else profile)
        step(f"new events: {rate:.0f}/s")
        if args.duplicates:
            step(f"queued {queue(settings, batch)} duplicates")
            rate = drain(procs, settings, argv, profile)
            step(f"duplicates: {rate:.0f}/s")
        print(summarize(profile, args.top, args.focus))
    finally:
        procs.stop_all()
        redis_server.stop()
        if postgres:
            postgres.remove()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
