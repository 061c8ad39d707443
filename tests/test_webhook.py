"""POST /api/v1/voice/webhook: the order of checks, every answer, and nothing written on refusal."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import json
import logging
import time

import pytest
import redis
from flask import Flask
from flask import request as flask_request
from flask.testing import FlaskClient

import app.intake.webhook as webhook
from app.base import logs, metrics
from app.plumbing.pending import PENDING_DATA
from app.plumbing.queues import WEBHOOK_QUEUE
from config import Settings
from tests.support import free_port

URL = "/api/v1/voice/webhook"
FORM = "application/x-www-form-urlencoded"
SEED_COMPLETED = (
    "sessionId=ATVoice_a1b2c3d4e5f6&phoneNumber=%2B254712345678&recordingUrl=https%3A%2F%2Fvoice.africastalking.com"
    "%2Frecordings%2Fa1b2c3d4e5f6.mp3&duration=420&status=completed"
)
SEED_FAILED = "sessionId=ATVoice_x9y8z7w6v5u4&phoneNumber=%2B254787654321&status=no-answer"


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """The webhook writes no row itself: one database is enough here."""
    return sqlite_url


def written(app: Flask) -> tuple[int, int]:
    """(messages in the webhook queue, events in the pending set)."""
    client: redis.Redis = app.extensions["redis"]
    return client.llen(WEBHOOK_QUEUE), client.hlen(PENDING_DATA)


def with_settings(make_app, settings: Settings, **changes: object) -> FlaskClient:
    return make_app(dataclasses.replace(settings, **changes)).test_client()


@pytest.mark.parametrize(
    ("body", "session_id"), [(SEED_COMPLETED, "ATVoice_a1b2c3d4e5f6"), (SEED_FAILED, "ATVoice_x9y8z7w6v5u4")]
)
def test_seed_examples_are_acknowledged_after_the_broker_holds_them(
    client: FlaskClient, app: Flask, body: str, session_id: str
) -> None:
    response = client.post(URL, data=body, content_type=FORM)
    assert response.status_code == 200
    assert response.get_json() == {"status": "webhook_processed", "session_id": session_id}
    assert written(app) == (1, 1)


def test_json_body_from_the_curl_example(client: FlaskClient, app: Flask) -> None:
    response = client.post(URL, json={"sessionId": "S", "phoneNumber": "+254712345678", "recordingUrl": "",
                                      "duration": 123, "status": "completed"})
    assert response.status_code == 200
    assert response.get_json()["session_id"] == "S"
    assert written(app) == (1, 1)


def test_request_id_is_echoed_or_made(client: FlaskClient) -> None:
    given = client.post(URL, data=SEED_FAILED, content_type=FORM, headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    made = client.post(URL, data=SEED_FAILED, content_type=FORM, headers={"X-Request-ID": "bad id\u00e9"})
    assert len(made.headers["X-Request-ID"]) == 32


@pytest.mark.parametrize(
    ("body", "content_type", "status", "error"),
    [
        ("sessionId=S&status=completed", "text/plain", 415, "Content-Type must be"),
        ("sessionId=S&status=completed", None, 415, "Content-Type must be"),
        ("status=completed", FORM, 400, "sessionId is required"),
        ("sessionId=S&status=maybe", FORM, 400, "status must be one of"),
        ("sessionId=S&status=busy&duration=999999", FORM, 400, "duration must be an integer between 0 and 604800"),
        ("sessionId=S&status=busy&phoneNumber=0712", FORM, 400, "phoneNumber must be in E.164"),
        ("sessionId=S&status=busy&recordingUrl=javascript:alert(1)", FORM, 400, "recordingUrl must be"),
        ("{\"sessionId\": [\"S\"], \"status\": \"busy\"}", "application/json", 400, "sessionId must be a string"),
        ("not json", "application/json", 400, "body is not valid JSON"),
        ("sessionId=S%00&status=busy", FORM, 400, "sessionId must not contain control characters"),
    ],
)
def test_refusals_name_the_problem_and_write_nothing(
    client: FlaskClient, app: Flask, body: str, content_type: str | None, status: int, error: str
) -> None:
    response = client.post(URL, data=body, content_type=content_type)
    assert response.status_code == status
    payload = response.get_json()
    assert payload["status"] == "webhook_error"
    assert error in payload["error"]
    assert "Traceback" not in response.get_data(as_text=True)
    assert written(app) == (0, 0)


def test_error_body_carries_the_session_id_when_readable(client: FlaskClient) -> None:
    response = client.post(URL, data="sessionId=S1&status=busy&duration=x", content_type=FORM)
    assert response.get_json()["session_id"] == "S1"


def test_too_large_comes_before_everything_else(make_app, settings: Settings, app: Flask) -> None:
    client = with_settings(make_app, settings, webhook_tokens=("t",), webhook_allowed_ips=())
    response = client.post(URL, data="x" * 70000, content_type="text/plain")
    assert response.status_code == 413
    assert response.get_json()["status"] == "webhook_error"


def test_too_large_without_a_content_length(client: FlaskClient) -> None:
    """A chunked body has no Content-Length: reading stops at the limit."""
    response = client.post(
        URL,
        input_stream=io.BytesIO(b"x" * 100_000),
        content_type=FORM,
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413


def test_address_allow_list_comes_before_authentication(make_app, settings: Settings) -> None:
    import ipaddress

    client = with_settings(
        make_app, settings, webhook_tokens=("t",), webhook_allowed_ips=(ipaddress.ip_network("10.0.0.0/8"),)
    )
    response = client.post(URL, data=SEED_FAILED, content_type="text/plain")
    assert response.status_code == 403
    assert response.get_json() == {"status": "webhook_error", "error": "client address not allowed"}


def test_forwarded_for_is_believed_only_from_trusted_hops(make_app, settings: Settings) -> None:
    import ipaddress

    allowed = (ipaddress.ip_network("203.0.113.0/24"),)
    untrusted = with_settings(make_app, settings, webhook_allowed_ips=allowed)
    spoofed = {"X-Forwarded-For": "203.0.113.5"}
    assert untrusted.post(URL, data=SEED_FAILED, content_type=FORM, headers=spoofed).status_code == 403
    behind_proxy = with_settings(make_app, settings, webhook_allowed_ips=allowed, trusted_proxy_count=1)
    assert behind_proxy.post(URL, data=SEED_FAILED, content_type=FORM, headers=spoofed).status_code == 200
    two_hops = {"X-Forwarded-For": "203.0.113.5, 198.51.100.7"}  # the proxy appended the real client
    assert behind_proxy.post(URL, data=SEED_FAILED, content_type=FORM, headers=two_hops).status_code == 403


def test_authentication_comes_before_content_type(make_app, settings: Settings) -> None:
    client = with_settings(make_app, settings, webhook_tokens=("t0k3n",))
    response = client.post(URL, data=SEED_FAILED, content_type="text/plain")
    assert response.status_code == 401
    assert response.get_json() == {"status": "webhook_error", "error": "webhook authentication failed"}


@pytest.mark.parametrize(("token", "status"), [("t0k3n", 200), ("other", 200), ("wrong", 401), ("", 401)])
def test_token_in_the_callback_url(make_app, settings: Settings, token: str, status: int) -> None:
    client = with_settings(make_app, settings, webhook_tokens=("t0k3n", "other"))
    assert client.post(f"{URL}?token={token}", data=SEED_FAILED, content_type=FORM).status_code == status


def sign(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (lambda body: sign("new-secret", body), 200),
        (lambda body: "sha256=" + sign("old-secret", body), 200),  # rotation: the old secret still works
        (lambda body: sign("new-secret", body).upper(), 200),
        (lambda body: sign("another", body), 401),
        (lambda body: sign("new-secret", body + b"&x=1"), 401),
        (lambda body: "", 401),
    ],
)
def test_hmac_signature_of_the_raw_body(make_app, settings: Settings, header, status: int) -> None:
    client = with_settings(make_app, settings, webhook_secrets=("new-secret", "old-secret"))
    body = SEED_COMPLETED.encode()
    response = client.post(URL, data=body, content_type=FORM, headers={"X-Webhook-Signature": header(body)})
    assert response.status_code == status


def test_redis_down_answers_503_with_retry_after_within_a_second(make_app, settings: Settings) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    client = with_settings(make_app, settings, redis_url=nowhere)
    for _ in range(3):
        started = time.monotonic()
        response = client.post(URL, data=SEED_COMPLETED, content_type=FORM)
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert response.headers["Retry-After"].isdigit()
        assert response.get_json() == {"status": "webhook_error", "error": "the queue is unavailable; try again",
                                       "session_id": "ATVoice_a1b2c3d4e5f6"}
        assert elapsed < 1.0


def test_broker_down_with_redis_up_still_answers_503(make_app, settings: Settings, app: Flask) -> None:
    client = with_settings(make_app, settings, celery_broker_url=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    response = client.post(URL, data=SEED_COMPLETED, content_type=FORM)
    assert response.status_code == 503
    assert time.monotonic() - started < 1.0


def test_other_methods_and_paths_answer_json(client: FlaskClient) -> None:
    response = client.get(URL)
    assert response.status_code == 405
    assert response.get_json() == {"error": "method not allowed"}
    missing = client.get("/nope")
    assert missing.status_code == 404
    assert json.loads(missing.data) == {"error": "not found"}


def test_api_headers(client: FlaskClient) -> None:
    response = client.post(URL, data=SEED_FAILED, content_type=FORM)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Type"] == "application/json"


@pytest.fixture
def json_app(make_app, settings: Settings) -> Flask:
    return make_app(dataclasses.replace(settings, log_format="json"))


def service_lines(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Where the service's own log lines go, for this test (after the app was made)."""
    lines = io.StringIO()
    monkeypatch.setattr(logs, "_handler", logging.StreamHandler(lines))
    return lines


def webhook_lines(lines: io.StringIO) -> list[dict]:
    return [line for line in map(json.loads, lines.getvalue().splitlines()) if line["event"] == "webhook"]


@pytest.mark.parametrize(("body", "content_type", "status", "reason", "session_id"), [
    (SEED_COMPLETED, FORM, 200, "ok", "ATVoice_a1b2c3d4e5f6"),
    ("sessionId=S&status=maybe", FORM, 400, "invalid", None),
    (SEED_COMPLETED, "text/plain", 415, "unsupported_media_type", None),
])
def test_each_answer_is_one_log_line_and_one_sample(json_app: Flask, monkeypatch: pytest.MonkeyPatch,
                                                    body: str, content_type: str, status: int, reason: str,
                                                    session_id: str | None) -> None:
    outcome = "accepted" if status == 200 else "refused"
    samples = metrics.WEBHOOKS.labels(outcome=outcome, reason=reason)
    before = samples._value.get()
    lines = service_lines(monkeypatch)
    response = json_app.test_client().post(URL, data=body, content_type=content_type, headers={"X-Request-ID": "req-7"})
    assert response.status_code == status
    assert samples._value.get() == before + 1
    [line] = webhook_lines(lines)
    assert line["status_code"] == status and line["outcome"] == outcome and line["reason"] == reason
    assert line["session_id"] == session_id and line["request_id"] == "req-7"
    assert line["phone_number"] == ("+254******678" if status == 200 else None)  # masked, never whole
    assert "254712345678" not in lines.getvalue()


def test_an_unexpected_error_is_a_bare_500_with_its_line(json_app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object) -> None:
        raise KeyError("a secret detail")

    monkeypatch.setattr(webhook, "decode_body", broken)
    lines = service_lines(monkeypatch)
    response = json_app.test_client().post(URL, data=SEED_COMPLETED, content_type=FORM)
    assert response.status_code == 500
    assert response.get_data() == b'{"error":"internal server error"}\n'
    assert response.headers["X-Content-Type-Options"] == "nosniff" and len(response.headers["X-Request-ID"]) == 32
    assert [line["reason"] for line in webhook_lines(lines)] == ["error"]
    assert "unhandled_error" in lines.getvalue() and "KeyError" in lines.getvalue()  # the trace is logged only
    assert written(json_app) == (0, 0)


def test_the_post_is_answered_ahead_of_flask(client: FlaskClient, app: Flask) -> None:
    """Flask's hooks never run for the webhook's POST (its contexts cost more than the checks);
    they still do for the path's other methods, which Flask answers."""
    seen: list[str] = []
    app.before_request(lambda: seen.append(flask_request.method))
    assert client.post(URL, data=SEED_FAILED, content_type=FORM).status_code == 200
    assert set(client.options(URL).headers["Allow"].split(", ")) == {"OPTIONS", "POST"}  # in no set order
    assert client.get(URL).status_code == 405
    assert seen == ["OPTIONS", "GET"]
    with app.test_request_context(URL, method="POST"), pytest.raises(RuntimeError, match="reached Flask"):
        webhook.receive()  # the route Flask lists, should a POST ever get past the endpoint
