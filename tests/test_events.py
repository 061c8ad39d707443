"""Decoding and validating webhook payloads: plain functions, no HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.base.errors import InvalidPayload, UnsupportedMediaType
from app.payload import events
from app.payload.events import FORM, JSON_TYPE, Event, decode_body, parse_event

SEED_COMPLETED = (
    b"sessionId=ATVoice_a1b2c3d4e5f6&phoneNumber=%2B254712345678&recordingUrl=https%3A%2F%2Fvoice.africastalking.com"
    b"%2Frecordings%2Fa1b2c3d4e5f6.mp3&duration=420&status=completed"
)


def parse(fields: dict) -> object:
    return parse_event(fields)


def test_seed_form_example_decodes_to_its_documented_values() -> None:
    event = parse_event(decode_body(FORM, SEED_COMPLETED))
    assert event.session_id == "ATVoice_a1b2c3d4e5f6"
    assert event.phone_number == "+254712345678"
    assert event.recording_url == "https://voice.africastalking.com/recordings/a1b2c3d4e5f6.mp3"
    assert event.duration == 420
    assert event.status == "completed"
    assert event.payload["duration"] == "420"  # kept exactly as received


def test_form_and_json_with_equal_fields_are_one_event() -> None:
    form = parse_event(decode_body(FORM, SEED_COMPLETED))
    as_json = json.dumps(
        {
            "status": "completed",
            "duration": 420,
            "recordingUrl": "https://voice.africastalking.com/recordings/a1b2c3d4e5f6.mp3",
            "phoneNumber": "+254712345678",
            "sessionId": "ATVoice_a1b2c3d4e5f6",
        }
    ).encode()
    assert parse_event(decode_body(JSON_TYPE, as_json)).fingerprint == form.fingerprint


def test_field_order_does_not_change_the_fingerprint() -> None:
    a = parse_event(decode_body(FORM, b"sessionId=S&status=busy&phoneNumber=%2B254700000001"))
    b = parse_event(decode_body(FORM, b"phoneNumber=%2B254700000001&status=busy&sessionId=S"))
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize(
    "changed",
    [{"status": "failed"}, {"duration": "421"}, {"phoneNumber": "+254700000002"}, {"sessionId": "T"},
     {"extra": "x"}],
)
def test_any_differing_field_makes_another_event(changed: dict) -> None:
    base = {"sessionId": "S", "status": "busy", "phoneNumber": "+254700000001", "duration": "420"}
    assert parse({**base, **changed}).fingerprint != parse(base).fingerprint


def test_empty_recording_url_means_no_recording() -> None:
    assert parse({"sessionId": "S", "status": "no-answer", "recordingUrl": ""}).recording_url is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"status": "completed"}, "sessionId is required"),
        ({"sessionId": "", "status": "completed"}, "sessionId is required"),
        ({"sessionId": "a b", "status": "completed"}, "sessionId must be"),
        ({"sessionId": "x" * 129, "status": "completed"}, "sessionId must be"),
        ({"sessionId": 12, "status": "completed"}, "sessionId must be"),
        ({"sessionId": "S"}, "status is required"),
        ({"sessionId": "S", "status": "done"}, "status must be one of"),
        ({"sessionId": "S", "status": "Completed"}, "status must be one of"),
        ({"sessionId": "S", "status": "busy", "phoneNumber": "254712345678"}, "phoneNumber must be in E.164"),
        ({"sessionId": "S", "status": "busy", "phoneNumber": "+1234567"}, "phoneNumber must be in E.164"),
        ({"sessionId": "S", "status": "busy", "phoneNumber": "+1234567890123456"}, "phoneNumber must be in E.164"),
        ({"sessionId": "S", "status": "busy", "recordingUrl": "ftp://x/y"}, "recordingUrl must be"),
        ({"sessionId": "S", "status": "busy", "recordingUrl": "/relative.mp3"}, "recordingUrl must be"),
        ({"sessionId": "S", "status": "busy", "recordingUrl": "https://" + "a" * 2050}, "recordingUrl must be"),
        ({"sessionId": "S", "status": "busy", "recordingUrl": "https://a b/c"}, "recordingUrl must be"),
        ({"sessionId": "S", "status": "busy", "duration": "-1"}, "duration must be an integer between 0 and 604800"),
        ({"sessionId": "S", "status": "busy", "duration": "604801"}, "duration must be an integer"),
        ({"sessionId": "S", "status": "busy", "duration": "4.5"}, "duration must be an integer"),
        ({"sessionId": "S", "status": "busy", "duration": 4.5}, "duration must be an integer"),
        ({"sessionId": "S", "status": "busy", "duration": 1e9}, "duration must be an integer"),
        ({"sessionId": "S", "status": "busy", "duration": True}, "duration must be an integer"),
        ({"sessionId": "S", "status": "busy", "duration": "1e3"}, "duration must be an integer"),
        ({"sessionId": "S", "status": "busy", "note": {"a": 1}}, "note must be a string or a number"),
        ({"sessionId": "S", "status": "busy", "note": [1]}, "note must be a string or a number"),
        ({"sessionId": "S", "status": "busy", "note": "a\x00b"}, "note must not contain control characters"),
        ({"sessionId": "S", "status": "busy", "bad name": "x"}, "field names must be"),
        ({"sessionId": "S", "status": "busy", "note": "\ud800"}, "note must be valid Unicode text"),
    ],
)
def test_invalid_fields_are_refused_naming_the_field(fields: dict, message: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        parse_event(fields)
    assert message in caught.value.message


def test_error_carries_the_session_id_once_it_was_readable() -> None:
    with pytest.raises(InvalidPayload) as caught:
        parse_event({"sessionId": "S1", "status": "busy", "duration": "x"})
    assert caught.value.session_id == "S1"
    with pytest.raises(InvalidPayload) as caught:
        parse_event({"sessionId": "a b", "status": "busy"})
    assert caught.value.session_id is None


@pytest.mark.parametrize("duration", [0, 604800, "0", "604800", 420, 420.0])
def test_duration_bounds_are_inclusive(duration: object) -> None:
    assert parse_event({"sessionId": "S", "status": "busy", "duration": duration}).duration == int(duration)


@pytest.mark.parametrize(
    ("mimetype", "body", "error", "message"),
    [
        ("text/plain", b"sessionId=S", UnsupportedMediaType, "Content-Type must be"),
        ("", b"sessionId=S", UnsupportedMediaType, "Content-Type must be"),
        (FORM, b"sessionId=\xff\xfe", InvalidPayload, "not valid UTF-8"),
        (FORM, b"sessionId=%ff", InvalidPayload, "not valid UTF-8"),
        (FORM, b"sessionId=S&sessionId=T&status=busy", InvalidPayload, "sessionId is given more than once"),
        (FORM, urlencode({f"f{i}": "x" for i in range(100)}).encode(), InvalidPayload, "more than 64 fields"),
        (JSON_TYPE, b"[1, 2]", InvalidPayload, "must be a JSON object"),
        (JSON_TYPE, b"\"text\"", InvalidPayload, "must be a JSON object"),
        (JSON_TYPE, b"{\"sessionId\":", InvalidPayload, "not valid JSON"),
        (JSON_TYPE, b"{\"duration\": NaN}", InvalidPayload, "not valid JSON"),
        (JSON_TYPE, b"[" * 100000, InvalidPayload, "not valid JSON"),
    ],
)
def test_bodies_that_do_not_decode(mimetype: str, body: bytes, error: type, message: str) -> None:
    with pytest.raises(error) as caught:
        decode_body(mimetype, body)
    assert message in caught.value.message


def test_blank_form_values_are_kept_as_received() -> None:
    fields = decode_body(FORM, b"sessionId=S&status=busy&recordingUrl=")
    assert fields == {"sessionId": "S", "status": "busy", "recordingUrl": ""}


@pytest.mark.parametrize(
    "fields",
    [
        {"sessionId": "S1", "status": "busy", "note": "a\x01b"},  # a control character in another field
        {"sessionId": "S1", "status": "busy", "bad name!": "x"},  # a field name that is not allowed
        {"status": "busy", "extra": "y" * 3000, "sessionId": "S1"},  # sessionId after the bad field
        {"sessionId": "S1", "status": "busy", "duration": [1]},  # neither string nor number
    ],
)
def test_a_field_error_carries_the_session_id_whatever_the_field_order(fields: dict) -> None:
    with pytest.raises(InvalidPayload) as caught:
        parse_event(fields)
    assert caught.value.session_id == "S1"


def test_a_repeated_form_field_error_carries_the_session_id() -> None:
    with pytest.raises(InvalidPayload) as caught:
        decode_body("application/x-www-form-urlencoded", b"status=busy&status=failed&sessionId=S1")
    assert caught.value.session_id == "S1"
    with pytest.raises(InvalidPayload) as caught:  # two session ids: neither is "the" readable one
        decode_body("application/x-www-form-urlencoded", b"sessionId=S1&sessionId=S2")
    assert caught.value.session_id is None


# --- one msgspec call over whole structs, or the fields one by one: the same answer -----------

NAMES = ["sessionId", "status", "phoneNumber", "recordingUrl", "duration", "isActive", "direction", "callerNumber",
         "destinationNumber", "durationInSeconds", "callSessionState", "hangupCause", "dtmfDigits", "amount", "note",
         "bad name"]
VALUES = st.one_of(
    st.sampled_from(["", "S1", "a b", "completed", "busy", "Completed", "Teleported", "+254712345678", "+1234567",
                     "0", "1", "yes", "420", "0420", "604801", "1e3", "https://voice.example/a.mp3", "ftp://x",
                     "https://voice.example/\ud800", "Inbound", "Sideways", "USER_BUSY", "a\x00b", "S1\n",
                     "x" * 2049, "https://" + "a" * 2050]),
    st.text(max_size=8), st.none(), st.booleans(), st.integers(-1, 700000), st.sampled_from([420.0, 4.5, 1e9]),
    st.lists(st.integers(), max_size=1),
)


def outcome(parse: Callable[[dict], Event | None], fields: dict) -> tuple | None:
    try:
        event = parse(fields)
    except InvalidPayload as error:
        return ("refused", error.message)
    return None if event is None else ("accepted", event, event.unknown_values)


@given(st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=4)), VALUES, max_size=8))
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_the_one_call_check_and_the_field_by_field_walk_agree(fields: dict) -> None:
    """parse_event first checks whole structs of the declared types in one msgspec call each
    (_accepted), and walks the fields in order only when that fails (_parse): a payload that one
    accepts, the other accepts as the same event; one that the walk refuses, the first never accepts."""
    walked, quick = outcome(events._parse, fields), outcome(events._accepted, fields)
    assert quick is None or quick == walked
    if walked[0] == "accepted":
        assert quick == walked  # a valid payload never needs the walk
