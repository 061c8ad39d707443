"""Errors are values: each carries its HTTP status, and one handler turns them into JSON."""

from __future__ import annotations

from typing import Any

import structlog
from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

log = structlog.get_logger(__name__)


class WebhookError(Exception):
    """A webhook refused; answered as ``{"status": "webhook_error", "error": ...}``."""

    status_code = 400
    reason = "invalid"

    def __init__(self, message: str, session_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.session_id = session_id

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": "webhook_error", "error": self.message}
        if self.session_id is not None:
            body["session_id"] = self.session_id
        return body


class PayloadTooLarge(WebhookError):
    status_code = 413
    reason = "too_large"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}  # the rest of the body is not read, so the connection ends


class BodyTimeout(WebhookError):
    """The client stopped sending its body; the connection is closed, not kept for it."""

    status_code = 408
    reason = "body_timeout"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class Forbidden(WebhookError):
    status_code = 403
    reason = "forbidden"


class Unauthenticated(WebhookError):
    status_code = 401
    reason = "unauthenticated"


class UnsupportedMediaType(WebhookError):
    status_code = 415
    reason = "unsupported_media_type"


class InvalidPayload(WebhookError):
    status_code = 400
    reason = "invalid"


class QueueUnavailable(WebhookError):
    """The broker did not take the task: 503 so that Africa's Talking sends it again."""

    status_code = 503
    reason = "queue_unavailable"
    retry_after_seconds = 5

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class ApiError(Exception):
    """A read-API or operations error; answered as ``{"error": ...}``."""

    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ApiError):
    status_code = 400


class NotAuthorized(ApiError):
    status_code = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="voice"'}


class NotFound(ApiError):
    status_code = 404


class Unavailable(ApiError):
    """This process cannot answer now, another moment (or another server) can: 503 with
    Retry-After, so that a client waits and asks again rather than giving up."""

    status_code = 503
    retry_after_seconds = 5

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


def register_errorhandlers(app: Flask) -> None:
    """Answer every error as JSON, and never with a stack trace."""

    @app.errorhandler(WebhookError)
    def webhook_error(error: WebhookError) -> ResponseReturnValue:
        return jsonify(error.body()), error.status_code, error.headers()

    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> ResponseReturnValue:
        return jsonify({"error": error.message}), error.status_code, error.headers()

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> ResponseReturnValue:
        code = error.code or 500
        message = (error.name or "error").lower()
        return jsonify({"error": message}), code, _allow_header(error)

    @app.errorhandler(OperationalError)
    def database_unavailable(error: OperationalError) -> ResponseReturnValue:
        """The database cannot answer now (no primary during a failover, a refused or dropped
        connection, a statement or lock timeout, SQLite busy): a read is worth asking again in a
        moment, so 503 with Retry-After rather than 500. The webhook never reaches this: its
        acknowledgement needs no database."""
        if _sqlite_fault(error):
            return unexpected_error(error)
        log.warning("database_unavailable", error_type=type(error.orig).__name__)
        retry_after = {"Retry-After": str(Unavailable.retry_after_seconds)}
        return jsonify({"error": "database unavailable: retry"}), 503, retry_after

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> ResponseReturnValue:
        log.exception("unhandled_error", error_type=type(error).__name__)
        return jsonify({"error": "internal server error"}), 500


def _sqlite_fault(error: OperationalError) -> bool:
    """SQLite names a missing table or a bad statement an OperationalError too: those are faults
    (500), not a moment's unavailability; only a busy or locked database is worth a retry."""
    if type(error.orig).__module__ != "sqlite3":
        return False
    message = str(error.orig).lower()
    return "locked" not in message and "busy" not in message


def _allow_header(error: HTTPException) -> dict[str, str]:
    valid = getattr(error, "valid_methods", None)
    return {"Allow": ", ".join(valid)} if valid else {}
