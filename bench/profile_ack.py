"""Where the webhook's acknowledgement spends its CPU: cProfile (process CPU time, so other load on
the machine does not distort it) over N webhooks through Flask's test client (no HTTP server, so
the profile is the service's own code), on a Redis of its own or RabbitMQ.

    python -m bench.profile_ack                      # Redis broker, 2,000 webhooks
    python -m bench.profile_ack --broker rabbitmq    # a virtual host of its own on the machine's RabbitMQ
    python -m bench.profile_ack --top 40 --sort tottime
    python -m bench.profile_ack --time-only [--no-hiredis]   # microseconds per webhook, no profiler
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
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
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


if __name__ == "__main__":
    raise SystemExit(main())
