"""Redis commands per event, end to end: what one accepted and applied webhook costs Redis.

    .venv/bin/python -m bench.redis_ops [--events 500]

Runs the service as the Procfile does (tests.e2e.stack: gunicorn, one Celery worker, a
redis-server of its own, SQLite), once with Redis as the broker and once with RabbitMQ (a virtual
host of its own on the machine's server) and Redis only as the dedup cache. It posts distinct
events, waits until every one is applied and nothing is queued or pending, and divides the change
in Redis's ``INFO commandstats`` (commands run inside scripts included) by the number of events.
Idle polling (the workers' BRPOP timeouts, the sweeper) is in the figure too: the count is of a
busy stack, not of the ideal path. Nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import redis

from bench.run import write_result
from tests.e2e.stack import Stack
from tests.faults.scenarios import make_events, post_all, wait_until_applied
from tests.support import rabbitmq_vhost


def commandstats(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in client.info("commandstats").items()}


def measure(events: int, broker_url: str | None) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        env = {"CELERY_BROKER_URL": broker_url} if broker_url else {}
        stack = Stack(workdir, f"sqlite:///{workdir / 'voice.db'}", **env)
        try:
            stack.start()
            client = redis.Redis.from_url(stack.redis.url)
            batch = make_events(sessions=events // 2, participants=2, per_session=2, seed=1, prefix="ops")
            before = commandstats(client)
            answers = post_all(stack, batch, threads=4)
            wait_until_applied(stack, batch, timeout=300)
            stack.wait_until_idle()
            after = commandstats(client)
            client.close()
        finally:
            stack.stop()
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    per_event = {name: round(calls / len(batch), 2) for name, calls in sorted(delta.items()) if calls}
    return {"events": len(batch), "answered_200": sum(1 for a in answers if a[-1].status == 200),
            "commands_per_event": round(sum(delta.values()) / len(batch), 2), "by_command": per_event}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--out", type=Path, help="also write the result here (bench/results/DATE-redis-ops.json)")
    args = parser.parse_args()
    result = {"redis_broker": measure(args.events, None)}
    with rabbitmq_vhost() as broker_url:
        result["rabbitmq_broker"] = measure(args.events, broker_url)
    print(json.dumps(result, indent=2))
    if args.out:
        write_result(args.out, "redis-ops", f".venv/bin/python -m bench.redis_ops --events {args.events}", result)


if __name__ == "__main__":
    main()
