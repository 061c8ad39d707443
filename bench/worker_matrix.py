"""The worker's configurations side by side: pool model x prefetch x task events, on SQLite and
PostgreSQL, each draining the same number of queued new events and then the same events again as
duplicates. Starts its own Redis and PostgreSQL; prints progress on stderr and a table on stdout.

    python -m bench.worker_matrix                       # every configuration, 1,500 events
    python -m bench.worker_matrix --events 300 --configs prefork-1,solo-1

A configuration's name is <pool>-<processes>[-p<prefetch>][-events]: ``prefork-2`` is one worker
with two pool processes, ``solo-2`` two worker processes with the solo pool, ``threads-2`` one
worker with two threads. Configurations run in turns (``--turns``) so that noise on a shared machine
falls on all of them; each figure is the median of its turns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis

from app import create_app
from app.base.extensions import db
from app.base.timeutil import utcnow
from app.plumbing.pending import PENDING_DUE
from app.plumbing.publish import enqueue
from bench.run import Processes, children, events, peak_rss_mb, plain_loop_rate, step
from config import Settings
from tests.conftest import migrate
from tests.support import PostgresServer, RedisServer, wait_for

QUEUES = "--queues=voice-webhooks"


@dataclass(frozen=True)
class Config:
    pool: str
    processes: int
    prefetch: int = 1
    task_events: bool = False

    @classmethod
    def parse(cls, name: str) -> Config:
        pool, processes, *rest = name.split("-")
        prefetch = next((int(part[1:]) for part in rest if part.startswith("p")), 1)
        return cls(pool, int(processes), prefetch, "events" in rest)

    @property
    def name(self) -> str:
        return (f"{self.pool}-{self.processes}" + (f"-p{self.prefetch}" if self.prefetch != 1 else "")
                + ("-events" if self.task_events else ""))

    def commands(self, tag: str) -> list[list[str]]:
        """One worker command per process for solo; one for prefork and threads."""
        base = [sys.executable, "-m", "worker", "--loglevel=WARNING", QUEUES, "--without-gossip",
                "--without-mingle", f"--prefetch-multiplier={self.prefetch}", *(["-E"] if self.task_events else [])]
        if self.pool == "solo":
            return [[*base, "--pool=solo", f"--hostname=bench-{tag}-{i}@%h"] for i in range(self.processes)]
        return [[*base, f"--pool={self.pool}", f"--concurrency={self.processes}", f"--hostname=bench-{tag}@%h"]]


DEFAULT_CONFIGS = ("prefork-1,solo-1,threads-1,prefork-1-events,solo-1-events,solo-1-p4,solo-1-p16,prefork-1-p4,"
                   "prefork-1-p16,prefork-2,solo-2,threads-2,solo-4,prefork-4")


def drain(procs: Processes, settings: Settings, batch: list, config: Config) -> tuple[float, float]:
    """Queue the batch, start the configuration's worker processes, time the drain from the first
    event applied to the last; returns events/s and the highest VmHWM among the processes."""
    app = create_app(settings)
    client = redis.Redis.from_url(settings.redis_url)
    with app.app_context():
        for event in batch:
            enqueue(event, utcnow(), None)
        db.engine.dispose()
    total = client.zcard(PENDING_DUE)
    tag = f"{time.time_ns()}"
    names = []
    for i, argv in enumerate(config.commands(tag)):
        names.append(f"worker-{tag}-{i}")
        procs.start(names[-1], argv, WORKER_METRICS_PORT="0")
    wait_for(lambda: client.zcard(PENDING_DUE) < total, timeout=120, interval=0.005)
    started = time.perf_counter()
    first_left = client.zcard(PENDING_DUE)
    wait_for(lambda: client.zcard(PENDING_DUE) == 0, timeout=900, interval=0.01)
    elapsed = time.perf_counter() - started
    rss = 0.0
    for name in names:
        pid = procs.running[name].pid
        rss = max(rss, peak_rss_mb(pid), *(peak_rss_mb(child) for child in children(pid)))
    for name in names:
        procs.stop(name)
    client.close()
    return first_left / elapsed, rss


def measure(procs: Processes, settings: Settings, configs: list[Config], n: int, turns: int) -> dict[str, Any]:
    database = settings.database_url.split(":", 1)[0].split("+")[0]
    results: dict[str, Any] = {"plain_loop_eps": [], "configs": {c.name: {"new": [], "dup": [], "rss": []}
                                                                  for c in configs}}
    for turn in range(turns):
        results["plain_loop_eps"].append(plain_loop_rate(settings, events(n, f"plain{time.time_ns()}")))
        step(f"{database} turn {turn + 1}/{turns}: plain loop {results['plain_loop_eps'][-1]:.0f} events/s")
        for config in configs:
            fresh = events(n, f"m{time.time_ns()}")
            new, rss_new = drain(procs, settings, fresh, config)
            dup, rss_dup = drain(procs, settings, fresh, config)
            row = results["configs"][config.name]
            row["new"].append(new)
            row["dup"].append(dup)
            row["rss"].append(max(rss_new, rss_dup))
            step(f"{database} turn {turn + 1}/{turns}: {config.name}: new {new:.0f}/s, duplicates {dup:.0f}/s, "
                 f"peak RSS {max(rss_new, rss_dup)} MB")
    summary: dict[str, Any] = {"plain_loop_eps": round(statistics.median(results["plain_loop_eps"]), 1)}
    for name, row in results["configs"].items():
        summary[name] = {"new_eps": round(statistics.median(row["new"]), 1),
                         "dup_eps": round(statistics.median(row["dup"]), 1), "peak_rss_mb": max(row["rss"])}
    return {"turns": results, "summary": summary}


def table(report: dict[str, Any], configs: list[Config]) -> str:
    databases = list(report)
    head = "| configuration (pool-processes[-prefetch][-events]) | " + " | ".join(
        f"{d}: new/s | {d}: new ÷ plain loop per process | {d}: duplicates/s (÷ new) | {d}: peak RSS MB"
        for d in databases) + " |"
    lines = [head, "|" + "---|" * (1 + 4 * len(databases))]
    for config in configs:
        cells = []
        for d in databases:
            s = report[d]["summary"]
            row = s[config.name]
            per_process = row["new_eps"] / config.processes / s["plain_loop_eps"]
            cells += [f"{row['new_eps']}", f"{per_process:.2f}",
                      f"{row['dup_eps']} ({row['dup_eps'] / row['new_eps']:.1f}x)", f"{row['peak_rss_mb']}"]
        lines.append(f"| {config.name} | " + " | ".join(cells) + " |")
    plain = ", ".join(f"{d} {report[d]['summary']['plain_loop_eps']}" for d in databases)
    return "\n".join(lines) + f"\n\nPlain loop (apply_event alone, one process), events/s: {plain}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1500)
    parser.add_argument("--turns", type=int, default=1)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    configs = [Config.parse(name) for name in args.configs.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="voice-matrix-"))
    redis_server = RedisServer(workdir / "redis").start()
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, "REDIS_URL": redis_server.url, "LOG_FORMAT": "json", "LOG_LEVEL": "WARNING",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "API_KEYS": "bench"}
    procs = Processes(workdir, env)
    report: dict[str, Any] = {}
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(redis_server.stop)
        cleanup.callback(procs.stop_all)
        databases = {}
        if "sqlite" in args.databases:
            databases["sqlite"] = f"sqlite:///{workdir / 'voice.db'}"
        if "postgresql" in args.databases:
            postgres = PostgresServer().init().start()
            cleanup.callback(postgres.remove)
            databases["postgresql"] = postgres.url
        base = Settings(redis_url=redis_server.url, log_level="WARNING")
        for name, url in databases.items():
            migrate(url, redis_server.url)
            procs.env["DATABASE_URL"] = url
            report[name] = measure(procs, replace(base, database_url=url), configs, args.events, args.turns)
    print(table(report, configs))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
