"""Webhook payloads: decoding a body, validating its fields, and naming the event it carries.

Plain functions, no Flask: the view hands them bytes and a media type; tests call them directly.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import parse_qsl

from app import africastalking
from app.errors import InvalidPayload, UnsupportedMediaType

FORM = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"

STATUSES = ("completed", "failed", "busy", "no-answer", "rejected")
MAX_DURATION = 604800
MAX_FIELDS = 64
MAX_FIELD_NAME = 64
MAX_VALUE_LENGTH = 2048
MAX_URL_LENGTH = 2048

# Patterns the OpenAPI document publishes as they are.
SESSION_ID_PATTERN = r"[\x21-\x7e]{1,128}"
PHONE_PATTERN = r"\+[0-9]{8,15}"
FIELD_NAME_PATTERN = rf"[A-Za-z0-9_.\-\[\]]{{1,{MAX_FIELD_NAME}}}"
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
# An absolute http(s) URL: an ASCII host name or address, an optional port, then no whitespace
# or control character.
URL_PATTERN = rf"https?://[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?(?::{_PORT})?(?:[/?#][^\x00-\x20\x7f]*)?"
TEXT_PATTERN = r"[^\x00-\x1f\x7f]*"  # any text without control characters

_SESSION_ID = re.compile(SESSION_ID_PATTERN)
_PHONE = re.compile(PHONE_PATTERN)
_URL = re.compile(URL_PATTERN)
_DIGITS = re.compile(r"[0-9]{1,7}")
_FIELD_NAME = re.compile(FIELD_NAME_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON can spell them; no UTF-8 text holds one


@dataclass(frozen=True)
class Event:
    """One webhook event, validated. ``payload`` keeps every field exactly as it was received."""

    session_id: str
    status: str
    phone_number: str | None = None
    recording_url: str | None = None
    duration: int | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    # The sender's own id for the message (Standard Webhooks' webhook-id), when it gave one: the
    # key deliveries are deduplicated by in Redis. The database still compares content.
    idempotency_key: str | None = None
    # AT values the mapping tables did not know: (field, value). Kept raw in ``payload`` anyway.
    unknown_values: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @cached_property
    def key(self) -> str:
        """What identifies this event in Redis: the sender's id, else the content fingerprint."""
        if self.idempotency_key:
            return hashlib.sha256(f"webhook-id:{self.idempotency_key}".encode()).hexdigest()
        return self.fingerprint

    @cached_property
    def fingerprint(self) -> str:
        """Identical for deliveries whose decoded fields are equal, whatever the encoding."""
        canonical = {name: _canonical(value) for name, value in self.payload.items()}
        canonical.update(
            sessionId=self.session_id,
            status=self.status,
            phoneNumber=self.phone_number,
            recordingUrl=self.recording_url,
            duration=self.duration,
        )
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_message(self) -> dict[str, Any]:
        """Plain values for a task message."""
        return {
            "session_id": self.session_id,
            "status": self.status,
            "phone_number": self.phone_number,
            "recording_url": self.recording_url,
            "duration": self.duration,
            "payload": self.payload,
            "idempotency_key": self.idempotency_key,
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Event:
        return cls(
            session_id=message["session_id"],
            status=message["status"],
            phone_number=message.get("phone_number"),
            recording_url=message.get("recording_url"),
            duration=message.get("duration"),
            payload=dict(message.get("payload") or {}),
            idempotency_key=message.get("idempotency_key"),
        )


def _canonical(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def decode_body(mimetype: str, body: bytes) -> dict[str, Any]:
    """The fields of a form or JSON body; 415 for any other type, 400 when it does not decode."""
    if mimetype == FORM:
        return _decode_form(body)
    if mimetype == JSON_TYPE:
        return _decode_json(body)
    raise UnsupportedMediaType(f"Content-Type must be {FORM} or {JSON_TYPE}")


def _decode_text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPayload("body is not valid UTF-8") from None


def _decode_form(body: bytes) -> dict[str, Any]:
    text = _decode_text(body)
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS, errors="strict")
    except UnicodeDecodeError:
        raise InvalidPayload("body is not valid UTF-8 once percent-decoded") from None
    except ValueError:
        raise InvalidPayload(f"body has more than {MAX_FIELDS} fields") from None
    fields: dict[str, Any] = {}
    for name, value in pairs:
        if name in fields:
            session_ids = [v for n, v in pairs if n == "sessionId"]
            readable = _readable_session_id(session_ids[0]) if len(session_ids) == 1 else None
            raise InvalidPayload(f"{_shown(name)} is given more than once", session_id=readable)
        fields[name] = value
    return fields


def _decode_json(body: bytes) -> dict[str, Any]:
    text = _decode_text(body)
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise InvalidPayload("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidPayload("body must be a JSON object")
    if len(data) > MAX_FIELDS:
        raise InvalidPayload(f"body has more than {MAX_FIELDS} fields",
                             session_id=_readable_session_id(data.get("sessionId")))
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _shown(name: str) -> str:
    """A field name safe to echo in an error message."""
    return name if _FIELD_NAME.fullmatch(name) else "a field with an invalid name"


def parse_event(fields: dict[str, Any]) -> Event:
    """Validate decoded fields into an :class:`Event`; the error names the first bad field.

    ``sessionId`` is read first, so that an error about any other field carries it when it is valid.
    """
    readable = _readable_session_id(fields.get("sessionId"))
    try:
        for name, value in fields.items():
            _check_field(name, value)
        session_id = _session_id(fields.get("sessionId"))
        if africastalking.is_at_payload(fields):
            return _parse_at(session_id, fields)
        return Event(
            session_id=session_id,
            status=_status(fields.get("status")),
            phone_number=_phone(fields.get("phoneNumber")),
            recording_url=_recording_url(fields.get("recordingUrl")),
            duration=_duration(fields.get("duration")),
            payload=dict(fields),
        )
    except InvalidPayload as error:
        error.session_id = readable
        raise


def _readable_session_id(value: Any) -> str | None:
    """The session id when it is valid on its own (then an error may echo it), else None."""
    return value if isinstance(value, str) and _SESSION_ID.fullmatch(value) else None


def _parse_at(session_id: str, fields: dict[str, Any]) -> Event:
    """A callback in AT's own names and values (see app.africastalking for the tables)."""
    live = _is_active(fields.get("isActive"))
    status, unknown = africastalking.map_status(fields, live)
    if fields.get("phoneNumber"):
        phone = _phone(fields["phoneNumber"])
    else:
        source, unknown_direction = africastalking.participant_field(fields)
        unknown += unknown_direction
        phone = _phone(fields[source], source) if source else None
    if fields.get("duration") not in (None, ""):
        duration = _duration(fields["duration"])
    else:
        duration = _duration(fields.get("durationInSeconds"), "durationInSeconds")
    return Event(
        session_id=session_id,
        status=status,
        phone_number=phone,
        recording_url=_recording_url(fields.get("recordingUrl")),
        duration=duration,
        payload=dict(fields),
        unknown_values=tuple(unknown),
    )


def _is_active(value: Any) -> bool:
    if value in (None, "", "0", 0, False):
        return False
    if value in ("1", 1, True):
        return True
    raise InvalidPayload("isActive must be 0 or 1")


def _check_field(name: str, value: Any) -> None:
    if not _FIELD_NAME.fullmatch(name):
        raise InvalidPayload("field names must be 1-64 letters, digits or _.-[]")
    if isinstance(value, bool) or value is None or isinstance(value, int | float):
        return
    if not isinstance(value, str):
        raise InvalidPayload(f"{name} must be a string or a number")
    if len(value) > MAX_VALUE_LENGTH and name != "recordingUrl":
        raise InvalidPayload(f"{name} must be at most {MAX_VALUE_LENGTH} characters")
    if _CONTROL.search(value):
        raise InvalidPayload(f"{name} must not contain control characters")
    if _SURROGATE.search(value):
        raise InvalidPayload(f"{name} must be valid Unicode text")


def _optional_string(name: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidPayload(f"{name} must be a string")
    return value


def _session_id(value: Any) -> str:
    if value is None or value == "":
        raise InvalidPayload("sessionId is required")
    if not isinstance(value, str) or not _SESSION_ID.fullmatch(value):
        raise InvalidPayload("sessionId must be 1-128 printable characters without whitespace")
    return value


def _status(value: Any) -> str:
    if value is None or value == "":
        raise InvalidPayload("status is required")
    if value not in STATUSES:
        raise InvalidPayload(f"status must be one of {', '.join(STATUSES)}")
    return value


def _phone(value: Any, name: str = "phoneNumber") -> str | None:
    phone = _optional_string(name, value)
    if phone is not None and not _PHONE.fullmatch(phone):
        raise InvalidPayload(f"{name} must be in E.164 format: + and 8 to 15 digits")
    return phone


def _recording_url(value: Any) -> str | None:
    url = _optional_string("recordingUrl", value)
    if url is None:
        return None
    if len(url) > MAX_URL_LENGTH or not _URL.fullmatch(url):
        raise InvalidPayload(
            f"recordingUrl must be an absolute http or https URL of at most {MAX_URL_LENGTH} characters"
        )
    return url


def _duration(value: Any, name: str = "duration") -> int | None:
    if value is None or value == "":
        return None
    message = f"{name} must be an integer between 0 and {MAX_DURATION}"
    if isinstance(value, bool):
        raise InvalidPayload(message)
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise InvalidPayload(message)
        value = int(value)
    if isinstance(value, float) and value.is_integer():  # 420.0 is an integer, as JSON Schema has it
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= MAX_DURATION:
        raise InvalidPayload(message)
    return value
