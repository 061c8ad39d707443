"""Does applying several events in one transaction pay? A plain loop of ``apply_event`` (one
transaction per event) against the same kind of events staged N at a time (``stage_event``) and
committed once, and against N at a time through ``batch.apply_batch`` (what the worker does: one
statement per kind of row for the whole batch, "set N="), on a SQLite file and on PostgreSQL
servers of the benchmark's own: one with fsync off (as bench/run.py starts it) and one with fsync
and synchronous_commit on (a commit waits for its WAL flush, as in production). Modes are
measured in alternating turns, each on fresh events, a chunk of 50 events at a time; figures are
medians of the turns, ratios are of medians from this run.

    python -m bench.batch_apply                 # 15 turns of 300 events per mode and database
    python -m bench.batch_apply --turns 3 --events 400 --databases sqlite,pg-fsync
    python -m bench.batch_apply --interleave    # consecutive events belong to different calls
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session

from app import create_app
from app.applying.batch import apply_batch
from app.applying.domain import apply_event, stage_event
from app.base.extensions import db
from app.base.timeutil import utcnow
from app.payload.events import Event
from bench.run import events, step
from config import Settings
from tests.conftest import migrate
from tests.support import PostgresServer, RedisServer, postgres_bin

BATCH_SIZES = (1, 10, 50)
CHUNK = max(BATCH_SIZES)  # events a mode applies before the next mode's turn


class DurablePostgres(PostgresServer):
    """The benchmark's PostgreSQL with fsync and synchronous_commit on: a commit waits for the
    WAL to reach the disk, which is what a batch of commits would save."""

    def start(self) -> DurablePostgres:
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on"
        self._run(postgres_bin("pg_ctl"), "-D", str(self.datadir), "-o", options,
                  "-l", str(self.workdir / "postgres.log"), "-w", "start")
        return self


def interleaved(made: list[Event], per_session: int = 4) -> list[Event]:
    """The same events reordered so that consecutive ones belong to different sessions, as when
    many calls are live at once: a batch of N then locks about N recordings instead of N/4."""
    return [event for _, event in sorted(enumerate(made), key=lambda item: (item[0] % per_session, item[1].session_id))]


def plain_loop(session: Session, batch: list[Event]) -> None:
    for event in batch:
        apply_event(session, event, utcnow())


def timed_commits(session: Session, batch: list[Event]) -> tuple[float, float]:
    """The plain loop again (stage and flush, then commit, one event at a time), timing the COMMITs:
    their share of the loop's time bounds what fewer commits can save. Returns the seconds spent
    committing and the seconds of the whole loop."""
    committing = 0.0
    started = time.perf_counter()
    for event in batch:
        try:
            _outcome, wrote = stage_event(session, event, utcnow())
            session.flush()  # the statements are the event's work; the COMMIT alone is timed
            before = time.perf_counter()
            if wrote:
                session.commit()
            else:
                session.rollback()
            committing += time.perf_counter() - before
        except BaseException:
            session.rollback()
            raise
    return committing, time.perf_counter() - started


def in_batches(size: int, savepoints: bool = False) -> Callable[[Session, list[Event]], None]:
    """Stage ``size`` events, then commit once; with ``savepoints``, each event in a SAVEPOINT of
    its own (what isolating one failing event inside the batch would cost)."""

    def run(session: Session, batch: list[Event]) -> None:
        for start in range(0, len(batch), size):
            try:
                for event in batch[start:start + size]:
                    if savepoints:
                        with session.begin_nested():
                            stage_event(session, event, utcnow())
                    else:
                        stage_event(session, event, utcnow())
                session.commit()
            except BaseException:
                session.rollback()
                raise

    return run


def modes() -> dict[str, Callable[[Session, list[Event]], None]]:
    made: dict[str, Callable[[Session, list[Event]], None]] = {"loop": plain_loop}
    for size in BATCH_SIZES:
        made[f"N={size}"] = in_batches(size)
    made["N=10 savepoints"] = in_batches(10, savepoints=True)
    for size in BATCH_SIZES[1:]:
        made[f"set N={size}"] = set_based(size)
    return made


def set_based(size: int) -> Callable[[Session, list[Event]], None]:
    """``size`` events at a time through ``batch.apply_batch``: one statement per kind of row."""

    def run(session: Session, batch: list[Event]) -> None:
        for start in range(0, len(batch), size):
            apply_batch(session, [(event, utcnow()) for event in batch[start:start + size]])

    return run


def measure(url: str, redis_url: str, turns: int, count: int, interleave: bool, label: str) -> dict[str, list[float]]:
    """Rates by mode (events/s, one a turn), and under ``commit share`` the COMMITs' share of the
    plain loop's time (one a turn). A turn goes through every mode CHUNK events at a time, in
    rotation, so that a burst of load from elsewhere on the machine falls on every mode alike."""
    app = create_app(Settings(database_url=url, redis_url=redis_url, log_level="WARNING"))
    runs = modes()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    shares: list[float] = []
    chunks = max(1, count // CHUNK)
    with app.app_context():
        plain_loop(db.session, events(200, f"warm{time.time_ns()}"))  # connections, caches, statements
        for turn in range(turns):
            spent = dict.fromkeys(runs, 0.0)
            committing = looping = 0.0
            for chunk in range(chunks):
                names = [*runs, "commit share"]
                shift = (turn * chunks + chunk) % len(names)
                for name in names[shift:] + names[:shift]:  # no mode always first
                    made = events(CHUNK, f"{label}_{turn}_{chunk}_{len(spent)}_{time.time_ns()}")
                    batch = interleaved(made) if interleave else made
                    if name == "commit share":
                        commit_seconds, loop_seconds = timed_commits(db.session, batch)
                        committing, looping = committing + commit_seconds, looping + loop_seconds
                        continue
                    started = time.perf_counter()
                    runs[name](db.session, batch)
                    spent[name] += time.perf_counter() - started
            for name in runs:
                rates[name].append(chunks * CHUNK / spent[name])
            shares.append(committing / looping)
            step(f"{label} turn {turn + 1}/{turns}: "
                 + ", ".join(f"{name} {rates[name][-1]:.0f}/s" for name in runs)
                 + f"; commits take {shares[-1]:.0%} of the loop")
        db.session.remove()
        db.engine.dispose()
    return {**rates, "commit share": shares}


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    lines = [f"events/s, median of {args.turns} turns of {args.events} events "
             f"({'interleaved' if args.interleave else 'grouped'}: four events per session); "
             "ratio = mode ÷ plain loop, medians of this run", "",
             "| database | mode | events/s (median) | turns | ÷ loop |", "|---|---|---|---|---|"]
    for database, rates in results.items():
        loop = statistics.median(rates["loop"])
        shares = rates.pop("commit share")
        for name, turns in rates.items():
            median = statistics.median(turns)
            lines.append(f"| {database} | {name} | {median:.0f} | {', '.join(f'{r:.0f}' for r in turns)} "
                         f"| {median / loop:.2f} |")
        lines.append(f"| {database} | commits' share of the loop's time | {statistics.median(shares):.0%} "
                     f"| {', '.join(f'{share:.0%}' for share in shares)} | |")
    return "\n".join(lines) + "\n"


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=15)
    parser.add_argument("--events", type=int, default=300, help="events per mode and turn")
    parser.add_argument("--databases", default="sqlite,pg-nofsync,pg-fsync")
    parser.add_argument("--interleave", action="store_true", help="consecutive events from different sessions")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)  # a stopped run still removes its servers
    wanted = [d for d in args.databases.split(",") if d]
    if not set(wanted) <= {"sqlite", "pg-nofsync", "pg-fsync"}:
        raise SystemExit("--databases takes sqlite, pg-nofsync, pg-fsync")
    workdir = Path(tempfile.mkdtemp(prefix="voice-batch-"))
    redis_server = RedisServer(workdir / "redis").start()
    servers: list[PostgresServer] = []
    results: dict[str, dict[str, list[float]]] = {}
    try:
        urls = {}
        for name in wanted:
            if name == "sqlite":
                urls[name] = f"sqlite:///{workdir / 'voice.db'}"
            else:
                server = (DurablePostgres() if name == "pg-fsync" else PostgresServer()).init()
                servers.append(server)
                urls[name] = server.start().url
            migrate(urls[name], redis_server.url)
            step(f"{name}: migrated")
        for name, url in urls.items():
            results[name] = measure(url, redis_server.url, args.turns, args.events, args.interleave, name)
    finally:
        for server in servers:
            server.remove()
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
