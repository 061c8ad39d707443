"""Africa's Talking as it really is, against the running service: fixtures and the simulator."""

from __future__ import annotations

import json
import subprocess
from urllib.parse import parse_qsl

import pytest

from tests.e2e.conftest import SECRET, TOKEN
from tests.e2e.stack import BIN, Stack
from tests.support import ROOT

pytestmark = pytest.mark.e2e

FIXTURES = ROOT / "tests" / "fixtures" / "africastalking"


def post_fixture(stack: Stack, name: str) -> tuple[int, dict[str, str], bytes, dict[str, str]]:
    body = (FIXTURES / f"{name}.form").read_bytes()
    status, headers, data = stack.request("POST", "/api/v1/voice/webhook", body,
                                          {"Content-Type": "application/x-www-form-urlencoded"})
    return status, headers, data, dict(parse_qsl(body.decode(), keep_blank_values=True))


@pytest.mark.parametrize(
    ("name", "status"),
    [("completed_with_recording", "completed"), ("not_answered_subscriber_absent", "no-answer"), ("busy", "busy"),
     ("rejected", "rejected")],
)
def test_final_requests_become_recordings_and_keep_every_field(stack: Stack, name: str, status: str) -> None:
    code, _, body, sent = post_fixture(stack, name)
    assert code == 200 and json.loads(body)["status"] == "webhook_processed"
    session = sent["sessionId"]
    [event] = stack.wait_for_events(session, 1)
    assert event["payload"] == sent  # nothing AT sent is dropped
    assert stack.recording(session)["status"] == status


def test_a_live_request_gets_xml_and_never_overrides_the_final_status(stack: Stack) -> None:
    code, headers, body, sent = post_fixture(stack, "live")
    assert code == 200
    assert headers["Content-Type"].startswith("application/xml")
    assert body.startswith(b"<?xml") and b"<Response" in body
    session = sent["sessionId"]
    stack.wait_for_events(session, 1)
    assert stack.recording(session)["status"] == "in-progress"
    final = {**sent, "isActive": "0", "status": "Completed", "callSessionState": "Completed",
             "hangupCause": "NORMAL_CLEARING", "durationInSeconds": "61"}
    assert stack.post_form(final)[0] == 200
    stack.wait_for_events(session, 2)
    late_live = {**sent, "dtmfDigits": "5"}  # a live request arriving after the final one
    assert stack.request("POST", "/api/v1/voice/webhook", "&".join(f"{k}={v}" for k, v in late_live.items())
                         .replace("+", "%2B").encode(), {"Content-Type": "application/x-www-form-urlencoded"})[0] == 200
    stack.wait_until_idle()
    recording = stack.recording(session)
    assert (recording["status"], recording["duration"]) == ("completed", 61)
    assert [p["status"] for p in recording["participants"]] == ["completed"]


def run_simulator(stack: Stack, *args: str) -> dict:
    done = subprocess.run(
        [str(BIN / "flask"), "--app", "wsgi", "voice", "simulate",
         "--url", f"http://127.0.0.1:{stack.port}/api/v1/voice/webhook", "--expected", *args],
        cwd=ROOT, env=stack.env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_expected(stack: Stack, report: dict) -> None:
    stack.wait_until_idle()
    for session, expected in report["expected"].items():
        recording = stack.recording(session)
        assert recording is not None, session
        got = {"status": recording["status"], "duration": recording["duration"],
               "recording_url": recording["recording_url"],
               "participants": {p["phone_number"]: p["status"] for p in recording["participants"]}}
        assert got == expected, session


def test_simulator_plays_calls_and_every_recording_ends_as_the_rules_say(stack: Stack) -> None:
    report = run_simulator(stack, "--calls", "25", "--participants", "3", "--duplicates", "0.3", "--seed", "3")
    assert report["failed_requests"] == 0
    assert report["deliveries"] > report["requests"]  # some finals were delivered twice
    check_expected(stack, report)


@pytest.mark.parametrize("auth", [("--token", TOKEN), ("--secret", SECRET)])
def test_simulator_authenticates_as_told(secured: Stack, auth: tuple[str, str]) -> None:
    report = run_simulator(secured, "--calls", "5", "--participants", "2", "--duplicates", "0.5", "--seed", "4",
                           *auth)
    assert report["answers"].keys() == {"200"}
    check_expected(secured, report)
    without = subprocess.run(
        [str(BIN / "flask"), "--app", "wsgi", "voice", "simulate", "--url",
         f"http://127.0.0.1:{secured.port}/api/v1/voice/webhook", "--calls", "1"],
        cwd=ROOT, env=secured.env(), capture_output=True, text=True, timeout=120,
    )
    assert without.returncode == 1 and '"401"' in without.stdout

