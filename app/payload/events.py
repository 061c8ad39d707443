"""Webhook payloads: decoding a body, validating its fields, and naming the event it carries.

Every rule a field follows is declared once, as a msgspec type below (:class:`WebhookPayload`
gathers them): validation converts each value to its type, and app.payload.openapi publishes the same
types as the document's JSON Schema. A type's ``Meta.extra`` holds what its refusal says. What
is left here by hand is the order of the checks, and which fields an Africa's Talking callback
has checked (see app.payload.africastalking). Plain functions, no Flask: tests call them directly.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, Any, Literal, get_args
from urllib.parse import parse_qsl

import msgspec
from msgspec import UNSET, Meta, UnsetType

from app.base.errors import InvalidPayload, UnsupportedMediaType
from app.payload import africastalking

FORM = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"

ContractStatus = Literal["completed", "failed", "busy", "no-answer", "rejected"]
STATUSES: tuple[str, ...] = get_args(ContractStatus)
MAX_DURATION = 604800
MAX_FIELDS = 64
MAX_VALUE_LENGTH = 2048
MAX_URL_LENGTH = 2048

_CONTROL = r"\x00-\x1f\x7f"
SURROGATES = r"\ud800-\udfff"  # JSON can spell them; no UTF-8 text holds one (nor JSON Schema's)
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
# An absolute http(s) URL: an ASCII host name or address, an optional port, then no whitespace
# or control character (and, as in any field, no lone surrogate).
_URL = rf"https?://[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?(?::{_PORT})?(?:[/?#][^\x00-\x20\x7f{SURROGATES}]*)?"


def _whole(pattern: str) -> str:
    r"""``pattern`` matching a whole value: msgspec searches for a pattern, and Python's ``$`` would
    let a final newline through, so the end is ``\Z`` (app.payload.openapi publishes it as JSON Schema's ``$``)."""
    return rf"^(?:{pattern})\Z"


def _refused(says: str, **meta: Any) -> Meta:
    """Constraints for a type, with what a value that breaks them is told (``{name}``: the field)."""
    return Meta(**meta, extra={"refusal": says})


# --- the declarations: every field's rules ----------------------------------------------------

FieldName = Annotated[str, _refused("field names must be 1-64 letters, digits or _.-[]",
                                    pattern=_whole(r"[A-Za-z0-9_.\-\[\]]{1,64}"))]
Text = Annotated[str, Meta(max_length=MAX_VALUE_LENGTH, pattern=_whole(f"[^{_CONTROL}{SURROGATES}]*"))]
_Scalar = Text | int | float | bool | None
Value = Annotated[_Scalar, Meta(description="any other field is kept with the event as received")]
AtValue = Annotated[_Scalar, Meta(description="AT's, kept with the event as received")]
SessionId = Annotated[str, _refused("{name} must be 1-128 printable characters without whitespace",
                                    pattern=_whole(r"[\x21-\x7e]{1,128}"))]
Status = Annotated[ContractStatus, _refused(f"{{name}} must be one of {', '.join(STATUSES)}")]
Phone = Annotated[str, _refused("{name} must be in E.164 format: + and 8 to 15 digits",
                                pattern=_whole(r"(?:\+[0-9]{8,15})?"), description="E.164; empty means none")]
RecordingUrl = Annotated[str, _refused(
    f"{{name}} must be an absolute http or https URL of at most {MAX_URL_LENGTH} characters",
    max_length=MAX_URL_LENGTH, pattern=_whole(f"(?:{_URL})?"),
    description="absolute http(s) URL; empty means no recording")]
Duration = Annotated[int, _refused(f"{{name}} must be an integer between 0 and {MAX_DURATION}", ge=0, le=MAX_DURATION)]
# Types whose refusal of a value that is not text says "must be a string" instead.
_TEXT_ONLY = (Phone, RecordingUrl)


class WebhookPayload(msgspec.Struct):
    ("The contract's fields (docs/contract.md), or Africa's Talking's own (isActive, direction, callerNumber, "
     "destinationNumber, durationInSeconds, callSessionState, hangupCause, ...): see "
     "app/payload/africastalking.py for how they map. Every field is kept with the event.")
    # (the string above is the class's docstring, published as the body's description)

    sessionId: SessionId  # the wire's names
    phoneNumber: UnsetType | Phone = UNSET
    recordingUrl: UnsetType | RecordingUrl = UNSET
    duration: UnsetType | Duration = UNSET
    status: UnsetType | Annotated[Text, Meta(
        description=f"one of {', '.join(STATUSES)}; or AT's own values (Completed, NotAnswered, ...) in a "
                    "payload with AT's fields")] = UNSET
    isActive: UnsetType | Annotated[Literal["0", "1"], Meta(description="1 while the call is live")] = UNSET
    direction: UnsetType | Annotated[Text, Meta(description="Inbound or Outbound")] = UNSET
    callerNumber: UnsetType | Phone = UNSET
    destinationNumber: UnsetType | Phone = UNSET
    durationInSeconds: UnsetType | Duration = UNSET
    callSessionState: UnsetType | Text = UNSET
    hangupCause: UnsetType | Text = UNSET
    dtmfDigits: UnsetType | AtValue = UNSET
    callStartTime: UnsetType | AtValue = UNSET
    callerCarrierName: UnsetType | AtValue = UNSET
    callerCountryCode: UnsetType | AtValue = UNSET
    currencyCode: UnsetType | AtValue = UNSET
    amount: UnsetType | AtValue = UNSET


# A form spells an integer in digits; JSON may spell it 420.0 (an integer, as JSON Schema has it).
_DIGITS = re.compile(r"[0-9]{1,7}")
_CONTROL_CHARACTER = re.compile(f"[{_CONTROL}]")
_SURROGATE = re.compile(f"[{SURROGATES}]")


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
        """The event a task message carries (see :meth:`to_message`)."""
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


# --- decoding ---------------------------------------------------------------------------------


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
            shown = name if _conforms(name, FieldName) else "a field with an invalid name"
            raise InvalidPayload(f"{shown} is given more than once", session_id=readable)
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


# --- validating -------------------------------------------------------------------------------
#
# A payload that breaks no rule is accepted by one or two msgspec calls over the types above
# (_accepted); any other is walked through field by field in the order below (_parse), which names
# the first rule broken. The one-call structs hold the same types, so both accept the same payloads
# (tests/test_events.py checks that they do).

# The contract's fields, in the order a refusal names the first bad one: (name, type, required).
_CONTRACT = (("sessionId", SessionId, True), ("status", Status, True), ("phoneNumber", Phone, False),
             ("recordingUrl", RecordingUrl, False), ("duration", Duration, False))
_Contract = msgspec.defstruct(
    "_Contract", [(name, kind) if required else (name, kind | None, None) for name, kind, required in _CONTRACT])
# AT's: every field the body declares; sessionId and the recording's URL by their own types, the
# others as any field's value (_parse_at then checks the ones it chooses by their own).
_At = msgspec.defstruct("_At", [("sessionId", SessionId), ("recordingUrl", RecordingUrl | None, None),
                                *[(name, Value, None) for name in WebhookPayload.__struct_fields__
                                  if name not in ("sessionId", "recordingUrl")]])
_Others = msgspec.defstruct("_Others", [("fields", dict[FieldName, Value])])  # any other field
# What msgspec raises for a value a type refuses: text with a lone surrogate may also fail its UTF-8
# lookup among a struct's field names or a Literal's values.
_REFUSED = (msgspec.ValidationError, UnicodeEncodeError)
# Each type alone, in a struct: msgspec compiles a struct's types once, a bare type's on every call.
_ALONE = {id(kind): msgspec.defstruct("_Alone", [("value", kind)], array_like=True)
          for kind in (FieldName, SessionId, Status, Phone, RecordingUrl, Duration)}


def parse_event(fields: dict[str, Any]) -> Event:
    """Validate decoded fields into an :class:`Event`; the error names the first bad field.

    Every field's name and value come first, in the order received; then ``sessionId``; then the
    contract's fields in :data:`_CONTRACT`'s order, or AT's (see :func:`_parse_at`). An error carries
    the ``sessionId`` whenever that is valid on its own.
    """
    try:
        return _accepted(fields) or _parse(fields)
    except InvalidPayload as error:
        error.session_id = _readable_session_id(fields.get("sessionId"))
        raise


def _accepted(fields: dict[str, Any]) -> Event | None:
    """The event, when one msgspec call finds the known fields valid and another the others; else None."""
    at = africastalking.is_at_payload(fields)
    known_fields = _At if at else _Contract
    others = fields.keys() - known_fields.__struct_fields__
    duration = fields.get("duration")
    typed = fields if at or duration is None or type(duration) is int else {**fields, "duration": _integer(duration)}
    try:
        if others:
            msgspec.convert({"fields": {name: fields[name] for name in others}}, _Others)
        known = msgspec.convert(typed, known_fields)
    except _REFUSED:
        return None
    if at:
        return _parse_at(known.sessionId, fields, known.recordingUrl or None)
    return Event(session_id=known.sessionId, status=known.status, phone_number=known.phoneNumber or None,
                 recording_url=known.recordingUrl or None, duration=known.duration, payload=dict(fields))


def _parse(fields: dict[str, Any]) -> Event:
    """The same rules, one field at a time in their order: raises naming the first that is broken."""
    for name, value in fields.items():
        if (refusal := _field_refusal(name, value)) is not None:
            raise InvalidPayload(refusal)
    session_id = _required(fields, "sessionId", SessionId)
    if africastalking.is_at_payload(fields):
        return _parse_at(session_id, fields)
    status, phone, url, duration = (_required(fields, name, kind) if required else _optional(fields, name, kind)
                                    for name, kind, required in _CONTRACT[1:])
    return Event(session_id=session_id, status=status, phone_number=phone, recording_url=url, duration=duration,
                 payload=dict(fields))


def _parse_at(session_id: str, fields: dict[str, Any], recording_url: str | UnsetType | None = UNSET) -> Event:
    """A callback in AT's own names and values (see app.payload.africastalking for the tables): of the
    fields that name the participant and the duration, only the ones chosen are checked; and the
    recording's URL, unless the caller already has."""
    live = _is_active(fields.get("isActive"))
    status, unknown = africastalking.map_status(fields, live)
    if fields.get("phoneNumber"):
        phone = _optional(fields, "phoneNumber", Phone)
    else:
        source, unknown_direction = africastalking.participant_field(fields)
        unknown += unknown_direction
        phone = _optional(fields, source, Phone) if source else None
    duration = _optional(fields, "duration" if fields.get("duration") not in (None, "") else "durationInSeconds",
                         Duration)
    return Event(
        session_id=session_id,
        status=status,
        phone_number=phone,
        recording_url=_optional(fields, "recordingUrl", RecordingUrl) if recording_url is UNSET else recording_url,
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


def _field_refusal(name: str, value: Any) -> str | None:
    """What a field breaks of FieldName and Value, in the order a refusal names it; None if nothing.

    A ``recordingUrl`` past the text limit breaks nothing here: its own rule names its length.
    """
    if _conforms({"fields": {name: value}}, _Others):
        return None
    if not _conforms(name, FieldName):
        return _says(FieldName, name)
    if not isinstance(value, str):
        return f"{name} must be a string or a number"
    if len(value) > MAX_VALUE_LENGTH and name != "recordingUrl":
        return f"{name} must be at most {MAX_VALUE_LENGTH} characters"
    if _CONTROL_CHARACTER.search(value):
        return f"{name} must not contain control characters"
    if _SURROGATE.search(value):
        return f"{name} must be valid Unicode text"
    return None


def _required(fields: dict[str, Any], name: str, kind: Any) -> Any:
    value = fields.get(name)
    if value is None or value == "":
        raise InvalidPayload(f"{name} is required")
    return _converted(name, value, kind)


def _optional(fields: dict[str, Any], name: str, kind: Any) -> Any:
    """The field's value as ``kind``; None when it is absent, empty or null."""
    value = fields.get(name)
    if value is None or value == "":
        return None
    return _converted(name, _integer(value) if kind is Duration else value, kind)


def _integer(value: Any) -> Any:
    """The integer that a form's digits or JSON's 420.0 spell; any other value as it is."""
    if value == "":
        return None
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _converted(name: str, value: Any, kind: Any) -> Any:
    """``value`` as the type ``kind`` declares it, else the refusal that names ``name``."""
    try:
        return _as(value, kind)
    except _REFUSED:
        if kind in _TEXT_ONLY and not isinstance(value, str):
            raise InvalidPayload(f"{name} must be a string") from None
        raise InvalidPayload(_says(kind, name)) from None


def _says(kind: Any, name: str) -> str:
    """The refusal a type declares, naming the field."""
    return str(get_args(kind)[1].extra["refusal"]).format(name=name)


def _as(value: Any, kind: Any) -> Any:
    """``value`` converted to ``kind`` (one of the declared types, or a struct); raises one of _REFUSED."""
    alone = _ALONE.get(id(kind))
    return msgspec.convert(value, kind) if alone is None else msgspec.convert((value,), alone).value


def _conforms(value: Any, kind: Any) -> bool:
    try:
        _as(value, kind)
    except _REFUSED:
        return False
    return True


def _readable_session_id(value: Any) -> str | None:
    """The session id when it is valid on its own (then an error may echo it), else None."""
    return value if isinstance(value, str) and _conforms(value, SessionId) else None
