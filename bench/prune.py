"""Measure retention's prune on generated events in a PostgreSQL database of its own.

    python -m bench.prune                      # 1,000,000 events, half older than the window
    python -m bench.prune --events 20000       # a quick run

It makes a database on the machine's PostgreSQL (TEST_PG_ADMIN_DSN), migrates it, generates the
events in SQL, prunes those older than 30 days in the service's batches while a writer keeps
inserting one event at a time into the same table, prints progress and the figures, and drops
the database (also on failure). Figures: rows deleted per second, the longest batch transaction
(the longest any deleted row stays locked) and the slowest single-event insert of the writer.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import create_engine, text

from app import create_app
from app.applying import retention
from app.base.extensions import db
from config import Settings
from tests.conftest import migrate
from tests.support import pg_database

WINDOW_DAYS = 30
SPAN_DAYS = 60  # events are spread evenly over this many days back from now: half are older than the window


def generate(url: str, events: int, per_recording: int) -> None:
    recordings = max(1, events // per_recording)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO voice_recordings (id, status, duration, recording_url, created_at, processed_at,
                                          status_key, url_key, change_position)
            SELECT 'bench_' || g, 'completed', 60, NULL, now(), now(), '', NULL, 0
            FROM generate_series(0, :n - 1) AS g"""), {"n": recordings})
        # Oldest first by id, as a table filled over time is; payloads the size of a real callback's.
        conn.execute(text("""
            INSERT INTO webhook_events (recording_id, fingerprint, received_at, phone_number, status, duration,
                                        recording_url, outcome, payload)
            SELECT 'bench_' || (g % :r), md5(g::text) || md5((-g)::text),
                   now() - make_interval(secs => (:n - g) * (:span * 86400.0 / :n)),
                   '+2547' || lpad((g % 100000000)::text, 8, '0'), 'completed', 60, NULL, 'applied',
                   json_build_object('sessionId', 'bench_' || (g % :r), 'status', 'completed',
                                     'phoneNumber', '+2547' || lpad((g % 100000000)::text, 8, '0'),
                                     'duration', 60, 'callSessionState', 'Completed', 'direction', 'Inbound')
            FROM generate_series(0, :n - 1) AS g"""), {"n": events, "r": recordings, "span": SPAN_DAYS})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE webhook_events"))
    engine.dispose()


class Writer(threading.Thread):
    """Inserts one new event per transaction into the pruned table, timing each, until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.engine = create_engine(url)
        self.stop = threading.Event()
        self.seconds: list[float] = []

    def run(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            with self.engine.begin() as conn:
                conn.execute(text("""
                    INSERT INTO webhook_events (recording_id, fingerprint, received_at, status, outcome, payload)
                    VALUES ('bench_0', :f, now(), 'completed', 'applied', '{}')"""), {"f": uuid.uuid4().hex * 2})
            self.seconds.append(time.monotonic() - began)
            self.stop.wait(0.01)
        self.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--per-recording", type=int, default=10)
    parser.add_argument("--batch", type=int, default=retention.BATCH)
    args = parser.parse_args()

    with pg_database("voice_bench_prune") as url:
        print(f"database {url.rsplit('/', 1)[1]}: migrating", flush=True)
        migrate(url, "redis://127.0.0.1:6379/0")  # Redis is not touched by a prune
        began = time.monotonic()
        generate(url, args.events, args.per_recording)
        print(f"generated {args.events:,} events in {time.monotonic() - began:.1f} s", flush=True)

        app = create_app(Settings(database_url=url, log_format="console", log_level="WARNING"))
        writer = Writer(url)
        with app.app_context():
            old = retention.prune(db.session, WINDOW_DAYS, dry_run=True).deleted
            print(f"{old:,} events older than {WINDOW_DAYS} days; pruning in batches of {args.batch:,}", flush=True)

            def progress(report: retention.PruneReport) -> None:
                if report.batches % 20 == 0:
                    print(f"  {report.deleted:>9,} deleted, {report.batches} batches, "
                          f"longest batch {report.longest_batch_seconds * 1000:.0f} ms", flush=True)

            writer.start()
            report = retention.prune(db.session, WINDOW_DAYS, batch=args.batch, progress=progress)
            writer.stop.set()
            writer.join()
            left = db.session.scalar(text("SELECT count(*) FROM webhook_events WHERE received_at < :c"),
                                     {"c": datetime.now(UTC) - timedelta(days=WINDOW_DAYS)})
            db.session.remove()
            db.engine.dispose()

        batches = sorted(report.batch_seconds)
        print(f"deleted {report.deleted:,} of {old:,} old events ({left} left) in {report.seconds:.1f} s: "
              f"{report.deleted / report.seconds:,.0f} rows/s")
        print(f"batches: {report.batches}; batch transaction median {statistics.median(batches) * 1000:.0f} ms, "
              f"p99 {batches[int(len(batches) * 0.99) - 1] * 1000:.0f} ms, "
              f"longest {report.longest_batch_seconds * 1000:.0f} ms (the longest any row lock was held)")
        writes = sorted(writer.seconds)
        print(f"concurrent single-event inserts: {len(writes)}, median {statistics.median(writes) * 1000:.1f} ms, "
              f"slowest {writes[-1] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
