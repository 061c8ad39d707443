"""Web and worker together under an open-loop load: the highest fixed rate at which the queue does
not grow.

    .venv/bin/python -m bench.end_to_end --out bench/results/DATE-end-to-end.json
    .venv/bin/python -m bench.end_to_end --rates 200,400 --seconds 20 --database postgresql

The Procfile's web line (gunicorn) and its worker line, as many processes as ``scripts/run.sh``
starts, run on a Redis and a database of the bench's own (SQLite by default: the service's own
default; or a PostgreSQL with fsync on). For each rate, distinct events are sent at that rate for
``--seconds`` (open loop: request i is due at start + i/rate whatever the answers before it), and
what was answered 200 but not yet applied (the pending set) is read as the load ends. A rate is
*sustained* when every request was answered 200, the last answer came within ``--slack-seconds``
of the load's schedule (a web that cannot answer the rate holds the load back, and then its queue
need not grow), and that backlog holds at most ``--slack-seconds`` of the load (what is in flight
in a queue that keeps up); the worker then
drains, and the next rate starts on an empty queue. Everything sent must be applied in the end,
whatever the rate: the run fails otherwise.

Progress goes to stderr, the result (JSON) to stdout and to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import redis

from app.plumbing.pending import PENDING_DATA
from bench.loadgen import open_loop
from bench.node_limits import _durable
from bench.run import BIN, Processes, procfile_command, step, write_result
from bench.worker_floor import line_processes
from tests.conftest import migrate
from tests.support import PostgresServer, RedisServer, free_port, wait_for

DEFAULT_RATES = "100,200,300,400,500,600"


def body_maker(run: str) -> Callable[[int], bytes]:
    def body_for(index: int) -> bytes:
        """Distinct events, three per call session, as a call's status changes arrive."""
        return urlencode({"sessionId": f"ATVoice_e2e_{run}_{index // 3}", "phoneNumber": f"+2547{index % 10**8:08d}",
                          "duration": str(index % 3600), "status": "completed"}).encode()

    return body_for


def applied(database_url: str) -> int:
    """Stored events (one row per distinct event)."""
    if database_url.startswith("sqlite"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(database_url.removeprefix("sqlite:///"), timeout=30)) as conn:
            return int(conn.execute("SELECT count(*) FROM webhook_events").fetchone()[0])
    import psycopg

    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        return int(conn.execute("SELECT count(*) FROM webhook_events").fetchone()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default=DEFAULT_RATES, help="requests per second, comma-separated, in order")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--slack-seconds", type=float, default=2.0)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="voice-e2e-"))
    workdir.chmod(0o755)
    result: dict[str, Any] = {"database": args.database, "seconds": args.seconds,
                              "slack_seconds": args.slack_seconds, "runs": []}
    with contextlib.ExitStack() as cleanup:
        redis_server = RedisServer(workdir / "redis").start()
        cleanup.callback(redis_server.stop)
        if args.database == "postgresql":
            server = _durable(PostgresServer()).init().start()
            cleanup.callback(server.remove)
            database_url = server.url
        else:
            database_url = f"sqlite:///{workdir / 'voice.db'}"
        migrate(database_url, redis_server.url)
        metrics_dir = workdir / "metrics"
        (metrics_dir / "web").mkdir(parents=True)
        (metrics_dir / "worker").mkdir(parents=True)
        port = free_port()
        env = {**os.environ, "REDIS_URL": redis_server.url, "DATABASE_URL": database_url, "LOG_FORMAT": "json",
               "API_KEYS": "bench", "PATH": f"{BIN}:{os.environ['PATH']}"}
        procs = Processes(workdir, env)
        cleanup.callback(procs.stop_all)
        procs.start("web", ["bash", "-c", procfile_command("web")], PORT=str(port), HOST="127.0.0.1",
                    PROMETHEUS_MULTIPROC_DIR=str(metrics_dir / "web"))
        processes = line_processes()
        for i in range(1, processes + 1):
            procs.start(f"worker.{i}", ["bash", "-c", procfile_command("worker")], WORKER_METRICS_PORT="0",
                        HONCHO_PROCESS_NAME=f"worker.{i}", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir / "worker"))
        result["worker_processes"] = processes
        client = redis.Redis.from_url(redis_server.url)
        cleanup.callback(client.close)

        def backlog() -> int:
            return int(client.hlen(PENDING_DATA))

        step(f"{args.database}: web on :{port}, {processes} worker processes; warming up")
        wait_for(lambda: open_loop(port, 5, 1, body_maker("warm"))["errors"] == 0, timeout=60, interval=1)
        sent_total = 5
        wait_for(lambda: backlog() == 0, timeout=120, interval=0.2)
        for rate in rates:
            before = applied(database_url)
            step(f"{args.database}: {rate:.0f} req/s for {args.seconds} s")
            load = open_loop(port, rate, args.seconds, body_maker(f"r{int(rate)}_{time.time_ns()}"))
            left = backlog()
            done = applied(database_url) - before
            sent = int(rate * args.seconds)
            sent_total += sent
            started = time.perf_counter()
            wait_for(lambda: backlog() == 0, timeout=1800, interval=0.2)
            drain = time.perf_counter() - started
            # The web kept up when the load's last answer came within the slack of its schedule: a
            # web that cannot answer the rate slows the load down, and its queue need not grow.
            answered_in_time = load["achieved_rps"] >= sent / (args.seconds + args.slack_seconds)
            sustained = load["errors"] == 0 and answered_in_time and left <= rate * args.slack_seconds
            run = {"rate": rate, "sent": sent, "errors": load["errors"], "achieved_rps": load["achieved_rps"],
                   "p50_ms": load["p50_ms"], "p99_ms": load["p99_ms"], "applied_during_load": done,
                   "backlog_at_end": left, "drain_seconds": round(drain, 1), "answered_in_time": answered_in_time,
                   "sustained": sustained}
            result["runs"].append(run)
            verdict = "sustained" if sustained else "the queue grew" if answered_in_time else "the web fell behind"
            step(f"  answered {load['achieved_rps']}/s with {load['errors']} errors, p99 {load['p99_ms']} ms; applied "
                 f"{done} during the load; {left} left at its end ({verdict}), drained in {drain:.1f} s")
        total = applied(database_url)
        result["applied_total"] = total
        if total < sent_total - sum(r["errors"] for r in result["runs"]):
            raise SystemExit(f"lost events: {sent_total} sent, {total} applied")
        kept = [r["rate"] for r in result["runs"] if r["sustained"]]
        result["highest_sustained_rate"] = max(kept) if kept else None
    print(json.dumps(result, indent=2))
    if args.out:
        write_result(args.out, "end-to-end", f".venv/bin/python -m bench.end_to_end --rates {args.rates} --seconds "
                     f"{args.seconds} --database {args.database}", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
