"""Hostile input against the running service: no 5xx, nothing written, no secret in any log."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import socket
import time
import uuid

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.e2e.conftest import SECRET, STACKS, TOKEN
from tests.e2e.stack import API_KEY, Stack
from tests.support import sent_to_redis, wait_for

pytestmark = pytest.mark.e2e

PHONE = "+254712345678"


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    reply = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def raw_exchange(stack: Stack, data: bytes) -> bytes:
    """Send bytes exactly as they are and read the whole answer."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=60) as sock:
        sock.sendall(data)
        return read_all(sock)


def request_bytes(body: bytes, content_type: str = "application/x-www-form-urlencoded", extra: str = "") -> bytes:
    return (f"POST /api/v1/voice/webhook?token={TOKEN} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def status_of(reply: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", reply)
    assert match, reply[:200]
    return int(match.group(1))


HOSTILE = {
    "malformed UTF-8": request_bytes(b"sessionId=\xc3\x28&status=busy"),
    "thousands of fields": request_bytes(b"&".join(b"f%d=x" % i for i in range(5000))),
    "repeated fields": request_bytes(b"sessionId=A&sessionId=B&status=busy"),
    "NUL byte": request_bytes(b"sessionId=A%00B&status=busy"),
    "raw NUL byte": request_bytes(b"sessionId=A\x00B&status=busy"),
    "nested JSON": request_bytes(b'{"sessionId": {"a": {"b": [1, 2]}}, "status": "busy"}', "application/json"),
    "JSON array": request_bytes(b'[{"sessionId": "A", "status": "busy"}]', "application/json"),
    "JSON string": request_bytes(b'"sessionId=A"', "application/json"),
    "deep JSON": request_bytes(b"[" * 30000 + b"]" * 30000, "application/json"),
    "huge number": request_bytes(b'{"sessionId": "A", "status": "busy", "duration": 1' + b"0" * 5000 + b"}",
                                 "application/json"),
    "very long header": request_bytes(b"sessionId=A&status=busy", extra="X-Long: " + "a" * 20000 + "\r\n"),
    "too many headers": request_bytes(b"sessionId=A&status=busy",
                                      extra="".join(f"X-H{i}: v\r\n" for i in range(150))),
    "lying content length": (f"POST /api/v1/voice/webhook?token={TOKEN} HTTP/1.1\r\nHost: x\r\n"
                             "Connection: close\r\nContent-Type: application/json\r\nContent-Length: -5\r\n\r\n{}"
                             ).encode(),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_requests_get_a_4xx_and_write_nothing(secured: Stack, name: str) -> None:
    client = redis.Redis.from_url(secured.redis.url)
    before = client.hlen("voice:pending:data")
    reply = raw_exchange(secured, HOSTILE[name])
    assert 400 <= status_of(reply) < 500, reply[:300]
    assert b"Traceback" not in reply
    assert client.hlen("voice:pending:data") == before


def test_a_slow_body_is_cut_off_and_others_are_still_served(secured: Stack) -> None:
    run = uuid.uuid4().hex[:8]
    slow_session, fast_sessions = f"SLOW_{run}", [f"FAST{n}_{run}" for n in range(5)]
    body = f"sessionId={slow_session}&status=busy".encode()
    seen: dict[str, object] = {}

    def exchange() -> None:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", secured.port), timeout=60) as slow:
            data = request_bytes(body)
            slow.sendall(data[:-10])  # headers and most of the body, then nothing
            # Meanwhile the service still answers everyone else.
            seen["fast"] = [secured.post_form(f"sessionId={session}&status=busy",
                                              path=f"/api/v1/voice/webhook?token={TOKEN}")[0]
                            for session in fast_sessions]
            seen["reply"] = read_all(slow)
        seen["waited"] = time.monotonic() - started
        for session in fast_sessions:
            secured.wait_for_events(session, 1)
        secured.wait_until_idle()

    # Every command sent to Redis meanwhile (the web's publishes carry the event's pending entry,
    # session id in clear, as a script's arguments), until the others are applied and nothing is
    # pending: what was queued at any moment, not only what is still queued at the end.
    commands = [entry["command"] for entry in sent_to_redis(secured.redis.url, exchange)]
    assert seen["fast"] == [200] * len(fast_sessions)
    assert seen["waited"] < 20  # the server does not wait on a stalled body for ever
    assert status_of(seen["reply"]) == 408, seen["reply"][:200]
    # The capture did see the others queued (so it would have seen the slow one)...
    for session in fast_sessions:
        assert any(session in command for command in commands), session
    # ...and nothing of the cut-off request was ever queued, or applied.
    assert not [command for command in commands if slow_session in command]
    assert secured.recording(slow_session) is None


def test_responses_carry_no_server_version_and_safe_headers(secured: Stack) -> None:
    for method, path in [("POST", f"/api/v1/voice/webhook?token={TOKEN}"), ("GET", "/api/v1/voice/recordings")]:
        status, headers, _ = secured.request(method, path, b"sessionId=H&status=busy" if method == "POST" else None,
                                             {"Content-Type": "application/x-www-form-urlencoded",
                                              "Authorization": f"Bearer {API_KEY}"})
        assert status == 200
        assert not re.search(r"\d", headers.get("Server", ""))
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == "no-store"


def test_no_secret_token_key_or_phone_number_reaches_the_logs(secured: Stack) -> None:
    run = uuid.uuid4().hex[:8]
    session = f"LOGS_{run}"
    request_ids = [f"logs-{run}-{n}" for n in range(3)]
    body = f"sessionId={session}&phoneNumber=%2B254712345678&status=completed&duration=3".encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    form = "application/x-www-form-urlencoded"
    assert secured.request("POST", f"/api/v1/voice/webhook?token={TOKEN}", body,
                           {"Content-Type": form, "X-Request-ID": request_ids[0]})[0] == 200
    assert secured.request("POST", "/api/v1/voice/webhook", body.replace(b"=3", b"=4"),
                           {"Content-Type": form, "X-Webhook-Signature": signature,
                            "X-Request-ID": request_ids[1]})[0] == 401  # a wrong signature, logged as refused
    assert secured.request("POST", "/api/v1/voice/webhook?token=wrong-" + TOKEN, body,
                           {"Content-Type": form, "X-Request-ID": request_ids[2]})[0] == 401
    secured.wait_for_events(session, 1)
    assert secured.get(f"/api/v1/voice/recordings/{session}")[0] == 200
    secured.get("/api/v1/voice/recordings/none")

    def logged() -> bool:
        """The web's line for each of the three webhooks, and the worker's for the one applied."""
        web, worker = secured.log("web"), secured.log("worker")
        return (all(f'"request_id": "{rid}"' in web for rid in request_ids)
                and any(session in line and '"event": "event_applied"' in line for line in worker.splitlines()))

    wait_for(logged, timeout=30)
    logs = secured.log("web") + secured.log("worker")
    assert '"event": "event_applied"' in logs and '"event": "webhook"' in logs  # the logs were captured
    for secret in (TOKEN, SECRET, signature, API_KEY, PHONE, "254712345678"):
        assert secret not in logs, f"{secret[:6]}... appears in a log"
    assert "+254******678" in logs


# --- schemathesis: every documented operation, generated inputs, against the running service ---


# The read API's queries differ by database; the broker plays no part in what is checked here.
DATABASES = [param for param in STACKS if param.id in {"sqlite-redis", "postgresql-redis"}]


@pytest.mark.parametrize("stack", DATABASES, indirect=True)
def test_schemathesis_no_5xx_and_responses_match_the_schema(stack: Stack) -> None:
    """Every operation in /openapi.json, with generated inputs, over HTTP: no 5xx, and every
    answer (status, headers, body) matches the document."""
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{stack.port}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    document = json.loads(stack.request("GET", "/openapi.json")[2])
    assert {op.path for op in operations} == set(document["paths"]) - {"/openapi.json"}  # it skips its own URL
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            # positive_data_acceptance expects 2xx for any schema-valid input; an opaque cursor (or a
            # recording id) that the service never issued is schema-valid and rightly refused.
            response = case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"},
                                              excluded_checks=[positive_data_acceptance])
            assert response.status_code < 500

        check()
