"""The webhook with one part taken out or swapped, for ``bench.ack_parts``: what each part of the
acknowledgement costs under gunicorn, where the parts cost more than they do alone (the profile
through Flask's test client, ``bench.profile_ack --breakdown``).

    gunicorn -c gunicorn.conf.py bench.ack_variants:app          # VOICE_BENCH_VARIANT picks the variant
    gunicorn -c gunicorn.conf.py bench.ack_variants:bare_round_trip
    gunicorn -c gunicorn.conf.py bench.ack_variants:bare_confirmed_publish   # CELERY_BROKER_URL: an amqp:// URL

``VOICE_BENCH_VARIANT`` (for ``app``): ``no-publish`` (the task is not sent: nothing reaches the
broker) or ``round-trip`` (the publish replaced by one Redis PING on the service's own client); unset,
the service unchanged. Never used by the service: a benchmark's stand-in only.
"""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import unquote, urlsplit

import amqp
import redis
from flask import Flask, jsonify

import app.intake.webhook as webhook
from bench.bare import FLOOR_QUEUE
from wsgi import app

VARIANT = os.environ.get("VOICE_BENCH_VARIANT", "")
if VARIANT == "no-publish":
    webhook.enqueue = lambda event, received_at, request_id, app=None: None
elif VARIANT == "round-trip":
    _client = app.extensions["redis"]
    webhook.enqueue = lambda event, received_at, request_id, app=None: _client.ping()
elif VARIANT:
    raise SystemExit(f"VOICE_BENCH_VARIANT must be no-publish or round-trip, got {VARIANT!r}")

# bench/bare.py's endpoint plus one Redis round trip: what a round trip costs a bare endpoint.
bare_round_trip = Flask(__name__)
_bare_client = redis.Redis.from_url(os.environ["REDIS_URL"])


@bare_round_trip.post("/api/v1/voice/webhook")
def bare_webhook() -> Any:
    _bare_client.ping()
    return jsonify(status="webhook_processed", session_id="ATVoice_bench")


# bench/bare.py's endpoint plus one confirmed, persistent publish on RabbitMQ (py-amqp, what kombu
# publishes with, publisher confirms on as the service has them): the floor of a webhook's publish
# on RabbitMQ. A message of a webhook task's size (900 bytes) to a durable queue of its own; one
# connection per server thread (a py-amqp channel is not shared between threads).
_FLOOR_BODY = b"x" * 900
_floor = threading.local()


def _floor_channel() -> amqp.Channel:
    channel = getattr(_floor, "channel", None)
    if channel is None:
        url = urlsplit(os.environ["CELERY_BROKER_URL"])
        connection = amqp.Connection(f"{url.hostname}:{url.port or 5672}", userid=unquote(url.username or "guest"),
                                     password=unquote(url.password or "guest"),
                                     virtual_host=unquote(url.path[1:]) or "/", confirm_publish=True)
        connection.connect()
        channel = _floor.channel = connection.channel()
        channel.queue_declare(FLOOR_QUEUE, durable=True, auto_delete=False)
    return channel


bare_confirmed_publish = Flask(__name__ + ".floor")


@bare_confirmed_publish.post("/api/v1/voice/webhook")
def bare_publish_webhook() -> Any:
    _floor_channel().basic_publish(amqp.Message(_FLOOR_BODY, delivery_mode=2, content_type="application/json"),
                                   exchange="", routing_key=FLOOR_QUEUE)
    return jsonify(status="webhook_processed", session_id="ATVoice_bench")
