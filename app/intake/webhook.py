"""POST /api/v1/voice/webhook: authenticate, validate, enqueue, answer. Nothing else.

The webhook is answered by a WSGI application of its own (``WebhookEndpoint``), ahead of Flask's:
Flask's request and app contexts, its URL matching, request hooks and response building cost a
webhook more CPU than the rest of its checks together (``python -m bench.ack_parts``: "the
service's Flask app" in ``bench/results/2026-12-03-ack-parts.json``). The request is werkzeug's,
as Flask's is; the answers, headers, log line and metrics are the ones the rest of the service
gives (``app.base.errors``, ``app.register_request_hooks``). Every other method and path goes on
to Flask, which still holds the route (the 405 for other methods, OPTIONS, the OpenAPI
document's list of routes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog
from flask import Blueprint
from werkzeug.exceptions import ClientDisconnected
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wrappers import Request

from app.base import metrics
from app.base.errors import BodyTimeout, PayloadTooLarge, WebhookError
from app.base.logs import REQUEST_ID_HEADER, mask_phone, request_id_of
from app.base.security import check_client_address, check_webhook_auth
from app.base.timeutil import utcnow
from app.payload.africastalking import IN_PROGRESS
from app.payload.events import Event, decode_body, parse_event
from app.plumbing.publish import enqueue

if TYPE_CHECKING:
    from flask import Flask

PATH = "/api/v1/voice/webhook"
JSON = "application/json"
XML = "application/xml; charset=utf-8"

bp = Blueprint("webhook", __name__, url_prefix="/api/v1/voice")
log = structlog.get_logger(__name__)

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@bp.post("/webhook")
def receive() -> None:
    """The route as Flask's URL map lists it; a POST is answered by WebhookEndpoint first."""
    raise RuntimeError(f"POST {PATH} reached Flask: WebhookEndpoint is not in front of the app")


class WebhookEndpoint:
    """WSGI: a POST to the webhook's path is answered here, anything else by ``flask_app``."""

    def __init__(self, app: Flask, flask_app: WSGIApp) -> None:
        self.app = app
        self.flask_app = flask_app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH or environ.get("REQUEST_METHOD", "").upper() != "POST":
            return self.flask_app(environ, start_response)
        started = time.perf_counter()
        request_id = request_id_of(environ)
        parsed: list[Event] = []  # the event once its body parsed: its session and phone for the log line
        headers: dict[str, str] = {}
        try:
            status, content_type, body = 200, *self.answer(Request(environ), request_id, parsed)
        except WebhookError as error:
            status, content_type, body, headers = error.status_code, JSON, _json(error.body()), error.headers()
        except Exception as error:  # answered 500 with no detail, as the service's error handler does
            log.exception("unhandled_error", error_type=type(error).__name__)
            status, content_type, body = 500, JSON, _json({"error": "internal server error"})
        record(status, time.perf_counter() - started, parsed[0] if parsed else None, request_id)
        start_response(_STATUS_LINES.get(status) or f"{status} {HTTP_STATUS_CODES.get(status, 'Error')}", [
            ("Content-Type", content_type), ("Content-Length", str(len(body))), *headers.items(),
            (REQUEST_ID_HEADER, request_id), ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"),
        ])
        return [body]

    def answer(self, request: Request, request_id: str, parsed: list[Event]) -> tuple[str, bytes]:
        """The checks in order, then the publish; (content type, body) once the broker holds the task."""
        received_at = utcnow()
        settings = self.app.extensions["settings"]
        body = _read_body(request, settings.max_content_length)
        check_client_address(settings, request)
        webhook_id = check_webhook_auth(settings, request, body)
        event = parse_event(decode_body(request.mimetype, body))
        if webhook_id is not None:  # Standard Webhooks named the delivery: its id is the event's key
            event = replace(event, idempotency_key=webhook_id)
        parsed.append(event)
        enqueue(event, received_at, request_id, app=self.app)
        if event.unknown_values:
            metrics.note_unknown_at_values(event.unknown_values)
        if event.status == IN_PROGRESS:  # a live call: AT wants its next instructions
            return XML, settings.voice_active_call_xml.encode()
        return JSON, _json({"status": "webhook_processed", "session_id": event.session_id})


def _json(value: dict[str, Any]) -> bytes:
    """As Flask's jsonify writes it outside debug mode: compact, ASCII, keys in order, a newline."""
    return (json.dumps(value, separators=(",", ":")) + "\n").encode()


# A 64 KiB body arrives in well under a second; a client that stalls longer holds a server
# thread for nothing (gunicorn has no body-read timeout of its own).
BODY_READ_TIMEOUT_SECONDS = 10.0


def _read_body(request: Request, limit: int) -> bytes:
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


def record(status: int, elapsed: float, event: Event | None, request_id: str) -> None:
    """One log line and one metric sample per webhook, whatever its answer."""
    outcome = "accepted" if status == 200 else "refused"
    reason = "ok" if status == 200 else REASONS.get(status, "error")
    metrics.observe_webhook(outcome, reason, elapsed)
    log.info(
        "webhook",
        status_code=status,
        outcome=outcome,
        reason=reason,
        session_id=event.session_id if event else None,
        phone_number=mask_phone(event.phone_number) if event else None,
        request_id=request_id,
        ms=round(elapsed * 1000, 2),
    )


REASONS = {
    400: "invalid",
    408: "body_timeout",
    401: "unauthenticated",
    403: "forbidden",
    413: "too_large",
    415: "unsupported_media_type",
    503: "queue_unavailable",
}
_STATUS_LINES = {code: f"{code} {HTTP_STATUS_CODES[code]}" for code in (200, 500, *REASONS)}
