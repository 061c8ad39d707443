"""The yardstick: a bare Flask endpoint answering the webhook's JSON, doing nothing else.

Served by the same gunicorn.conf.py as the service, so a ratio of the two is the cost of the
webhook's own work (validation, two Redis round trips, the broker publish).
"""

from flask import Flask, jsonify

app = Flask(__name__)

# The queue bench.ack_variants' confirmed-publish floor publishes to (bench.ack_cpu empties it).
FLOOR_QUEUE = "voice-bench-floor"


@app.post("/api/v1/voice/webhook")
def webhook():
    return jsonify(status="webhook_processed", session_id="ATVoice_bench")
