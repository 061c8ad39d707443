"""Where the webhook's acknowledgement spends its CPU: cProfile (process CPU time, so other load on
the machine does not distort it) over N webhooks through Flask's test client (no HTTP server, so
the profile is the service's own code), on a Redis of its own or RabbitMQ.

    python -m bench.profile_ack                      # Redis broker, 2,000 webhooks
    python -m bench.profile_ack --broker rabbitmq    # a virtual host of its own on the machine's RabbitMQ
    python -m bench.profile_ack --top 40 --sort tottime
    python -m bench.profile_ack --time-only [--no-hiredis]   # microseconds per webhook, no profiler
    python -m bench.profile_ack --breakdown 2>/dev/null      # CPU of each part of the ack, timed alone
"""

from __future__ import annotations

import sys

if "--no-hiredis" in sys.argv:  # before redis is imported: redis-py then parses replies in Python
    sys.modules["hiredis"] = None  # type: ignore[assignment]

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from app import create_app
from config import Settings
from tests.conftest import migrate
from tests.support import RedisServer, rabbitmq_vhost

URL = "/api/v1/voice/webhook"


def body(i: int) -> str:
    return urlencode({"sessionId": f"ATVoice_prof_{i // 3}", "phoneNumber": f"+2547{i:08d}",
                      "duration": str(i % 3600), "status": "completed"})


@contextlib.contextmanager
def broker(kind: str) -> Iterator[str]:
    if kind == "rabbitmq":
        with rabbitmq_vhost() as url:
            yield url
    else:
        yield ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", default="cumulative")
    parser.add_argument("--time-only", action="store_true", help="time the webhooks without the profiler")
    parser.add_argument("--no-hiredis", action="store_true", help="parse Redis replies in Python")
    parser.add_argument("--breakdown", action="store_true",
                        help="time each part of the ack on its own (median of 5 runs of N/5 calls)")
    parser.add_argument("--log-level", default="INFO", help="INFO, as in production, writes one line per webhook "
                        "(to stderr: send it to /dev/null)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="voice-profile-") as workdir:
        server = RedisServer(Path(workdir) / "redis").start()
        try:
            database_url = f"sqlite:///{workdir}/voice.db"
            migrate(database_url, server.url)
            with broker(args.broker) as broker_url:
                settings = Settings(database_url=database_url, redis_url=server.url, celery_broker_url=broker_url,
                                    log_level=args.log_level)
                app = create_app(settings)
                client = app.test_client()
                headers = {"Content-Type": "application/x-www-form-urlencoded"}
                for i in range(50):  # warm up: connections, queue declarations, scripts
                    if client.post(URL, data=body(10**7 + i), headers=headers).status_code != 200:
                        raise SystemExit("the webhook did not answer 200: is the broker up?")
                if args.breakdown:
                    with app.app_context():
                        breakdown(app, max(200, args.n // 5))
                    return 0
                # CPU time, not wall time: the figures hold on a machine other processes keep busy.
                profile = cProfile.Profile(time.process_time)
                started = time.process_time()
                if not args.time_only:
                    profile.enable()
                for i in range(args.n):
                    client.post(URL, data=body(i), headers=headers)
                profile.disable()
                elapsed = time.process_time() - started
        finally:
            server.stop()
    import redis.utils

    how = "without the profiler" if args.time_only else "under the profiler"
    print(f"{args.n} webhooks on {args.broker} (hiredis: {redis.utils.HIREDIS_AVAILABLE}): "
          f"{elapsed * 1e6 / args.n:.0f} us of CPU each {how}")
    if args.time_only:
        return 0
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats(args.sort).print_stats(args.top)
    print(out.getvalue())
    return 0


def cpu_us(work: Callable[[int], object], n: int) -> float:
    """Median CPU microseconds per call over five runs of ``n`` calls."""
    runs = []
    for _ in range(5):
        started = time.process_time()
        for i in range(n):
            work(i)
        runs.append((time.process_time() - started) / n * 1e6)
    return round(statistics.median(runs), 1)


def breakdown(app: Any, n: int) -> None:
    """The ack's parts, each timed alone in this process (a profiler inflates call-heavy code)."""
    import structlog

    from app.base import metrics
    from app.base.timeutil import utcnow
    from app.payload.events import FORM, decode_body, parse_event
    from app.plumbing.publish import enqueue

    client, headers = app.test_client(), {"Content-Type": FORM}
    bodies = [body(10**6 + i).encode() for i in range(n * 10)]
    events = [parse_event(decode_body(FORM, raw)) for raw in bodies]
    celery, log, now = app.extensions["celery"], structlog.get_logger("app.intake.webhook"), utcnow()
    parts: list[tuple[str, Callable[[int], object]]] = [
        ("whole request through the test client", lambda i: client.post(URL, data=bodies[i], headers=headers)),
        ("decode and validate the body", lambda i: parse_event(decode_body(FORM, bodies[i]))),
        ("enqueue: build and publish the task", lambda i: enqueue(events[n + i], now, "r")),
        ("  of it: Celery building the message", lambda i: celery.amqp.create_task_message(
            "id", "voice.apply_webhook_event", (events[i].to_message(), "t", None), {})),
        ("  of it: one Redis round trip (PING)", lambda i: app.extensions["redis"].ping()),
        ("the log line", lambda i: log.info("webhook", status_code=200, outcome="accepted", reason="ok",
                                            session_id="S", phone_number="+254******678", request_id="r", ms=1.0)),
        ("the metrics", lambda i: metrics.observe_webhook("accepted", "ok", 0.001)),
    ]
    for name, work in parts:
        print(f"{name:45s} {cpu_us(work, n):8.1f} us of CPU", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
