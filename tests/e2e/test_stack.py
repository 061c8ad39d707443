"""End to end: real gunicorn, a real Celery worker and their own Redis, over HTTP."""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.stack import Stack
from tests.support import wait_for

pytestmark = pytest.mark.e2e

SEED_URL = "https://voice.africastalking.com/recordings/a1b2c3d4e5f6.mp3"


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def test_seed_examples(stack: Stack) -> None:
    completed, failed = unique("ATVoice"), unique("ATVoice")
    status, body = stack.post_form(
        f"sessionId={completed}&phoneNumber=%2B254712345678&recordingUrl=https%3A%2F%2Fvoice.africastalking.com"
        "%2Frecordings%2Fa1b2c3d4e5f6.mp3&duration=420&status=completed"
    )
    assert (status, body) == (200, {"status": "webhook_processed", "session_id": completed})
    assert stack.post_form(f"sessionId={failed}&phoneNumber=%2B254787654321&status=no-answer")[0] == 200

    stack.wait_for_events(completed, 1)
    recording = stack.recording(completed)
    assert recording["status"] == "completed"
    assert (recording["duration"], recording["recording_url"]) == (420, SEED_URL)
    assert recording["participants"][0]["phone_number"] == "+254712345678"
    assert recording["created_at"].endswith("Z") and recording["processed_at"] >= recording["created_at"]

    stack.wait_for_events(failed, 1)
    recording = stack.recording(failed)
    assert (recording["status"], recording["duration"], recording["recording_url"]) == ("no-answer", None, None)


def test_json_curl_example(stack: Stack) -> None:
    session = unique("json")
    status, body = stack.post_json({"sessionId": session, "phoneNumber": "+254712345678", "recordingUrl": "",
                                    "duration": 123, "status": "completed"})
    assert (status, body["status"]) == (200, "webhook_processed")
    [event] = stack.wait_for_events(session, 1)
    assert event["payload"]["duration"] == 123
    assert stack.recording(session)["duration"] == 123


def test_ten_identical_posts_at_once_are_one_event(stack: Stack) -> None:
    session = unique("dup")
    form = f"sessionId={session}&phoneNumber=%2B254712345678&duration=60&status=completed"
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: stack.post_form(form)[0], range(10)))
    assert answers == [200] * 10
    stack.wait_for_events(session, 1)
    stack.wait_until_idle()
    assert len(stack.events(session)) == 1
    recording = stack.recording(session)
    assert (recording["status"], recording["duration"], len(recording["participants"])) == ("completed", 60, 1)


def test_participants_racing_on_sessions_lose_no_update(stack: Stack) -> None:
    """Two participants per session, all posted at once over 20 sessions; every update must land."""
    sessions = [unique("race") for _ in range(20)]
    posts = []
    for session in sessions:
        posts.append({"sessionId": session, "phoneNumber": "+254712345678", "duration": "300", "status": "completed",
                      "recordingUrl": SEED_URL})
        posts.append({"sessionId": session, "phoneNumber": "+254787654321", "duration": "0", "status": "no-answer"})
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda fields: stack.post_form(fields)[0], posts))
    assert answers == [200] * len(posts)
    stack.wait_until_idle()
    for session in sessions:
        recording = stack.recording(session)
        assert recording["status"] == "completed", session
        assert recording["recording_url"] == SEED_URL
        assert sorted((p["phone_number"], p["status"]) for p in recording["participants"]) == [
            ("+254712345678", "completed"), ("+254787654321", "no-answer")]
        assert len(stack.events(session)) == 2


def test_bad_input_is_refused_and_nothing_is_written(stack: Stack) -> None:
    session = unique("bad")
    assert stack.post_form(f"sessionId={session}&status=completed&duration=-5") == (
        400, {"status": "webhook_error", "error": "duration must be an integer between 0 and 604800",
              "session_id": session})
    status, _, body = stack.request("POST", "/api/v1/voice/webhook", b"<xml/>", {"Content-Type": "text/xml"})
    assert status == 415 and json.loads(body)["status"] == "webhook_error"
    status, _, body = stack.request("POST", "/api/v1/voice/webhook", b"sessionId=\xff&status=busy",
                                    {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and b"Traceback" not in body
    stack.wait_until_idle()
    assert stack.recording(session) is None


def test_chunked_body_over_the_limit_is_413(stack: Stack) -> None:
    """Without a Content-Length the limit still holds while the body streams in."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(b"POST /api/v1/voice/webhook HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"a" * 8192
        try:
            for _ in range(10):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server may answer and close before the body ends
        reply = b""
        while data := sock.recv(65536):
            reply += data
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"webhook_error" in reply


def test_read_api_over_http(stack: Stack) -> None:
    session = unique("read")
    stack.post_form({"sessionId": session, "phoneNumber": "+254712345678", "status": "busy"})
    stack.wait_for_events(session, 1)
    status, body = stack.get("/api/v1/voice/recordings?limit=500")
    assert status == 200 and session in [r["recording_id"] for r in body["recordings"]]
    status, _, data = stack.request("GET", f"/api/v1/voice/recordings/{session}")
    assert status == 401 and json.loads(data) == {"error": "missing bearer token"}


def test_metrics_add_up_across_processes(stack: Stack) -> None:
    """Two gunicorn workers and two Celery processes write samples; each role's scrape adds its own up."""
    before_web, before_events = _sample(stack, WEB_ACCEPTED), _worker_sample(stack, EVENTS_APPLIED)
    sessions = [unique("m") for _ in range(6)]
    for session in sessions:
        assert stack.post_form({"sessionId": session, "status": "busy"})[0] == 200
    for session in sessions:
        stack.wait_for_events(session, 1)
    assert _sample(stack, WEB_ACCEPTED) == before_web + 6
    wait_for(lambda: _worker_sample(stack, EVENTS_APPLIED) == before_events + 6, timeout=10)
    _, text = stack.get("/metrics")
    assert "voice_webhook_ack_seconds_bucket" in text
    assert 'voice_queue_depth{queue="voice-webhooks"}' in text
    assert "voice_pending_events " in text and "voice_dead_letters " in text


def test_the_worker_consumes_from_the_configured_broker(stack: Stack) -> None:
    transport = next(line for line in stack.log("worker").splitlines() if "transport:" in line)
    expected = "amqp://" if "CELERY_BROKER_URL" in stack.extra_env else "app.plumbing.transport:Transport://"
    assert expected in transport  # Redis: kombu's transport with the service's client reuse


def test_worker_metrics_port(stack: Stack) -> None:
    """The worker's own scrape endpoint counts the events it applied (one applied here, so the test
    does not depend on another having run first)."""

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5).read().decode()

    before = _sample_of(scrape(), EVENTS_APPLIED)
    session = unique("wm")
    assert stack.post_form({"sessionId": session, "status": "busy"})[0] == 200
    stack.wait_for_events(session, 1)
    wait_for(lambda: _sample_of(scrape(), EVENTS_APPLIED) >= before + 1, timeout=10)
    assert "voice_queue_depth" in scrape()


def test_readiness_reports_every_dependency_with_latency(stack: Stack) -> None:
    status, body = stack.get("/readyz")
    assert status == 200
    assert set(body["checks"]) == {"database", "redis", "broker"}
    assert all(check["ok"] and check["latency_ms"] >= 0 for check in body["checks"].values())


def test_request_id_travels_into_the_task_log(stack: Stack) -> None:
    session, request_id = unique("rid"), f"trace-{uuid.uuid4().hex[:8]}"
    status, headers, _ = stack.request("POST", "/api/v1/voice/webhook",
                                       f"sessionId={session}&status=busy".encode(),
                                       {"Content-Type": "application/x-www-form-urlencoded",
                                        "X-Request-ID": request_id})
    assert status == 200 and headers["X-Request-ID"] == request_id
    stack.wait_for_events(session, 1)
    web_line = _log_line(stack, "web", request_id)
    task_line = wait_for(lambda: _log_line(stack, "worker", request_id))
    assert web_line["event"] == "webhook" and web_line["session_id"] == session
    assert task_line["event"] == "event_applied" and task_line["session_id"] == session


WEB_ACCEPTED = 'voice_webhooks_total{outcome="accepted",reason="ok"}'
EVENTS_APPLIED = 'voice_events_total{outcome="applied"}'


def _sample(stack: Stack, name: str) -> float:
    status, text = stack.get("/metrics")
    assert status == 200
    return _sample_of(text, name)


def _sample_of(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _worker_sample(stack: Stack, name: str) -> float:
    text = wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics",
                                                   timeout=5).read().decode())
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _log_line(stack: Stack, name: str, request_id: str) -> dict | None:
    for line in stack.log(name).splitlines():
        if request_id in line and line.startswith("{"):
            entry = json.loads(line)
            if entry.get("request_id") == request_id and entry["event"] in {"webhook", "event_applied"}:
                return entry
    return None
