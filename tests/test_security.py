"""Webhook authentication schemes, failing closed, and the parser under arbitrary input."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from urllib.parse import urlencode

import pytest
from flask import Flask
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from app.base.errors import InvalidPayload, UnsupportedMediaType
from app.payload.events import FORM, JSON_TYPE, decode_body, parse_event
from app.plumbing.pending import PENDING_DATA
from config import Settings
from tests.support import ROOT

URL = "/api/v1/voice/webhook"
KEY = b"standard-webhooks-test-key-32-bytes!"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
OLD_KEY = b"the-previous-key-being-rotated-out"
OLD_SECRET = "whsec_" + base64.b64encode(OLD_KEY).decode()
BODY = b"sessionId=SW1&phoneNumber=%2B254712345678&status=completed&duration=9"


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def standard_headers(key: bytes, body: bytes, webhook_id: str = "msg_1", timestamp: int | None = None) -> dict:
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": "v1," + base64.b64encode(digest).decode(), "Content-Type": FORM}


@pytest.fixture
def signed_client(make_app, settings: Settings):
    app = make_app(dataclasses.replace(settings, webhook_secrets=(SECRET, OLD_SECRET)))
    return app, app.test_client()


def test_standard_webhooks_signature_is_accepted(signed_client) -> None:
    app, client = signed_client
    response = client.post(URL, data=BODY, headers=standard_headers(KEY, BODY))
    assert response.status_code == 200
    # webhook-id is the event's idempotency key: a second delivery of msg_1 is the same pending entry
    assert client.post(URL, data=BODY, headers=standard_headers(KEY, BODY)).status_code == 200
    [raw] = app.extensions["redis"].hvals(PENDING_DATA)
    assert json.loads(raw)["message"]["idempotency_key"] == "msg_1"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (lambda: standard_headers(OLD_KEY, BODY), 200),  # a key being rotated out still works
        (lambda: {**standard_headers(KEY, BODY), "webhook-signature": "v1,AAAA " +
                  standard_headers(KEY, BODY)["webhook-signature"]}, 200),  # several signatures, one good
        (lambda: standard_headers(b"another key", BODY), 401),
        (lambda: standard_headers(KEY, BODY + b"&x=1"), 401),  # the body was changed
        (lambda: {**standard_headers(KEY, BODY), "webhook-id": "msg_2"}, 401),  # the id was changed
        (lambda: standard_headers(KEY, BODY, timestamp=int(time.time()) - 301), 401),  # a replay
        (lambda: standard_headers(KEY, BODY, timestamp=int(time.time()) + 301), 401),
        (lambda: {**standard_headers(KEY, BODY), "webhook-timestamp": "soon"}, 401),
        (lambda: {**standard_headers(KEY, BODY), "webhook-timestamp": "\u00b2"}, 401),  # a digit to isdigit()
        (lambda: {**standard_headers(KEY, BODY), "webhook-signature": "v2,abc"}, 401),
        (lambda: {"Content-Type": FORM}, 401),
    ],
)
def test_standard_webhooks_refusals(signed_client, headers, status: int) -> None:
    _, client = signed_client
    response = client.post(URL, data=BODY, headers=headers())
    assert response.status_code == status
    if status == 401:
        assert response.get_json() == {"status": "webhook_error", "error": "webhook authentication failed"}


def test_malformed_whsec_secret_is_a_startup_error() -> None:
    from config import ConfigError

    with pytest.raises(ConfigError, match="WEBHOOK_SECRETS"):
        Settings.from_env({"WEBHOOK_SECRETS": "whsec_not*base64"})


def start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Import the WSGI entry point as gunicorn would, in a clean environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK_", "API_KEYS", "APP_ENV"))}
    return subprocess.run([sys.executable, "-c", "import wsgi"], cwd=ROOT, env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def test_production_refuses_to_start_without_webhook_auth(sqlite_url: str) -> None:
    done = start({"APP_ENV": "production", "DATABASE_URL": sqlite_url})
    assert done.returncode == 1
    assert "WEBHOOK_SECRETS or WEBHOOK_TOKENS" in done.stderr
    assert "WEBHOOK_AUTH=none" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("extra", [{"WEBHOOK_AUTH": "none"}, {"WEBHOOK_TOKENS": "t"}])
def test_production_starts_with_auth_or_an_explicit_none(sqlite_url: str, extra: dict) -> None:
    assert start({"APP_ENV": "production", "DATABASE_URL": sqlite_url, **extra}).returncode == 0


def test_api_headers_on_read_api(client, auth: dict) -> None:
    response = client.get("/api/v1/voice/recordings", headers=auth)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"


# --- the parser under arbitrary input --------------------------------------------------------

printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=128)
anything = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=50),
                     st.lists(st.integers(), max_size=3),
                     st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@given(st.binary(max_size=2000), st.sampled_from([FORM, JSON_TYPE, "text/plain", ""]))
@hypothesis_settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_bytes_are_refused_cleanly(body: bytes, mimetype: str) -> None:
    """Whatever the bytes, the parser raises nothing but the service's own refusals (random bytes
    almost never make a valid event: test_valid_payloads_are_one_event_whatever_the_encoding
    generates ones that do)."""
    with contextlib.suppress(InvalidPayload, UnsupportedMediaType):
        parse_event(decode_body(mimetype, body))


# The field rules as the contract states them, written out as literal cases (never derived from
# app.payload.events' own patterns): sessionId 1-128 printable characters, no whitespace; phoneNumber +
# and 8 to 15 digits; recordingUrl an absolute http or https URL of at most 2048 characters, empty
# meaning no recording; duration an integer from 0 to 604800; status one of completed, failed,
# busy, no-answer, rejected.
URL_2048 = "https://voice.example/" + "a" * (2048 - len("https://voice.example/"))
ATTRIBUTE = {"sessionId": "session_id", "phoneNumber": "phone_number", "recordingUrl": "recording_url",
             "duration": "duration", "status": "status"}

ACCEPTED = [  # (field, value sent, value parsed)
    pytest.param("sessionId", "A", "A", id="sessionId-one-character"),
    pytest.param("sessionId", "x" * 128, "x" * 128, id="sessionId-128-characters"),
    pytest.param("sessionId", "ATVoice_a1b2c3d4e5f6", "ATVoice_a1b2c3d4e5f6", id="sessionId-AT-style"),
    pytest.param("sessionId", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
                 id="sessionId-punctuation"),
    pytest.param("phoneNumber", "+12345678", "+12345678", id="phone-8-digits"),
    pytest.param("phoneNumber", "+254712345678", "+254712345678", id="phone-12-digits"),
    pytest.param("phoneNumber", "+123456789012345", "+123456789012345", id="phone-15-digits"),
    pytest.param("recordingUrl", "https://voice.africastalking.com/recordings/a1b2.mp3",
                 "https://voice.africastalking.com/recordings/a1b2.mp3", id="url-https"),
    pytest.param("recordingUrl", "http://10.0.0.5:8080/r?id=7#t", "http://10.0.0.5:8080/r?id=7#t",
                 id="url-http-address-port-query"),
    pytest.param("recordingUrl", URL_2048, URL_2048, id="url-2048-characters"),
    pytest.param("recordingUrl", "", None, id="url-empty-is-no-recording"),
    pytest.param("duration", 0, 0, id="duration-0"),
    pytest.param("duration", 420, 420, id="duration-420"),
    pytest.param("duration", 604800, 604800, id="duration-604800"),
    *[pytest.param("status", status, status, id=f"status-{status}")
      for status in ("completed", "failed", "busy", "no-answer", "rejected")],
]

REFUSED = [  # (field, value sent)
    pytest.param("sessionId", "", id="sessionId-empty"),
    pytest.param("sessionId", "x" * 129, id="sessionId-129-characters"),
    pytest.param("sessionId", "two words", id="sessionId-space"),
    pytest.param("sessionId", " A", id="sessionId-leading-space"),
    pytest.param("sessionId", "tab\there", id="sessionId-tab"),
    pytest.param("sessionId", "new\nline", id="sessionId-newline"),
    pytest.param("sessionId", "no\u00a0break", id="sessionId-no-break-space"),
    pytest.param("phoneNumber", "+1234567", id="phone-7-digits"),
    pytest.param("phoneNumber", "+1234567890123456", id="phone-16-digits"),
    pytest.param("phoneNumber", "254712345678", id="phone-no-plus"),
    pytest.param("phoneNumber", "+", id="phone-plus-alone"),
    pytest.param("phoneNumber", "+254 712 345 678", id="phone-spaces"),
    pytest.param("phoneNumber", "+25471234567a", id="phone-letter"),
    pytest.param("phoneNumber", "0712345678", id="phone-national"),
    pytest.param("recordingUrl", URL_2048 + "a", id="url-2049-characters"),
    pytest.param("recordingUrl", "ftp://voice.example/a.mp3", id="url-ftp"),
    pytest.param("recordingUrl", "javascript:alert(1)", id="url-javascript"),
    pytest.param("recordingUrl", "/recordings/a.mp3", id="url-path-only"),
    pytest.param("recordingUrl", "//voice.example/a.mp3", id="url-no-scheme"),
    pytest.param("recordingUrl", "voice.example/a.mp3", id="url-bare-host"),
    pytest.param("recordingUrl", "https://", id="url-no-host"),
    pytest.param("recordingUrl", "https://voice.example/a b.mp3", id="url-space"),
    pytest.param("duration", -1, id="duration-negative"),
    pytest.param("duration", 604801, id="duration-604801"),
    pytest.param("duration", 4.5, id="duration-fraction"),
    pytest.param("duration", "abc", id="duration-letters"),
    pytest.param("duration", "1e3", id="duration-exponent"),
    pytest.param("status", "COMPLETED", id="status-upper-case"),
    pytest.param("status", "complete", id="status-near-miss"),
    pytest.param("status", "answered", id="status-unknown"),
    pytest.param("status", "completed ", id="status-trailing-space"),
]


def encoded(fields: dict[str, object], mimetype: str) -> bytes:
    if mimetype == FORM:
        return urlencode({name: str(value) for name, value in fields.items()}).encode()
    return json.dumps(fields).encode()


@pytest.mark.parametrize("mimetype", [FORM, JSON_TYPE])
@pytest.mark.parametrize(("name", "value", "parsed"), ACCEPTED)
def test_a_value_the_contract_allows_parses_to_what_was_sent(name: str, value: object, parsed: object,
                                                             mimetype: str) -> None:
    fields = {"sessionId": "S1", "status": "completed", name: value}
    event_ = parse_event(decode_body(mimetype, encoded(fields, mimetype)))
    assert getattr(event_, ATTRIBUTE[name]) == parsed


@pytest.mark.parametrize("mimetype", [FORM, JSON_TYPE])
@pytest.mark.parametrize(("name", "value"), REFUSED)
def test_a_value_the_contract_refuses_is_refused_naming_the_field(name: str, value: object, mimetype: str) -> None:
    fields = {"sessionId": "S1", "status": "completed", name: value}
    with pytest.raises(InvalidPayload) as refused:
        parse_event(decode_body(mimetype, encoded(fields, mimetype)))
    assert refused.value.message.startswith(f"{name} "), refused.value.message


@given(
    session_id=printable,
    status=st.sampled_from(["completed", "failed", "busy", "no-answer", "rejected"]),
    phone=st.one_of(st.none(), st.from_regex(r"\+[0-9]{8,15}", fullmatch=True)),
    duration=st.one_of(st.none(), st.integers(0, 604800)),
    url=st.one_of(st.none(), st.just(""), st.from_regex(r"https://[a-z]{1,20}\.example/[a-z0-9]{0,40}\.mp3",
                                                         fullmatch=True)),
    extra=st.dictionaries(st.from_regex(r"x[a-z]{1,10}", fullmatch=True), st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x2FF, blacklist_characters="\x7f"), max_size=20),
        max_size=3),
)
def test_valid_payloads_are_one_event_whatever_the_encoding(session_id: str, status: str, phone: str | None,
                                                            duration: int | None, url: str | None,
                                                            extra: dict) -> None:
    fields: dict = {"sessionId": session_id, "status": status, **extra}
    if phone:
        fields["phoneNumber"] = phone
    if duration is not None:
        fields["duration"] = duration
    if url is not None:
        fields["recordingUrl"] = url
    as_json = parse_event(decode_body(JSON_TYPE, json.dumps(fields).encode()))
    reordered = dict(reversed(list(fields.items())))
    as_form = parse_event(decode_body(FORM, urlencode({k: str(v) for k, v in reordered.items()}).encode()))
    assert as_json.fingerprint == as_form.fingerprint
    assert (as_form.session_id, as_form.status, as_form.duration) == (session_id, status, duration)
    assert as_form.recording_url == (url or None)


def test_flask_never_answers_500_for_these(client, app: Flask) -> None:
    hostile = [
        ("a=1&" * 5000).encode(),  # thousands of fields
        b"sessionId=S&status=busy&status=busy",  # repeated
        b"sessionId=S\x00&status=busy",  # NUL
        b"%" * 1000,
    ]
    for body in hostile:
        response = client.post(URL, data=body, content_type=FORM)
        assert 400 <= response.status_code < 500, body[:40]
    for body in [b'{"sessionId": {"nested": {"deep": 1}}, "status": "busy"}', b"[]", b"null", b"1e999999",
                 b'{"sessionId": "S", "status": "busy", "x": "\\ud800"}', b"{" * 50000]:
        response = client.post(URL, data=body, content_type=JSON_TYPE)
        assert 400 <= response.status_code < 500, body[:40]
    assert app.extensions["redis"].hlen(PENDING_DATA) == 0
