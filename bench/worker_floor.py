"""The worker against its database's own rate, in one run: how close the Procfile's worker line
(as many processes as ``scripts/run.sh`` starts) comes to what the database itself takes for the
writes an event makes.

    .venv/bin/python -m bench.worker_floor --out bench/results/DATE-worker-floor-LABEL.json
    .venv/bin/python -m bench.worker_floor --events 600 --seconds 5 --databases sqlite   # quick look
    git worktree add /tmp/before COMMIT && ln -s $PWD/.venv /tmp/before/.venv
    .venv/bin/python -m bench.worker_floor --before /tmp/before --turns 3   # before and after, one run
    .venv/bin/python -m bench.worker_floor --task-events ...   # the same, task events on (Flower watching)

- **PostgreSQL** (a server of the bench's own, fsync on: a commit is a flush, as in production):
  pgbench with 2 clients doing one new event's writes as seven statements and as one server-side
  call (``bench.node_limits``' scripts), then the worker line draining queued new events, then the
  same events again as duplicates, all against that one server.
- **SQLite** (a file of the bench's own, the service's pragmas: WAL, synchronous=FULL, BEGIN
  IMMEDIATE): a plain ``sqlite3`` loop of the same seven statements in one process, then the worker
  line as above.

Ratios are of figures from this one run. Progress goes to stderr, the result (JSON) to stdout and
to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.node_limits import FUNCTION, ONE_CALL, SEVEN, _durable, _psql, pgbench
from bench.run import ROOT, Processes, events, step, sync_doc, worker_rate, write_result
from config import Settings
from tests.conftest import migrate
from tests.support import PostgresServer, RedisServer

# The seven statements of bench.node_limits.SEVEN as SQLite takes them: no row lock (the write
# lock taken at BEGIN IMMEDIATE serializes writers), and the change position as the service takes
# it there (the table's highest plus one).
SQLITE_SEVEN = [
    "INSERT INTO voice_recordings (id, status, status_key, created_at, processed_at, change_position) "
    "VALUES (:rid, '', '', :now, :now, 0) ON CONFLICT (id) DO NOTHING",
    "SELECT id, status, status_key, duration, recording_url, url_key FROM voice_recordings WHERE id = :rid",
    "SELECT id, phone_number, status, status_key, duration, duration_key FROM participants WHERE recording_id = :rid",
    "SELECT id FROM webhook_events WHERE fingerprint = :rid",
    "UPDATE voice_recordings SET status = 'completed', status_key = 'k', duration = 42, processed_at = :now, "
    "change_position = (SELECT coalesce(max(latest.change_position), 0) + 1 FROM voice_recordings AS latest) "
    "WHERE id = :rid",
    "INSERT INTO participants (recording_id, phone_number, status, status_key, duration, duration_key, updated_at) "
    "VALUES (:rid, '+254712345678', 'completed', 'k', 42, 'k', :now) ON CONFLICT (recording_id, phone_number) "
    "DO UPDATE SET status = excluded.status",
    "INSERT INTO webhook_events (recording_id, fingerprint, received_at, phone_number, status, duration, "
    "recording_url, outcome, payload) VALUES (:rid, :rid, :now, '+254712345678', 'completed', 42, NULL, "
    "'applied', '{\"sessionId\": \"b\", \"status\": \"completed\"}')",
]


def sqlite_loop(path: Path, seconds: float) -> float:
    """Transactions per second of the seven statements, one transaction per event, for ``seconds``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    done, n = 0, time.time_ns()
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        params = {"rid": f"loop-{n}-{done}", "now": "2026-12-02 00:00:00.000000"}
        conn.execute("BEGIN IMMEDIATE")
        for statement in SQLITE_SEVEN:
            conn.execute(statement, params).fetchall()
        conn.execute("COMMIT")
        done += 1
    rate = done / (time.perf_counter() - started)
    conn.close()
    return rate


def line_processes() -> int:
    return int(re.search(r"WORKER_CONCURRENCY:-(\d+)", (ROOT / "scripts" / "run.sh").read_text()).group(1))


def worker_line(procs: Processes, settings: Settings, n: int, label: str,
                options: tuple[str, ...] = ()) -> dict[str, Any]:
    processes = line_processes()
    tag = label.replace(" ", "-")
    batch = events(n, f"{tag}{time.time_ns()}")
    step(f"{label}: the worker line ({processes} processes) draining {n} queued new events")
    new = worker_rate(procs, settings, batch, processes, options, LOG_LEVEL="INFO")
    step(f"{label}:   {new.rate:.0f} new events/s (CPU per event: workers {new.worker_cpu_us:.0f} us, Redis "
         f"{new.redis_cpu_us:.0f} us); the same events again as duplicates")
    dup = worker_rate(procs, settings, batch, processes, options, LOG_LEVEL="INFO")
    step(f"{label}:   {dup.rate:.0f} duplicates/s (CPU per duplicate: workers {dup.worker_cpu_us:.0f} us, Redis "
         f"{dup.redis_cpu_us:.0f} us)")
    return {"processes": processes, "events": n, "new_eps": round(new.rate, 1), "duplicate_eps": round(dup.rate, 1),
            "duplicates_per_new": round(dup.rate / new.rate, 2), "peak_rss_mb": new.rss,
            "worker_cpu_us_per_new": new.worker_cpu_us, "redis_cpu_us_per_new": new.redis_cpu_us,
            "worker_cpu_us_per_duplicate": dup.worker_cpu_us, "redis_cpu_us_per_duplicate": dup.redis_cpu_us}


# CPU per event over each drain, of the worker processes and of the Redis server (us).
CPU_FIGURES = ("worker_cpu_us_per_new", "redis_cpu_us_per_new", "worker_cpu_us_per_duplicate",
               "redis_cpu_us_per_duplicate")


def lines(procs: Processes, settings: Settings, n: int, database: str, before: Path | None,
          turns: int, options: tuple[str, ...] = ()) -> dict[str, Any]:
    """This checkout's worker line, and with ``before`` that checkout's too, in alternating turns
    against the same database; each figure the median of its turns."""
    sides = {"line": procs.cwd, **({"before": before} if before else {})}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for turn in range(turns):
        for side, root in sides.items():
            procs.cwd = root
            runs[side].append(worker_line(procs, settings, n, f"{database} {side} {turn + 1}/{turns}", options))
    procs.cwd = sides["line"]
    out: dict[str, Any] = {}
    for side, got in runs.items():
        new = statistics.median(r["new_eps"] for r in got)
        dup = statistics.median(r["duplicate_eps"] for r in got)
        out[side] = {**got[0], "new_eps": round(new, 1), "duplicate_eps": round(dup, 1),
                     "duplicates_per_new": round(dup / new, 2), "peak_rss_mb": max(r["peak_rss_mb"] for r in got),
                     **{name: statistics.median(r[name] for r in got) for name in CPU_FIGURES},
                     "turns": [{"new_eps": r["new_eps"], "duplicate_eps": r["duplicate_eps"],
                                **{name: r[name] for name in CPU_FIGURES}} for r in got]}
    if before:
        out["before_root_commit"] = _commit_of(before)
    return out


def _commit_of(root: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return done.stdout.strip()


DOC = ROOT / "docs" / "performance.md"
DOC_BLOCK = re.compile(r"<!-- worker-floor -->.*<!-- /worker-floor -->", re.S)


def doc_table(data: dict[str, Any]) -> str:
    """docs/performance.md's before-and-after table, from a result file of a ``--before`` run."""
    pg, sq = data["postgresql"], data["sqlite"]

    def f(value: float, digits: int = 1) -> str:
        return f"{value:,.{digits}f}"

    def dup(side: dict[str, Any]) -> str:
        return f"{f(side['duplicate_eps'])} ({side['duplicates_per_new']:.2f}x)"

    def met(side: dict[str, Any]) -> str:
        return "" if side["duplicates_per_new"] >= 5 else " — not met"

    lines = [
        f"| | before ({pg['before_root_commit']}) | after ({data['commit']}) | goal |",
        "|---|---|---|---|",
        f"| PostgreSQL: new events/s through the worker line | {f(pg['before']['new_eps'])} | "
        f"**{f(pg['line']['new_eps'])}** | |",
        f"| ÷ pgbench, one server-side call ({f(pg['pgbench_one_call_tps'])} tps) | {pg['before_to_one_call']:.3f} | "
        f"**{pg['line_to_one_call']:.3f}** | ≥ 0.25{'' if pg['line_to_one_call'] >= 0.25 else ' — not met'} |",
        f"| ÷ pgbench, seven statements ({f(pg['pgbench_seven_statements_tps'])} tps) | "
        f"{pg['before']['new_eps'] / pg['pgbench_seven_statements_tps']:.3f} | "
        f"{pg['line_to_seven_statements']:.3f} | |",
        f"| duplicates/s (÷ new) | {dup(pg['before'])} | {dup(pg['line'])} | ≥ 5x{met(pg['line'])} |",
        f"| SQLite: new events/s through the worker line | {f(sq['before']['new_eps'])} | "
        f"**{f(sq['line']['new_eps'])}** | |",
        f"| ÷ the plain `sqlite3` loop ({f(sq['sqlite3_loop_tps'])} tps) | {sq['before_to_loop']:.3f} | "
        f"**{sq['line_to_loop']:.3f}** | ≥ 0.25{'' if sq['line_to_loop'] >= 0.25 else ' — not met'} |",
        f"| duplicates/s (÷ new) | {dup(sq['before'])} | {dup(sq['line'])} | ≥ 5x{met(sq['line'])} |",
    ]
    return "<!-- worker-floor -->\n" + "\n".join(lines) + "\n<!-- /worker-floor -->"


def doc(mode: str) -> int:
    """Print, check or write docs/performance.md's table from the newest worker-floor result."""
    from bench.capacity import newest

    _path, data = newest("worker-floor")
    generated = doc_table(data)
    return sync_doc(DOC, DOC_BLOCK, generated, mode, "python -m bench.worker_floor")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=3000, help="queued new events per drain")
    parser.add_argument("--seconds", type=int, default=10, help="each pgbench run and the sqlite3 loop")
    parser.add_argument("--databases", default="postgresql,sqlite")
    parser.add_argument("--before", type=Path, help="another checkout of the service (an earlier commit): its "
                        "worker line is measured too, in turns with this one's, against the same database")
    parser.add_argument("--turns", type=int, default=1, help="alternating turns of the worker lines")
    parser.add_argument("--out", type=Path, help="also write the result here")
    parser.add_argument("--task-events", action="store_true", help="the worker lines with task events on (-E, as "
                        "while Flower watches); the result is of kind worker-floor-task-events")
    parser.add_argument("--doc", choices=("print", "check", "write"),
                        help="no measuring: docs/performance.md's table from the newest result file")
    args = parser.parse_args()
    if args.doc:
        return doc(args.doc)
    result: dict[str, Any] = {"events": args.events, "seconds": args.seconds, "task_events": args.task_events}
    options = ("-E",) if args.task_events else ()
    workdir = Path(tempfile.mkdtemp(prefix="voice-floor-"))
    workdir.chmod(0o755)
    redis_server = RedisServer(workdir / "redis").start()
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, "REDIS_URL": redis_server.url, "LOG_FORMAT": "json", "PROMETHEUS_MULTIPROC_DIR":
           str(metrics_dir), "API_KEYS": "bench"}
    procs = Processes(workdir, env)
    base = Settings(redis_url=redis_server.url, log_level="WARNING")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(redis_server.stop)
        cleanup.callback(procs.stop_all)
        if "postgresql" in args.databases:
            server = _durable(PostgresServer()).init().start()
            cleanup.callback(server.remove)
            migrate(server.url, redis_server.url)
            _psql(server, FUNCTION)
            step(f"postgresql: pgbench, 2 clients, {args.seconds} s each")
            seven = pgbench(server, SEVEN, args.seconds, workdir)
            one_call = pgbench(server, ONE_CALL, args.seconds, workdir)
            step(f"postgresql:   seven statements {seven:.0f} tps, one call {one_call:.0f} tps")
            procs.env["DATABASE_URL"] = server.url
            got = lines(procs, replace(base, database_url=server.url), args.events, "postgresql", args.before,
                        args.turns, options)
            result["postgresql"] = {"pgbench_seven_statements_tps": round(seven, 1),
                                    "pgbench_one_call_tps": round(one_call, 1), **got,
                                    **{f"{side}_to_one_call": round(got[side]["new_eps"] / one_call, 3)
                                       for side in ("line", "before") if side in got},
                                    "line_to_seven_statements": round(got["line"]["new_eps"] / seven, 3)}
        if "sqlite" in args.databases:
            url = f"sqlite:///{workdir / 'voice.db'}"
            migrate(url, redis_server.url)
            step(f"sqlite: a plain sqlite3 loop of the same statements, {args.seconds} s")
            loop = sqlite_loop(workdir / "voice.db", args.seconds)
            step(f"sqlite:   {loop:.0f} transactions/s")
            procs.env["DATABASE_URL"] = url
            got = lines(procs, replace(base, database_url=url), args.events, "sqlite", args.before, args.turns,
                        options)
            result["sqlite"] = {"sqlite3_loop_tps": round(loop, 1), **got,
                                **{f"{side}_to_loop": round(got[side]["new_eps"] / loop, 3)
                                   for side in ("line", "before") if side in got}}
    print(json.dumps(result, indent=2))
    if args.out:
        command = (f".venv/bin/python -m bench.worker_floor --events {args.events} --seconds {args.seconds} "
                   f"--databases {args.databases} --turns {args.turns}" + (" --task-events" if args.task_events else "")
                   + (f" --before CHECKOUT-AT-{_commit_of(args.before)}" if args.before else ""))
        write_result(args.out, "worker-floor-task-events" if args.task_events else "worker-floor", command, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
