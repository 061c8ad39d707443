"""What one node of each store takes, on this machine's cores: the rate at which a single piece of
the deployment runs out, whatever the number of web and worker processes in front of it.

    .venv/bin/python -m bench.node_limits --seconds 10 --out bench/results/DATE-node-limits.json

- **One PostgreSQL primary**: pgbench (2 clients) doing the writes one new event makes (recording
  upsert, row lock, participants read, fingerprint check, recording update with its change
  position, participant upsert, event insert) on the service's own schema (its migrations), as
  seven statements and as one server-side call, on a primary alone and on a primary whose every
  commit waits for a synchronous standby (the failover setup's price). fsync on: a commit is a
  flush, as in production.
- **One quorum queue's leader**: a three-node RabbitMQ cluster of the bench's own; a task-sized
  persistent message published with publisher confirms to one quorum queue replicated on all
  three, and consumed and acknowledged: messages per second through the one queue.
- **One cache shard**: one redis-server and ``redis-benchmark`` running what an event costs the
  dedup cache on RabbitMQ: the claim script (EVALSHA on the event's key) and the done mark (a
  SET with a TTL), on random keys.

Every server is the bench's own, on free ports, removed at the end. Progress goes to stderr, the
result (JSON) to stdout and to ``--out``. Needs pgbench and redis-benchmark (Debian's
postgresql-client and redis-tools) and RabbitMQ's server (as the fault suite does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

from bench.run import step, write_result
from tests.conftest import migrate
from tests.faults.pg_failover import PostgresPair
from tests.support import PostgresServer, RedisServer

PUBLISHERS = 8  # connections publishing at once, as several web processes do (each waits for its confirm)
NO_REDIS = "redis://127.0.0.1:1/0"  # the migrations build an app; it never connects to Redis

# One new event's writes, as the service's apply does them (app.applying.domain.stage_event): each
# transaction a new recording, one participant, one event. :client_id keeps the keys distinct.
SEVEN = """\\set n random(1, 1000000000000000000)
BEGIN;
INSERT INTO voice_recordings (id, status, status_key, created_at, processed_at, change_position)
  VALUES ('b' || :client_id || '-' || :n, '', '', now(), now(), 0) ON CONFLICT (id) DO NOTHING;
SELECT id, status, status_key, duration, recording_url, url_key FROM voice_recordings
  WHERE id = 'b' || :client_id || '-' || :n FOR UPDATE;
SELECT id, phone_number, status, status_key, duration, duration_key FROM participants
  WHERE recording_id = 'b' || :client_id || '-' || :n;
SELECT id FROM webhook_events WHERE fingerprint = md5('b' || :client_id || '-' || :n);
UPDATE voice_recordings SET status = 'completed', status_key = 'k', duration = 42, processed_at = now(),
  change_position = pg_current_xact_id()::text::bigint WHERE id = 'b' || :client_id || '-' || :n;
INSERT INTO participants (recording_id, phone_number, status, status_key, duration, duration_key, updated_at)
  VALUES ('b' || :client_id || '-' || :n, '+254712345678', 'completed', 'k', 42, 'k', now())
  ON CONFLICT (recording_id, phone_number) DO UPDATE SET status = excluded.status, status_key = excluded.status_key,
  duration = excluded.duration, duration_key = excluded.duration_key, updated_at = excluded.updated_at;
INSERT INTO webhook_events (recording_id, fingerprint, received_at, phone_number, status, duration, recording_url,
  outcome, payload) VALUES ('b' || :client_id || '-' || :n, md5('b' || :client_id || '-' || :n), now(),
  '+254712345678', 'completed', 42, NULL, 'applied', '{"sessionId": "b", "status": "completed"}');
END;
"""

ONE_CALL = """\\set n random(1, 1000000000000000000)
SELECT bench_apply('b' || :client_id || '-' || :n);
"""

FUNCTION = """
CREATE OR REPLACE FUNCTION bench_apply(rid text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  r record;
BEGIN
  INSERT INTO voice_recordings (id, status, status_key, created_at, processed_at, change_position)
    VALUES (rid, '', '', now(), now(), 0) ON CONFLICT (id) DO NOTHING;
  SELECT id, status, status_key INTO r FROM voice_recordings WHERE id = rid FOR UPDATE;
  PERFORM id FROM participants WHERE recording_id = rid;
  PERFORM id FROM webhook_events WHERE fingerprint = md5(rid);
  UPDATE voice_recordings SET status = 'completed', status_key = 'k', duration = 42, processed_at = now(),
    change_position = pg_current_xact_id()::text::bigint WHERE id = rid;
  INSERT INTO participants (recording_id, phone_number, status, status_key, duration, duration_key, updated_at)
    VALUES (rid, '+254712345678', 'completed', 'k', 42, 'k', now())
    ON CONFLICT (recording_id, phone_number) DO UPDATE SET status = excluded.status;
  INSERT INTO webhook_events (recording_id, fingerprint, received_at, phone_number, status, duration, recording_url,
    outcome, payload) VALUES (rid, md5(rid), now(), '+254712345678', 'completed', 42, NULL, 'applied',
    '{"sessionId": "b", "status": "completed"}');
END $$;
"""


def _durable(server: PostgresServer) -> PostgresServer:
    """A commit is a flush here, as in production (the suite's servers run with fsync off)."""
    server.fsync = "on"
    return server


def pgbench(server: PostgresServer, script: str, seconds: int, workdir: Path) -> float:
    path = workdir / f"script-{abs(hash(script))}.sql"
    path.write_text(script)
    path.chmod(0o644)
    done = subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", "-n",
                           "-c", "2", "-j", "2", "-M", "prepared", "-T", str(seconds), "-f", str(path), "postgres"],
                          capture_output=True, text=True, timeout=seconds + 120, check=True)
    match = re.search(r"tps = ([\d.]+)", done.stdout)
    if not match:
        raise RuntimeError(f"pgbench printed no tps:\n{done.stdout}\n{done.stderr}")
    return float(match.group(1))


def postgres(seconds: int, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    lone = _durable(PostgresServer())
    try:
        lone.init().start()
        migrate(lone.url, NO_REDIS)
        _psql(lone, FUNCTION)
        step("postgresql: a primary alone")
        results["primary_alone"] = {"seven_statements_tps": pgbench(lone, SEVEN, seconds, workdir),
                                    "one_call_tps": pgbench(lone, ONE_CALL, seconds, workdir)}
        step(f"  {results['primary_alone']}")
    finally:
        lone.remove()
    pair = PostgresPair()
    _durable(pair.primary)
    _durable(pair.standby)
    try:
        pair.start()
        migrate(pair.url, NO_REDIS)
        _psql(pair.primary, FUNCTION)
        step("postgresql: a primary with a synchronous standby")
        results["primary_sync_standby"] = {"seven_statements_tps": pgbench(pair.primary, SEVEN, seconds, workdir),
                                           "one_call_tps": pgbench(pair.primary, ONE_CALL, seconds, workdir)}
        step(f"  {results['primary_sync_standby']}")
    finally:
        pair.remove()
    return results


def _psql(server: PostgresServer, sql: str) -> None:
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(sql)


def cache_shard(seconds: int, workdir: Path) -> dict[str, Any]:
    from app.plumbing.dedup import _CLAIM

    server = RedisServer(workdir / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)
        sha = client.script_load(_CLAIM)
        host, port = "127.0.0.1", str(server.port)
        stamp = "2026-12-02T12:00:00.000000"
        requests = 100_000
        common = ["redis-benchmark", "-h", host, "-p", port, "-c", "50", "-P", "16", "-r", "100000000",
                  "-n", str(requests), "--csv"]
        step("cache shard: the claim script")
        claim = _benchmark([*common, "EVALSHA", sha, "1", "voice:dedup:__rand_int__", "claim:bench", "600",
                            "__rand_int__", stamp])
        step("cache shard: the done mark")
        done = _benchmark([*common, "SET", "voice:dedup:__rand_int__", f"done:{stamp}", "EX", "86400"])
        client.close()
    finally:
        server.stop()
    per_event = 1 / (1 / claim + 1 / done)
    return {"claims_per_second": claim, "done_marks_per_second": done,
            "events_per_second": round(per_event, 1),
            "note": "redis-benchmark, 50 connections, 16 pipelined, random keys; one redis-server core"}


def _benchmark(argv: list[str]) -> float:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
    rows = [line for line in done.stdout.splitlines() if line and not line.startswith('"test"')]
    return float(rows[-1].split(",")[1].strip('"'))


def quorum_leader(seconds: int, workdir: Path) -> dict[str, Any]:
    from kombu import Exchange, Queue

    from tests.rabbitmq_cluster import RabbitCluster

    cluster = RabbitCluster()
    try:
        cluster.start()
        url = cluster.nodes[0].url
        queue = Queue("bench-quorum", Exchange("bench-quorum", type="direct"), routing_key="bench-quorum",
                      queue_arguments={"x-queue-type": "quorum"}, durable=True)
        body = json.dumps([["b" * 24, "completed", "+254712345678", None, 42, {"sessionId": "b" * 24}],
                           "2026-12-02T12:00:00.000000Z", None]).ljust(900)
        published = _publish(url, queue, body, seconds)
        step(f"  quorum queue: {published['per_second']:.0f} confirmed publishes/s")
        consumed = _consume(url, queue, published["count"])
        step(f"  quorum queue: {consumed['per_second']:.0f} consumed and acknowledged/s")
    finally:
        cluster.remove()
    both = 1 / (1 / published["per_second"] + 1 / consumed["per_second"])
    return {"publish": published, "consume": consumed, "messages_per_second": round(both, 1),
            "note": f"one quorum queue on three nodes on this machine; {PUBLISHERS} publishing connections, "
                    "confirms on, persistent 900-byte messages; then one consumer, prefetch 100, each acknowledged"}


def _publish(url: str, queue: Any, body: str, seconds: int) -> dict[str, Any]:
    from kombu import Connection

    counts = [0] * PUBLISHERS

    def publisher(index: int, until: float) -> None:
        with Connection(url, transport_options={"confirm_publish": True}) as conn:
            producer = conn.Producer()
            while time.monotonic() < until:
                producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key, delivery_mode=2,
                                 declare=[queue], retry=False, serializer=None, content_type="application/json",
                                 content_encoding="utf-8")
                counts[index] += 1

    with Connection(url) as conn:
        queue.bind(conn.default_channel).declare()
    until = time.monotonic() + seconds
    started = time.monotonic()
    threads = [threading.Thread(target=publisher, args=(i, until)) for i in range(PUBLISHERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - started
    return {"count": sum(counts), "seconds": round(took, 2), "per_second": round(sum(counts) / took, 1)}


def _consume(url: str, queue: Any, count: int) -> dict[str, Any]:
    from kombu import Connection

    got = 0
    started = time.monotonic()
    with Connection(url) as conn:
        channel = conn.channel()
        channel.basic_qos(0, 100, False)

        def on_message(_body: Any, message: Any) -> None:
            nonlocal got
            message.ack()
            got += 1

        with conn.Consumer(queue.bind(channel), callbacks=[on_message], accept=["json"]):
            while got < count:
                conn.drain_events(timeout=30)
    took = time.monotonic() - started
    return {"count": got, "seconds": round(took, 2), "per_second": round(got / took, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--only", choices=("postgresql", "rabbitmq", "redis"), action="append")
    parser.add_argument("--out", type=Path, help="also write the result here (bench/results/DATE-node-limits.json)")
    args = parser.parse_args()
    parts = args.only or ["postgresql", "rabbitmq", "redis"]
    result: dict[str, Any] = {"seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="voice-node-limits-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        if "postgresql" in parts:
            result["postgresql"] = postgres(args.seconds, workdir)
        if "rabbitmq" in parts:
            step("rabbitmq: one quorum queue on a three-node cluster")
            result["rabbitmq"] = quorum_leader(args.seconds, workdir)
        if "redis" in parts:
            result["redis"] = cache_shard(args.seconds, workdir)
    print(json.dumps(result, indent=2))
    if args.out:
        command = "python -m bench.node_limits " + " ".join(
            [f"--seconds {args.seconds}", *(f"--only {p}" for p in args.only or [])])
        write_result(args.out, "node-limits", f".venv/bin/{command}", result)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
