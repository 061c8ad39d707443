"""What parts of a duplicate's cost take in the worker process, each timed alone, in one process.

    .venv/bin/python -m bench.duplicate_parts --out bench/results/DATE-duplicate-parts.json

- **The claims of a batch** of ``--batch`` duplicates (each already applied, its message recorded
  in kombu's unacknowledged hash, as a worker's batch finds them), against a redis-server of the
  bench's own: ``dedup.claim_many`` (one script for the batch) and the same claims as one pipeline
  of the single event's script (``dedup._CLAIM``, what ``claim_many`` sent before), alternating.
  Per claim: this process's CPU and the Redis server's (``INFO cpu``).
- **One ``event_applied`` line** as a batch writes it (the JSON format, INFO, to /dev/null): through
  the module's logger proxy one line at a time, and bound once with the batch's lines held
  (``logs.lines_held``).
- **An event's key** (the fingerprint: canonical JSON and SHA-256) and **a message's decoding**
  (the task message's JSON), for scale.

CPU per item, medians of ``--turns``. Progress goes to stderr, the result (JSON) to stdout and to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import structlog

from app import create_app
from app.base import logs
from app.base.timeutil import stamp, utcnow
from app.payload.envelope import Envelope
from app.payload.events import Event
from app.plumbing import dedup, pending, transport
from bench.run import step, write_result
from config import Settings
from tests.support import RedisServer


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def claims_as_pipeline(claims: list[tuple[str, str, Any]]) -> list[str]:
    """The batch's claims as one pipeline of the single event's script."""
    pipe = dedup._client().pipeline(transaction=False)
    calls = []
    for key, owner, received_at in claims:
        keys, args, delivery = dedup._claim_call(key, owner, received_at)
        pipe.eval(dedup._CLAIM, len(keys), *keys, *args)
        calls.append((owner, delivery))
    return [dedup._claim_state(answer, owner, delivery)
            for answer, (owner, delivery) in zip(pipe.execute(), calls, strict=True)]


def time_claims(client: redis.Redis, claim: Callable[[list[tuple[str, str, Any]]], list[str]],
                batch: int, rounds: int) -> tuple[float, float]:
    """CPU per claim (this process, Redis) for ``rounds`` batches of duplicates."""
    arrived = utcnow()
    keys = [f"{n:064x}" for n in range(batch)]
    for key in keys:
        client.set(dedup.DEDUP_PREFIX + key, f"{dedup.DONE}:{stamp(arrived)}")
    acks = transport._Acks
    spent_here = spent_redis = 0.0
    for _ in range(rounds):
        for n in range(batch):  # each message delivered and recorded as unacknowledged again
            tag = f"tag-{n}"
            acks.tags[f"task-{n}"], acks.ids[tag] = tag, f"task-{n}"
            client.hset("unacked", tag, "message")
            client.zadd("unacked_index", {tag: n})
        claims = [(key, f"task-{n}", arrived) for n, key in enumerate(keys)]
        redis_before, started = redis_cpu(client), time.process_time()
        answers = claim(claims)
        spent_here += time.process_time() - started
        spent_redis += redis_cpu(client) - redis_before
        if answers != ["duplicate"] * batch:
            raise SystemExit(f"the claims did not find duplicates: {answers}")
    claimed = rounds * batch
    return spent_here / claimed * 1e6, spent_redis / claimed * 1e6


def per_call(fn: Callable[[], Any], n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - started) / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=50, help="duplicates per batch (WORKER_BATCH_SIZE)")
    parser.add_argument("--rounds", type=int, default=200, help="batches per turn")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="voice-dup-parts-"))
    server = RedisServer(workdir / "redis").start()
    try:
        app = create_app(Settings(redis_url=server.url, database_url=f"sqlite:///{workdir / 'voice.db'}",
                                  log_format="json"))
        client = app.extensions["redis"]
        acks = transport._Acks
        acks.pid, acks.thread = os.getpid(), threading.get_ident()
        logs.configure_logging("INFO", "json")
        logs._handler.stream = open(os.devnull, "w")  # noqa: SIM115 - the process's whole life
        log = structlog.get_logger("app.applying.tasks")
        event = Event("ATVoice_parts_1", "completed", "+254712345678", None, 42,
                      {"sessionId": "ATVoice_parts_1", "status": "completed", "phoneNumber": "+254712345678",
                       "duration": "42"})
        envelope = Envelope(event.to_message(), utcnow().isoformat(), "0123456789abcdef")
        fields = {"outcome": "duplicate", "phone_number": logs.mask_phone(event.phone_number),
                  "status": event.status, "request_id": envelope.request_id,
                  "task_id": "0b8e7c1e-6c1f-4a5e-9d1f-0123456789ab", "session_id": event.session_id,
                  "event_key": event.key, "turned_away": "on arrival"}
        body = json.dumps([[envelope.message, envelope.received_at, envelope.request_id], {}, {}])

        def held_lines() -> None:
            bound = log.bind()
            with logs.lines_held():
                for _ in range(args.batch):
                    bound.info("event_applied", **fields)

        turns: dict[str, list[float]] = {}
        with app.app_context():
            if not pending.in_use():
                raise SystemExit("the claims need Redis as the broker (the pending set in use)")
            for turn in range(1, args.turns + 1):
                for name, claim in (("claims_one_script", dedup.claim_many), ("claims_pipeline", claims_as_pipeline)):
                    here, server_cpu = time_claims(client, claim, args.batch, args.rounds)
                    turns.setdefault(f"{name}_worker_us", []).append(here)
                    turns.setdefault(f"{name}_redis_us", []).append(server_cpu)
                turns.setdefault("log_line_proxy_us", []).append(
                    per_call(lambda: log.info("event_applied", **fields), 5000))
                turns.setdefault("log_line_bound_held_us", []).append(per_call(held_lines, 100) / args.batch)
                turns.setdefault("event_key_us", []).append(
                    per_call(lambda: Event.from_message(envelope.message).key, 5000))
                turns.setdefault("message_decode_us", []).append(per_call(lambda: json.loads(body), 5000))
                step(f"turn {turn}/{args.turns}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in turns.items()))
        result: dict[str, Any] = {"batch": args.batch, "rounds": args.rounds, "turns": args.turns,
                                  **{name: round(statistics.median(values), 2) for name, values in turns.items()},
                                  "all_turns": {name: [round(v, 2) for v in values] for name, values in turns.items()}}
    finally:
        server.stop()
    print(json.dumps(result, indent=2))
    if args.out:
        write_result(args.out, "duplicate-parts", f".venv/bin/python -m bench.duplicate_parts --batch {args.batch} "
                     f"--rounds {args.rounds} --turns {args.turns}", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
