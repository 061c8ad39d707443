"""The webhook with one part taken out or swapped, for ``bench.ack_parts``: what each part of the
acknowledgement costs under gunicorn, where the parts cost more than they do alone (the profile
through Flask's test client, ``bench.profile_ack --breakdown``).

    gunicorn -c gunicorn.conf.py bench.ack_variants:app          # VOICE_BENCH_VARIANT picks the variant
    gunicorn -c gunicorn.conf.py bench.ack_variants:bare_round_trip

``VOICE_BENCH_VARIANT`` (for ``app``): ``no-publish`` (the task is not sent: nothing reaches the
broker) or ``round-trip`` (the publish replaced by one Redis PING on the service's own client); unset,
the service unchanged. Never used by the service: a benchmark's stand-in only.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from flask import Flask, jsonify

import app.intake.webhook as webhook
from wsgi import app

VARIANT = os.environ.get("VOICE_BENCH_VARIANT", "")
if VARIANT == "no-publish":
    webhook.enqueue = lambda event, received_at, request_id: None
elif VARIANT == "round-trip":
    _client = app.extensions["redis"]
    webhook.enqueue = lambda event, received_at, request_id: _client.ping()
elif VARIANT:
    raise SystemExit(f"VOICE_BENCH_VARIANT must be no-publish or round-trip, got {VARIANT!r}")

# bench/bare.py's endpoint plus one Redis round trip: what a round trip costs a bare endpoint.
bare_round_trip = Flask(__name__)
_bare_client = redis.Redis.from_url(os.environ["REDIS_URL"])


@bare_round_trip.post("/api/v1/voice/webhook")
def bare_webhook() -> Any:
    _bare_client.ping()
    return jsonify(status="webhook_processed", session_id="ATVoice_bench")
