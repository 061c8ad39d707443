"""Africa's Talking's real callbacks: names, the status table, live calls, unknown values, fixtures."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import uuid
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.base import logs, metrics
from app.base.errors import InvalidPayload
from app.operating.simulator import plan
from app.payload.africastalking import DECISIVE_CAUSES, OTHER_CAUSES
from app.payload.events import FORM, decode_body, parse_event
from app.plumbing.pending import PENDING_DATA
from config import DEFAULT_ACTIVE_CALL_XML, Settings

FIXTURES = Path(__file__).parent / "fixtures" / "africastalking"
URL = "/api/v1/voice/webhook"


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def fixture(name: str) -> bytes:
    return (FIXTURES / f"{name}.form").read_bytes()


def final(**fields: str) -> dict[str, str]:
    return {"sessionId": "ATVoice_t", "isActive": "0", "direction": "Outbound", "callerNumber": "+254711082000",
            "destinationNumber": "+254722123456", **fields}


@pytest.mark.parametrize(
    ("name", "status", "phone", "duration", "url"),
    [
        ("completed_with_recording", "completed", "+254722123456", 187,
         "https://voice.africastalking.com/recordings/fx_completed.mp3"),
        ("not_answered_subscriber_absent", "no-answer", "+254733456789", 0, None),
        ("busy", "busy", "+254744567890", 0, None),
        ("rejected", "rejected", "+254755678901", 3, None),  # Inbound: the caller is the participant
        ("live", "in-progress", "+254766789012", None, None),
    ],
)
def test_fixtures_map_to_the_contract(name: str, status: str, phone: str, duration: int | None,
                                      url: str | None) -> None:
    body = fixture(name)
    fields = decode_body(FORM, body)
    event = parse_event(fields)
    assert (event.status, event.phone_number, event.duration, event.recording_url) == (status, phone, duration, url)
    assert event.payload == fields  # every field AT sent is kept
    assert event.unknown_values == ()


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"status": "Completed", "callSessionState": "Completed", "hangupCause": "NORMAL_CLEARING"}, "completed"),
        ({"callSessionState": "Answered"}, "completed"),
        ({"hangupCause": "NORMAL_CLEARING"}, "completed"),
        ({"status": "NotAnswered", "hangupCause": "NORMAL_CLEARING"}, "no-answer"),
        ({"status": "NotAnswered", "hangupCause": "USER_BUSY"}, "busy"),
        ({"status": "Completed", "hangupCause": "USER_BUSY"}, "busy"),  # the cause is the more specific
        ({"status": "Failed", "hangupCause": "CALL_REJECTED"}, "rejected"),
        *[({"status": "NotAnswered", "hangupCause": cause}, "no-answer")
          for cause in ("NO_ANSWER", "NO_USER_RESPONSE", "SUBSCRIBER_ABSENT")],
        *[({"hangupCause": cause}, "failed") for cause in OTHER_CAUSES if cause != "NORMAL_CLEARING"],
        ({"status": "Busy"}, "busy"),
        ({"status": "Rejected"}, "rejected"),
        ({"callSessionState": "Ringing"}, "no-answer"),
        ({"status": "Aborted"}, "failed"),
        ({"status": "no-answer"}, "no-answer"),  # the contract's own values work in AT payloads too
        ({}, "failed"),  # a final request that says nothing known
        ({"isActive": "1", "status": "Completed"}, "in-progress"),
    ],
)
def test_status_table(fields: dict, status: str) -> None:
    assert parse_event(final(**fields)).status == status


def test_every_listed_hangup_cause_is_known() -> None:
    listed = {"NORMAL_CLEARING", "USER_BUSY", "CALL_REJECTED", "NO_ANSWER", "NO_USER_RESPONSE", "SUBSCRIBER_ABSENT",
              "ORIGINATOR_CANCEL", "UNALLOCATED_NUMBER", "NORMAL_TEMPORARY_FAILURE", "RECOVERY_ON_TIMER_EXPIRE",
              "SERVICE_UNAVAILABLE", "USER_NOT_REGISTERED", "LOSE_RACE", "UNSPECIFIED"}
    assert listed == set(DECISIVE_CAUSES) | set(OTHER_CAUSES)


@pytest.mark.parametrize(
    ("fields", "phone"),
    [
        ({"direction": "Outbound"}, "+254722123456"),
        ({"direction": "Inbound"}, "+254711082000"),
        ({"direction": ""}, "+254711082000"),
        ({"direction": "Outbound", "destinationNumber": ""}, "+254711082000"),
        ({"phoneNumber": "+254799999999"}, "+254799999999"),  # the seed's name wins
    ],
)
def test_participant_number_by_direction(fields: dict, phone: str) -> None:
    assert parse_event(final(status="Completed", **fields)).phone_number == phone


def test_duration_names() -> None:
    assert parse_event(final(durationInSeconds="42")).duration == 42
    assert parse_event(final(durationInSeconds="42", duration="43")).duration == 43
    with pytest.raises(InvalidPayload, match="durationInSeconds must be an integer"):
        parse_event(final(durationInSeconds="-1"))
    with pytest.raises(InvalidPayload, match=r"destinationNumber must be in E\.164"):
        parse_event(final(destinationNumber="0722123456"))
    with pytest.raises(InvalidPayload, match="isActive must be 0 or 1"):
        parse_event(final(isActive="yes"))


def test_unknown_values_are_accepted_kept_and_listed() -> None:
    event = parse_event(final(status="Teleported", hangupCause="SOLAR_FLARE", direction="Sideways"))
    assert event.status == "failed"
    assert set(event.unknown_values) == {("status", "Teleported"), ("hangupCause", "SOLAR_FLARE"),
                                         ("direction", "Sideways")}
    assert event.payload["hangupCause"] == "SOLAR_FLARE"


def test_the_seed_format_stays_strict() -> None:
    with pytest.raises(InvalidPayload, match="status must be one of"):
        parse_event({"sessionId": "S", "status": "Completed"})


def test_a_live_request_is_answered_with_call_control_xml(client: FlaskClient, app: Flask) -> None:
    response = client.post(URL, data=fixture("live"), content_type=FORM)
    assert response.status_code == 200
    assert response.mimetype == "application/xml"
    assert response.get_data(as_text=True) == DEFAULT_ACTIVE_CALL_XML
    [raw] = app.extensions["redis"].hvals(PENDING_DATA)
    assert json.loads(raw)["message"]["status"] == "in-progress"


def test_the_call_control_xml_is_configurable(make_app, settings: Settings) -> None:
    document = '<?xml version="1.0"?><Response><Say>Please hold</Say></Response>'
    client = make_app(dataclasses.replace(settings, voice_active_call_xml=document)).test_client()
    assert client.post(URL, data=fixture("live"), content_type=FORM).get_data(as_text=True) == document


def test_a_final_request_is_answered_with_json(client: FlaskClient) -> None:
    response = client.post(URL, data=fixture("busy"), content_type=FORM)
    assert response.get_json() == {"status": "webhook_processed", "session_id": "ATVoice_fx_busy"}


def test_unknown_values_are_counted_and_logged_once(client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    cause = f"NEW_CAUSE_{uuid.uuid4().hex[:8].upper()}"  # a value this process has never logged
    body = "&".join(f"{k}={v}" for k, v in final(hangupCause=cause).items()).replace("+", "%2B")
    before = metrics.UNKNOWN_AT_VALUES.labels(field="hangupCause")._value.get()
    lines = io.StringIO()
    monkeypatch.setattr(logs, "_handler", logging.StreamHandler(lines))  # where the service's lines go
    for _ in range(3):
        assert client.post(URL, data=body, content_type=FORM).status_code == 200
    assert metrics.UNKNOWN_AT_VALUES.labels(field="hangupCause")._value.get() == before + 3
    logged = [line for line in lines.getvalue().splitlines() if "unknown_at_value" in line and cause in line]
    assert len(logged) == 1, lines.getvalue()  # once, not once per delivery, and not never
    assert "hangupCause" in logged[0]


def test_simulated_calls_are_valid_at_requests() -> None:
    for requests in plan(calls=20, participants=3, seed=1, prefix="ATVoice_sim"):
        assert requests[0]["isActive"] == "1"
        events = [parse_event(r) for r in requests]
        assert events[0].status == "in-progress"
        assert all(e.status != "in-progress" for e in events if e.payload["isActive"] == "0")
        assert all(e.unknown_values == () for e in events)
