"""Bytes per event at rest: PostgreSQL rows and indexes, and the Redis dedup key.

    .venv/bin/python -m bench.storage [--calls 2000]

Applies realistic Africa's Talking call sequences (``app.operating.simulator.plan``: several callbacks per
call, per participant) to a fresh PostgreSQL database on the machine's server, then reads
``pg_total_relation_size`` and ``pg_indexes_size`` of each table, and asks a redis-server of its
own for ``MEMORY USAGE`` of done dedup keys. Nothing is timed: the figures are sizes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis
from sqlalchemy import Text, cast, func, select, text

from app import create_app
from app.applying.domain import apply_event
from app.base.extensions import db
from app.base.timeutil import stamp
from app.operating.simulator import plan
from app.payload.events import parse_event
from app.plumbing.dedup import DEDUP_PREFIX, DONE
from app.records.models import Participant, VoiceRecording, WebhookEvent
from bench.run import write_result
from config import Settings
from tests.conftest import migrate
from tests.support import RedisServer, pg_database

TABLES = ("webhook_events", "voice_recordings", "participants")


def measure(calls: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp, pg_database("voice_storage") as url:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            migrate(url, server.url)
            app = create_app(Settings(database_url=url, redis_url=server.url, log_level="WARNING"))
            started = datetime(2026, 3, 6, 14, 0, tzinfo=UTC)
            client = redis.Redis.from_url(server.url)
            with app.app_context():
                n = 0
                for requests in plan(calls, participants=2, seed=1, prefix="STORE"):
                    for fields in requests:
                        event = parse_event(fields)
                        received_at = started + timedelta(seconds=n)
                        apply_event(db.session, event, received_at)
                        client.set(DEDUP_PREFIX + event.key, f"{DONE}:{stamp(received_at)}", ex=86400)
                        n += 1
                counts = {
                    "webhook_events": db.session.scalar(select(func.count()).select_from(WebhookEvent)),
                    "voice_recordings": db.session.scalar(select(func.count()).select_from(VoiceRecording)),
                    "participants": db.session.scalar(select(func.count()).select_from(Participant)),
                }
                sizes = {}
                for table in TABLES:
                    total, indexes = db.session.execute(text(
                        f"SELECT pg_total_relation_size('{table}'), pg_indexes_size('{table}')")).one()
                    sizes[table] = {"rows": counts[table], "total_bytes": total, "index_bytes": indexes,
                                    "bytes_per_row": round(total / max(1, counts[table]), 1),
                                    "index_bytes_per_row": round(indexes / max(1, counts[table]), 1)}
                payload = db.session.scalar(select(func.avg(func.length(cast(WebhookEvent.payload, Text)))))
                keys = list(client.scan_iter(match=f"{DEDUP_PREFIX}*", count=1000))
                key_bytes = sum(client.memory_usage(k) or 0 for k in keys) / max(1, len(keys))
                db.session.remove()
                db.engine.dispose()
            client.close()
            return {"events": n, "tables": sizes, "average_payload_json_chars": round(float(payload or 0), 1),
                    "dedup_key_memory_usage_bytes": round(key_bytes, 1), "dedup_keys": len(keys)}
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", type=Path, help="also write the result here (bench/results/DATE-storage.json)")
    args = parser.parse_args()
    result = {"calls": args.calls, **measure(args.calls)}
    print(json.dumps(result, indent=2))
    if args.out:
        write_result(args.out, "storage", f".venv/bin/python -m bench.storage --calls {args.calls}", result)


if __name__ == "__main__":
    main()
