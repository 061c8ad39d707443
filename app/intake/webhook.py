"""POST /api/v1/voice/webhook: authenticate, validate, enqueue, answer. Nothing else."""

from __future__ import annotations

import time
from dataclasses import replace

import structlog
from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.exceptions import ClientDisconnected

from app.base import metrics
from app.base.errors import BodyTimeout, PayloadTooLarge
from app.base.logs import mask_phone
from app.base.security import check_client_address, check_webhook_auth
from app.base.timeutil import utcnow
from app.payload.africastalking import IN_PROGRESS
from app.payload.events import decode_body, parse_event
from app.plumbing.publish import enqueue

bp = Blueprint("webhook", __name__, url_prefix="/api/v1/voice")
log = structlog.get_logger(__name__)


@bp.post("/webhook")
def receive() -> Response:
    g.webhook_started = time.perf_counter()
    received_at = utcnow()
    settings = current_app.extensions["settings"]
    body = _read_body(settings.max_content_length)
    check_client_address(settings, request)
    webhook_id = check_webhook_auth(settings, request, body)
    event = replace(parse_event(decode_body(request.mimetype, body)), idempotency_key=webhook_id)
    g.session_id, g.phone_number = event.session_id, event.phone_number
    enqueue(event, received_at, g.request_id)
    if event.unknown_values:
        metrics.note_unknown_at_values(event.unknown_values)
    if event.status == IN_PROGRESS:  # a live call: AT wants its next instructions
        return Response(settings.voice_active_call_xml, content_type="application/xml; charset=utf-8")
    return jsonify(status="webhook_processed", session_id=event.session_id)


# A 64 KiB body arrives in well under a second; a client that stalls longer holds a server
# thread for nothing (gunicorn has no body-read timeout of its own).
BODY_READ_TIMEOUT_SECONDS = 10.0


def _read_body(limit: int) -> bytes:
    """The raw body, refused past ``limit`` or when it stalls, with or without a declared length."""
    too_large = PayloadTooLarge(f"body is larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        sock.settimeout(BODY_READ_TIMEOUT_SECONDS)
    try:
        if request.content_length is not None:
            return request.get_data(cache=True)
        if not request.environ.get("wsgi.input_terminated"):
            return b""  # no length and no end marker: nothing can be read safely
        # A chunked body: read the server's de-chunked input directly, one byte past the limit,
        # since werkzeug's own cap stops at the limit without telling whether more was sent.
        body = request.environ["wsgi.input"].read(limit + 1)
        if len(body) > limit:
            raise too_large
        return body
    except (TimeoutError, ClientDisconnected):
        raise BodyTimeout(f"body not received within {BODY_READ_TIMEOUT_SECONDS:g} seconds") from None
    finally:
        if sock is not None:
            sock.settimeout(None)


@bp.after_request
def _record(response: Response) -> Response:
    """One log line and one metric sample per webhook, whatever its answer."""
    started = g.get("webhook_started")
    elapsed = time.perf_counter() - started if started is not None else 0.0
    outcome = "accepted" if response.status_code == 200 else "refused"
    reason = "ok" if response.status_code == 200 else _reason(response)
    metrics.observe_webhook(outcome, reason, elapsed)
    log.info(
        "webhook",
        status_code=response.status_code,
        outcome=outcome,
        reason=reason,
        session_id=g.get("session_id"),
        phone_number=mask_phone(g.get("phone_number")),
        request_id=g.get("request_id"),
        ms=round(elapsed * 1000, 2),
    )
    return response


def _reason(response: Response) -> str:
    return {
        400: "invalid",
        408: "body_timeout",
        401: "unauthenticated",
        403: "forbidden",
        405: "method_not_allowed",
        413: "too_large",
        415: "unsupported_media_type",
        503: "queue_unavailable",
    }.get(response.status_code, "error")
